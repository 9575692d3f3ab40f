"""LLaVA-NeXT / OneVision glue: vision tower -> mlp2x_gelu projector -> (video pooling) -> merge -> decoder.

Two entry points:
  - `model.embed_inputs(input_ids, pixels_nhwc, videos_nhwc, visual_index, frozen_layers)`: the jittable,
    static-shape path used by training and batched generation (the visual feature table of `instit_jax/processing.py`).
  - `model(input_ids, attention_mask, pixel_values, image_sizes, pixel_values_videos)`: the eager call
    taking transformers' processor arrays (NCHW with the tile/frame axis) and returning logits [B, T, V];
    it derives `visual_index` on the host from `processing.token_planner(cfg)`'s plans.
`jitted_forward(graphdef, state, ...)` is the one jit of a split model's `embed_inputs` (and, given an
attention mask, the decoder): the eager call, `generate_llava` and `BatchEngine` prefills all use it. Callers
that call it often pass `static_graph(graphdef)` (a static argument hashed by identity) instead of the graphdef.
`LlavaNextModel(cfg, compute=ComputeConfig(...))` sets how it computes (attention kernels, remat policy,
view and MLP chunking, the vocabulary-parallel LM head, the Linears' weight-gradient layout;
`models/config.py`); every module applies its part itself, at construction or in its call. With
`vision_chunk_views` = k > 0 the vision tower + projector run over k views of every sample at a time
(`lax.map`, each chunk rematerialised), so the activations of only one chunk of tiles/frames are live in
the backward pass; the features equal the unchunked ones.
Positions are `cumsum(attention_mask) - 1` (equal to transformers' arange for unpadded or right-padded
rows; for left padding it matches transformers' generate()).
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instit_jax import processing
from instit_jax.models.config import ComputeConfig, LlavaConfig
from instit_jax.models.llm import Decoder, positions_from_mask
from instit_jax.models.vit import VisionTower, activation, dense, partitioned
from instit_jax.models.weight_grads import linear_dot_general


class MultiModalProjector(nnx.Module):
    """mlp2x_gelu: Linear(Dv -> D), activation, Linear(D -> D). [..., Dv] -> [..., D]."""

    def __init__(self, vision_dim: int, text_dim: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs,
                 dot_general: Callable = jax.lax.dot_general):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, dot_general=dot_general)
        self.linear_1 = dense(vision_dim, text_dim, ("vision_embed", "mlp"), **kw)
        self.linear_2 = dense(text_dim, text_dim, ("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


def pool_video_tokens(x: jax.Array, stride: int, mode: str) -> jax.Array:
    """Spatial pooling of per-frame token grids after the projector. [F, h, w, D] -> [F, h', w', D].

    'bilinear' resizes to ceil(h/stride) with half-pixel centres and no antialias (= torch
    F.interpolate(mode='bilinear', align_corners=False)); 'average'/'max' pool stride x stride windows.
    """
    if stride <= 1:
        return x
    f, h, w, d = x.shape
    if mode == "bilinear":
        shape = (f, math.ceil(h / stride), math.ceil(w / stride), d)
        return jax.image.resize(x, shape, method="bilinear", antialias=False).astype(x.dtype)
    hh, ww = h // stride, w // stride
    windows = x[:, :hh * stride, :ww * stride].reshape(f, hh, stride, ww, stride, d)
    if mode == "average":
        return windows.mean(axis=(2, 4))
    if mode == "max":
        return windows.max(axis=(2, 4))
    raise ValueError(f"video_pooling must be bilinear/average/max, got {mode!r}")


class LlavaNextModel(nnx.Module):
    """Vision tower + projector + image_newline + decoder; see the module docstring for the two calls."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, compute: ComputeConfig | None = None):
        compute = compute or ComputeConfig()
        self.cfg = cfg
        self.compute = compute
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        linear_dot = linear_dot_general(compute.direct_weight_grads, compute.dot_dtype)
        self.vision_tower = VisionTower(
            cfg.vision, feature_layer=cfg.vision_feature_layer, select_strategy=cfg.vision_feature_select_strategy,
            dtype=dtype, param_dtype=param_dtype, attention_impl=compute.vision_attention_impl,
            attention_block_size=compute.vision_attention_block_size, remat_policy=compute.remat_policy,
            dot_general=linear_dot, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(
            cfg.vision.hidden_size, cfg.text.hidden_size, cfg.projector_hidden_act, dtype=dtype,
            param_dtype=param_dtype, dot_general=linear_dot, rngs=rngs)
        std = 1 / math.sqrt(cfg.text.hidden_size)
        self.image_newline = nnx.Param(
            partitioned(nnx.initializers.normal(std), ("embed",))(rngs.params(), (cfg.text.hidden_size,), param_dtype))
        self.language_model = Decoder(
            cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs, initializer_range=cfg.text.initializer_range,
            attention_impl=compute.attention_impl, attention_block_size=compute.attention_block_size,
            remat_policy=compute.remat_policy, mlp_sequence_pieces=compute.mlp_sequence_pieces,
            vocab_parallel_head=compute.vocab_parallel_head, dot_general=linear_dot)
        if compute.vision_chunk_views < 0:
            raise ValueError(f"vision_chunk_views must be >= 0 (0 = all views at once), got {compute.vision_chunk_views}")
        self.vision_chunk_views = compute.vision_chunk_views  # views per vision-tower pass (0 = all at once)

    def with_compute(self, compute: ComputeConfig) -> LlavaNextModel:
        """This model's parameters (the same arrays, not copies) in a model that computes as `compute` says.
        For plain models (no LoRA layers): the new graph is a fresh LlavaNextModel's."""
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: LlavaNextModel(self.cfg, rngs=nnx.Rngs(0), compute=compute)))
        return nnx.merge(graphdef, nnx.state(self))

    # ---- static-shape path -------------------------------------------------------------------------
    @property
    def tokens_per_tile(self) -> int:
        """Feature rows one tile contributes (P)."""
        extra = 1 if (self.cfg.vision.model_type == "clip" and self.cfg.vision_feature_select_strategy == "full") else 0
        return self.cfg.vision.num_patches + extra

    @property
    def tokens_per_frame(self) -> int:
        """Feature rows one video frame contributes after pooling (Pv)."""
        side = processing.pooled_side(self.cfg.vision.patches_per_side, self.cfg.video_pool_stride,
                                      self.cfg.video_pooling)
        return side * side

    def image_features(self, pixels: jax.Array, frozen_layers: int = 0) -> jax.Array:
        """Projected tile features: [M, H, W, C] -> [M, P, D]."""
        return self.multi_modal_projector(self.vision_tower(pixels, frozen_layers=frozen_layers))

    def view_features(self, views: jax.Array, frozen_layers: int = 0) -> jax.Array:
        """Projected features of every sample's views: [B, N, H, W, C] -> [B, N, P, D].

        With `vision_chunk_views` = k > 0 and N > k, the N axis is cut into even chunks of <= k views that
        `lax.map` runs one after the other (B stays whole, so a batch-sharded B keeps its sharding and each
        device handles k of its own views per pass), each chunk rematerialised in the backward pass.
        """
        b, n = views.shape[:2]
        chunk = self.vision_chunk_views
        if not chunk or n <= chunk:
            feats = self.image_features(views.reshape(b * n, *views.shape[2:]), frozen_layers)
            return feats.reshape(b, n, *feats.shape[1:])
        num = -(-n // chunk)
        size = -(-n // num)  # even chunks: 32 frames in chunks of <= 12 -> 3 x 11 (1 zero view)
        padded = jnp.pad(views, [(0, 0), (0, num * size - n)] + [(0, 0)] * (views.ndim - 2))
        chunks = jnp.moveaxis(padded.reshape(b, num, size, *views.shape[2:]), 1, 0)  # [num, B, size, H, W, C]
        graphdef, state = nnx.split((self.vision_tower, self.multi_modal_projector))

        @jax.checkpoint  # keep only each chunk's features; recompute its tower in the backward pass
        def one(state, x):
            tower, projector = nnx.merge(graphdef, state)
            feats = projector(tower(x.reshape(b * size, *x.shape[2:]), frozen_layers=frozen_layers))
            return feats.reshape(b, size, *feats.shape[1:])

        out = jax.lax.map(lambda x: one(state, x), chunks)  # [num, B, size, P, D]
        return jnp.moveaxis(out, 0, 1).reshape(b, num * size, *out.shape[3:])[:, :n]

    def video_features(self, frames: jax.Array, frozen_layers: int = 0) -> jax.Array:
        """Projected, pooled frame features: [M, H, W, C] -> [M, Pv, D]."""
        return self.pool_frame_features(self.image_features(frames, frozen_layers))

    def pool_frame_features(self, feats: jax.Array) -> jax.Array:
        """Projected frame features [M, P, D] -> pooled [M, Pv, D]."""
        side = self.cfg.vision.patches_per_side
        if feats.shape[1] != side * side:
            raise ValueError(f"video pooling needs {side}x{side} tokens per frame, got {feats.shape[1]} "
                             "(use vision_feature_select_strategy='default' for CLIP)")
        grid = feats.reshape(feats.shape[0], side, side, -1)
        pooled = pool_video_tokens(grid, self.cfg.video_pool_stride, self.cfg.video_pooling)
        return pooled.reshape(feats.shape[0], -1, feats.shape[-1])

    def embed_inputs(self, input_ids: jax.Array, pixels_nhwc: jax.Array | None, videos_nhwc: jax.Array | None,
                     visual_index: jax.Array, frozen_layers: int = 0,
                     visual_weights: jax.Array | None = None) -> jax.Array:
        """Text embeddings with visual rows gathered in: -> inputs_embeds [B, T, D].

        pixels_nhwc [B, N, H, W, C], videos_nhwc [B, F, H, W, C]; visual_index [B, T] (-1 = text) indexes
        the per-sample table concat(tiles N*P, frames F*Pv, newline 1). For anyres_max_N downsampling,
        visual_index [B, T, K] with visual_weights [B, T, K] mixes K rows per token
        (`processing.build_visual_taps`).
        """
        lm = self.language_model
        text = lm.embed(jnp.clip(input_ids, 0, self.cfg.text.vocab_size - 1))
        b = text.shape[0]
        parts = []
        if pixels_nhwc is not None:
            feats = self.view_features(pixels_nhwc, frozen_layers)
            parts.append(feats.reshape(b, -1, feats.shape[-1]))
        if videos_nhwc is not None:
            feats = self.view_features(videos_nhwc, frozen_layers)
            frames = self.pool_frame_features(feats.reshape(-1, *feats.shape[2:]))
            parts.append(frames.reshape(b, -1, frames.shape[-1]))
        parts.append(jnp.broadcast_to(self.image_newline[...], (b, 1, text.shape[-1])))
        table = jnp.concatenate([p.astype(text.dtype) for p in parts], axis=1)
        if visual_weights is None:
            rows = jnp.take_along_axis(table, jnp.clip(visual_index, 0)[..., None], axis=1)
            return jnp.where(visual_index[..., None] >= 0, rows, text)
        t, k = visual_index.shape[1:]
        rows = jnp.take_along_axis(table, jnp.clip(visual_index, 0).reshape(b, t * k, 1), axis=1)
        mixed = (rows.reshape(b, t, k, -1).astype(jnp.float32) * visual_weights[..., None]).sum(axis=2)
        return jnp.where(visual_index[..., :1] >= 0, mixed.astype(text.dtype), text)

    def embed_views(self, input_ids: jax.Array, views_nhwc: jax.Array, visual_index: jax.Array,
                    frozen_layers: int = 0) -> jax.Array:
        """Packed rows: text embeddings with visual rows gathered in -> inputs_embeds [R, T, D].

        views_nhwc [R, V, H, W, C]: every conversation's tiles and frames of the row, one tower pass over
        R * V views (a budget of real views, not R x (max tiles + max frames)); visual_index [R, T] (-1 =
        text) indexes the row's table ``[V*P tile rows | V*Pv pooled frame rows | image_newline]``
        (`instit_jax.data.pipeline.PackedCollator`).
        """
        text = self.language_model.embed(jnp.clip(input_ids, 0, self.cfg.text.vocab_size - 1))
        r, v = views_nhwc.shape[:2]
        feats = self.view_features(views_nhwc, frozen_layers)  # [R, V, P, D]
        pooled = self.pool_frame_features(feats.reshape(r * v, *feats.shape[2:]))
        newline = jnp.broadcast_to(self.image_newline[...], (r, 1, text.shape[-1]))
        table = jnp.concatenate([feats.reshape(r, -1, feats.shape[-1]).astype(text.dtype),
                                 pooled.reshape(r, -1, pooled.shape[-1]).astype(text.dtype),
                                 newline.astype(text.dtype)], axis=1)
        rows = jnp.take_along_axis(table, jnp.clip(visual_index, 0)[..., None], axis=1)
        return jnp.where(visual_index[..., None] >= 0, rows, text)

    # ---- eager HF-style call ------------------------------------------------------------------------
    def visual_index_for(self, input_ids: np.ndarray, image_sizes: np.ndarray | None, has_image: np.ndarray,
                         num_tiles: int, num_frames: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Host-side (visual_index, visual_weights or None) for one image per image-bearing sample and one
        video per video sample."""
        cfg = self.cfg
        planner = processing.token_planner(cfg)
        plans, img_i = [], 0
        for b in range(input_ids.shape[0]):
            sample = []
            if has_image[b]:
                sample.append(planner.image(None if image_sizes is None else image_sizes[img_i]))
                img_i += 1
            if num_frames:
                sample.append(planner.video(num_frames))
            plans.append(sample)
        index, weights = processing.build_visual_taps(
            input_ids, plans, cfg.image_token_id, tokens_per_tile=self.tokens_per_tile, num_tiles=num_tiles,
            tokens_per_frame=self.tokens_per_frame, num_frames=num_frames, video_token_id=cfg.video_token_id)
        if any(p.weights is not None for sample in plans for p in sample):
            return index, weights
        return index[..., 0], None

    def prepare_hf_inputs(self, input_ids, pixel_values=None, image_sizes=None, pixel_values_videos=None
                          ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """transformers' processor arrays -> (pixels [B,N,H,W,C] | None, videos [B,F,H,W,C] | None,
        visual_index [B,T] or [B,T,4], weights | None). Image i goes to the i-th sample holding image tokens."""
        ids = np.asarray(input_ids)
        b = ids.shape[0]
        pixels = videos = None
        num_tiles = num_frames = 0
        has_image = np.zeros(b, bool)
        if pixel_values is not None and np.asarray(pixel_values).shape[0] > 0:
            pv = np.asarray(pixel_values, np.float32)
            if pv.ndim == 4:  # single-view processors give [I, C, H, W]
                pv = pv[:, None]
            has_image = (ids == self.cfg.image_token_id).any(axis=1)
            if has_image.sum() != pv.shape[0]:
                raise ValueError(f"{pv.shape[0]} images but {int(has_image.sum())} samples hold image token "
                                 f"{self.cfg.image_token_id}; one image per sample is supported")
            num_tiles = pv.shape[1]
            pixels = np.zeros((b,) + pv.shape[1:], np.float32)
            pixels[has_image] = pv
            pixels = pixels.transpose(0, 1, 3, 4, 2)
        if pixel_values_videos is not None:
            videos = np.asarray(pixel_values_videos, np.float32).transpose(0, 1, 3, 4, 2)
            num_frames = videos.shape[1]
        sizes = None if image_sizes is None else np.asarray(image_sizes)
        visual_index, weights = self.visual_index_for(ids, sizes, has_image, num_tiles, num_frames)
        return pixels, videos, visual_index, weights

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                 pixel_values_videos=None) -> jax.Array:
        """transformers-style forward: input_ids [B, T], pixel_values [I, N, C, H, W], image_sizes [I, 2],
        pixel_values_videos [B, F, C, H, W] -> logits [B, T, V]. Image i goes to the i-th sample that
        holds image tokens."""
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        pixels, videos, visual_index, weights = self.prepare_hf_inputs(ids, pixel_values, image_sizes,
                                                                       pixel_values_videos)
        graphdef, state = nnx.split(self)
        return jitted_forward(graphdef, state, jnp.asarray(ids, jnp.int32), pixels, videos,
                              jnp.asarray(visual_index, jnp.int32), weights, jnp.asarray(mask))


class StaticGraph:
    """A graphdef as a jit static argument hashed by identity: hashing an nnx GraphDef walks the whole module
    tree (milliseconds for a LLaVA-NeXT, on every call of a jitted function taking it). Made by
    `static_graph`, one per distinct graphdef, so callers over equal models share compiled functions and
    every call hashes in O(1)."""

    __slots__ = ("graphdef", "__weakref__")

    def __init__(self, graphdef: Any):
        self.graphdef = graphdef


_STATIC_GRAPHS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_STATIC_LOCK = threading.Lock()


def static_graph(graphdef: Any) -> StaticGraph:
    """The one live `StaticGraph` of graphdefs equal to `graphdef` (hashed once here, not per call); held
    only while something (a caller, a jit cache entry) holds it."""
    if isinstance(graphdef, StaticGraph):
        return graphdef
    with _STATIC_LOCK:
        out = _STATIC_GRAPHS.get(graphdef)
        if out is None:
            out = _STATIC_GRAPHS[graphdef] = StaticGraph(graphdef)
        return out


def merge(graphdef: Any, state: Any) -> Any:
    """`nnx.merge` that also takes a `StaticGraph`."""
    return nnx.merge(graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef, state)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def jitted_forward(graphdef, state, input_ids, pixels, videos, visual_index, visual_weights=None,
                   attention_mask=None) -> jax.Array:
    """`nnx.merge` of a split LlavaNextModel + `embed_inputs`, in one jit: -> inputs_embeds [B, T, D]
    (generation prefills), or with attention_mask [B, T] the decoder's logits [B, T, V] (the eager call).
    `graphdef` may be a `StaticGraph`."""
    model = merge(graphdef, state)
    if visual_weights is None:  # the plain call: models without 4-tap support work too
        embeds = model.embed_inputs(input_ids, pixels, videos, visual_index)
    else:
        embeds = model.embed_inputs(input_ids, pixels, videos, visual_index, visual_weights=visual_weights)
    if attention_mask is None:
        return embeds
    logits, _ = model.language_model(embeds, positions_from_mask(attention_mask), attention_mask)
    return logits
