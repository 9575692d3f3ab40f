"""CLIP and SigLIP vision towers (Flax NNX) that return the hidden state LLaVA feeds its projector.

Layout: pixels are NHWC float32, normalised as the HF processors do. Param paths
(`patch_embed`, `class_embedding`, `position_embedding`, `pre_layernorm`, `layers/<i>/{layer_norm1,
attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1,fc2}}`, `post_layernorm`) are mapped to Hugging Face
names by `instit_jax/convert/hf.py`.

Logical axis names carried by every param (metadata `out_sharding`, read by `nnx.get_partition_spec`;
the training helper maps them to mesh axes with a rules table):

| name | meaning |
|---|---|
| `vision_patch` | flattened patch pixels P*P*C (input of the patch embedding) |
| `vision_pos` | position-embedding rows (replicate) |
| `vision_embed` | vision hidden width |
| `vision_heads` | flattened attention heads * head_dim of the vision tower |
| `vision_mlp` | vision MLP intermediate width |
| `embed`, `mlp` | LLM width and the projector hidden width (projector, `image_newline`) |

Activation layouts (`sharding.with_logical_constraint`, pinned only under `sharding.use_mesh`): every
block's input and attention output [views, T, D] as `TOKENS`, per-head queries, keys, values and the
attention result [views, T, H, hd] as `HEADS`, the MLP hidden [views, T, intermediate] as `MLP_HIDDEN`;
the views (tiles and frames of the batch's samples) split like the batch.

Feature layer semantics follow transformers: `hidden_states[k]` with hidden_states[0] = embeddings
(after CLIP's pre-layernorm) and hidden_states[i] = output of block i-1; k may be negative
(-2 = penultimate for CLIP; -1 for SigLIP checkpoints whose last block the reference removed).
Only blocks up to the selected one are computed; later blocks and `post_layernorm` stay as params so
conversion round-trips, but they receive no gradient.

Attention: "xla" (`jax.nn.dot_product_attention`, [heads, T, T] scores per view) or "blockwise"
(`models/attention.py` with causal=False: online softmax over key blocks, recomputing backward, no
[T, T] buffer; the 16 GiB-chip choice), chosen by `VisionTower(attention_impl=...)` for every block;
`remat_policy` rematerialises every block the tower runs (see `models/remat.py`); `dot_general` is every
Linear's product (`models/weight_grads.py:linear_dot_general`).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from instit_jax import sharding as shd
from instit_jax.models.attention import blockwise_attention
from instit_jax.models.config import VisionConfig
from instit_jax.models.remat import check_policy, remat

Axes = tuple[str | None, ...]
VISION_ATTENTION_IMPLS = ("xla", "blockwise")

# Activation layouts: one logical name per dimension, resolved by the active rules table (module docstring).
TOKENS = ("act_batch", "act_len", "act_embed")  # [views, T, D]
HEADS = ("act_batch", "act_len", "act_heads", None)  # [views, T, H, hd]
MLP_HIDDEN = ("act_batch", "act_len", "act_mlp")  # [views, T, intermediate]


def partitioned(init: Callable, axes: Axes) -> Callable:
    """Wrap an initializer with logical axis names (never sharded eagerly; the trainer places params)."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation functions HF configs name (`quick_gelu`, `gelu`, `gelu_pytorch_tanh`, ...): module-level
    functions, so two models of one config have equal graphdefs (and share compiled functions)."""
    if name == "quick_gelu":
        return quick_gelu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return gelu_tanh
    if name == "gelu":
        return gelu_exact
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r} (known: quick_gelu, gelu, gelu_pytorch_tanh, silu)")


def dense(din: int, dout: int, axes: Axes, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
          dot_general: Callable = jax.lax.dot_general) -> nnx.Linear:
    """nnx.Linear with logical axis names on kernel [din, dout] and bias [dout], computing its product with
    `dot_general` (`models/weight_grads.py:linear_dot_general`)."""
    return nnx.Linear(
        din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), axes[1:]),
        dot_general=dot_general,
    )


def layer_norm(dim: int, eps: float, axis: str, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """nnx.LayerNorm with logical axis names on scale and bias."""
    return nnx.LayerNorm(
        dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        scale_init=partitioned(nnx.initializers.ones_init(), (axis,)),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axis,)),
    )


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention. x: [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, impl: str = "xla",
                 block_size: int = 256, dot_general: Callable = jax.lax.dot_general):
        d = cfg.hidden_size
        if d % cfg.num_attention_heads:
            raise ValueError(f"vision hidden_size {d} not divisible by num_attention_heads {cfg.num_attention_heads}")
        self.num_heads = cfg.num_attention_heads
        self.impl = impl  # "xla" or "blockwise"
        self.block_size = block_size  # blockwise key/query block
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, dot_general=dot_general)
        self.q_proj = dense(d, d, ("vision_embed", "vision_heads"), **kw)
        self.k_proj = dense(d, d, ("vision_embed", "vision_heads"), **kw)
        self.v_proj = dense(d, d, ("vision_embed", "vision_heads"), **kw)
        self.out_proj = dense(d, d, ("vision_heads", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: shd.with_logical_constraint(y.reshape(b, t, self.num_heads, d // self.num_heads), HEADS)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if self.impl == "blockwise":
            out = blockwise_attention(q, k, v, jnp.ones((b, t), jnp.int32), block_q=self.block_size,
                                      block_k=self.block_size, causal=False)
        else:
            out = jax.nn.dot_product_attention(q, k, v)
        out = shd.with_logical_constraint(out, HEADS).reshape(b, t, d)
        return shd.with_logical_constraint(self.out_proj(out), TOKENS)


class VisionMLP(nnx.Module):
    """fc1 -> activation -> fc2. x: [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, dot_general: Callable = jax.lax.dot_general):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, dot_general=dot_general)
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(shd.with_logical_constraint(self.act(self.fc1(x)), MLP_HIDDEN))


class VisionBlock(nnx.Module):
    """Pre-LN transformer block (CLIP and SigLIP share it). x: [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_impl: str = "xla",
                 attention_block_size: int = 256, dot_general: Callable = jax.lax.dot_general):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "vision_embed", **kw)
        self.attn = VisionAttention(cfg, impl=attention_impl, block_size=attention_block_size,
                                    dot_general=dot_general, **kw)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "vision_embed", **kw)
        self.mlp = VisionMLP(cfg, dot_general=dot_general, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = shd.with_logical_constraint(x, TOKENS)
        x = x + self.attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H//p)*(W//p), p*p*C], patches row-major, pixels (py, px, c) inside a patch.

    Trailing rows/columns that do not fill a patch are dropped, as HF's stride-p VALID convolution does
    (SigLIP-SO400M-384: 384 = 27 * 14 + 6).
    """
    b, h, w, c = pixels.shape
    if h < patch or w < patch:
        raise ValueError(f"image {h}x{w} is smaller than the patch size {patch}")
    h, w = h - h % patch, w - w % patch
    pixels = pixels[:, :h, :w]
    x = pixels.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class VisionTower(nnx.Module):
    """CLIP (class token, pre-layernorm) or SigLIP (no class token) ViT.

    `tower(pixels[B,H,W,C], frozen_layers=k) -> features[B, P, Dv]` (P = patches, plus CLS for CLIP
    when select_strategy == "full"). attention_impl ("xla" or "blockwise") and attention_block_size set
    every block's attention; remat_policy (a `REMAT_POLICIES` name) rematerialises every block it runs;
    dot_general is every Linear's product (`models/weight_grads.py:linear_dot_general`).
    """

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        feature_layer: int = -2,
        select_strategy: str = "default",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        attention_block_size: int = 256,
        remat_policy: str = "none",
        dot_general: Callable = jax.lax.dot_general,
        rngs: nnx.Rngs,
    ):
        if cfg.model_type not in ("clip", "siglip"):
            raise ValueError(f"VisionConfig.model_type must be 'clip' or 'siglip', got {cfg.model_type!r}")
        if select_strategy not in ("default", "full"):
            raise ValueError(f"select_strategy must be 'default' or 'full', got {select_strategy!r}")
        n_states = cfg.num_hidden_layers + 1
        if not -n_states <= feature_layer < n_states:
            raise ValueError(f"feature_layer {feature_layer} out of range for {cfg.num_hidden_layers} layers")
        if attention_impl not in VISION_ATTENTION_IMPLS:
            raise ValueError(f"vision attention_impl must be one of {VISION_ATTENTION_IMPLS}, got {attention_impl!r}")
        self.cfg = cfg
        self.num_feature_blocks = feature_layer % n_states  # blocks to run to reach hidden_states[k]
        self.select_strategy = select_strategy
        self.dtype = dtype
        self.remat_policy = check_policy(remat_policy)
        d, p = cfg.hidden_size, cfg.patch_size
        is_clip = cfg.model_type == "clip"
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = dense(p * p * cfg.num_channels, d, ("vision_patch", "vision_embed"), bias=not is_clip,
                                 dot_general=dot_general, **kw)
        n_pos = cfg.num_patches + (1 if is_clip else 0)
        init = nnx.initializers.normal(0.02)
        self.position_embedding = nnx.Param(
            partitioned(init, ("vision_pos", "vision_embed"))(rngs.params(), (n_pos, d), param_dtype))
        if is_clip:
            self.class_embedding = nnx.Param(partitioned(init, ("vision_embed",))(rngs.params(), (d,), param_dtype))
            self.pre_layernorm = layer_norm(d, cfg.layer_norm_eps, "vision_embed", **kw)
        self.layers = nnx.List([VisionBlock(cfg, attention_impl=attention_impl, attention_block_size=attention_block_size,
                                            dot_general=dot_general, **kw)
                                for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = layer_norm(d, cfg.layer_norm_eps, "vision_embed", **kw)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """Patch + position embeddings (+ CLS and pre-layernorm for CLIP). [B,H,W,C] -> [B,T,D]."""
        x = self.patch_embed(patchify(pixels.astype(self.dtype), self.cfg.patch_size))
        if self.cfg.model_type == "clip":
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding[...].astype(x.dtype)[None]
        if self.cfg.model_type == "clip":
            x = self.pre_layernorm(x)
        return x

    def hidden_state(self, pixels: jax.Array, *, frozen_layers: int = 0) -> jax.Array:
        """hidden_states[feature_layer] with the gradient stopped after block frozen_layers-1. -> [B,T,D]."""
        x = self.embed(pixels)
        call = remat(lambda blk, y: blk(y), self.remat_policy)
        for i in range(self.num_feature_blocks):
            x = call(self.layers[i], x)
            if i == frozen_layers - 1:
                x = jax.lax.stop_gradient(x)
        if frozen_layers > self.num_feature_blocks:
            x = jax.lax.stop_gradient(x)
        return x

    def __call__(self, pixels: jax.Array, *, frozen_layers: int = 0) -> jax.Array:
        """Selected features: [B,H,W,C] -> [B, P, D] ('default' drops the first token, like transformers)."""
        x = self.hidden_state(pixels, frozen_layers=frozen_layers)
        return x[:, 1:] if self.select_strategy == "default" else x
