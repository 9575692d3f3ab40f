"""Set-of-Marks rendering: numbered instance marks drawn on images and video frames (numpy + Pillow).

``render_marks(image[H, W, 3] uint8, instances, style) -> [H, W, 3] uint8`` where ``instances`` is a
list of ``(id, spec)`` (or a ``{id: spec}`` dict); ``spec`` is anything ``data_gen.masks.to_mask``
accepts: a ``[H, W]`` mask, a COCO RLE dict, COCO polygon rings, or an ``[x1, y1, x2, y2]`` box.

What is drawn (the look of the SoM reference, re-derived):

- Order: instances are sorted by area, largest first, so small ones are drawn on top. The number
  drawn is the given ID (``str(id)``), never a re-numbering; ``number_by_area`` gives the reference's
  1..N numbering when you need it.
- Colour: fixed per ID (``id_color``): integer-like IDs index a 24-colour palette, other IDs hash
  (crc32) into it, so the same ID has the same colour on every frame and in every process.
- Fill: the mask blended with its colour at ``alpha`` (0.1 by default); contour: the mask's inner
  boundary (the mask XOR its 4-neighbour erosion, ``contour_px`` times) in the full colour.
- Label: the ID on a box centred at the mask's interior point farthest from its boundary (Euclidean
  distance transform with the image border counted as boundary; ties: the middle entry of the
  maximal pixels in row-major order, as the reference picks). ``"image"`` style: white digits on a
  dark box; ``"video"`` style (Inst-IT frames): dark digits on a light box; box opacity 0.8.
  The font is about 18 px at a 640 px short side (``font_px`` overrides). Below 11 px Pillow's fonts
  blur, so a built-in 3x5 pixel digit font (integer scaled) is used: labels stay legible down to
  ~5 px high, e.g. on 56-84 px training images. Non-digit IDs always use Pillow's bundled font.

Edge cases:

- Overlap: the label goes on the *visible* part of the mask (the mask minus the instances drawn on
  top of it); if nothing is visible it falls back to the whole mask. Fill and contour use the whole mask.
- Tiny masks (even one pixel) get a label; every label box is clamped inside the image (and cropped
  when the image is smaller than the box).
- Hollow masks (rings): the farthest point is computed on the mask itself, so it lies on the ring.
- Empty masks are skipped; ``return_info=True`` returns ``(image, infos)`` with ``MarkInfo.skipped``
  set to ``"empty"`` for them.
- Border-touching masks: the image border counts as boundary, so labels move inwards.

Speed: all work happens on each mask's bounding-box crop (the distance transform of a padded crop
equals the full-frame one); crops longer than ``dt_max_side`` are shrunk by block-AND (a block is
foreground only if all its pixels are) before the distance transform, so the chosen point still lies
on the mask (approximate maximum; exact below the threshold). Label patches are cached.

Augmentation: ``seed`` draws a random but reproducible style (fill alpha, contour width, font scale,
label opacity, palette offset); one seed gives one style for a whole video (``render_video_marks``).
"""
from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from data_gen.confine import ascii_digits
from data_gen.masks import MaskFormatError, decode_rle_crop, mask_to_box, spec_kind, to_mask

__all__ = [
    "PALETTE",
    "MarkStyle",
    "MarkInfo",
    "id_color",
    "label_point",
    "number_by_area",
    "random_style",
    "render_marks",
    "render_video_marks",
]

# 24 distinct, saturated colours (RGB); index = (int(id) - 1 + offset) % 24.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 225, 25), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
    (128, 128, 128), (255, 99, 71), (46, 139, 87), (65, 105, 225), (218, 165, 32), (199, 21, 133),
)

STYLES = ("image", "video")


@dataclass(frozen=True)
class MarkStyle:
    """Drawing parameters (see the module docstring)."""

    style: str = "image"
    alpha: float = 0.1
    contour_px: int = 1
    font_scale: float = 1.0
    font_px: int | None = None
    label_opacity: float = 0.8
    palette_offset: int = 0
    dt_max_side: int = 96
    label_box: str = "plain"
    label_grid: int = 0  # > 0: each label centred in its own cell of this pixel grid (a ViT's patch grid)


@dataclass(frozen=True)
class MarkInfo:
    """What happened to one instance: label centre ``(x, y)``, label box ``(x1, y1, x2, y2)``."""

    id: str
    area: int
    color: tuple[int, int, int]
    label_xy: tuple[int, int] | None = None
    label_box: tuple[int, int, int, int] | None = None
    skipped: str | None = None


def id_color(instance_id: Any, palette_offset: int = 0) -> tuple[int, int, int]:
    """Stable RGB colour for an instance ID (same ID -> same colour, in every process)."""
    key = str(instance_id).strip()
    if ascii_digits(key.lstrip("-")):
        idx = int(key) - 1
    else:
        idx = zlib.crc32(key.encode("utf-8"))
    return PALETTE[(idx + palette_offset) % len(PALETTE)]


def random_style(seed: int, style: str = "image", alpha: float = 0.1) -> MarkStyle:
    """A reproducible randomised style for augmentation."""
    rng = np.random.default_rng(seed)
    return MarkStyle(
        style=style,
        alpha=float(np.clip(alpha * rng.uniform(0.7, 2.5), 0.03, 0.5)),
        contour_px=int(rng.choice([1, 1, 2])),
        font_scale=float(rng.uniform(0.85, 1.2)),
        label_opacity=float(rng.uniform(0.65, 0.95)),
        palette_offset=int(rng.integers(0, len(PALETTE))),
    )


# ------------------------------------------------------------------------------ label placement


def _farthest_point(mask: np.ndarray) -> tuple[int, int]:
    """(row, col) of the farthest-from-boundary pixel of a non-empty crop; zero-padded EDT."""
    dt = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    flat = np.flatnonzero(dt == dt.max())
    r, c = divmod(int(flat[len(flat) // 2]), mask.shape[1])
    return r, c


def _label_point_crop(mask: np.ndarray, dt_max_side: int) -> tuple[int, int]:
    """(row, col) label point inside a cropped mask, with block-AND shrinking for big crops."""
    h, w = mask.shape
    f = -(-max(h, w) // dt_max_side) if dt_max_side > 0 else 1
    if f > 1:
        hp, wp = -(-h // f) * f, -(-w // f) * f
        padded = np.zeros((hp, wp), bool)
        padded[:h, :w] = mask
        small = padded.reshape(hp // f, f, wp // f, f).all(axis=(1, 3))
        if small.any():
            r, c = _farthest_point(small)
            return min(r * f + f // 2, h - 1), min(c * f + f // 2, w - 1)
    return _farthest_point(mask)


def label_point(mask: np.ndarray, *, dt_max_side: int = 0) -> tuple[int, int] | None:
    """``(x, y)`` of the interior point farthest from the mask boundary, or None for an empty mask.

    ``dt_max_side=0`` gives the exact reference point; > 0 enables the fast shrunk approximation.
    """
    box = mask_to_box(np.asarray(mask, bool))
    if box is None:
        return None
    x1, y1, x2, y2 = box
    r, c = _label_point_crop(np.asarray(mask[y1:y2, x1:x2], bool), dt_max_side)
    return x1 + c, y1 + r


def number_by_area(masks: Sequence[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """Reference numbering: IDs 1..N by area, largest first (empty masks dropped)."""
    order = sorted(range(len(masks)), key=lambda i: -int(np.count_nonzero(masks[i])))
    kept = [masks[i] for i in order if np.count_nonzero(masks[i])]
    return [(k + 1, m) for k, m in enumerate(kept)]


# ----------------------------------------------------------------------------------------- labels

# 3x5 pixel digits (rows top to bottom, 3 bits each, MSB = left column).
_DIGITS_3X5 = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 2, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
}
_BITMAP_BELOW_PX = 11


def _bitmap_text(text: str, scale: int) -> np.ndarray:
    """[5*s, (4*n-1)*s] bool glyph image of a digit string."""
    cols = []
    for i, ch in enumerate(text):
        rows = _DIGITS_3X5[ch]
        g = np.array([[(r >> (2 - b)) & 1 for b in range(3)] for r in rows], bool)
        if i:
            cols.append(np.zeros((5, 1), bool))
        cols.append(g)
    glyphs = np.concatenate(cols, axis=1)
    return np.kron(glyphs, np.ones((scale, scale), bool))


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


LABEL_BOXES = ("plain", "id")


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@functools.lru_cache(maxsize=4096)
def _label_patch(text: str, font_px: int, style: str, opacity: float,
                 box: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label patch: colour [h, w, 3] float32 and alpha [h, w] float32.

    ``box`` (an RGB colour) fills the box with it and picks black or white text by its luminance;
    None gives the style's plain box (dark for "image", light for "video").
    """
    if box is not None:
        box_rgb = tuple(float(v) for v in box)
        text_rgb = (0.0, 0.0, 0.0) if _luma(box) > 140 else (255.0, 255.0, 255.0)
    elif style == "image":
        box_rgb, text_rgb = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    else:
        box_rgb, text_rgb = (255.0, 255.0, 255.0), (0.0, 0.0, 0.0)
    if font_px < _BITMAP_BELOW_PX and ascii_digits(text):
        glyph = _bitmap_text(text, max(1, font_px // 5))
        pad = 1
        ink = np.pad(glyph, pad).astype(np.float32)
    else:
        font = _font(font_px)
        x0, y0, x1, y1 = font.getbbox(text)
        pad = max(1, font_px // 6)
        img = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
        ImageDraw.Draw(img).text((pad - x0, pad - y0), text, fill=255, font=font)
        ink = np.asarray(img, np.float32) / 255.0
    alpha = opacity + (1.0 - opacity) * ink
    color = np.empty(ink.shape + (3,), np.float32)
    for k in range(3):
        color[..., k] = (ink * text_rgb[k] + (1.0 - ink) * box_rgb[k] * opacity) / alpha
    return color, alpha


def _grid_cell_centre(point: tuple[int, int], mask: np.ndarray, x0: int, y0: int, grid: int, h: int, w: int,
                      taken: set[tuple[int, int]]) -> tuple[int, int]:
    """Centre (x, y) of a free `grid`-px cell for a label near `point`: cells whose centre lies on `mask`
    (a crop at (x0, y0)) first, then by distance; the cell is added to `taken`."""
    rows, cols = max(1, h // grid), max(1, w // grid)
    best, best_key = None, None
    for gy in range(rows):
        for gx in range(cols):
            if (gy, gx) in taken:
                continue
            cx, cy = gx * grid + grid // 2, gy * grid + grid // 2
            my, mx = cy - y0, cx - x0
            on = 0 <= my < mask.shape[0] and 0 <= mx < mask.shape[1] and bool(mask[my, mx])
            key = (not on, (cx - point[0]) ** 2 + (cy - point[1]) ** 2)
            if best_key is None or key < best_key:
                best, best_key = (gy, gx), key
    if best is None:  # more labels than cells: share the nearest one
        gy, gx = min(max(point[1] // grid, 0), rows - 1), min(max(point[0] // grid, 0), cols - 1)
        return gx * grid + grid // 2, gy * grid + grid // 2
    taken.add(best)
    return best[1] * grid + grid // 2, best[0] * grid + grid // 2


def _paste_label(out: np.ndarray, patch: tuple[np.ndarray, np.ndarray], cx: int, cy: int
                 ) -> tuple[int, int, int, int]:
    """Alpha-composite a label centred at (cx, cy), clamped inside the image; returns its box."""
    color, alpha = patch
    H, W = out.shape[:2]
    ph, pw = alpha.shape
    x1 = int(min(max(cx - pw // 2, 0), max(W - pw, 0)))
    y1 = int(min(max(cy - ph // 2, 0), max(H - ph, 0)))
    x2, y2 = min(x1 + pw, W), min(y1 + ph, H)
    a = alpha[: y2 - y1, : x2 - x1, None]
    region = out[y1:y2, x1:x2].astype(np.float32)
    out[y1:y2, x1:x2] = np.clip(region * (1 - a) + color[: y2 - y1, : x2 - x1] * a + 0.5, 0, 255).astype(np.uint8)
    return x1, y1, x2, y2


# ------------------------------------------------------------------------------------ rendering


def _crop(spec: Any, h: int, w: int, where: str) -> tuple[int, int, np.ndarray] | None:
    """(x0, y0, bool crop) of an instance's tight bounding box, or None when empty."""
    try:
        kind = spec_kind(spec)
    except MaskFormatError as e:
        raise MaskFormatError(f"{where}: {e}") from None
    if kind == "rle":
        size = spec.get("size")
        if isinstance(size, (list, tuple)) and len(size) == 2 and list(size) != [h, w]:
            raise MaskFormatError(f"{where}: RLE size {list(size)} does not match the image {h}x{w}")
        return decode_rle_crop(spec, where=where)
    if kind == "polygon":
        rings = spec.get("polygon", spec.get("segmentation")) if isinstance(spec, dict) else spec
        if len(rings) and not isinstance(rings[0], (list, tuple, np.ndarray)):
            rings = [rings]
        pts = np.concatenate([np.asarray(r, np.float64).ravel() for r in rings]) if len(rings) else np.zeros(0)
        if pts.size < 6 or pts.size % 2 or not np.all(np.isfinite(pts)):
            full = to_mask(spec, h, w, where=where)  # raises the detailed error
        else:
            xs, ys = pts[0::2], pts[1::2]
            x0 = max(0, int(np.floor(xs.min())) - 1)
            y0 = max(0, int(np.floor(ys.min())) - 1)
            x1 = min(w, int(np.ceil(xs.max())) + 2)
            y1 = min(h, int(np.ceil(ys.max())) + 2)
            if x1 <= x0 or y1 <= y0:
                return None
            shifted = [(np.asarray(r, np.float64).reshape(-1, 2) - (x0, y0)).ravel().tolist() for r in rings]
            full = to_mask({"polygon": shifted}, y1 - y0, x1 - x0, where=where)
            box = mask_to_box(full)
            if box is None:
                return None
            bx1, by1, bx2, by2 = box
            return x0 + bx1, y0 + by1, full[by1:by2, bx1:bx2]
    else:
        full = to_mask(spec, h, w, where=where)
    box = mask_to_box(full)
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return x1, y1, full[y1:y2, x1:x2]


def _contour(m: np.ndarray, width: int) -> np.ndarray:
    """Inner boundary of a crop: mask XOR its 4-neighbour erosion (``width`` times)."""
    er = m
    for _ in range(max(1, width)):
        p = np.pad(er, 1)
        er = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~er


@functools.lru_cache(maxsize=1024)
def _blend_lut(value: int, alpha: float) -> np.ndarray:
    """uint8 table: v -> round(v * (1 - alpha) + value * alpha)."""
    return (np.arange(256, dtype=np.float32) * (1 - alpha) + value * alpha + 0.5).astype(np.uint8)


def _font_px(style: MarkStyle, h: int, w: int) -> int:
    if style.font_px is not None:
        return max(5, int(style.font_px))
    return max(5, int(round(18.0 * min(h, w) / 640.0 * style.font_scale)))


def render_marks(image: np.ndarray, instances: Sequence[tuple[Any, Any]] | Mapping[Any, Any],
                 style: str = "image", *, alpha: float = 0.1, seed: int | None = None,
                 contour_px: int = 1, font_px: int | None = None, label_opacity: float = 0.8,
                 dt_max_side: int = 96, label_box: str = "plain", label_grid: int = 0,
                 mark_style: MarkStyle | None = None, label_on_visible: bool = True,
                 return_info: bool = False) -> np.ndarray | tuple[np.ndarray, list[MarkInfo]]:
    """Draw Set-of-Marks on ``image[H, W, 3] uint8``; returns a new ``[H, W, 3] uint8`` array.

    ``seed`` (when given) replaces alpha / contour / font scale / opacity / palette offset by a
    reproducible random style; ``mark_style`` sets everything explicitly. ``label_box="id"`` fills each
    label box with its ID's colour (the coloured-label look of SoM's visualiser; the ID is then readable
    from the colour as well as the digits); ``"plain"`` keeps the style's dark / light box. ``label_on_visible=False``
    places labels on whole masks (the reference's rule, ignoring what covers them). ``label_grid=G`` centres
    every label in a cell of the G-px grid (one label per cell, on the instance where a free cell's centre
    is on it, else the nearest free cell): with G = a ViT's patch side, one patch holds a whole label.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"render_marks expects an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if mark_style is None:
        if seed is not None:
            mark_style = replace(random_style(seed, style, alpha), dt_max_side=dt_max_side, font_px=font_px,
                                 label_box=label_box, label_grid=label_grid)
        else:
            mark_style = MarkStyle(style=style, alpha=alpha, contour_px=contour_px, font_px=font_px,
                                   label_opacity=label_opacity, dt_max_side=dt_max_side, label_box=label_box,
                                   label_grid=label_grid)
    st = mark_style
    if st.label_box not in LABEL_BOXES:
        raise ValueError(f"label_box must be one of {LABEL_BOXES}, got {st.label_box!r}")
    h, w = image.shape[:2]
    items = list(instances.items()) if isinstance(instances, Mapping) else list(instances)

    crops: list[tuple[str, int, int, np.ndarray, int]] = []
    infos: list[MarkInfo] = []
    for k, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"instance {k}: expected an (id, spec) pair, got {type(item).__name__}")
        iid, spec = str(item[0]), item[1]
        c = _crop(spec, h, w, where=f"instance {k} (id {iid})")
        if c is None:
            infos.append(MarkInfo(iid, 0, id_color(iid, st.palette_offset), skipped="empty"))
            continue
        x0, y0, m = c
        crops.append((iid, x0, y0, m, int(np.count_nonzero(m))))
    crops.sort(key=lambda t: -t[4])  # largest first; stable for equal areas

    # Label points on the visible part: walk from the top-most (smallest) instance down.
    occupied = np.zeros((h, w), bool)
    points: list[tuple[int, int]] = [(0, 0)] * len(crops)
    taken: set[tuple[int, int]] = set()
    for i in range(len(crops) - 1, -1, -1):
        _, x0, y0, m, _ = crops[i]
        occ = occupied[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
        vis = m & ~occ if label_on_visible else m
        r, c = _label_point_crop(vis if vis.any() else m, st.dt_max_side)
        points[i] = (x0 + c, y0 + r)
        if st.label_grid > 0:
            points[i] = _grid_cell_centre(points[i], vis if vis.any() else m, x0, y0, st.label_grid, h, w, taken)
        occ |= m

    out = image.copy()
    a = float(st.alpha)
    for iid, x0, y0, m, _ in crops:
        color = id_color(iid, st.palette_offset)
        region = out[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
        if a > 0:  # per-channel lookup table + masked copy: cheaper than gather/scatter
            for k in range(3):
                ch = region[..., k]
                np.copyto(ch, _blend_lut(color[k], a)[ch], where=m)
        if st.contour_px > 0:
            region[_contour(m, st.contour_px)] = color
    fpx = _font_px(st, h, w)
    for (iid, _x0, _y0, _m, area), (cx, cy) in zip(crops, points):
        box_rgb = id_color(iid, st.palette_offset) if st.label_box == "id" else None
        patch = _label_patch(iid, fpx, st.style, round(float(st.label_opacity), 3), box_rgb)
        box = _paste_label(out, patch, cx, cy)
        infos.append(MarkInfo(iid, area, id_color(iid, st.palette_offset), (cx, cy), box))
    return (out, infos) if return_info else out


def render_video_marks(frames: Sequence[np.ndarray],
                       tracks: Sequence[Sequence[tuple[Any, Any]] | Mapping[Any, Any]],
                       style: str = "video", *, alpha: float = 0.1, seed: int | None = None,
                       **kwargs: Any) -> list[np.ndarray]:
    """Mark every frame ``[H, W, 3]``; ``tracks[t]`` lists frame t's ``(id, spec)`` (IDs stable per track).

    One style is used for the whole sequence: every frame gets the same seed, and ``random_style`` is a
    pure function of it (so a seed changes the look, never the ID colours between frames).
    """
    if len(frames) != len(tracks):
        raise ValueError(f"render_video_marks: {len(frames)} frames but {len(tracks)} per-frame instance lists")
    return [render_marks(f, t, style, alpha=alpha, seed=seed, **kwargs) for f, t in zip(frames, tracks)]
