"""``instit-build-data``: Inst-IT / LLaVA JSON + media -> TFRecord shards with a manifest.

Each output record holds one conversation (untokenised, JSON) and its media as encoded bytes (JPEG/PNG
kept as they are, anything else re-encoded as PNG), so one build serves every model and template.
Videos are stored as the frames the conversation refers to (Inst-IT: the annotated frames), capped at
``--max-frames`` by uniform sampling.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_gen.confine import (
    MAX_IMAGE_PIXELS,
    InputRejected,
    MissingInputError,
    ResourceLimitError,
    check_pixels,
    confine,
)
from data_gen.frames import uniform_frame_indices
from instit_jax.data.annotations_to_llava import LEVELS, annotations_to_llava
from instit_jax.data.records import sample_features, write_shards
from instit_jax.data.schema import SchemaError, load_records

_FRAME_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_media(path: str | os.PathLike, where: str = "",
               max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[bytes, tuple[int, int]]:
    """Encoded bytes (JPEG/PNG as stored, others re-encoded to PNG) and (height, width) of an image file.

    An image beyond ``max_pixels`` (checked from the header, before decoding) raises ResourceLimitError;
    a file Pillow cannot read raises InputRejected naming ``where`` and the file.
    """
    where = f"{where}: {path}" if where else str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise MissingInputError(f"{where}: no such file") from e
    except OSError as e:  # a folder, no permission, ...
        raise InputRejected(f"{where}: cannot be read as a file ({type(e).__name__}: {e.strerror})") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(im.width, im.height, where, max_pixels)
            size = (im.height, im.width)
            if im.format not in ("JPEG", "PNG"):
                out = io.BytesIO()
                im.convert("RGB").save(out, format="PNG")
                data = out.getvalue()
    except Image.DecompressionBombError as e:
        raise ResourceLimitError(f"{where}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InputRejected):
            raise
        raise InputRejected(f"{where}: not a readable image ({type(e).__name__}: {e})") from e
    return data, size


def _media_path(rel: str, media_root: str, where: str, field: str, allow_outside_root: bool) -> str:
    return str(confine(rel, media_root, f"{where}: field {field!r}", allow_outside_root=allow_outside_root))


def _frame_list(rec: dict, media_root: str, where: str, allow_outside_root: bool = False) -> list[str]:
    if rec.get("frames"):
        frames = rec["frames"]
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise SchemaError(f"{where}: field 'frames' must be a list of file names, got {frames!r:.80}")
        return frames
    vdir = _media_path(rec["video"], media_root, where, "video", allow_outside_root)
    if not os.path.isdir(vdir):
        raise MissingInputError(f"{where}: field 'video' = {rec['video']!r:.200} is not a folder of frames under "
                                f"{media_root!r}; extract frames first (video files are not decoded here)")
    names = sorted(n for n in os.listdir(vdir) if n.lower().endswith(_FRAME_EXT))
    if not names:
        raise MissingInputError(f"{where}: no frame images in {vdir}")
    return [os.path.join(rec["video"], n) for n in names]


def llava_to_payload(rec: dict, media_root: str, where: str, source: str, max_frames: int, *,
                     allow_outside_root: bool = False) -> bytes:
    """One LLaVA-format dict (with ``image`` / ``video`` [+ ``frames``]) -> serialised sample.

    Media paths must resolve under ``media_root`` (UnsafePathError otherwise) unless ``allow_outside_root``.
    """
    conv = rec["conversations"]
    if rec.get("image"):
        data, size = read_media(_media_path(rec["image"], media_root, where, "image", allow_outside_root), where)
        return sample_features(str(rec.get("id", "")), "image", conv, [data], source=source,
                               frame_names=[rec["image"]], media_sizes=[size])
    if rec.get("video"):
        frames = _frame_list(rec, media_root, where, allow_outside_root)
        frames = [frames[i] for i in uniform_frame_indices(len(frames), max_frames)]
        media = [read_media(_media_path(f, media_root, where, "frames", allow_outside_root), where)
                 for f in frames]
        return sample_features(str(rec.get("id", "")), "video", conv, [m[0] for m in media], source=source,
                               frame_names=frames, media_sizes=[m[1] for m in media])
    return sample_features(str(rec.get("id", "")), "text", conv, source=source)


def iter_payloads(inputs: Sequence[str], media_root: str, *, levels: Sequence[str] = LEVELS, seed: int = 0,
                  group_by: str = "record", max_frames: int = 32, skip_missing: bool = False,
                  allow_outside_root: bool = False, log=print) -> Iterator[bytes]:
    """Serialised samples of every input file, in input order."""
    for path in inputs:
        records = load_records(path)
        llava = annotations_to_llava(records, levels=levels, seed=seed, group_by=group_by)
        skipped = 0
        for i, rec in enumerate(llava):
            where = f"{path}: conversation {i} (id {rec.get('id')!r})"
            try:
                yield llava_to_payload(rec, media_root, where, os.path.basename(path), max_frames,
                                       allow_outside_root=allow_outside_root)
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON) cannot be stored as UTF-8
                raise SchemaError(f"{where}: a string holds {e.object[e.start:e.end]!r}, which is not valid "
                                  "Unicode text") from e
            except FileNotFoundError as e:
                if not skip_missing:
                    if isinstance(e, MissingInputError):
                        raise
                    raise MissingInputError(f"{where}: {e}") from e
                skipped += 1
        if skipped:
            log(f"{path}: skipped {skipped} conversations with missing media")


def build(inputs: Sequence[str], media_root: str, out: str, num_shards: int, **kw) -> dict:
    """Builds the shards and manifest; returns the manifest."""
    extra = {"inputs": [os.path.basename(p) for p in inputs],
             "levels": list(kw.get("levels", LEVELS)), "seed": kw.get("seed", 0),
             "group_by": kw.get("group_by", "record"), "max_frames": kw.get("max_frames", 32)}
    return write_shards(iter_payloads(inputs, media_root, **kw), out, num_shards, extra=extra)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="instit-build-data", description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", required=True, help="Inst-IT image/video JSON or LLaVA JSON")
    p.add_argument("--media-root", required=True, help="folder that image_path / video_path are relative to")
    p.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--levels", default=",".join(LEVELS), help=f"annotation levels to use, from {LEVELS}")
    p.add_argument("--group-by", choices=("record", "level"), default="record")
    p.add_argument("--seed", type=int, default=0, help="seed of the instruction paraphrase choice")
    p.add_argument("--max-frames", type=int, default=32)
    p.add_argument("--skip-missing", action="store_true", help="skip conversations whose media is missing")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept media paths that are absolute or resolve outside --media-root (refused by default)")
    a = p.parse_args(argv)
    levels = [lv for lv in a.levels.split(",") if lv]
    man = build(a.input, a.media_root, a.out, a.num_shards, levels=levels, seed=a.seed, group_by=a.group_by,
                max_frames=a.max_frames, skip_missing=a.skip_missing, allow_outside_root=a.allow_outside_root)
    sizes = np.asarray([s["bytes"] for s in man["shards"]])
    print(f"wrote {man['num_records']} records in {len(sizes)} shards ({sizes.sum() / 1e6:.1f} MB) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
