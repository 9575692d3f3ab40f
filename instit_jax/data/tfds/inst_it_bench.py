"""TFDS builder ``inst_it_bench``: Inst-It Bench from a manual dir, one example per question.

Splits ``image`` and ``video``; each holds the multiple-choice and the open-ended questions (``config``
says which, ``choices`` is empty for open-ended ones). ``media`` is the image (one item) or every frame
of the video folder sorted by file name (what the bench protocol feeds the model). Table files and
records are read and validated with ``instit_jax.data.bench`` (the evaluator's loaders).
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from instit_jax.data.tfds.manual import ManualDirError, extract_media, rgb_bytes

CONFIGS = ("image_open_ended", "image_multi_choice", "video_open_ended", "video_multi_choice")
_TABLE_EXTS = (".parquet", ".jsonl", ".json")


def config_tables(manual_dir: str, config: str) -> list[str]:
    """Table files of one bench config in ``manual_dir`` (first layout found); an error listing the options.

    Looked for, in order: ``<config>/`` (the Hugging Face parquet shards), ``<config>.parquet|.jsonl|.json``,
    and for multiple choice the release's JSON name ``<split>_multi_choices.json``.
    """
    folder = os.path.join(manual_dir, config)
    if os.path.isdir(folder):
        found = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(_TABLE_EXTS))
        if found:
            return found
    names = [config + ext for ext in _TABLE_EXTS]
    if config.endswith("multi_choice"):
        names.append(config + "s.json")
    for name in names:
        if os.path.isfile(os.path.join(manual_dir, name)):
            return [os.path.join(manual_dir, name)]
    raise ManualDirError(f"manual dir {manual_dir!r}: missing the bench table for {config!r}; expected a folder "
                         f"{config}/ of parquet/JSON files or one of {names} (download Inst-IT/Inst-It-Bench "
                         "into this folder, see docs/tfds.md)")


def _media_path(rec: dict) -> str:
    val = rec.get("video_path", rec.get("image", rec.get("image_path")))
    return str(val.get("path") or "") if isinstance(val, dict) else str(val or "")


class InstItBench(tfds.core.GeneratorBasedBuilder):
    """Inst-It Bench (arXiv 2412.03565): instance-level image and video questions, MC and open-ended."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (four configs of the Hugging Face bench, split test)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the Hugging Face dataset Inst-IT/Inst-It-Bench into the manual dir: the four config folders
    image_multi_choice/ image_open_ended/ video_multi_choice/ video_open_ended/ (parquet), or JSON/JSONL
    tables <config>.json, plus videos_vpt.zip (the marked frame folders; images_vpt.zip when the image
    tables hold paths instead of embedded bytes). Zips are extracted safely under
    <data_dir>/downloads/inst_it_bench_media.
    """
    code_path = tfds.core.utils.classproperty(classmethod(lambda cls: epath.Path(__file__)))  # see inst_it_dataset

    def __init__(self, *, file_format: str | None = None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "question_id": tfds.features.Text(doc="e.g. '001-01'; shared by the MC and OE version"),
                "config": tfds.features.Text(doc="image_multi_choice | image_open_ended | video_..."),
                "question": tfds.features.Text(),
                "choices": tfds.features.Sequence(tfds.features.Text(), doc="choice_a..d (MC), empty (OE)"),
                "answer": tfds.features.Text(doc="a letter A-D (MC) or the reference answer (OE)"),
                "media_path": tfds.features.Text(doc="image path or video folder as written in the table"),
                "frame_names": tfds.features.Sequence(tfds.features.Text()),
                "media": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
            }),
            homepage="https://huggingface.co/datasets/Inst-IT/Inst-It-Bench", disable_shuffling=True)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual = os.fspath(dl_manager.manual_dir)
        tables = {cfg: config_tables(manual, cfg) for cfg in CONFIGS}
        out = os.path.join(os.fspath(dl_manager.download_dir), "inst_it_bench_media")
        image_roots = extract_media(manual, ("images_vpt.zip", "images.zip"), ("images_vpt", "images"), out,
                                    "the bench images", required=False)
        video_roots = extract_media(manual, ("videos_vpt.zip", "videos.zip"), ("videos_vpt", "videos"), out,
                                    "the bench video frames (videos_vpt.zip)")
        return {split: self._generate_examples({c: tables[c] for c in CONFIGS if c.startswith(split)},
                                               image_roots if split == "image" else video_roots)
                for split in ("image", "video")}

    def _generate_examples(self, tables: dict[str, list[str]], roots: list[str]):
        from instit_jax.data import bench  # the loaders the evaluator uses (eval.bench re-exports them)

        for cfg, files in tables.items():
            seen: set[str] = set()
            for path in files:
                search = [Path(r) for r in [*roots, os.path.dirname(path)]]
                for i, rec in enumerate(bench.read_records(path)):
                    where = f"{path}: record {i}"
                    item = bench.make_item(rec, cfg, where, search)
                    if item.question_id in seen:
                        raise bench.BenchError(f"{where}: duplicate question_id {item.question_id!r} in {cfg}")
                    seen.add(item.question_id)
                    if item.video_dir is not None:
                        frames = bench.list_frames(item.video_dir)
                        media = [rgb_bytes(p.read_bytes(), f"{where}: {p}")[0] for p in frames]
                        names = [p.name for p in frames]
                    else:
                        data = item.image if isinstance(item.image, bytes) else Path(item.image).read_bytes()
                        media, names = [rgb_bytes(data, f"{where}, field 'image'")[0]], []
                    yield f"{cfg}/{item.question_id}", {
                        "question_id": item.question_id, "config": cfg, "question": item.question,
                        "choices": list(item.choices or ()), "answer": item.answer,
                        "media_path": _media_path(rec), "frame_names": names, "media": media}
