"""From a prepared ``inst_it_dataset`` split back to our data path: the annotation records that
``instit-build-data`` uses, the TFRecord shards it writes (same payloads as building from JSON + media),
or a random-access source that ``instit_jax.data.pipeline.build_pipeline`` reads directly.

    python -m instit_jax.data.tfds.convert --data-dir ~/tensorflow_datasets --config video --out shards/
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from PIL import Image

from data_gen.frames import uniform_frame_indices
from instit_jax.data.annotations_to_llava import LEVELS, annotations_to_llava
from instit_jax.data.records import parse_sample, sample_features, write_shards
from instit_jax.data.schema import FrameAnnotation, ImageAnnotation, QAPair, VideoAnnotation


class KeepEncoded(tfds.decode.Decoder):
    """A TFDS decoder that returns an image feature's stored bytes (no pixel decoding, no TensorFlow)."""

    def decode_example(self, serialized_example):  # the tf.data path is not used here
        raise NotImplementedError("KeepEncoded is for as_data_source (NumPy); use tfds.decode.SkipDecoding")

    def decode_example_np(self, serialized_example):
        return bytes(serialized_example)

    def decode_batch_example_np(self, serialized_example):
        return [bytes(x) for x in serialized_example]


def open_split(data_dir: str, config: str, split: str = "train") -> Sequence[dict]:
    """Random-access source of a prepared ``inst_it_dataset/<config>`` split, images kept as encoded bytes."""
    import instit_jax.data.tfds.inst_it_dataset  # noqa: F401  (registers the builder)

    builder = tfds.builder(f"inst_it_dataset/{config}", data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(f"inst_it_dataset/{config} is not prepared under {data_dir!r}; run `tfds build` "
                                "or builder.download_and_prepare(...) first (docs/tfds.md)")
    decoders = {"image": KeepEncoded()} if config == "image" else {"frames": {"image": KeepEncoded()}}
    return builder.as_data_source(split=split, decoders=decoders)


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _texts(seq: Any) -> list[str]:
    return [_text(v) for v in list(seq)]


def example_to_annotation(ex: dict) -> tuple[ImageAnnotation | VideoAnnotation, dict[str, bytes]]:
    """One decoded example (images as bytes, see ``open_split``) -> (record, {relative media path: bytes})."""
    if "image_id" in ex:
        inst = ex["instance_level_caption"]
        rec = ImageAnnotation(_text(ex["image_id"]), dict(zip(_texts(inst["id"]), _texts(inst["caption"]))),
                              _text(ex["image_level_caption"]), _text(ex["image_path"]))
        return rec, {rec.image_path: ex["image"]}
    fr, inst, qa = ex["frames"], ex["instance_level"], ex["question_answer_pairs"]
    names = _texts(fr["frame_name"])
    per_frame: list[dict[str, str]] = [{} for _ in names]
    for j, k, v in zip(list(inst["frame"]), _texts(inst["id"]), _texts(inst["caption"])):
        per_frame[int(j)][k] = v
    frames = [FrameAnnotation(t, n, caps, lvl, ch if has else None)
              for t, n, caps, lvl, ch, has in zip(_texts(fr["timestamp"]), names, per_frame,
                                                  _texts(fr["image_level"]), _texts(fr["temporal_change"]),
                                                  list(fr["has_temporal_change"]))]
    rec = VideoAnnotation(_text(ex["video_id"]), frames,
                          [QAPair(q, a) for q, a in zip(_texts(qa["question"]), _texts(qa["answer"]))],
                          _text(ex["video_level_caption"]), _text(ex["video_path"]))
    media = {os.path.join(rec.video_path, n): bytes(b) for n, b in zip(names, fr["image"])}
    return rec, media


def to_annotations(source: Iterable[dict]) -> Iterator[ImageAnnotation | VideoAnnotation]:
    """The annotation records of a split, in order (ids and timestamps come back as strings)."""
    for ex in source:
        yield example_to_annotation(ex)[0]


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def conversation_payload(conv: dict, media: dict[str, bytes], *, max_frames: int = 32,
                         source_name: str = "") -> bytes:
    """One LLaVA dict of ``annotations_to_llava`` + the example's media -> a serialised training sample."""
    if "image" in conv:
        data = media[conv["image"]]
        return sample_features(conv["id"], "image", conv["conversations"], [data], source=source_name,
                               frame_names=[conv["image"]], media_sizes=[_size(data)])
    frames = [conv["frames"][i] for i in uniform_frame_indices(len(conv["frames"]), max_frames)]
    data = [media[f] for f in frames]
    return sample_features(conv["id"], "video", conv["conversations"], data, source=source_name,
                           frame_names=frames, media_sizes=[_size(d) for d in data])


def iter_tfds_payloads(source: Iterable[dict], *, levels: Sequence[str] = LEVELS, seed: int = 0,
                       group_by: str = "record", max_frames: int = 32, source_name: str = "") -> Iterator[bytes]:
    """Serialised training samples of a split: the same bytes ``instit_jax.data.build`` writes from the JSON."""
    for ex in source:
        rec, media = example_to_annotation(ex)
        for conv in annotations_to_llava([rec], levels=levels, seed=seed, group_by=group_by):
            yield conversation_payload(conv, media, max_frames=max_frames, source_name=source_name)


class TfdsSampleSource:
    """Random-access Grain source over a prepared ``inst_it_dataset`` config, for ``build_pipeline``.

    Item ``i`` is the training sample of example ``i`` (one conversation per record, as
    ``instit-build-data --group-by record``) as a ``parse_sample`` dict. Picklable (reopens lazily).
    """

    def __init__(self, data_dir: str, config: str, *, split: str = "train", levels: Sequence[str] = LEVELS,
                 seed: int = 0, max_frames: int = 32, source_name: str | None = None):
        self.data_dir, self.config, self.split = data_dir, config, split
        self.levels, self.seed, self.max_frames = tuple(levels), seed, max_frames
        self.source_name = f"inst_it_dataset/{config}" if source_name is None else source_name
        self._src: Sequence[dict] | None = None

    def _source(self) -> Sequence[dict]:
        if self._src is None:
            self._src = open_split(self.data_dir, self.config, self.split)
        return self._src

    def __len__(self) -> int:
        return len(self._source())

    def __getitem__(self, i: int) -> dict:
        rec, media = example_to_annotation(self._source()[i])
        convs = annotations_to_llava([rec], levels=self.levels, seed=self.seed, group_by="record")
        if not convs:
            raise ValueError(f"inst_it_dataset/{self.config} {self.split}[{i}] (id {rec.record_id!r}): no "
                             f"caption or QA for levels {list(self.levels)}; drop it or use to-tfrecords")
        return parse_sample(conversation_payload(convs[0], media, max_frames=self.max_frames,
                                                 source_name=self.source_name))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_src": None}

    def __repr__(self) -> str:
        return f"TfdsSampleSource({self.data_dir!r}, {self.config!r}, split={self.split!r})"


def build_from_tfds(data_dir: str, configs: Sequence[str], out: str, num_shards: int, **kw: Any) -> dict:
    """TFRecord shards + manifest (as ``instit-build-data``) from prepared ``inst_it_dataset`` configs."""
    extra = {"inputs": [f"tfds:inst_it_dataset/{c}" for c in configs], "levels": list(kw.get("levels", LEVELS)),
             "seed": kw.get("seed", 0), "group_by": kw.get("group_by", "record"),
             "max_frames": kw.get("max_frames", 32)}

    def payloads() -> Iterator[bytes]:
        for c in configs:
            yield from iter_tfds_payloads(open_split(data_dir, c), source_name=f"inst_it_dataset/{c}", **kw)

    return write_shards(payloads(), out, num_shards, extra=extra)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m instit_jax.data.tfds.convert", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="TFDS data_dir where inst_it_dataset was prepared")
    p.add_argument("--config", action="append", choices=("image", "video"), required=True)
    p.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--levels", default=",".join(LEVELS), help=f"annotation levels to use, from {LEVELS}")
    p.add_argument("--group-by", choices=("record", "level"), default="record")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-frames", type=int, default=32)
    a = p.parse_args(argv)
    man = build_from_tfds(a.data_dir, a.config, a.out, a.num_shards, levels=[v for v in a.levels.split(",") if v],
                          seed=a.seed, group_by=a.group_by, max_frames=a.max_frames)
    print(f"wrote {man['num_records']} records in {len(man['shards'])} shards to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
