"""Instance mask formats: COCO RLE (compressed and uncompressed), polygons, boxes, dense masks.

COCO RLE, re-derived from the format description (no pycocotools needed):

- A mask of shape ``[H, W]`` is flattened in column-major (Fortran) order and written as run
  lengths that alternate 0-runs and 1-runs, always starting with a (possibly empty) 0-run.
- Uncompressed RLE: ``{"size": [H, W], "counts": [int, ...]}``.
- Compressed RLE: ``{"size": [H, W], "counts": "string"}`` (``bytes`` accepted too). Each count
  (after the third, as the difference to the count two places earlier) is written as a signed
  little-endian base-32 varint: 5 payload bits per character, bit 0x20 = "more follows", bit 0x10
  of the last character = sign, each character offset by 48 (``'0'``).

Polygons follow COCO: a list of flat ``[x1, y1, x2, y2, ...]`` rings (pixel coordinates), filled
with Pillow's ``ImageDraw.polygon`` (several rings are OR-ed, as COCO does). Boxes are
``[x1, y1, x2, y2]`` in pixels, half-open (``x2``/``y2`` exclusive), clipped to the image.

``to_mask(spec, height, width)`` turns any of these into a ``[H, W]`` bool array; errors name the
offending field (pass ``where=`` to prefix a file / record name).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_gen.confine import InputRejected

__all__ = [
    "MaskFormatError",
    "encode_rle",
    "decode_rle",
    "decode_rle_crop",
    "rle_area",
    "rle_to_string",
    "rle_from_string",
    "polygon_to_mask",
    "box_to_mask",
    "mask_to_box",
    "mask_area",
    "to_mask",
    "spec_kind",
]


class MaskFormatError(InputRejected):
    """A mask, RLE, polygon or box spec that cannot be interpreted."""


def _fail(where: str, msg: str) -> MaskFormatError:
    return MaskFormatError(f"{where}: {msg}" if where else msg)


# --------------------------------------------------------------------------------------------- RLE


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a bool mask, starting with a 0-run."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return counts


def rle_to_string(counts: Sequence[int]) -> str:
    """Compress a list of run lengths into the COCO counts string."""
    out: list[str] = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift (Python ints keep the sign)
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def rle_from_string(s: str | bytes, *, where: str = "") -> list[int]:
    """Decode a COCO counts string into run lengths."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise _fail(where, "RLE counts string ends in the middle of a number")
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise _fail(where, f"RLE counts string has an invalid character {s[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle(mask: np.ndarray, *, compress: bool = True) -> dict[str, Any]:
    """Encode a ``[H, W]`` mask as a COCO RLE dict (string counts if ``compress``, else a list)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskFormatError(f"encode_rle expects a [H, W] mask, got shape {mask.shape}")
    counts = _runs(mask != 0)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": rle_to_string(counts) if compress else counts}


def _rle_counts(rle: dict[str, Any], where: str) -> tuple[int, int, list[int]]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise _fail(where, "an RLE must be a dict with 'size' [H, W] and 'counts'")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in size)):
        raise _fail(where, f"RLE 'size' must be [H, W] non-negative ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    raw = rle["counts"]
    if isinstance(raw, (str, bytes)):
        counts = rle_from_string(raw, where=where)
    elif isinstance(raw, (list, tuple, np.ndarray)):
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                   or isinstance(c, (float, np.floating)) and np.isfinite(c) and float(c).is_integer()
                   for c in raw):
            raise _fail(where, "RLE 'counts' list must hold integer run lengths")
        counts = [int(c) for c in raw]
    else:
        raise _fail(where, f"RLE 'counts' must be a string or a list of ints, got {type(raw).__name__}")
    if any(c < 0 for c in counts):
        raise _fail(where, "RLE 'counts' has a negative run length")
    total = sum(counts)
    if total != h * w:
        raise _fail(where, f"RLE run lengths sum to {total} but size {h}x{w} needs {h * w}")
    return h, w, counts


def decode_rle(rle: dict[str, Any], *, where: str = "") -> np.ndarray:
    """Decode a COCO RLE dict into a ``[H, W]`` bool mask."""
    h, w, counts = _rle_counts(rle, where)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy() if h * w else np.zeros((h, w), bool)


def decode_rle_crop(rle: dict[str, Any], *, where: str = "") -> tuple[int, int, np.ndarray] | None:
    """Decode only the tight bounding box of an RLE: ``(x0, y0, crop[h, w] bool)``, or None if empty.

    Column-major runs make a column range one contiguous slice, so only that slab is expanded.
    """
    h, w, counts = _rle_counts(rle, where)
    c = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(c)
    starts = ends - c
    fg = np.arange(len(c)) % 2 == 1
    fg &= c > 0
    if not fg.any():
        return None
    first, last = int(starts[fg][0]), int(ends[fg][-1]) - 1
    c0, c1 = first // h, last // h
    lo, hi = c0 * h, (c1 + 1) * h
    keep = (ends > lo) & (starts < hi)
    seg = np.minimum(ends[keep], hi) - np.maximum(starts[keep], lo)
    vals = fg[keep]
    slab = np.repeat(vals, seg).reshape((c1 - c0 + 1, h)).T
    rows = np.flatnonzero(slab.any(axis=1))
    return c0, int(rows[0]), slab[rows[0]:rows[-1] + 1]


def rle_area(rle: dict[str, Any], *, where: str = "") -> int:
    """Foreground pixel count of an RLE without decoding it."""
    _, _, counts = _rle_counts(rle, where)
    return int(sum(counts[1::2]))


# ------------------------------------------------------------------------------ polygons and boxes


def polygon_to_mask(polygon: Sequence, height: int, width: int, *, where: str = "") -> np.ndarray:
    """Rasterise COCO polygon rings (flat ``[x, y, ...]`` lists, or one flat list) to ``[H, W]`` bool."""
    rings = polygon
    if len(rings) and isinstance(rings[0], (int, float, np.integer, np.floating)):
        rings = [rings]
    img = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(img)
    for r, ring in enumerate(rings):
        pts = np.asarray(ring, dtype=np.float64).ravel()
        if pts.size < 6 or pts.size % 2:
            raise _fail(where, f"polygon ring {r} needs an even number (>= 6) of coordinates, got {pts.size}")
        if not np.all(np.isfinite(pts)):
            raise _fail(where, f"polygon ring {r} has non-finite coordinates")
        draw.polygon([tuple(p) for p in pts.reshape(-1, 2).tolist()], fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def box_to_mask(box: Sequence[float], height: int, width: int, *, where: str = "") -> np.ndarray:
    """``[x1, y1, x2, y2]`` pixel box (x2/y2 exclusive) to a ``[H, W]`` bool mask, clipped."""
    if len(box) != 4:
        raise _fail(where, f"a box must be [x1, y1, x2, y2], got {len(box)} numbers")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise _fail(where, f"box has non-finite coordinates {list(box)}")
    if x2 < x1 or y2 < y1:
        raise _fail(where, f"box {list(box)} has x2 < x1 or y2 < y1 (expected [x1, y1, x2, y2])")
    m = np.zeros((int(height), int(width)), bool)
    c1, c2 = max(0, int(round(x1))), min(int(width), int(round(x2)))
    r1, r2 = max(0, int(round(y1))), min(int(height), int(round(y2)))
    if c2 > c1 and r2 > r1:
        m[r1:r2, c1:c2] = True
    return m


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight ``(x1, y1, x2, y2)`` box (x2/y2 exclusive) of a mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_area(mask: np.ndarray) -> int:
    """Foreground pixel count."""
    return int(np.count_nonzero(mask))


# ------------------------------------------------------------------------------------ any -> mask


def spec_kind(spec: Any) -> str:
    """Classify an instance spec: 'mask', 'rle', 'polygon', 'box' (or raise).

    Accepted: a 2-D array (mask); a dict with 'size'+'counts' (RLE); ``{"polygon": rings}`` or
    ``{"segmentation": rings}``; ``{"box": [x1, y1, x2, y2]}`` or ``{"bbox_xyxy": ...}``; a list of
    rings (polygon); a flat list of 4 numbers (box) or of >= 6 numbers (one polygon ring).
    """
    if isinstance(spec, np.ndarray):
        if spec.ndim == 2:
            return "mask"
        raise MaskFormatError(f"a mask array must be [H, W], got shape {spec.shape}")
    if isinstance(spec, dict):
        if "counts" in spec and "size" in spec:
            return "rle"
        if "polygon" in spec or "segmentation" in spec:
            return "polygon"
        if "box" in spec or "bbox_xyxy" in spec:
            return "box"
        raise MaskFormatError(f"cannot interpret instance dict with keys {sorted(spec)}")
    if isinstance(spec, (list, tuple)):
        if len(spec) and isinstance(spec[0], (list, tuple, np.ndarray)):
            return "polygon"
        if len(spec) == 4:
            return "box"
        if len(spec) >= 6 and len(spec) % 2 == 0:
            return "polygon"
    raise MaskFormatError(f"cannot interpret instance spec of type {type(spec).__name__}")


def to_mask(spec: Any, height: int, width: int, *, where: str = "") -> np.ndarray:
    """Any accepted instance spec (see ``spec_kind``) to a ``[H, W]`` bool mask of the image size."""
    try:
        kind = spec_kind(spec)
    except MaskFormatError as e:
        raise _fail(where, str(e)) from None
    if kind == "mask":
        if spec.shape != (height, width):
            raise _fail(where, f"mask shape {spec.shape} does not match the image {height}x{width}")
        return spec if spec.dtype == bool else spec != 0
    if kind == "rle":
        size = spec.get("size")
        if isinstance(size, (list, tuple)) and len(size) == 2 and list(size) != [height, width]:
            raise _fail(where, f"RLE size {list(size)!r:.60} does not match the image {height}x{width}")
        m = decode_rle(spec, where=where)
        if m.shape != (height, width):
            raise _fail(where, f"RLE size {list(m.shape)} does not match the image {height}x{width}")
        return m
    if kind == "polygon":
        rings = spec.get("polygon", spec.get("segmentation")) if isinstance(spec, dict) else spec
        return polygon_to_mask(rings, height, width, where=where)
    box = spec.get("box", spec.get("bbox_xyxy")) if isinstance(spec, dict) else spec
    return box_to_mask(box, height, width, where=where)
