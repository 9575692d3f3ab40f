"""Grain input pipeline: TFRecord shards -> shuffled, host-sharded, fixed-shape training batches.

Order of operations (every step deterministic in ``cfg.seed``):
``source -> global shuffle (reshuffled each epoch) -> repeat -> weighted mix of sources -> this host's
slice (index::count) -> decode + preprocess + tokenise -> batch + pad to a length bucket``.
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

from instit_jax import processing
from instit_jax.conversation import IMAGE_TOKEN, tokenize_conversation
from instit_jax.data.records import ShardedRecordSource


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that fixes the batch shapes and contents."""

    batch_size: int  # per host
    max_length: int  # T upper bound; longer samples are truncated (never inside visual tokens)
    template: str = "vicuna_v1"  # chat template (instit_jax.conversation)
    mask_policy: str = "answers"  # "answers" (ours) or "reference"
    image: processing.ImageProcessorConfig = processing.ImageProcessorConfig()
    patch_size: int = 14  # vision patch size: tokens per tile side = tile_size // patch_size
    num_tiles: int = 5  # N: image views per sample (1 base + tiles); 0 for video-only batches
    num_frames: int = 32  # F: frame cap; videos are sampled uniformly (linspace) down to it; 0 = no videos
    min_video_frames: int = 8  # the token budget may lower a video's frames (see fit_frames) down to this
    video_pool_stride: int = 2  # 2x2 spatial pooling of frame tokens
    video_pool_mode: str = "bilinear"
    video_newline: str = "no_token"  # grid | frame | one_token | no_token
    image_newline: bool = True  # anyres newline after every row
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

    @property
    def patches_per_side(self) -> int:
        return self.image.tile_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return processing.pooled_side(self.patches_per_side, self.video_pool_stride, self.video_pool_mode) ** 2


def pipeline_config_for(model_cfg: Any, *, batch_size: int, max_length: int, num_frames: int = 32,
                        template: str | None = None, **overrides: Any) -> PipelineConfig:
    """A PipelineConfig whose shapes match a ``LlavaConfig`` (tile size, normalisation, pinpoints, pooling).

    ``num_tiles`` is 1 + the largest pinpoint grid (anyres) or 1 (single view); ``template`` defaults to
    vicuna_v1 for Llama decoders and qwen_1_5 for Qwen2.
    """
    vis = model_cfg.vision
    anyres = str(model_cfg.image_aspect_ratio).startswith("anyres")
    if str(model_cfg.image_aspect_ratio).startswith("anyres_max"):
        raise NotImplementedError(f"image_aspect_ratio={model_cfg.image_aspect_ratio!r}: its bilinear grid "
                                  "downsample needs 4-tap plans, which training batches (visual_index) do not carry")
    pinpoints = tuple(tuple(int(v) for v in p) for p in model_cfg.image_grid_pinpoints)
    image = processing.image_processor_config(model_cfg)
    max_grid = max((h // vis.image_size) * (w // vis.image_size) for h, w in pinpoints) if anyres else 0
    if template is None:
        template = "qwen_1_5" if model_cfg.text.model_type == "qwen2" else "vicuna_v1"
    kw = dict(batch_size=batch_size, max_length=max_length, template=template, image=image,
              patch_size=vis.patch_size, num_tiles=1 + max_grid, num_frames=num_frames,
              video_pool_stride=model_cfg.video_pool_stride, video_pool_mode=model_cfg.video_pooling,
              video_newline=model_cfg.video_newline, image_newline=bool(model_cfg.use_image_newline))
    return PipelineConfig(**{**kw, **overrides})


def check_tokenizer(tokenizer: Tokenizer, model_cfg: Any) -> None:
    """Raises unless the tokenizer's ``<image>`` id equals the model's ``image_token_id``."""
    tid = tokenizer.token_to_id(IMAGE_TOKEN)
    if tid != model_cfg.image_token_id:
        raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {tid} but the model expects image_token_id="
                         f"{model_cfg.image_token_id}; set LlavaConfig.image_token_id to the tokenizer's id")


def sample_frame_indices(total: int, cap: int) -> np.ndarray:
    """Uniform frame choice: all frames when ``total <= cap``, else ``round(linspace(0, total-1, cap))``."""
    if total <= cap:
        return np.arange(total)
    return np.round(np.linspace(0, total - 1, cap)).astype(np.int64)


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
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if self.image_token_id is None:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token")

    def __call__(self, rec: dict) -> dict:
        cfg, where = self.cfg, f"sample {rec.get('id')!r} ({rec.get('source') or 'unknown source'})"
        s, pps = cfg.image.tile_size, cfg.patches_per_side
        tiles = np.zeros((0, s, s, 3), np.float32)
        frames = np.zeros((0, s, s, 3), np.float32)
        plans: list[processing.TokenPlan] = []
        size = (0, 0)
        if rec["kind"] == "image":
            if cfg.num_tiles == 0:
                raise ValueError(f"{where}: image sample in a pipeline built with num_tiles=0")
            img = _decode(rec["media"][0], where)
            size = img.shape[:2]
            if cfg.image.mode == "anyres":
                chw = processing.anyres_tiles(img, cfg.image)
                plan = processing.anyres_token_plan(size, cfg.image.grid_pinpoints, s, pps,
                                                    newline=cfg.image_newline)
            else:
                chw = processing.single_view(img, cfg.image)
                plan = processing.single_view_token_plan(pps)
            if len(chw) > cfg.num_tiles:
                raise ValueError(f"{where}: image {size} needs {len(chw)} views but num_tiles={cfg.num_tiles}")
            tiles = chw.transpose(0, 2, 3, 1)
            plans.append(plan)
        elif rec["kind"] == "video":
            if cfg.num_frames == 0:
                raise ValueError(f"{where}: video sample in a pipeline built with num_frames=0")
            pooled = processing.pooled_side(pps, cfg.video_pool_stride, cfg.video_pool_mode)
            n = min(len(rec["media"]), cfg.num_frames)
            plans.append(processing.video_token_plan(n, pooled, cfg.video_newline))
            tok = self._tokenize(rec, plans, where)
            if len(tok.input_ids) > cfg.max_length:  # e.g. 32 SigLIP frames = 6,272 tokens > 6,144
                count = lambda k: processing.video_token_plan(k, pooled, cfg.video_newline).count  # noqa: E731
                visual = np.flatnonzero(tok.input_ids == self.image_token_id)
                fit = fit_frames(n, len(tok.input_ids) - len(visual), int(visual[0]) if len(visual) else 0,
                                 cfg.max_length, cfg.min_video_frames, count)
                if 0 < fit < n:
                    n, plans = fit, [processing.video_token_plan(fit, pooled, cfg.video_newline)]
                    tok = self._tokenize(rec, plans, where)
            pick = sample_frame_indices(len(rec["media"]), n)  # uniform over the whole video
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
                "image_size": np.asarray(size, np.int32)}


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
        batch["visual_index"] = processing.build_visual_index(
            ids, [s["plans"] for s in samples], self.image_token_id,
            tokens_per_tile=cfg.patches_per_side ** 2, num_tiles=cfg.num_tiles,
            tokens_per_frame=cfg.tokens_per_frame, num_frames=cfg.num_frames)
        return batch


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
    read = grain.ReadOptions(num_threads=cfg.read_threads,
                             prefetch_buffer_size=cfg.prefetch_samples or 2 * cfg.batch_size)
    it = ds.to_iter_dataset(read).batch(cfg.batch_size, drop_remainder=cfg.drop_remainder,
                                    batch_fn=Collator(tokenizer, cfg))
    if cfg.num_workers > 0:
        from absl import flags  # grain's workers read absl flags; outside an absl app nobody parsed them

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it
