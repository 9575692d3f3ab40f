"""LLaVA-NeXT / OneVision image and video preprocessing and visual-token plans (numpy + Pillow only).

Pixels match transformers' `LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil` (bicubic
PIL resize on uint8, scale 1/255, normalise; output NCHW float32 with the tile axis, tile 0 = base
view, images with fewer tiles zero-padded). Video frames follow the tower family's own processor, as the
reference runs it on each frame: CLIP (`CLIPImageProcessor`) resizes the shortest edge to S and centre-crops
SxS; SigLIP (`SiglipImageProcessor`, OneVision) resizes straight to SxS. Token plans say which row of a sample's visual feature table
fills each placeholder token; a sample's feature table is laid out as
`[image tiles: N*P rows (tile-major)] + [pooled video frames: F*Pv rows] + [image_newline: 1 row]`.
A plan's `index` is relative to its own tiles/frames and uses NEWLINE (-2) for the newline row;
`build_visual_index` turns plans into absolute `visual_index[B, T]`. OneVision's `anyres_max_N`
bilinear downsample of large grids mixes 4 rows per token: such plans carry `weights` and need
`build_visual_taps` (index and weights [B, T, 4]), which `LlavaNextModel.embed_inputs` also accepts.
`token_planner(LlavaConfig)` picks an image's plan (single view, anyres, anyres_max_N) and a video's, for
the model, the training pipeline and the inference API alike.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_gen.frames import uniform_frame_indices  # noqa: F401  (re-exported: the one frame sampler)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
NEWLINE = -2  # plan marker for the image_newline row
TEXT = -1  # visual_index value of text positions


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """How images become tiles: `mode` is 'anyres' (tiles + base view) or 'single' (pad square, 1 view)."""

    tile_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    grid_pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    mode: str = "anyres"
    resample: int = Image.BICUBIC
    family: str = "clip"  # vision tower family ('clip' or 'siglip'): picks the video frame preprocessing


def image_processor_config(model_cfg: Any) -> ImageProcessorConfig:
    """The preprocessing a ``LlavaConfig`` implies: tile size, CLIP or SigLIP statistics, anyres or single."""
    siglip = model_cfg.vision.model_type == "siglip"
    return ImageProcessorConfig(
        tile_size=model_cfg.vision.image_size,
        mean=SIGLIP_MEAN if siglip else CLIP_MEAN,
        std=SIGLIP_STD if siglip else CLIP_STD,
        grid_pinpoints=tuple(tuple(int(v) for v in p) for p in model_cfg.image_grid_pinpoints),
        mode="single" if model_cfg.image_aspect_ratio == "single" else "anyres",
        family="siglip" if siglip else "clip")


def _as_uint8_rgb(image) -> np.ndarray:
    """PIL image or HWC uint8 array -> HWC uint8 RGB array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"image must be HWC uint8 with 3 or 4 channels, got shape {arr.shape} dtype {arr.dtype}")
    return arr[..., :3]


def _resize(image: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """Pillow resize of an HWC uint8 array to (h, w)."""
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), resample=resample))


def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """HWC uint8 -> CHW float32 ((x/255 - mean) / std)."""
    x = image.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1).astype(np.float32)


def select_anyres_grid(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Best (height, width) pinpoint: max effective resolution, then least waste (HF's rule)."""
    h, w = image_hw
    best, best_eff, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    if best is None:
        raise ValueError(f"no grid pinpoint fits image size {image_hw} (pinpoints {pinpoints})")
    return best


def _fit_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """Size after resizing into target keeping aspect ratio (ceil on the side that does not fill)."""
    h, w = image_hw
    th, tw = target_hw
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def anyres_tiles(image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image -> [1 + rows*cols, C, S, S] float32 (base view first, then tiles row-major)."""
    img = _as_uint8_rgb(image)
    s = cfg.tile_size
    grid_h, grid_w = select_anyres_grid(img.shape[:2], cfg.grid_pinpoints)
    nh, nw = _fit_size(img.shape[:2], (grid_h, grid_w))
    resized = _resize(img, (nh, nw), cfg.resample)
    canvas = np.zeros((grid_h, grid_w, 3), np.uint8)
    top, left = (grid_h - nh) // 2, (grid_w - nw) // 2
    canvas[top:top + nh, left:left + nw] = resized
    views = [_resize(img, (s, s), cfg.resample)]
    views += [canvas[y:y + s, x:x + s] for y in range(0, grid_h, s) for x in range(0, grid_w, s)]
    return np.stack([_normalize(v, cfg.mean, cfg.std) for v in views])


def single_view(image, cfg: ImageProcessorConfig) -> np.ndarray:
    """LLaVA-1.5 style: pad to a square with the mean colour, resize -> [1, C, S, S]."""
    img = _as_uint8_rgb(image)
    h, w = img.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = np.asarray([int(m * 255) for m in cfg.mean], np.uint8)
    canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
    return _normalize(_resize(canvas, (cfg.tile_size, cfg.tile_size), cfg.resample), cfg.mean, cfg.std)[None]


def preprocess_images(images: Sequence, cfg: ImageProcessorConfig, num_tiles: int | None = None,
                      channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values [B, N, C, S, S] float32 zero-padded, image_sizes [B, 2] int64 (h, w)).

    num_tiles fixes N (static shapes for training); channels_last gives [B, N, S, S, C] (the training batch layout).
    """
    views, sizes = [], []
    for i, image in enumerate(images):
        img = _as_uint8_rgb(image)
        views.append(anyres_tiles(img, cfg) if cfg.mode == "anyres" else single_view(img, cfg))
        sizes.append(img.shape[:2])
        if num_tiles is not None and len(views[-1]) > num_tiles:
            raise ValueError(f"image {i} needs {len(views[-1])} tiles but num_tiles={num_tiles}")
    n = num_tiles or max(len(v) for v in views)
    out = np.zeros((len(views), n) + views[0].shape[1:], np.float32)
    for i, v in enumerate(views):
        out[i, :len(v)] = v
    if channels_last:
        out = np.ascontiguousarray(out.transpose(0, 1, 3, 4, 2))
    return out, np.asarray(sizes, np.int64)


def clip_frame(frame, cfg: ImageProcessorConfig) -> np.ndarray:
    """One frame as `CLIPImageProcessor` makes it: shortest edge resized to S (the long edge to
    int(S * long / short)), centre crop SxS, normalise -> [C, S, S] float32."""
    img = _as_uint8_rgb(frame)
    s = cfg.tile_size
    h, w = img.shape[:2]
    hw = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
    img = _resize(img, hw, cfg.resample)
    top, left = (hw[0] - s) // 2, (hw[1] - s) // 2
    return _normalize(img[top:top + s, left:left + s], cfg.mean, cfg.std)


def siglip_frame(frame, cfg: ImageProcessorConfig) -> np.ndarray:
    """One frame as `SiglipImageProcessor` makes it: resized to SxS (aspect not kept), normalise."""
    s = cfg.tile_size
    return _normalize(_resize(_as_uint8_rgb(frame), (s, s), cfg.resample), cfg.mean, cfg.std)


VIDEO_FRAME = {"clip": clip_frame, "siglip": siglip_frame}


def preprocess_video(frames: Sequence, cfg: ImageProcessorConfig, channels_last: bool = False) -> np.ndarray:
    """Video frames (HWC uint8) -> [F, C, S, S] float32 ([F, S, S, C] if channels_last), base resolution,
    each frame through its tower family's processor (`VIDEO_FRAME[cfg.family]`)."""
    if cfg.family not in VIDEO_FRAME:
        raise ValueError(f"unknown tower family {cfg.family!r}; expected one of {sorted(VIDEO_FRAME)}")
    out = np.stack([VIDEO_FRAME[cfg.family](f, cfg) for f in frames])
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if channels_last else out



@dataclasses.dataclass(frozen=True)
class TokenPlan:
    """Visual tokens of one image or video: `index` rows relative to its own tiles/frames (NEWLINE = -2).

    `index` is [count] for plain gathers; for a bilinear downsample (anyres_max_N) it is [count, 4] with
    `weights` [count, 4] mixing the four source rows of each token.
    """

    kind: str  # "image" or "video"
    index: np.ndarray  # int32 [count] or [count, 4]
    num_views: int  # tiles (image) or frames (video) it consumes from the sample's table
    weights: np.ndarray | None = None  # float32 [count, 4] when index is 4-tap

    @property
    def count(self) -> int:
        """How many placeholder tokens `<image>` expands to."""
        return int(self.index.shape[0])

    def taps(self) -> tuple[np.ndarray, np.ndarray]:
        """(index [count, 4], weights [count, 4]) for any plan (plain rows get weight 1 on tap 0)."""
        if self.weights is not None:
            return self.index, self.weights
        idx = np.repeat(self.index[:, None], 4, axis=1)
        w = np.zeros(idx.shape, np.float32)
        w[:, 0] = 1
        return idx, w


def bilinear_taps(size: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch bilinear (align_corners=False, no antialias) source taps along one axis: (i0, i1, frac)."""
    src = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size - 1)
    return i0, np.minimum(i0 + 1, size - 1), (src - i0).astype(np.float32)


def unpadded_grid(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows/cols of the stitched feature grid kept after unpadding: (top, bottom, left, right)."""
    h, w = image_hw
    ch, cw = grid_hw
    if w / h > cw / ch:
        new_h = int(round(h * (cw / w), 7))  # transformers rounds to 7 digits before int()
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(w * (ch / h), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def anyres_token_plan(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_size: int,
                      patches_per_side: int, *, newline: bool = True, max_num_patches: int | None = None
                      ) -> TokenPlan:
    """Base view tokens, then the unpadded tile grid row by row with a newline after each row."""
    gh, gw = select_anyres_grid(image_hw, pinpoints)
    rows, cols = gh // tile_size, gw // tile_size
    pps = patches_per_side
    per_tile = pps * pps
    top, bottom, left, right = unpadded_grid(image_hw, (rows * pps, cols * pps))
    ys, xs = np.arange(top, bottom), np.arange(left, right)
    tile = 1 + (ys[:, None] // pps) * cols + xs[None, :] // pps
    grid = tile * per_tile + (ys[:, None] % pps) * pps + xs[None, :] % pps
    hu, wu = grid.shape
    ratio = math.sqrt(hu * wu / (max_num_patches * pps**2)) if max_num_patches else 0.0
    if ratio > 1.1:  # anyres_max_N: bilinear downsample to (hu // ratio, wu // ratio), as transformers does
        (y0, y1, fy), (x0, x1, fx) = bilinear_taps(hu, int(hu // ratio)), bilinear_taps(wu, int(wu // ratio))
        taps = np.stack([grid[y0][:, x0], grid[y0][:, x1], grid[y1][:, x0], grid[y1][:, x1]], axis=-1)
        wy, wx = fy[:, None], fx[None, :]
        mix = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], axis=-1)
        if newline:
            taps = np.concatenate([taps, np.full((taps.shape[0], 1, 4), NEWLINE)], axis=1)
            nl = np.zeros((mix.shape[0], 1, 4), np.float32)
            nl[..., 0] = 1
            mix = np.concatenate([mix, nl], axis=1)
        base = np.repeat(np.arange(per_tile)[:, None], 4, axis=1)
        base_w = np.zeros((per_tile, 4), np.float32)
        base_w[:, 0] = 1
        index = np.concatenate([base, taps.reshape(-1, 4)]).astype(np.int32)
        weights = np.concatenate([base_w, mix.reshape(-1, 4)]).astype(np.float32)
        return TokenPlan("image", index, 1 + rows * cols, weights)
    if newline:
        grid = np.concatenate([grid, np.full((grid.shape[0], 1), NEWLINE)], axis=1)
    index = np.concatenate([np.arange(per_tile), grid.reshape(-1)]).astype(np.int32)
    return TokenPlan("image", index, 1 + rows * cols)


def single_view_token_plan(patches_per_side: int) -> TokenPlan:
    """LLaVA-1.5 single view: the base tokens only, no newline."""
    return TokenPlan("image", np.arange(patches_per_side**2, dtype=np.int32), 1)


def pooled_side(patches_per_side: int, stride: int, mode: str) -> int:
    """Side of a frame's token grid after pooling: bilinear rounds up, average/max pooling round down."""
    if stride <= 1:
        return patches_per_side
    return math.ceil(patches_per_side / stride) if mode == "bilinear" else patches_per_side // stride


def video_token_plan(num_frames: int, pooled: int, newline: str = "no_token") -> TokenPlan:
    """Frames' pooled tokens in time order; newline 'grid' (per row), 'frame', 'one_token' or 'no_token'."""
    per_frame = pooled * pooled
    grid = np.arange(num_frames * per_frame).reshape(num_frames, pooled, pooled)
    if newline == "grid":
        grid = np.concatenate([grid, np.full((num_frames, pooled, 1), NEWLINE)], axis=2)
        index = grid.reshape(-1)
    elif newline == "frame":
        index = np.concatenate([grid.reshape(num_frames, -1), np.full((num_frames, 1), NEWLINE)], 1).reshape(-1)
    elif newline == "one_token":
        index = np.concatenate([grid.reshape(-1), [NEWLINE]])
    elif newline == "no_token":
        index = grid.reshape(-1)
    else:
        raise ValueError(f"video newline mode must be grid/frame/one_token/no_token, got {newline!r}")
    return TokenPlan("video", index.astype(np.int32), num_frames)


def max_num_patches(image_aspect_ratio: str) -> int | None:
    """N of OneVision's 'anyres_max_N' (the tiles' worth of grid tokens kept before downsampling); None
    for 'anyres' and 'single'. Read as transformers reads `vision_aspect_ratio`."""
    if image_aspect_ratio.startswith("anyres_max_"):
        return int(image_aspect_ratio[len("anyres_max_"):])
    return None


@dataclasses.dataclass(frozen=True)
class TokenPlanner:
    """Which token plan one image (by its size) or one video (by its frame count) gets: a single view
    ('single'), anyres tiles, or anyres with the bilinear downsample past `max_num_patches` tiles
    (anyres_max_N). Build it from a LlavaConfig with `token_planner`."""

    mode: str = "anyres"  # "single" (LLaVA-1.5 pad, one view) or "anyres" (base view + tiles)
    tile_size: int = 336
    patches_per_side: int = 24
    grid_pinpoints: tuple[tuple[int, int], ...] = ImageProcessorConfig.grid_pinpoints
    image_newline: bool = True  # anyres: a newline token after every grid row
    max_num_patches: int | None = None  # anyres_max_N: N; None = never downsample
    pooled_side: int = 12  # side of a video frame's token grid after pooling
    video_newline: str = "no_token"  # grid | frame | one_token | no_token

    def image(self, image_hw: Sequence[int] | None) -> TokenPlan:
        """The plan of one image of size (h, w) (a single view needs no size)."""
        if self.mode == "single":
            return single_view_token_plan(self.patches_per_side)
        if image_hw is None:
            raise ValueError("an anyres token plan needs the image size (h, w); got none (image_sizes missing?)")
        return anyres_token_plan(tuple(int(v) for v in image_hw), self.grid_pinpoints, self.tile_size,
                                 self.patches_per_side, newline=self.image_newline,
                                 max_num_patches=self.max_num_patches)

    def video(self, num_frames: int) -> TokenPlan:
        """The plan of one video of `num_frames` frames."""
        return video_token_plan(num_frames, self.pooled_side, self.video_newline)


def token_planner(model_cfg: Any) -> TokenPlanner:
    """The TokenPlanner a ``LlavaConfig`` implies (the one place its image_aspect_ratio picks a plan)."""
    pps = model_cfg.vision.patches_per_side
    return TokenPlanner(
        mode="single" if model_cfg.image_aspect_ratio == "single" else "anyres",
        tile_size=model_cfg.vision.image_size, patches_per_side=pps,
        grid_pinpoints=tuple(tuple(int(v) for v in p) for p in model_cfg.image_grid_pinpoints),
        image_newline=bool(model_cfg.use_image_newline),
        max_num_patches=max_num_patches(model_cfg.image_aspect_ratio),
        pooled_side=pooled_side(pps, model_cfg.video_pool_stride, model_cfg.video_pooling),
        video_newline=model_cfg.video_newline)


def hf_image_token_count(plan: TokenPlan, *, num_additional_image_tokens: int = 1,
                         select_strategy: str = "default") -> int:
    """The `<image>` expansion transformers' LlavaNextProcessor computes for this image.

    It adds `num_additional_image_tokens` (CLS) to the base view and subtracts 1 for the 'default'
    strategy, so it equals `plan.count` only when both are set consistently (llava-hf configs use 1).
    """
    return plan.count + num_additional_image_tokens - (1 if select_strategy == "default" else 0)


def _sample_streams(plans: Sequence[TokenPlan], b: int, tokens_per_tile: int, num_tiles: int,
                    tokens_per_frame: int, num_frames: int, separate_video: bool
                    ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Absolute 4-tap rows of one sample's plans, grouped by placeholder stream."""
    newline_row = num_tiles * tokens_per_tile + num_frames * tokens_per_frame
    streams: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"image": [], "video": []}
    tile_off = frame_off = 0
    for plan in plans:
        rel, w = plan.taps()
        if plan.kind == "image":
            offset, tile_off, stream = tile_off * tokens_per_tile, tile_off + plan.num_views, "image"
        else:
            offset = num_tiles * tokens_per_tile + frame_off * tokens_per_frame
            frame_off += plan.num_views
            stream = "video" if separate_video else "image"
        streams[stream].append((np.where(rel == NEWLINE, newline_row, rel + offset), w))
    if tile_off > num_tiles or frame_off > num_frames:
        raise ValueError(f"sample {b}: plans need {tile_off} tiles / {frame_off} frames but the batch holds "
                         f"{num_tiles} / {num_frames}")
    return streams


def build_visual_taps(input_ids: np.ndarray, plans: Sequence[Sequence[TokenPlan]], image_token_id: int, *,
                      tokens_per_tile: int, num_tiles: int, tokens_per_frame: int = 0, num_frames: int = 0,
                      video_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like `build_visual_index` but 4-tap: (index [B, T, 4] int32 (-1 = text), weights [B, T, 4] float32).

    Needed when a plan downsamples (anyres_max_N); `LlavaNextModel.embed_inputs` accepts both forms.
    """
    input_ids = np.asarray(input_ids)
    index = np.full(input_ids.shape + (4,), TEXT, np.int32)
    weights = np.zeros(input_ids.shape + (4,), np.float32)
    for b, sample_plans in enumerate(plans):
        streams = _sample_streams(sample_plans, b, tokens_per_tile, num_tiles, tokens_per_frame, num_frames,
                                  video_token_id is not None)
        for stream, token_id in (("image", image_token_id), ("video", video_token_id)):
            if token_id is None:
                continue
            pos = np.nonzero(input_ids[b] == token_id)[0]
            parts = streams[stream]
            idx = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 4), np.int32)
            if len(pos) != len(idx):
                raise ValueError(f"sample {b}: {len(pos)} {stream} placeholder tokens (id {token_id}) but the "
                                 f"plans expand to {len(idx)}")
            index[b, pos] = idx
            weights[b, pos] = np.concatenate([p[1] for p in parts]) if parts else 0
    return index, weights


def build_visual_index(input_ids: np.ndarray, plans: Sequence[Sequence[TokenPlan]], image_token_id: int, *,
                       tokens_per_tile: int, num_tiles: int, tokens_per_frame: int = 0, num_frames: int = 0,
                       video_token_id: int | None = None) -> np.ndarray:
    """Absolute `visual_index[B, T]` (-1 = text) for the per-sample feature table of the module docstring.

    plans[b] lists sample b's images/videos in prompt order; images fill `image_token_id` positions and
    videos fill `video_token_id` positions (or image-token positions when it is None), in order.
    Plans that downsample (4-tap) need `build_visual_taps` instead.
    """
    if any(p.weights is not None for sample in plans for p in sample):
        raise ValueError("a plan mixes 4 rows per token (anyres_max_N downsample); use build_visual_taps")
    index, _ = build_visual_taps(input_ids, plans, image_token_id, tokens_per_tile=tokens_per_tile,
                                 num_tiles=num_tiles, tokens_per_frame=tokens_per_frame, num_frames=num_frames,
                                 video_token_id=video_token_id)
    return index[..., 0]
