"""Grain input pipeline: TFRecord shards -> shuffled, host-sharded, fixed-shape training batches.

Order of operations (every step deterministic in ``cfg.seed``):
``source -> global shuffle (reshuffled each epoch) -> repeat -> weighted mix of sources -> this host's
slice (index::count) -> decode + preprocess + tokenise -> batch + pad to a length bucket``, or with
``packing``: ``... -> tokenise -> first-fit packing into rows of max_length tokens and max_views views
(grain's FirstFitPackIterDataset) -> batch of rows`` (layout in PackedCollator).
The iterator returned by ``iter(pipeline)`` has ``get_state()`` / ``set_state()`` (grain's), so the next
batch after a restore is identical to the one the original iterator would have produced. With
``num_workers > 0`` each grain worker batches its own slice of samples, so batch composition depends on
the worker count; restore with the same ``num_workers`` the state was saved with.

Batch layout (what the train step, the AOT fit and the random batches take), all numpy with static shapes:
``input_ids/attention_mask/targets/visual_index [B,T] int32``, ``loss_mask [B,T] float32`` (aligned with
``targets``: the next-token ids), ``pixel_values [B,N,S,S,3] float32`` (NHWC, tile 0 = base view,
zero-padded tiles; absent when ``num_tiles == 0``), ``pixel_values_videos [B,F,S,S,3] float32`` (zero-padded
frames; absent when ``num_frames == 0``), ``image_sizes [B,2] int32`` (h, w of the first image or frame;
0 for text samples).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from data_gen.frames import uniform_frame_indices
from instit_jax import processing
from instit_jax.chat_template import IMAGE_TOKEN, tokenize_conversation
from instit_jax.data.records import ShardedRecordSource


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that fixes the batch shapes and contents."""

    batch_size: int  # per host
    max_length: int  # T upper bound; longer samples are truncated (never inside visual tokens)
    template: str = "vicuna_v1"  # chat template (instit_jax.chat_template)
    mask_policy: str = "answers"  # chat_template.MASK_POLICIES: "answers" (ours), "reference", "all"
    image: processing.ImageProcessorConfig = processing.ImageProcessorConfig()
    patch_size: int = 14  # vision patch size: tokens per tile side = tile_size // patch_size
    num_tiles: int = 5  # N: image views per sample (1 base + tiles); 0 for video-only batches
    num_frames: int = 32  # F: frame cap; videos are sampled uniformly (data_gen.frames) down to it; 0 = no videos
    min_video_frames: int = 8  # the token budget may lower a video's frames (see fit_frames) down to this
    video_pool_stride: int = 2  # 2x2 spatial pooling of frame tokens
    video_pool_mode: str = "bilinear"
    video_newline: str = "no_token"  # grid | frame | one_token | no_token
    image_newline: bool = True  # anyres newline after every row
    max_num_patches: int | None = None  # anyres_max_N: N (4-tap plans: refused by the collators)
    length_buckets: tuple[int, ...] = ()  # pad T to the smallest bucket >= longest sample; () -> max_length
    cache_samples: bool = False  # keep every processed sample in RAM after its first use (small datasets
    #                              trained for many epochs: decode/resize/tokenise once)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever
    drop_remainder: bool = True
    num_workers: int = 0  # >0: grain multiprocessing workers
    read_threads: int = 4  # threads per process that decode/preprocess samples (PIL and numpy drop the GIL)
    prefetch_samples: int = 0  # processed samples kept ahead per process; 0 -> 2 * batch_size (grain's 500
    #                            would hold ~20 GB of 32-frame float32 videos)
    pad_token: str = "<pad>"
    packing: bool = False  # several conversations per row of max_length tokens (see PackedCollator)
    max_views: int = 0  # packing: the tower's views per row (tiles and frames together)
    packing_bins: int = 0  # packing: rows filled at once (first fit); 0 -> 4 * batch_size

    @property
    def patches_per_side(self) -> int:
        return self.image.tile_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return processing.pooled_side(self.patches_per_side, self.video_pool_stride, self.video_pool_mode) ** 2

    @property
    def token_planner(self) -> processing.TokenPlanner:
        """The plans samples get; `processing.token_planner(model_cfg)` for a config from `pipeline_config_for`."""
        return processing.TokenPlanner(
            mode=self.image.mode, tile_size=self.image.tile_size, patches_per_side=self.patches_per_side,
            grid_pinpoints=self.image.grid_pinpoints, image_newline=self.image_newline,
            max_num_patches=self.max_num_patches,
            pooled_side=processing.pooled_side(self.patches_per_side, self.video_pool_stride, self.video_pool_mode),
            video_newline=self.video_newline)


def pipeline_config_for(model_cfg: Any, *, batch_size: int, max_length: int, num_frames: int = 32,
                        template: str | None = None, **overrides: Any) -> PipelineConfig:
    """A PipelineConfig whose shapes match a ``LlavaConfig`` (tile size, normalisation, pinpoints, pooling).

    ``num_tiles`` is 1 + the largest pinpoint grid (anyres) or 1 (single view); ``template`` defaults to
    vicuna_v1 for Llama decoders and qwen_1_5 for Qwen2.
    """
    vis = model_cfg.vision
    planner = processing.token_planner(model_cfg)
    if planner.max_num_patches is not None:
        raise NotImplementedError(f"image_aspect_ratio={model_cfg.image_aspect_ratio!r}: its bilinear grid "
                                  "downsample needs 4-tap plans, which training batches (visual_index) do not carry")
    image = processing.image_processor_config(model_cfg)
    max_grid = (max((h // vis.image_size) * (w // vis.image_size) for h, w in planner.grid_pinpoints)
                if planner.mode == "anyres" else 0)
    if template is None:
        template = "qwen_1_5" if model_cfg.text.model_type == "qwen2" else "vicuna_v1"
    kw = dict(batch_size=batch_size, max_length=max_length, template=template, image=image,
              patch_size=vis.patch_size, num_tiles=1 + max_grid, num_frames=num_frames,
              video_pool_stride=model_cfg.video_pool_stride, video_pool_mode=model_cfg.video_pooling,
              video_newline=planner.video_newline, image_newline=planner.image_newline,
              max_num_patches=planner.max_num_patches)
    return PipelineConfig(**{**kw, **overrides})


def check_tokenizer(tokenizer: Tokenizer, model_cfg: Any) -> None:
    """Raises unless the tokenizer's ``<image>`` id equals the model's ``image_token_id``."""
    tid = tokenizer.token_to_id(IMAGE_TOKEN)
    if tid != model_cfg.image_token_id:
        raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {tid} but the model expects image_token_id="
                         f"{model_cfg.image_token_id}; set LlavaConfig.image_token_id to the tokenizer's id")


def fit_frames(cap: int, text_tokens: int, prefix_tokens: int, max_length: int, min_frames: int,
               count: Any) -> int:
    """Frames for one video sample under the token budget ``max_length`` (the paper's 6K context).

    The most frames <= cap whose visual tokens (``count(n)``) plus ALL ``text_tokens`` fit; when a long
    conversation would push that below ``min_frames``, keep min(cap, min_frames) frames (fewer if the
    visual span itself does not fit after ``prefix_tokens``) and let the text after the video be truncated.
    Returns 0 when not even one frame fits after the prefix.
    """
    for n in range(cap, 0, -1):
        if count(n) + text_tokens <= max_length:
            if n >= min(cap, min_frames):
                return n
            break
    for n in range(min(cap, min_frames), 0, -1):
        if prefix_tokens + count(n) <= max_length:
            return n
    return 0


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - re-raised with the sample named
        raise ValueError(f"{where}: cannot decode media ({e})") from e


class SampleProcessor:
    """Decoded record -> model-ready arrays for one sample (picklable; used inside grain workers)."""

    def __init__(self, tokenizer: Tokenizer, cfg: PipelineConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.planner = cfg.token_planner
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if self.image_token_id is None:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token")

    def __call__(self, rec: dict) -> dict:
        cfg, where = self.cfg, f"sample {rec.get('id')!r} ({rec.get('source') or 'unknown source'})"
        s = cfg.image.tile_size
        tiles = np.zeros((0, s, s, 3), np.float32)
        frames = np.zeros((0, s, s, 3), np.float32)
        plans: list[processing.TokenPlan] = []
        size = (0, 0)
        if rec["kind"] == "image":
            if cfg.num_tiles == 0:
                raise ValueError(f"{where}: image sample in a pipeline built with num_tiles=0")
            img = _decode(rec["media"][0], where)
            size = img.shape[:2]
            plan = self.planner.image(size)
            chw = (processing.anyres_tiles(img, cfg.image) if cfg.image.mode == "anyres"
                   else processing.single_view(img, cfg.image))
            if len(chw) > cfg.num_tiles:
                raise ValueError(f"{where}: image {size} needs {len(chw)} views but num_tiles={cfg.num_tiles}")
            tiles = chw.transpose(0, 2, 3, 1)
            plans.append(plan)
        elif rec["kind"] == "video":
            if cfg.num_frames == 0:
                raise ValueError(f"{where}: video sample in a pipeline built with num_frames=0")
            n = min(len(rec["media"]), cfg.num_frames)
            plans.append(self.planner.video(n))
            tok = self._tokenize(rec, plans, where)
            if len(tok.input_ids) > cfg.max_length:  # e.g. 32 SigLIP frames = 6,272 tokens > 6,144
                count = lambda k: self.planner.video(k).count  # noqa: E731
                visual = np.flatnonzero(tok.input_ids == self.image_token_id)
                fit = fit_frames(n, len(tok.input_ids) - len(visual), int(visual[0]) if len(visual) else 0,
                                 cfg.max_length, cfg.min_video_frames, count)
                if 0 < fit < n:
                    n, plans = fit, [self.planner.video(fit)]
                    tok = self._tokenize(rec, plans, where)
            pick = uniform_frame_indices(len(rec["media"]), n)  # uniform over the whole video
            imgs = [_decode(rec["media"][i], f"{where} frame {i}") for i in pick]
            size = imgs[0].shape[:2]
            frames = processing.preprocess_video(imgs, cfg.image).transpose(0, 2, 3, 1)
        if rec["kind"] != "video":
            tok = self._tokenize(rec, plans, where)
        ids, mask = tok.input_ids, tok.loss_mask
        if len(ids) > cfg.max_length:
            visual = np.flatnonzero(ids == self.image_token_id)
            if len(visual) and visual[-1] >= cfg.max_length:
                raise ValueError(f"{where}: {len(ids)} tokens with visual tokens up to position {visual[-1]} "
                                 f"do not fit max_length={cfg.max_length}")
            ids, mask = ids[:cfg.max_length], mask[:cfg.max_length]
        # tiles/frames stay NHWC views of processing's NCHW output: the collator copies them once
        return {"input_ids": ids, "token_mask": mask, "tiles": tiles, "frames": frames, "plans": plans,
                "image_size": np.asarray(size, np.int32), "where": where}


    def _tokenize(self, rec: dict, plans: list, where: str) -> Any:
        try:
            return tokenize_conversation(self.tokenizer, self.cfg.template, rec["conversations"],
                                         [p.count for p in plans], mask_policy=self.cfg.mask_policy)
        except ValueError as e:
            raise ValueError(f"{where}: field 'conversations': {e}") from e


class Collator:
    """List of processed samples -> one padded, fixed-shape batch dict (the layout above)."""

    def __init__(self, tokenizer: Tokenizer, cfg: PipelineConfig):
        self.cfg = cfg
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        pad = tokenizer.token_to_id(cfg.pad_token)
        self.pad_id = 0 if pad is None else int(pad)

    def length_for(self, longest: int) -> int:
        for b in sorted(self.cfg.length_buckets):
            if b >= longest:
                return min(b, self.cfg.max_length)
        return self.cfg.max_length

    def __call__(self, samples: Sequence[dict]) -> dict[str, np.ndarray]:
        cfg, n = self.cfg, len(samples)
        t = self.length_for(max(len(s["input_ids"]) for s in samples))
        ids = np.full((n, t), self.pad_id, np.int32)
        attn = np.zeros((n, t), np.int32)
        tmask = np.zeros((n, t), np.float32)
        for b, s in enumerate(samples):
            L = len(s["input_ids"])
            ids[b, :L], attn[b, :L], tmask[b, :L] = s["input_ids"], 1, s["token_mask"]
        targets = np.full((n, t), self.pad_id, np.int32)
        targets[:, :-1] = ids[:, 1:]
        loss_mask = np.zeros((n, t), np.float32)
        loss_mask[:, :-1] = tmask[:, 1:] * attn[:, 1:]
        batch = {"input_ids": ids, "attention_mask": attn, "targets": targets, "loss_mask": loss_mask,
                 "image_sizes": np.stack([s["image_size"] for s in samples]).astype(np.int32)}
        s_ = cfg.image.tile_size
        if cfg.num_tiles:
            pv = np.empty((n, cfg.num_tiles, s_, s_, 3), np.float32)
            for b, s in enumerate(samples):
                pv[b, :len(s["tiles"])] = s["tiles"]
                pv[b, len(s["tiles"]):] = 0
            batch["pixel_values"] = pv
        if cfg.num_frames:
            vv = np.empty((n, cfg.num_frames, s_, s_, 3), np.float32)
            for b, s in enumerate(samples):
                vv[b, :len(s["frames"])] = s["frames"]
                vv[b, len(s["frames"]):] = 0
            batch["pixel_values_videos"] = vv
        for s in samples:
            if any(p.weights is not None for p in s["plans"]):
                raise ValueError(f"{s['where']}: its anyres_max_N token plan mixes 4 feature rows per token, "
                                 "which training batches (visual_index [B, T]) do not carry")
        batch["visual_index"] = processing.build_visual_index(
            ids, [s["plans"] for s in samples], self.image_token_id,
            tokens_per_tile=cfg.patches_per_side ** 2, num_tiles=cfg.num_tiles,
            tokens_per_frame=cfg.tokens_per_frame, num_frames=cfg.num_frames)
        return batch


# kinds of a packable sample's per-token visual rows
KIND_TEXT, KIND_TILE, KIND_FRAME, KIND_NEWLINE = 0, 1, 2, 3


class Packable:
    """Processed sample -> the flat arrays the packer moves: tokens with per-token visual rows relative to
    the sample's own views (``vkind``: text / tile row / pooled frame row / newline, ``vview``: which of its
    views, ``vrow``: which row of that view's features) and ``views`` [n, S, S, 3] (its tiles, then its
    frames). A sample with more views than ``max_views`` is an error naming it (never dropped)."""

    def __init__(self, tokenizer: Tokenizer, cfg: PipelineConfig):
        self.cfg = cfg
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)

    def __call__(self, s: dict) -> dict:
        cfg = self.cfg
        per_tile, per_frame = cfg.patches_per_side ** 2, cfg.tokens_per_frame
        ids = s["input_ids"]
        n_tiles = len(s["tiles"])
        views = np.concatenate([s["tiles"], s["frames"]]) if len(s["frames"]) else np.asarray(s["tiles"])
        if len(views) > cfg.max_views:
            raise ValueError(f"{s['where']}: {len(views)} views ({n_tiles} tiles, {len(s['frames'])} frames) do "
                             f"not fit data.max_views={cfg.max_views} views per packed row")
        kinds, vviews, vrows = [], [], []
        tile_off, frame_off = 0, n_tiles
        for plan in s["plans"]:
            if plan.weights is not None:
                raise ValueError(f"{s['where']}: 4-tap token plans (anyres_max_N) cannot be packed")
            rel = plan.index
            per, off = (per_tile, tile_off) if plan.kind == "image" else (per_frame, frame_off)
            kind = np.where(rel == processing.NEWLINE, KIND_NEWLINE, KIND_TILE if plan.kind == "image" else KIND_FRAME)
            kinds.append(kind)
            vviews.append(np.where(rel >= 0, off + rel // per, 0))
            vrows.append(np.where(rel >= 0, rel % per, 0))
            if plan.kind == "image":
                tile_off += plan.num_views
            else:
                frame_off += plan.num_views
        pos = np.flatnonzero(ids == self.image_token_id)
        vkind = np.zeros(len(ids), np.int32)
        vview = np.zeros(len(ids), np.int32)
        vrow = np.zeros(len(ids), np.int32)
        if kinds:
            k = np.concatenate(kinds)
            if len(k) != len(pos):
                raise ValueError(f"{s['where']}: {len(pos)} visual placeholder tokens but the plans expand to {len(k)}")
            vkind[pos], vview[pos], vrow[pos] = k, np.concatenate(vviews), np.concatenate(vrows)
        return {"input_ids": np.asarray(ids, np.int32), "token_mask": np.asarray(s["token_mask"], np.float32),
                "vkind": vkind, "vview": vview, "vrow": vrow, "views": views.astype(np.float32, copy=False)}


class PackedCollator:
    """Packed rows (grain's first-fit packer output) -> one fixed-shape batch [R, T] with R = batch_size.

    Adds to the unpacked layout: ``segment_ids [R,T] int32`` (0 = padding, k >= 1 = the row's k-th
    conversation; attention is block-diagonal causal), ``positions [R,T] int32`` (restart at 0 in every
    conversation) and ``views [R,V,S,S,3]`` (every conversation's tiles and frames, V = max_views, unused
    slots zero) instead of pixel_values / pixel_values_videos. ``visual_index`` indexes the row's table
    ``[V*P tile rows | V*Pv pooled frame rows | image_newline]`` (LlavaNextModel.embed_views).
    ``attention_mask`` is ``segment_ids > 0``; targets and loss_mask never cross a conversation boundary,
    so the loss sum and the trained-token count are those of the same conversations unpacked."""

    def __init__(self, tokenizer: Tokenizer, cfg: PipelineConfig):
        self.cfg = cfg
        pad = tokenizer.token_to_id(cfg.pad_token)
        self.pad_id = 0 if pad is None else int(pad)

    def __call__(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        v, per_tile, per_frame = cfg.max_views, cfg.patches_per_side ** 2, cfg.tokens_per_frame
        ids = np.stack([r["input_ids"] for r in rows]).astype(np.int32)
        seg = np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32)
        pos = np.stack([r["input_ids_positions"] for r in rows]).astype(np.int32)
        tmask = np.stack([r["token_mask"] for r in rows]).astype(np.float32)
        ids = np.where(seg > 0, ids, self.pad_id)
        targets = np.full_like(ids, self.pad_id)
        targets[:, :-1] = ids[:, 1:]
        loss_mask = np.zeros(ids.shape, np.float32)
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        loss_mask[:, :-1] = tmask[:, 1:] * same
        vseg = np.stack([r["views_segment_ids"] for r in rows])
        first = np.zeros((len(rows), int(seg.max(initial=0)) + 1), np.int32)  # first view slot of each segment
        for b in range(len(rows)):
            starts = np.flatnonzero((vseg[b] > 0) & np.r_[True, vseg[b, 1:] != vseg[b, :-1]])
            first[b, vseg[b, starts]] = starts
        kind = np.stack([r["vkind"] for r in rows])
        view = np.take_along_axis(first, seg, axis=1) + np.stack([r["vview"] for r in rows])
        row = np.stack([r["vrow"] for r in rows])
        index = np.full(ids.shape, processing.TEXT, np.int32)
        index = np.where(kind == KIND_TILE, view * per_tile + row, index)
        index = np.where(kind == KIND_FRAME, v * per_tile + view * per_frame + row, index)
        index = np.where(kind == KIND_NEWLINE, v * (per_tile + per_frame), index)
        return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg,
                "positions": np.where(seg > 0, pos, 0).astype(np.int32), "targets": targets,
                "loss_mask": loss_mask, "visual_index": index.astype(np.int32),
                "views": np.stack([r["views"] for r in rows]).astype(np.float32)}


def _as_source(src: Any) -> Any:
    if isinstance(src, (str, os.PathLike)):
        return ShardedRecordSource(src)
    return src


class ProcessedCache:
    """A random-access source of processed samples: ``processor(source[i])`` computed once, then kept.

    Processing is deterministic, so a cached sample equals a recomputed one. Thread-safe enough for
    Grain's reader threads: a race only computes one sample twice.
    """

    def __init__(self, source: Any, processor: Callable[[dict], dict]):
        self.source, self.processor = source, processor
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        sample = self._cache.get(index)
        if sample is None:
            sample = self._cache[index] = self.processor(self.source[index])
        return sample

    def __repr__(self) -> str:
        return f"ProcessedCache({self.source!r})"


def build_pipeline(sources: str | os.PathLike | Sequence[Any], tokenizer: Tokenizer, cfg: PipelineConfig, *,
                   weights: Sequence[float] | None = None, shard_index: int | None = None,
                   shard_count: int | None = None) -> grain.IterDataset:
    """Training input pipeline; ``iter()`` it for batches (the iterator checkpoints via get/set_state).

    sources: shard directories (``instit-build-data`` output) or random-access sources yielding
    ``parse_sample`` dicts; several sources are mixed by ``weights``. shard_index/shard_count default to
    ``jax.process_index()/jax.process_count()``.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    srcs = [_as_source(s) for s in sources]
    if weights is not None and len(weights) != len(srcs):
        raise ValueError(f"{len(weights)} weights for {len(srcs)} sources")
    if shard_index is None or shard_count is None:
        import jax  # only to learn this host's position in a multi-host job

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    processor = SampleProcessor(tokenizer, cfg)
    parts = []
    for k, src in enumerate(srcs):
        if len(src) == 0:
            raise ValueError(f"source {k} ({src!r}) is empty")
        ds = grain.MapDataset.source(ProcessedCache(src, processor) if cfg.cache_samples else src)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + 7919 * k)
        parts.append(ds.repeat(cfg.num_epochs) if cfg.num_epochs != 1 else ds)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds[shard_index::shard_count]
    if not cfg.cache_samples:
        ds = ds.map(processor)
    if cfg.packing:
        if cfg.max_views < 1:
            raise ValueError(f"packing needs max_views >= 1 (the tower's views per packed row), got {cfg.max_views}")
        ds = ds.map(Packable(tokenizer, cfg))
    bins = cfg.packing_bins or 4 * cfg.batch_size
    read = grain.ReadOptions(num_threads=cfg.read_threads,
                             prefetch_buffer_size=cfg.prefetch_samples or 2 * (bins if cfg.packing else cfg.batch_size))
    it = ds.to_iter_dataset(read)
    if cfg.packing:
        t = cfg.max_length
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"input_ids": t, "token_mask": t, "vkind": t, "vview": t, "vrow": t,
                               "views": cfg.max_views},
            num_packing_bins=bins, seed=cfg.seed, shuffle_bins=cfg.shuffle)
        it = it.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=PackedCollator(tokenizer, cfg))
    else:
        it = it.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=Collator(tokenizer, cfg))
    if cfg.num_workers > 0:
        from absl import flags  # grain's workers read absl flags; outside an absl app nobody parsed them

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it
