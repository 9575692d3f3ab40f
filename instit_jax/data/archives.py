"""Safe extraction of dataset archives (the Inst-IT release ships media as zip files in a manual dir).

``safe_extract_zip`` refuses members with absolute paths, drive letters, ``..`` components or symlinks,
and archives whose uncompressed size or member count exceeds a limit (zip bombs); it checks every target
resolves inside the destination before writing anything, and writes each file via a temporary name.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from collections.abc import Sequence

from data_gen.confine import UnsafePathError, confine


class UnsafeArchiveError(UnsafePathError):
    """An archive member would escape the destination or the archive exceeds a limit."""


def _check_member(zip_path: str, info: zipfile.ZipInfo) -> str:
    name = info.filename.replace("\\", "/")
    where = f"{zip_path}: member {info.filename!r}"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{where} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{where} contains '..'")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{where} is a symbolic link")
    return "/".join(parts)


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, *,
                     max_total_bytes: int = 1 << 40, max_members: int = 10_000_000) -> list[str]:
    """Extracts ``zip_path`` under ``dest``; returns the relative paths of the extracted files."""
    zip_path, dest = os.fspath(zip_path), os.path.realpath(os.fspath(dest))
    os.makedirs(dest, exist_ok=True)
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise UnsafeArchiveError(f"{zip_path}: {len(infos)} members exceed the limit {max_members}")
        total = sum(i.file_size for i in infos)
        if total > max_total_bytes:
            raise UnsafeArchiveError(f"{zip_path}: {total} uncompressed bytes exceed the limit {max_total_bytes}")
        plan = []
        for info in infos:
            rel = _check_member(zip_path, info)
            if not rel:
                continue
            try:
                target = str(confine(rel, dest, f"{zip_path}: member {info.filename!r}"))
            except UnsafePathError as e:
                raise UnsafeArchiveError(str(e)) from e
            plan.append((info, rel, target))
        out = []
        for info, rel, target in plan:
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.part{os.getpid()}"
            with zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
            out.append(rel)
    return out


def prepare_manual_dir(manual_dir: str | os.PathLike, media_out: str | os.PathLike,
                       json_names: Sequence[str] = ("inst_it_dataset_image_51k.json",
                                                    "inst_it_dataset_video_21k.json")) -> list[str]:
    """Extracts every ``*.zip`` of a manually downloaded release into ``media_out``; returns JSON paths found.

    The JSON paths (and ``media_out`` as media root) are what ``instit-build-data`` takes.
    """
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"manual dir {manual_dir!r} does not exist; download the release there first")
    for name in sorted(os.listdir(manual_dir)):
        if name.endswith(".zip"):
            safe_extract_zip(os.path.join(manual_dir, name), media_out)
    found = [os.path.join(manual_dir, n) for n in json_names if os.path.exists(os.path.join(manual_dir, n))]
    if not found:
        raise FileNotFoundError(f"{manual_dir}: none of {list(json_names)} present")
    return found
