"""Input-safety rules shared by every loader: paths named by an input stay under its root; sizes are capped.

Datasets, manifests and bench folders come from other people. A file such a document names is resolved
under the document's declared root after following symlinks; an absolute path, a ``..`` that climbs out,
or a symlink pointing elsewhere is refused with an ``UnsafePathError`` naming the input, record and field,
unless the caller opts in with ``allow_outside_root=True`` (``--allow-outside-root`` on the CLIs).
Names with NUL bytes or over-long components are refused the same way instead of surfacing as a bare
``OSError`` / ``ValueError`` from the OS.

``InputRejected`` is the common base of these errors; loaders' own error types stay as they are.
"""
from __future__ import annotations

import os
from pathlib import Path

MAX_NAME_BYTES = 255  # one path component (NAME_MAX on Linux / macOS)
MAX_PATH_BYTES = 4096  # a whole path (PATH_MAX on Linux)
MAX_IMAGE_PIXELS = 1 << 28  # 268M pixels (16384 x 16384): beyond it a file is treated as a decompression bomb
MAX_VIDEO_FRAMES = 4096  # frames one video item may name or sample
MAX_JSON_BYTES = 8 << 30  # a dataset JSON read whole into memory
MAX_LINE_BYTES = 64 << 20  # one manifest / bench JSONL line


def ascii_digits(text: str) -> bool:
    """True for '0'-'9' only: str.isdigit also accepts '²' and other digits that int() refuses."""
    return text.isascii() and text.isdigit()


class InputRejected(ValueError):
    """An input (file, record, field) is refused by a safety rule; the message names it."""


class UnsafePathError(InputRejected):
    """A path named by an input escapes its root, or cannot be a path at all (NUL byte, over-long name)."""


class ResourceLimitError(InputRejected):
    """An input exceeds a size limit (pixels, frames, bytes)."""


class MissingInputError(InputRejected, FileNotFoundError):
    """A file or folder an input names does not exist (also a FileNotFoundError, for `--skip-missing`)."""


def check_path_text(path: str, where: str) -> str:
    """``path`` unchanged, or UnsafePathError if it is empty, holds a NUL byte or has an over-long part."""
    if not isinstance(path, str):
        raise UnsafePathError(f"{where}: path must be a string, got {type(path).__name__}")
    if not path:
        raise UnsafePathError(f"{where}: path is empty")
    if "\0" in path:
        raise UnsafePathError(f"{where}: path {path[:80]!r} contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as e:
        raise UnsafePathError(f"{where}: path {path[:80]!r} holds {e.object[e.start:e.end]!r}, which no file name "
                              "can hold") from e
    raw = path.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PATH_BYTES:
        raise UnsafePathError(f"{where}: path of {len(raw)} bytes exceeds {MAX_PATH_BYTES}")
    for part in path.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise UnsafePathError(f"{where}: path component {part[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return path


def confine(rel: str | os.PathLike, root: str | os.PathLike, where: str, *,
            allow_outside_root: bool = False) -> Path:
    """``root / rel`` resolved (symlinks followed); UnsafePathError unless it stays under resolved ``root``.

    ``where`` names the input, record and field (``"data.json: record 3 (id 'x'): field 'image_path'"``).
    With ``allow_outside_root`` absolute and escaping paths are accepted (the resolved path is returned).
    """
    if not isinstance(rel, str | os.PathLike):
        raise UnsafePathError(f"{where}: path must be a string, got {type(rel).__name__}")
    text = check_path_text(os.fspath(rel), where)
    root_real = Path(os.path.realpath(os.fspath(root)))
    target = Path(os.path.realpath(os.path.join(root_real, text)))
    if allow_outside_root:
        return target
    if os.path.isabs(text) or (len(text) > 1 and text[1] == ":"):
        raise UnsafePathError(f"{where}: absolute path {text!r} is refused (paths are relative to {root_real}; "
                              "pass --allow-outside-root / allow_outside_root=True to allow it)")
    if not target.is_relative_to(root_real):
        raise UnsafePathError(f"{where}: path {text!r} resolves to {target}, outside the root {root_real} "
                              "(pass --allow-outside-root / allow_outside_root=True to allow it)")
    return target


def check_file_size(path: str | os.PathLike, limit: int, where: str) -> int:
    """Size of ``path`` in bytes; ResourceLimitError when it exceeds ``limit``."""
    size = os.path.getsize(path)
    if size > limit:
        raise ResourceLimitError(f"{where}: {size} bytes exceed the limit {limit}")
    return size


def check_pixels(width: int, height: int, where: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    """ResourceLimitError when a ``width x height`` image exceeds the pixel budget (checked before decoding)."""
    if width * height > limit:
        raise ResourceLimitError(f"{where}: image of {width}x{height} pixels exceeds the budget of {limit} "
                                 "pixels (a decompression bomb or a mislabelled file)")
