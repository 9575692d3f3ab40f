"""TFDS builder ``inst_it_dataset``: the Inst-IT instruction-tuning release, built from a manual dir.

Configs ``image`` (one example per annotated image) and ``video`` (one example per video; its annotated
frames in JSON order, each with its encoded image and captions). Media bytes are stored as released
(RGB JPEG/PNG; anything else becomes RGB PNG). Ids and timestamps are stored as text (``str(value)``).
Writes ArrayRecord by default, so preparing and reading need no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from instit_jax.data.schema import ImageAnnotation, VideoAnnotation, load_records
from instit_jax.data.tfds.manual import extract_media, find_first, read_rgb_media, resolve

_CITATION = """@article{peng2024inst,
  title={Inst-IT: Boosting Multimodal Instance Understanding via Explicit Visual Prompt Instruction Tuning},
  author={Peng, Wujian and Meng, Lingchen and Chen, Yitong and Xie, Yiweng and Liu, Yang and Gui, Tao and
          Xu, Hang and Qiu, Xipeng and Wu, Zuxuan and Jiang, Yu-Gang},
  journal={arXiv preprint arXiv:2412.03565},
  year={2024}
}"""


@dataclasses.dataclass(eq=False)
class InstItConfig(tfds.core.BuilderConfig):
    """Which annotation file and media archive a config reads (first present name wins)."""

    kind: str = "image"
    json_names: tuple[str, ...] = ()
    zip_names: tuple[str, ...] = ()
    dir_names: tuple[str, ...] = ()


def _captions() -> tfds.features.Sequence:
    return tfds.features.Sequence({"id": tfds.features.Text(doc="instance id, e.g. '3' or '1,2'"),
                                   "caption": tfds.features.Text()})


def _caption_list(caps: dict[str, str]) -> list[dict[str, str]]:
    return [{"id": k, "caption": v} for k, v in caps.items()]


class InstItDataset(tfds.core.GeneratorBasedBuilder):
    """Inst-IT Dataset (arXiv 2412.03565): instance-level image and video annotations with their media."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (annotation JSON schema of the 51k-image / 21k-video release)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download from the Hugging Face dataset Inst-IT/Inst-It-Dataset into the manual dir:
      image config: inst_it_dataset_image_51k.json (or ..._w_mask.json) and images_vpt.zip (or images.zip)
      video config: inst_it_dataset_video_21k.json (or ..._w_mask.json) and videos_vpt.zip (or videos.zip)
    Zips are extracted (safely) under <data_dir>/downloads/inst_it_media; an already extracted folder
    images_vpt/ or videos_vpt/ inside the manual dir works too. image_path / video_path in the JSON are
    resolved against the extracted tree.
    """
    BUILDER_CONFIGS = [
        InstItConfig(name="image", description="One example per annotated image.", kind="image",
                     json_names=("inst_it_dataset_image_51k.json", "inst_it_dataset_image_51k_w_mask.json"),
                     zip_names=("images_vpt.zip", "images.zip"), dir_names=("images_vpt", "images")),
        InstItConfig(name="video", description="One example per video, with its annotated frames.", kind="video",
                     json_names=("inst_it_dataset_video_21k.json", "inst_it_dataset_video_21k_w_mask.json"),
                     zip_names=("videos_vpt.zip", "videos.zip"), dir_names=("videos_vpt", "videos")),
    ]
    DEFAULT_CONFIG_NAME = "image"
    # TFDS 4.9.10's own code_path needs `importlib_resources` on Python >= 3.9 (a missing dependency).
    code_path = tfds.core.utils.classproperty(classmethod(lambda cls: epath.Path(__file__)))

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # ArrayRecord: random access for Grain, and writing/reading it needs no TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 3), doc="encoded RGB JPEG/PNG (SoM-marked as released)")
        if self.builder_config.kind == "image":
            features = {
                "image_id": tfds.features.Text(),
                "image_path": tfds.features.Text(doc="path as written in the JSON"),
                "image": image,
                "instance_level_caption": _captions(),
                "image_level_caption": tfds.features.Text(),
            }
        else:
            features = {
                "video_id": tfds.features.Text(),
                "video_path": tfds.features.Text(doc="frame folder as written in the JSON"),
                "frames": tfds.features.Sequence({
                    "timestamp": tfds.features.Text(doc="frame reference, e.g. '<3>'"),
                    "frame_name": tfds.features.Text(),
                    "image": image,
                    "image_level": tfds.features.Text(),
                    "temporal_change": tfds.features.Text(doc="'' when has_temporal_change is False"),
                    "has_temporal_change": tfds.features.Scalar(np.bool_, doc="False where the JSON has null"),
                }),
                # Frame-level instance captions, flat (TFDS nests ragged sequences only with TensorFlow).
                "instance_level": tfds.features.Sequence({
                    "frame": tfds.features.Scalar(np.int32, doc="index into frames"),
                    "id": tfds.features.Text(doc="instance id, e.g. '3' or '1,2'"),
                    "caption": tfds.features.Text()}),
                "question_answer_pairs": tfds.features.Sequence({"question": tfds.features.Text(),
                                                                 "answer": tfds.features.Text()}),
                "video_level_caption": tfds.features.Text(),
            }
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(features),
            homepage="https://inst-it.github.io", citation=_CITATION, disable_shuffling=True)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        cfg = self.builder_config
        manual = os.fspath(dl_manager.manual_dir)
        json_path = find_first(manual, cfg.json_names, f"the {cfg.kind} annotation JSON")
        roots = extract_media(manual, cfg.zip_names, cfg.dir_names,
                              os.path.join(os.fspath(dl_manager.download_dir), "inst_it_media"),
                              f"the {cfg.kind} media archive")
        return {"train": self._generate_examples(json_path, roots)}

    def _generate_examples(self, json_path: str, roots: list[str]):
        for i, rec in enumerate(load_records(json_path, self.builder_config.kind)):
            where = f"{json_path}: record {i} (id {rec.record_id!r})"
            key = f"{i:09d}"
            if isinstance(rec, ImageAnnotation):
                data, _ = read_rgb_media(resolve(rec.image_path, roots, f"{where}, field 'image_path'"), where)
                yield key, {"image_id": rec.record_id, "image_path": rec.image_path, "image": data,
                            "instance_level_caption": _caption_list(rec.instance_level_caption),
                            "image_level_caption": rec.image_level_caption}
            else:
                yield key, _video_example(rec, roots, where)


def _video_example(rec: VideoAnnotation, roots: list[str], where: str) -> dict:
    vdir = resolve(rec.video_path, roots, f"{where}, field 'video_path'", folder=True)
    frames, instances = [], []
    for j, fr in enumerate(rec.frame_level_caption):
        fw = f"{where}, frame_level_caption[{j}]"
        data, _ = read_rgb_media(resolve(fr.frame_name, [vdir], f"{fw}, field 'frame_name'"), fw)
        instances += [{"frame": j, "id": k, "caption": v} for k, v in fr.instance_level.items()]
        frames.append({"timestamp": str(fr.timestamp), "frame_name": fr.frame_name, "image": data,
                       "image_level": fr.image_level,
                       "temporal_change": fr.temporal_change or "",
                       "has_temporal_change": fr.temporal_change is not None})
    return {"video_id": rec.record_id, "video_path": rec.video_path, "frames": frames, "instance_level": instances,
            "question_answer_pairs": [{"question": q.question, "answer": q.answer}
                                      for q in rec.question_answer_pairs],
            "video_level_caption": rec.video_level_caption}
