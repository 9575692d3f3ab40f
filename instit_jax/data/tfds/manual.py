"""What the TFDS builders need from a manual dir: finding the released files, extracting their zips safely
and resolving media paths. Plain Python (no tensorflow_datasets), so it is usable and testable on its own.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from instit_jax.data.archives import safe_extract_zip


class ManualDirError(FileNotFoundError):
    """A file the builder needs is missing from the manual dir (the message lists what is expected)."""


def find_first(manual_dir: str, names: Sequence[str], what: str) -> str:
    """The path of the first of ``names`` present in ``manual_dir``; an error listing them when none is."""
    for name in names:
        path = os.path.join(manual_dir, name)
        if os.path.exists(path):
            return path
    present = sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else []
    raise ManualDirError(
        f"manual dir {manual_dir!r}: missing {what}; expected one of {list(names)} "
        f"(found: {present[:20]}{' ...' if len(present) > 20 else ''}). Download it from the Inst-IT release "
        "into this folder (see docs/tfds.md).")


def extract_media(manual_dir: str, zip_names: Sequence[str], dir_names: Sequence[str], out_dir: str,
                  what: str, *, required: bool = True) -> list[str]:
    """Extracts the first present zip of ``zip_names`` into ``out_dir`` (once); returns media roots to search.

    A folder of ``dir_names`` already extracted inside ``manual_dir`` counts as present too. Roots are
    ``out_dir``, ``out_dir/<zip stem>`` (for archives whose top folder is not part of the JSON paths),
    the extracted folders and ``manual_dir`` itself. Extraction refuses unsafe members (``..``, absolute
    paths, symlinks) before writing anything; a marker file makes a second build skip the unzip.
    """
    roots: list[str] = []
    for name in zip_names:
        zpath = os.path.join(manual_dir, name)
        if not os.path.isfile(zpath):
            continue
        stem = name[:-len(".zip")] if name.endswith(".zip") else name
        st = os.stat(zpath)
        marker = os.path.join(out_dir, f".{name}.extracted")
        stamp = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns})
        if not (os.path.exists(marker) and Path(marker).read_text(encoding="utf-8") == stamp):
            safe_extract_zip(zpath, out_dir)
            Path(marker).write_text(stamp, encoding="utf-8")
        roots += [out_dir, os.path.join(out_dir, stem)]
        break
    for name in dir_names:
        if os.path.isdir(os.path.join(manual_dir, name)):
            roots.append(os.path.join(manual_dir, name))
    if not roots and required:
        raise ManualDirError(
            f"manual dir {manual_dir!r}: missing {what}; expected one of {list(zip_names)} "
            f"(or an extracted folder {' / '.join(d + '/' for d in dir_names)} there). Download it from the "
            "Inst-IT release into this folder (see docs/tfds.md).")
    roots.append(manual_dir)
    return list(dict.fromkeys(roots))


def resolve(rel: str, roots: Sequence[str], where: str, *, folder: bool = False) -> str:
    """``rel`` joined to the first root where it exists (a folder when ``folder``); an error naming both."""
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise ValueError(f"{where}: media path {rel!r} must be relative and stay inside the media root")
    for root in roots:
        cand = os.path.join(root, rel)
        if os.path.isdir(cand) if folder else os.path.isfile(cand):
            return cand
    raise ManualDirError(f"{where}: {'folder' if folder else 'file'} {rel!r} not found under any of "
                         f"{list(roots)}; is the media zip of the release in the manual dir?")


def rgb_bytes(data: bytes, where: str) -> tuple[bytes, tuple[int, int]]:
    """Encoded image bytes that decode to ``[H, W, 3] uint8``, and the image's (height, width).

    RGB JPEG/PNG bytes are kept as they are; anything else (grey, RGBA, CMYK, other formats) is converted
    to RGB and re-encoded as PNG.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = (im.height, im.width)
            if im.format in ("JPEG", "PNG") and im.mode == "RGB":
                return data, size
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
            return out.getvalue(), size
    except OSError as e:
        raise ValueError(f"{where}: not a readable image ({e})") from e


def read_rgb_media(path: str, where: str) -> tuple[bytes, tuple[int, int]]:
    """``rgb_bytes`` of an image file."""
    with open(path, "rb") as f:
        return rgb_bytes(f.read(), f"{where}: {path}")
