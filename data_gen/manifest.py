"""Manifest JSONL: one item per line; loading frames, images and masks with per-item errors.

Paths are relative to the manifest's folder. Lines (extra keys are kept in `meta`):

    {"video_id": "v1", "frames": ["f/0001.jpg", "f/0002.jpg"], "masks": "m/v1.json"}
    {"video_id": "v2", "video": "clips/v2.mp4", "num_frames": 8, "masks": "m/v2.json"}
    {"video_id": "v3", "frames": [...], "instance_ids": [1, 2]}          # frames already marked
    {"image_id": "i1", "image": "x.jpg", "masks": "m/i1.json"}
    {"image_id": "i2", "image": "y.jpg", "instance_ids": [1, 2, 3]}      # image already marked
    {"image_id": 42, "width": 800, "height": 600, "captions": [...], "objects": [...], "regions": [...]}  # svit
    {"image_id": 43, "scene": "vg/43.json"}                              # svit, VG JSON in a file

Video masks file: `{"frames": [{"<id>": RLE, ...}, ...]}` (one object per frame, in frame order) or
`{"frames": {"<frame file name>": {"<id>": RLE}}}`; image masks file: `{"<id>": RLE}`. RLE is COCO
(`{"size": [H, W], "counts": ...}`); masks may also be inline objects instead of file names.
`instance_ids`, when given with masks, must equal the set of mask IDs. Videos in files (mp4, gif, ...)
are read with imageio and `num_frames` are sampled uniformly (`data_gen.frames.uniform_frame_indices`); only the
sampled frames are kept (the file is streamed, never decoded whole).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_gen.confine import (
    MAX_JSON_BYTES,
    MAX_LINE_BYTES,
    MAX_VIDEO_FRAMES,
    InputRejected,
    ResourceLimitError,
    ascii_digits,
    check_file_size,
    check_pixels,
    confine,
)
from data_gen.frames import uniform_frame_indices
from data_gen.pipelines.schemas import ImageContext, VideoContext
from data_gen.pipelines.svit_scene import InputError, SvitScene, scene_from_record

KINDS = ("video", "image", "svit")


@dataclass
class ManifestItem:
    kind: str
    item_id: str
    line: int
    where: str
    record: dict
    base: Path
    allow_outside_root: bool = False


def read_manifest(path: str | Path, kind: str, *, allow_outside_root: bool = False) -> list[ManifestItem]:
    """Parse every line; a malformed line raises InputError (the whole manifest is unusable).

    Files an item names must resolve (symlinks followed) under the manifest's folder; an absolute or
    escaping path raises UnsafePathError when the item is loaded, unless ``allow_outside_root``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    id_key = "video_id" if kind == "video" else "image_id"
    items, seen = [], set()
    check_file_size(path, MAX_JSON_BYTES, str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            raise ResourceLimitError(f"{path}:{n}: a line of {len(raw)} characters exceeds the limit {MAX_LINE_BYTES}")
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError) as err:  # also nesting beyond the parser's depth
            raise InputError(f"{path}:{n}: not valid JSON ({err})") from err
        if not isinstance(rec, dict) or id_key not in rec:
            raise InputError(f"{path}:{n}: a {kind} item needs {id_key!r}")
        item_id = str(rec[id_key])
        if item_id in seen:
            raise InputError(f"{path}:{n}: duplicate {id_key} {item_id!r}")
        seen.add(item_id)
        items.append(ManifestItem(kind, item_id, n, f"{path.name}:{n} ({id_key} {item_id!r})", rec, path.parent,
                                  allow_outside_root))
    return items


# ----------------------------------------------------------------------------- files
def _resolve(item: ManifestItem, rel: str, field: str) -> Path:
    return confine(rel, item.base, f"{item.where}: field {field!r}", allow_outside_root=item.allow_outside_root)


def load_image(path: Path, where: str) -> np.ndarray:
    """Decode an image file to HWC uint8 RGB; InputError on a missing or corrupt file."""
    if not path.is_file():
        raise InputError(f"{where}: file not found: {path}")
    try:
        with Image.open(path) as im:
            check_pixels(im.width, im.height, f"{where}: {path}")
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, InputRejected):
            raise
        raise InputError(f"{where}: cannot decode image {path}: {err}") from err


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the header only."""
    if not path.is_file():
        raise InputError(f"{where}: file not found: {path}")
    try:
        with Image.open(path) as im:
            check_pixels(im.width, im.height, f"{where}: {path}")
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, InputRejected):
            raise
        raise InputError(f"{where}: cannot decode image {path}: {err}") from err


def _load_json_field(item: ManifestItem, key: str) -> Any:
    value = item.record.get(key)
    if isinstance(value, str):
        path = _resolve(item, value, key)
        if not path.is_file():
            raise InputError(f"{item.where}: '{key}' file not found: {path}")
        try:
            return json.loads(path.read_text())
        except (ValueError, RecursionError) as err:
            raise InputError(f"{item.where}: '{key}' file {path} is not valid JSON ({err})") from err
    return value


def _check_rle(rle: Any, size: tuple[int, int] | None, where: str) -> None:
    if not (isinstance(rle, dict) and "size" in rle and "counts" in rle):
        raise InputError(f"{where}: expected a COCO RLE object with 'size' and 'counts'")
    if not (isinstance(rle["size"], list) and len(rle["size"]) == 2):
        raise InputError(f"{where}: RLE 'size' must be [H, W], got {rle['size']!r:.60}")
    if size is not None and list(rle["size"]) != [size[1], size[0]]:
        raise InputError(f"{where}: mask size {rle['size']} does not match the frame's [H, W] = {[size[1], size[0]]}")


def _declared_ids(item: ManifestItem) -> list[str] | None:
    ids = item.record.get("instance_ids")
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise InputError(f"{item.where}: 'instance_ids' must be a list")
    return [str(i) for i in ids]


def _ids_from_masks(item: ManifestItem, mask_ids: set[str]) -> list[str]:
    declared = _declared_ids(item)
    if declared is not None and set(declared) != mask_ids:
        raise InputError(f"{item.where}: instance_ids {sorted(declared)} do not match the mask IDs {sorted(mask_ids)}")
    for i in mask_ids:
        if not all(ascii_digits(p.strip()) for p in i.split(",")):
            raise InputError(f"{item.where}: mask ID {i!r} is not a number")
    return sorted(mask_ids, key=lambda s: (int(s.split(",")[0]), s))


def _mark(frame: np.ndarray, masks: dict[str, Any] | None, style: str, where: str) -> np.ndarray:
    if not masks:
        return frame
    from data_gen.som import render_marks  # the Set-of-Marks renderer
    try:
        return render_marks(frame, [(int(k) if ascii_digits(k) else k, v) for k, v in masks.items()], style=style)
    except ValueError as err:
        raise InputError(f"{where}: cannot draw marks: {err}") from err


# ----------------------------------------------------------------------------- videos
@dataclass
class VideoInput:
    context: VideoContext
    video_path: str
    size: tuple[int, int]
    marked_frame: Callable[[int], np.ndarray]  # 0-based index -> marked HWC uint8


def load_video(item: ManifestItem) -> VideoInput:
    """Validate a video item (files exist, masks match) and return a lazy marked-frame loader."""
    rec = item.record
    if "frames" in rec:
        if not isinstance(rec["frames"], list) or not rec["frames"]:
            raise InputError(f"{item.where}: 'frames' must be a non-empty list")
        if len(rec["frames"]) > MAX_VIDEO_FRAMES:
            raise ResourceLimitError(f"{item.where}: {len(rec['frames'])} frames exceed the cap {MAX_VIDEO_FRAMES}")
        paths = [_resolve(item, f, f"frames[{k}]") for k, f in enumerate(rec["frames"])]
        names = [os.path.basename(f) for f in rec["frames"]]
        sizes = [image_size(p, f"{item.where}, frames[{k}]") for k, p in enumerate(paths)]
        video_path = rec.get("video_path") or os.path.dirname(rec["frames"][0])
        raw: Callable[[int], np.ndarray] = lambda i: load_image(paths[i], f"{item.where}, frames[{i}]")
    elif "video" in rec:
        frames, names = _read_video_file(item)
        sizes = [(f.shape[1], f.shape[0]) for f in frames]
        video_path = rec.get("video_path") or rec["video"]
        raw = lambda i: frames[i]
    else:
        raise InputError(f"{item.where}: a video item needs 'frames' or 'video'")
    masks = _load_json_field(item, "masks")
    per_frame: list[dict[str, Any] | None] = [None] * len(names)
    if masks is not None:
        table = masks.get("frames") if isinstance(masks, dict) else None
        if isinstance(table, dict):
            missing = [n for n in table if n not in names]
            if missing:
                raise InputError(f"{item.where}: masks name frames that are not in the item: {missing[:3]}")
            per_frame = [table.get(n) or {} for n in names]
        elif isinstance(table, list):
            if len(table) != len(names):
                raise InputError(f"{item.where}: masks have {len(table)} frames, the item has {len(names)}")
            per_frame = [m or {} for m in table]
        else:
            raise InputError(f"{item.where}: masks must be {{'frames': [...]}} or {{'frames': {{name: ...}}}}")
        mask_ids: set[str] = set()
        for k, frame_masks in enumerate(per_frame):
            if not isinstance(frame_masks, dict):
                raise InputError(f"{item.where}: masks frame {k + 1} must be an object {{id: RLE}}")
            for iid, rle in frame_masks.items():
                _check_rle(rle, sizes[k], f"{item.where}, masks frame {k + 1} id {iid}")
                mask_ids.add(str(iid))
        ids = _ids_from_masks(item, mask_ids)
    else:
        ids = _declared_ids(item)
        if ids is None:
            raise InputError(f"{item.where}: without masks (pre-marked frames) 'instance_ids' is required")
    context = VideoContext(item.item_id, ids, names, dict(rec.get("meta", {})))
    marked = lambda i: _mark(raw(i), per_frame[i], "video", f"{item.where}, frame {i + 1}")
    return VideoInput(context, video_path, sizes[0], marked)


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    """The frames of a video file in order, decoded one at a time (HWC uint8, RGB)."""
    import imageio.v3 as iio

    with iio.imopen(path, "r") as reader:
        for frame in reader.iter():
            frame = np.asarray(frame)
            yield np.repeat(frame[..., None], 3, axis=-1) if frame.ndim == 2 else frame[..., :3]


def _read_video_file(item: ManifestItem) -> tuple[list[np.ndarray], list[str]]:
    """The `num_frames` (default min(8, n)) uniformly sampled frames of a video file and their names.

    Two streaming passes: one counts the frames, one keeps the chosen ones and stops after the last, so
    memory holds the kept frames and one decoded frame, whatever the video's length."""
    path = _resolve(item, item.record["video"], "video")
    if not path.is_file():
        raise InputError(f"{item.where}: video file not found: {path}")
    count = item.record.get("num_frames", 8)
    try:
        count = int(count)
    except (TypeError, ValueError, OverflowError):
        count = -1
    if not 1 <= count <= MAX_VIDEO_FRAMES:
        raise ResourceLimitError(f"{item.where}: field 'num_frames' must be an integer in 1..{MAX_VIDEO_FRAMES}, "
                                 f"got {item.record.get('num_frames')!r:.40}")
    try:
        total = sum(1 for _ in _video_frames(path))
        if total == 0:
            raise ValueError("no frames")
        count = min(count, total) if "num_frames" not in item.record else count
        idx = uniform_frame_indices(total, count)
        keep, picked = set(idx.tolist()), []
        for i, frame in enumerate(_video_frames(path)):
            if i in keep:
                picked.append(np.ascontiguousarray(frame))
            if i >= idx[-1]:
                break
    except Exception as err:  # imageio raises plugin-specific types
        raise InputError(f"{item.where}: cannot read video {path} ({err}); mp4 needs imageio-ffmpeg "
                         "(pip install \"instit-jax[video]\") or av") from err
    return picked, [f"{i:06d}.jpg" for i in idx]


# ----------------------------------------------------------------------------- images / svit
@dataclass
class ImageInput:
    context: ImageContext
    image_path: str
    size: tuple[int, int]
    marked: Callable[[], np.ndarray]


def load_image_item(item: ManifestItem) -> ImageInput:
    rec = item.record
    if not isinstance(rec.get("image"), str):
        raise InputError(f"{item.where}: an image item needs 'image'")
    path = _resolve(item, rec["image"], "image")
    size = image_size(path, item.where)
    masks = _load_json_field(item, "masks")
    if masks is not None:
        if not isinstance(masks, dict):
            raise InputError(f"{item.where}: image masks must be an object {{id: RLE}}")
        for iid, rle in masks.items():
            _check_rle(rle, size, f"{item.where}, masks id {iid}")
        ids = _ids_from_masks(item, {str(k) for k in masks})
    else:
        ids = _declared_ids(item)
        if ids is None:
            raise InputError(f"{item.where}: without masks (pre-marked image) 'instance_ids' is required")
    context = ImageContext(item.item_id, ids, dict(rec.get("meta", {})))
    marked = lambda: _mark(load_image(path, item.where), masks, "image", item.where)
    return ImageInput(context, rec.get("image_path", rec["image"]), size, marked)


def load_svit_item(item: ManifestItem) -> SvitScene:
    rec = item.record
    if "scene" in rec:
        scene = _load_json_field(item, "scene")
        if not isinstance(scene, dict):
            raise InputError(f"{item.where}: 'scene' must hold a JSON object")
        rec = {**scene, **{k: v for k, v in rec.items() if k != "scene"}}
    return scene_from_record(rec, item.where)
