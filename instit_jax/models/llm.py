"""Llama/Vicuna and Qwen2 causal decoders in Flax NNX, with a static-length KV cache.

One `Decoder` class covers both families; the differences are config switches:
  - `cfg.attention_bias`: q/k/v projections carry biases (Qwen2); o_proj never has one.
  - `cfg.tie_word_embeddings`: logits reuse `embed_tokens.embedding` (then `lm_head` is absent).
  - `cfg.num_key_value_heads < num_attention_heads`: grouped-query attention.
  - `cfg.rope_theta`: RoPE base (10_000 for Llama-2/Vicuna, 1_000_000 for Qwen2).
Blocks are pre-norm: x + attn(rms(x)); x + mlp(rms(x)), MLP = down(silu(gate(x)) * up(x)); RoPE is the
"rotate half" variant (pairs dimension i with i + head_dim/2), attention scale head_dim**-0.5.

Parameter paths (NNX attribute names chosen to sit next to Hugging Face's keys):

  ours                                        HF key                                         layout
  embed_tokens.embedding                      model.embed_tokens.weight                      [V, D] (same)
  layers.N.self_attn.{q,k,v,o}_proj.kernel    model.layers.N.self_attn.{q,k,v,o}_proj.weight  [in, out] = weight.T
  layers.N.self_attn.{q,k,v}_proj.bias        model.layers.N.self_attn.{q,k,v}_proj.bias      [out] (Qwen2 only)
  layers.N.mlp.{gate,up,down}_proj.kernel     model.layers.N.mlp.{gate,up,down}_proj.weight   [in, out] = weight.T
  layers.N.input_layernorm.weight             model.layers.N.input_layernorm.weight           [D]
  layers.N.post_attention_layernorm.weight    model.layers.N.post_attention_layernorm.weight  [D]
  norm.weight                                 model.norm.weight                               [D]
  lm_head.kernel                              lm_head.weight                                  [D, V] = weight.T (untied only)

Head-major flattening is HF's: q_proj's output index is head * head_dim + d.

Logical axis names (param metadata `out_sharding`, created with `eager_sharding=False`, so
`nnx.get_partition_spec(state)` gives the logical specs that a rules table maps onto a mesh):
  'vocab'     vocabulary rows (embedding, lm_head columns)
  'embed'     model width D (residual stream)
  'q_heads'   flattened query heads * head_dim (q_proj out, o_proj in, q bias)
  'kv_heads'  flattened key/value heads * head_dim (k/v_proj out, biases)
  'mlp'       intermediate width (gate/up out, down in)
  'norm'      RMSNorm scales (replicate these)

Activation layouts (`sharding.with_logical_constraint`; pinned only while a step is traced under
`sharding.use_mesh(mesh, rules)`, untouched otherwise): every block's input and the attention output
[B, T, D] as `RESIDUAL`, queries and the attention result [B, T, N, hd] as `QUERY_HEADS`, keys and values
as `KV_HEADS`, the SwiGLU hidden [B, T, intermediate] as `MLP_HIDDEN`. With the rules of
`sharding.RULES`: the batch over (data, fsdp), heads and MLP width over tensor under "fsdp_tp".

KV cache (`KVCache`, made by `init_cache`): per layer keys/values [B, K, S, hd] (heads before slots, so one
query's attention reads a row's keys without a transpose) with a STATIC slot count S, a slot validity
mask [B, S] and a write index per row [B]. A call with a cache writes row b's T new keys at slots
[index[b], index[b] + T), marks those slots with the call's attention_mask and advances every index by T
(writes past S are dropped); a query attends to the valid slots at or before its own slot. Rows may sit
at different write positions (continuous batching refills one row while the others decode). Batches of
prompts with different lengths are LEFT padded (pads first), and RoPE uses the per-row `positions`
(cumsum(mask) - 1, as transformers' generate does). A one-token call (decode) writes with one in-place
dynamic_update_slice per row (`write_slots`) and attends over the cache in its own layout
(`decode_attention`: the native kernel of `kernels/cpu.py` on CPU, batched one-row products elsewhere).

`inference_view(decoder)` is the same model with its matrices rearranged for decoding (all stored [out, in],
q/k/v and gate/up fused; on CPU, decode-step products run the multi-threaded kernel of `kernels/cpu.py`);
the batch engine serves it. Its parameter names are its own; checkpoints, conversion and training use the
Decoder's.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from instit_jax import sharding as shd
from instit_jax.kernels import cpu as cpu_kernels
from instit_jax.models.attention import blockwise_attention, splash_attention
from instit_jax.models.config import TextConfig
from instit_jax.models.remat import check_policy, remat

Array = jax.Array
ATTENTION_IMPLS = ("xla", "cudnn", "blockwise", "splash", "splash_interpret")

# Activation layouts: one logical name per dimension, resolved by the active rules table (module docstring).
RESIDUAL = ("act_batch", "act_len", "act_embed")  # [B, T, D]
QUERY_HEADS = ("act_batch", "act_len", "act_heads", None)  # [B, T, N, hd]
KV_HEADS = ("act_batch", "act_len", "act_kv_heads", None)  # [B, T, K, hd]
MLP_HIDDEN = ("act_batch", "act_len", "act_mlp")  # [B, T, intermediate]


def _param_meta(*names: str | None) -> dict[str, Any]:
    return {"out_sharding": tuple(names), "eager_sharding": False}


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Static-length key/value cache: keys/values per layer [B, K, S, hd], slot_mask [B, S] (1 = a valid
    key), index [B] (each row's next write slot)."""

    keys: list[Array]
    values: list[Array]
    slot_mask: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.slot_mask.shape[1]


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """Empty cache for `batch` rows and `max_len` slots (prompt + new tokens), every row writing at slot 0."""
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.resolved_head_dim)
    return KVCache(
        keys=[jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)],
        values=[jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)],
        slot_mask=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((batch,), jnp.int32),
    )


def cached_attention(q: Array, keys: Array, values: Array, slot_mask: Array, query_slots: Array,
                     scale: float) -> Array:
    """q [B, T, N, hd] whose queries sit at slots query_slots [B, T], over keys/values [B, K, S, hd]: key s is
    visible to query t when slot_mask[b, s] > 0 and s <= query_slots[b, t]. -> [B, T, N, hd].

    On CPU with f32 operands the native kernel of `kernels/cpu.py`; elsewhere `_grouped_attention`, the
    arithmetic of `jax.nn.dot_product_attention`'s XLA path. Query heads are grouped by KV head (no
    repeated keys)."""
    b, t, n, hd = q.shape
    k_heads = keys.shape[1]
    grouped = q.reshape(b, t, k_heads, n // k_heads, hd)
    xla_form = functools.partial(_grouped_attention, scale=scale)
    out = cpu_kernels.cached_attention(grouped, keys, values, slot_mask, query_slots, scale, xla_form)
    return out.reshape(b, t, n, hd)


def _grouped_attention(q: Array, keys: Array, values: Array, slot_mask: Array, query_slots: Array, *,
                       scale: float) -> Array:
    """`cached_attention` in XLA on grouped queries q [B, T, K, G, hd] -> [B, T, K, G, hd]: logits in f32 or
    wider, scaled after the product, masked with -0.7 * f32 max, softmax in f32, probabilities cast to the
    value dtype."""
    s = keys.shape[2]
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q.dtype))
    logits = jnp.einsum("btkgd,bksd->bkgts", q, keys, precision=precision, preferred_element_type=logits_dtype)
    logits = logits * jnp.array(scale, logits.dtype)
    visible = (slot_mask[:, None, :] > 0) & (jnp.arange(s)[None, None, :] <= query_slots[:, :, None])  # [B, T, S]
    big_negative = jnp.asarray(-0.7 * float(jnp.finfo(jnp.float32).max), logits.dtype)
    logits = jnp.where(visible[:, None, None], logits, big_negative)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, values)


def write_slots(cache: Array, new: Array, slots: Array) -> Array:
    """cache [B, K, S, hd] with new [B, T, K, hd] written at slots [B, T]; slots >= S are dropped.

    One token per row (decode) is one in-place dynamic_update_slice per row; a scatter over the
    [B, K, S, hd] layout would make XLA transpose the whole cache around it."""
    b, t = slots.shape
    new = new.astype(cache.dtype)
    if t > 1:
        return cache.at[jnp.arange(b)[:, None], :, slots].set(new, mode="drop")
    k_heads, s, hd = cache.shape[1], cache.shape[2], cache.shape[3]
    new = jnp.swapaxes(new, 1, 2)  # [B, K, 1, hd]
    for row in range(b):
        slot = slots[row, 0]
        at = (row, 0, jnp.minimum(slot, s - 1), 0)
        old = jax.lax.dynamic_slice(cache, at, (1, k_heads, 1, hd))
        cache = jax.lax.dynamic_update_slice(cache, jnp.where(slot < s, new[row:row + 1], old), at)
    return cache


def decode_attention(q: Array, keys: Array, values: Array, slot_mask: Array, query_slots: Array,
                     scale: float) -> Array:
    """`cached_attention` for one query per row (T = 1): on CPU with an f32 cache the native kernel of
    `kernels/cpu.py` (each row's keys and values streamed once, rows and KV heads spread over the threads),
    elsewhere `cached_attention`'s XLA form. -> [B, 1, N, hd]."""
    b, t, n, hd = q.shape
    k_heads, s = keys.shape[1], keys.shape[2]
    visible = (slot_mask > 0) & (jnp.arange(s)[None, :] <= query_slots)  # [B, S] (query_slots [B, 1])

    def xla_form(qg, keys, values, visible):  # visibility passed whole as the slot mask
        return _grouped_attention(qg[:, None], keys, values, visible.astype(jnp.int32),
                                  jnp.full((b, 1), s - 1, jnp.int32), scale=scale)[:, 0]

    out = cpu_kernels.decode_attention(q.reshape(b, k_heads, n // k_heads, hd), keys, values, visible, scale,
                                       xla_form)
    return out.astype(q.dtype).reshape(b, 1, n, hd)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables [B, T, hd] for integer positions [B, T] (rotate-half layout, computed in f32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [B, T, N, hd] by the tables [B, T, hd]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in f32, scaled by `weight` [D] (HF Llama semantics)."""

    def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **_param_meta("norm"))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


def _linear(din: int, dout: int, names: tuple[str, str], *, bias: bool, dtype, param_dtype, std, rngs,
            dot_general: Callable = jax.lax.dot_general) -> nnx.Linear:
    """nnx.Linear with logical axis names on kernel [din, dout] and bias [dout], computing its product with
    `dot_general` (`models/weight_grads.py:linear_dot_general`)."""
    return nnx.Linear(
        din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, kernel_init=_normal(std),
        kernel_metadata=_param_meta(*names), bias_metadata=_param_meta(names[1]), rngs=rngs,
        dot_general=dot_general,
    )


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, std: float, rngs: nnx.Rngs, impl: str = "xla",
                 block_size: int = 512, dot_general: Callable = jax.lax.dot_general):
        d, hd = cfg.hidden_size, cfg.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.rope_theta = cfg.rope_theta
        self.impl = impl  # see __call__ and Decoder
        self.block_size = block_size  # query/key block of the "blockwise" and "splash" impls
        kw = dict(dtype=dtype, param_dtype=param_dtype, std=std, rngs=rngs, dot_general=dot_general)
        self.q_proj = _linear(d, self.num_heads * hd, ("embed", "q_heads"), bias=cfg.attention_bias, **kw)
        self.k_proj = _linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.v_proj = _linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.o_proj = _linear(self.num_heads * hd, d, ("q_heads", "embed"), bias=False, **kw)

    def __call__(
        self, x: Array, cos: Array, sin: Array, attention_mask: Array,
        cache: tuple[Array, Array, Array, Array] | None = None, segment_ids: Array | None = None,
        last_only: bool = False,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """x [B, T, D]; cache = (keys, values [B, K, S, hd], slot_mask_after_write [B, S], write slots [B, T])
        -> (y [B, T, D], the updated (keys, values) or None). `last_only` (with a cache): every position's key
        and value are written, but only the last position queries: y is [B, 1, D].

        segment_ids [B, T] int32 (packed rows, no cache): 0 = padding, k >= 1 = the row's k-th sequence;
        a query then sees only earlier keys of its own segment (block-diagonal causal), in every impl.

        self.impl "xla": explicit boolean mask (any padding). "cudnn" (no cache only): causal attention
        with padding given as per-row lengths, which assumes RIGHT padding; cuDNN flash attention on
        GPU, the same semantics through XLA elsewhere. "blockwise" (no cache only): the "xla" semantics
        (any padding) in pure-JAX flash attention that never stores the [T, T] scores (models/attention.py).
        "splash" (no cache only, TPU): Pallas splash attention, same rows for real tokens; T and head_dim
        multiples of 128; "splash_interpret" runs that kernel in the Pallas interpreter (CPU tests).
        """
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):  # `inference_view`: one product for q, k and v
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = jnp.split(self.qkv_proj(x), (nq, nq + nkv), axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = shd.with_logical_constraint(q.reshape(b, t, self.num_heads, self.head_dim), QUERY_HEADS)
        k = shd.with_logical_constraint(k.reshape(b, t, self.num_kv_heads, self.head_dim), KV_HEADS)
        v = shd.with_logical_constraint(v.reshape(b, t, self.num_kv_heads, self.head_dim), KV_HEADS)
        if last_only and cache is None:
            raise ValueError("Attention: last_only is for calls with a KV cache")
        k = apply_rope(k, cos, sin)
        q = apply_rope(q[:, -1:], cos[:, -1:], sin[:, -1:]) if last_only else apply_rope(q, cos, sin)
        if cache is not None:
            keys, values, slot_mask, slots = cache
            keys, values = write_slots(keys, k, slots), write_slots(values, v, slots)
            query_slots = slots[:, -1:] if last_only else slots
            attend = decode_attention if q.shape[1] == 1 else cached_attention
            y = attend(q, keys, values, slot_mask, query_slots, self.head_dim**-0.5)
            return self._out(y), (keys, values)
        if self.impl == "cudnn" and segment_ids is not None:
            # packed rows: cuDNN takes the block-diagonal causal mask explicitly
            mask = _segment_mask(segment_ids)
            backend = "cudnn" if jax.default_backend() == "gpu" else "xla"
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.head_dim**-0.5, implementation=backend)
        elif self.impl == "cudnn":
            lengths = jnp.sum(attention_mask > 0, axis=-1).astype(jnp.int32)
            backend = "cudnn" if jax.default_backend() == "gpu" else "xla"
            y = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim**-0.5, is_causal=True,
                                             query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                             implementation=backend)
        elif self.impl == "blockwise":
            y = blockwise_attention(q, k, v, attention_mask, block_q=self.block_size, block_k=self.block_size,
                                    segment_ids=segment_ids)
        elif self.impl in ("splash", "splash_interpret"):
            y = splash_attention(q, k, v, attention_mask, block_size=self.block_size,
                                 interpret=self.impl == "splash_interpret", segment_ids=segment_ids)
        else:
            if segment_ids is not None:
                mask = _segment_mask(segment_ids)
            else:
                causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
                mask = causal[None, None] & (attention_mask[:, None, None, :] > 0)
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.head_dim**-0.5, implementation=None)
        return self._out(y), None

    def _out(self, y: Array) -> Array:
        """Attention result [B, T, N, hd] -> o_proj output [B, T, D]."""
        b, t = y.shape[:2]
        y = shd.with_logical_constraint(y, QUERY_HEADS).reshape(b, t, self.num_heads * self.head_dim)
        return shd.with_logical_constraint(self.o_proj(y), RESIDUAL)


def _segment_mask(segment_ids: Array) -> Array:
    """Block-diagonal causal mask [B, 1, T, T] of packed rows: key s visible to query t when s <= t and both
    belong to the same segment > 0 (padding queries see nothing: don't-care rows, finite)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    return (causal[None] & same)[:, None]


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). x: [B, T, D] -> [B, T, D].

    sequence_pieces = k > 1 (and dividing T): the MLP runs over T in k slices one after the other
    (`lax.map`, each slice rematerialised), so only one slice's [B, T/k, intermediate] buffers are live."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, std: float, rngs: nnx.Rngs, sequence_pieces: int = 0,
                 dot_general: Callable = jax.lax.dot_general):
        if cfg.hidden_act != "silu":
            raise ValueError(f"TextConfig.hidden_act={cfg.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        d, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, std=std, rngs=rngs,
                  dot_general=dot_general)
        self.gate_proj = _linear(d, m, ("embed", "mlp"), **kw)
        self.up_proj = _linear(d, m, ("embed", "mlp"), **kw)
        self.down_proj = _linear(m, d, ("mlp", "embed"), **kw)
        self.sequence_pieces = sequence_pieces

    def _apply(self, x: Array) -> Array:
        if hasattr(self, "gate_up_proj"):  # `inference_view`
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        hidden = shd.with_logical_constraint(jax.nn.silu(gate) * up, MLP_HIDDEN)
        return self.down_proj(hidden)

    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        pieces = self.sequence_pieces
        if pieces <= 1 or t % pieces:
            return self._apply(x)
        graphdef, state = nnx.split(self)

        @jax.checkpoint
        def one(state, xs):
            return nnx.merge(graphdef, state)._apply(xs)

        xs = jnp.moveaxis(x.reshape(b, pieces, t // pieces, d), 1, 0)
        out = jax.lax.map(lambda piece: one(state, piece), xs)
        return jnp.moveaxis(out, 0, 1).reshape(b, t, out.shape[-1])


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block (attention then SwiGLU MLP, both residual)."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, std: float, rngs: nnx.Rngs,
                 attention_impl: str = "xla", attention_block_size: int = 512, mlp_sequence_pieces: int = 0,
                 dot_general: Callable = jax.lax.dot_general):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, std=std, rngs=rngs, impl=attention_impl, block_size=attention_block_size,
                                   dot_general=dot_general, **kw)
        self.mlp = MLP(cfg, std=std, rngs=rngs, sequence_pieces=mlp_sequence_pieces,
                       dot_general=dot_general, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, attention_mask, cache=None, segment_ids=None, last_only=False):
        """x [B, T, D] -> (x [B, T, D], updated (keys, values) or None); segment_ids, last_only (x [B, 1, D]
        out): see Attention."""
        x = shd.with_logical_constraint(x, RESIDUAL)
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, cache, segment_ids,
                                   last_only)
        x = (x[:, -1:] if last_only else x) + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


def _call_layer(layer: DecoderLayer, x, cos, sin, attention_mask, segment_ids):
    return layer(x, cos, sin, attention_mask, None, segment_ids)


class Decoder(nnx.Module):
    """Causal LM: embed_tokens -> layers -> norm -> lm_head (or tied embedding).

    Compute choices (`ComputeConfig`; none changes a number beyond float rounding):
      attention_impl: 'xla' (explicit masks, any padding), 'cudnn' (cuDNN flash attention on GPU for
        cache-free calls; padding as per-row lengths, so batches must be RIGHT padded, as training batches
        are), 'blockwise' (pure-JAX flash attention for cache-free calls, any padding: O(T) memory per head,
        the choice for long sequences on TPU, in query/key blocks of `attention_block_size`), 'splash' (the
        Pallas TPU kernel; T, block size, head_dim multiples of 128) or 'splash_interpret' (that kernel
        interpreted, CPU). jax.nn.dot_product_attention(implementation=None) always picks XLA in jax 0.10,
        hence the switch. Calls with a KV cache (prefill and decode) always use `cached_attention`.
      remat_policy: every block of a cache-free call rematerialised with this `REMAT_POLICIES` policy.
      mlp_sequence_pieces: see `MLP`.
      vocab_parallel_head: see `logits_fn`.
      dot_general: every Linear's product (`models/weight_grads.py:linear_dot_general`: kernel-layout weight
        gradients, bf16 operands).
    """

    def __init__(
        self, cfg: TextConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs, initializer_range: float = 0.02, attention_impl: str = "xla",
        attention_block_size: int = 512, remat_policy: str = "none", mlp_sequence_pieces: int = 0,
        vocab_parallel_head: bool = False, dot_general: Callable = jax.lax.dot_general,
    ):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Decoder attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        if attention_block_size < 8 or attention_block_size % 8:
            raise ValueError(f"Decoder attention block size must be a positive multiple of 8, got {attention_block_size}")
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.attention_impl = attention_impl
        self.remat_policy = check_policy(remat_policy)
        self.vocab_parallel_head = vocab_parallel_head
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=_normal(initializer_range),
            embedding_metadata=_param_meta("vocab", "embed"), rngs=rngs, **kw,
        )
        self.layers = nnx.List([
            DecoderLayer(cfg, std=initializer_range, rngs=rngs, attention_impl=attention_impl,
                         attention_block_size=attention_block_size, mlp_sequence_pieces=mlp_sequence_pieces,
                         dot_general=dot_general, **kw)
            for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(
                cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, std=initializer_range,
                rngs=rngs, dot_general=dot_general, **kw,
            )

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings [B, T] -> [B, T, D] in the compute dtype."""
        return self.embed_tokens(input_ids).astype(self.dtype)

    def hidden_states(
        self, inputs_embeds: Array, positions: Array, attention_mask: Array, cache: KVCache | None = None,
        segment_ids: Array | None = None, last_only: bool = False,
    ) -> tuple[Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] (before the LM head) and the updated cache.

        With a cache the call writes its T keys per row at that row's write index (see `KVCache`): a prompt
        (prefill) and one token per row (decode) are the same call. `last_only` (with a cache; a prefill that
        needs only the last position's logits, rows left-padded): the last block runs its query, o_proj and
        MLP for the last position alone (every block still writes every position's keys and values, so the
        cache is the same) and the result is [B, 1, D].

        segment_ids [B, T] (packed rows, no cache): block-diagonal causal attention, see Attention;
        `positions` then restart at 0 in every segment."""
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for cache-free calls (training), not generation")
        if last_only and cache is None:
            raise ValueError("last_only is for calls with a KV cache (prefill)")
        x = inputs_embeds.astype(self.dtype)
        t = x.shape[1]
        cos, sin = rope_tables(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta)
        attention_mask = attention_mask.astype(jnp.int32)
        slot_mask = slots = None
        if cache is not None:
            slots = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T] each row's write slots
            rows = jnp.arange(x.shape[0])[:, None]
            slot_mask = cache.slot_mask.at[rows, slots].set(attention_mask, mode="drop")
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], slot_mask, slots)
            if self.remat_policy != "none" and cache is None:
                x, kv = remat(_call_layer, self.remat_policy)(layer, x, cos, sin, attention_mask, segment_ids)
            elif segment_ids is not None:
                x, kv = layer(x, cos, sin, attention_mask, None, segment_ids)
            else:
                x, kv = layer(x, cos, sin, attention_mask, layer_cache, None, last_only and i == len(self.layers) - 1)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, KVCache(new_keys, new_values, slot_mask, cache.index + t)

    def logits(self, hidden: Array) -> Array:
        """LM head: hidden [B, T, D] -> logits [B, T, V] (compute dtype)."""
        if hasattr(self, "decode_head"):  # `inference_view`
            return self.decode_head(hidden)
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(hidden.astype(self.dtype))
        return self.lm_head(hidden)

    def logits_fn(self) -> Callable[[Array], Array]:
        """The LM head as a function hidden [B, t, D] -> logits [B, t, V], for a loss that applies it to
        one chunk of positions at a time.

        With vocab_parallel_head, traced under a mesh (`jax.set_mesh`) whose batch axes divide V: the untied
        [D, V] head is resharded along V over the batch axes once, here (an all-to-all of its compute-dtype
        copy), and every logits chunk is constrained to stay split along V. The matmul then contracts an
        unsplit D: no [B, t, V] partial sums, no all-gathered head, and the head's gradient stays split."""
        spec = vocab_parallel_spec(jax.sharding.get_abstract_mesh(), self.cfg.vocab_size)
        if not self.vocab_parallel_head or spec is None:
            return self.logits
        split = lambda logits: jax.lax.with_sharding_constraint(logits, spec)  # noqa: E731
        if self.cfg.tie_word_embeddings:
            return lambda hidden: split(self.logits(hidden))
        head = self.lm_head
        kernel = jax.lax.with_sharding_constraint(head.kernel[...].astype(self.dtype), jax.P(None, spec[-1]))

        def logits(hidden: Array) -> Array:  # nnx.Linear's arithmetic with the resharded kernel
            x = hidden.astype(self.dtype)
            return head.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=head.precision)

        return lambda hidden: split(logits(hidden))

    def __call__(
        self, inputs_embeds: Array, positions: Array, attention_mask: Array, cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """inputs_embeds [B, T, D], positions [B, T] int32, attention_mask [B, T] -> (logits [B, T, V], cache)."""
        hidden, cache = self.hidden_states(inputs_embeds, positions, attention_mask, cache)
        return self.logits(hidden), cache


class DecodeLinear(nnx.Module):
    """A Linear with its kernel stored [out, in] (HF's layout), for decoding: y = x @ kernel.T (+ bias), in the
    compute dtype. Products of at most `kernels.cpu.MAX_ROWS` rows run the multi-threaded CPU kernel
    (`instit_jax/kernels/cpu.py`: XLA:CPU runs them on one thread); wider ones (prefill), other dtypes and
    other platforms XLA's product. Forward only."""

    def __init__(self, kernel: nnx.Param, bias: Array | None, dtype: Any):
        self.kernel = kernel  # [out, in]; a Param of another module is shared, not copied (the tied head)
        self.bias = None if bias is None else nnx.Param(bias)
        self.dtype = dtype

    @classmethod
    def fused(cls, parts: list[nnx.Linear]) -> DecodeLinear:
        """`parts` (Linears with [in, out] kernels) as one [sum(out), in] matrix, outputs in `parts`' order."""
        kernel = jnp.concatenate([p.kernel[...].T for p in parts], axis=0)
        biases = [p.bias for p in parts]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            raise ValueError("DecodeLinear.fused: either every part has a bias or none does")
        bias = None if biases[0] is None else jnp.concatenate([b[...] for b in biases])
        return cls(nnx.Param(kernel), bias, parts[0].dtype)

    def __call__(self, x: Array) -> Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y = cpu_kernels.matmul_wt(x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def inference_view(decoder: Decoder) -> Decoder:
    """The decoder with its matrices laid out for decoding, same numbers: every block matrix and the LM head
    as a `DecodeLinear` stored [out, in] (on CPU, one multi-threaded kernel per product at decode), q/k/v
    fused into one [(N + 2K) hd, D] and gate/up into one [2 * intermediate, D] (fewer, wider products). The
    tied head shares the embedding table (already [V, D]); every other rearranged matrix is a new array, so
    the view holds a second copy of each block's weights (and of an untied head). `decoder`, its parameter
    names and its checkpoints are unchanged."""
    view = nnx.clone(decoder)
    for layer in view.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = DecodeLinear.fused([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.o_proj = DecodeLinear.fused([attn.o_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = DecodeLinear.fused([mlp.gate_proj, mlp.up_proj])
        mlp.down_proj = DecodeLinear.fused([mlp.down_proj])
        del mlp.gate_proj, mlp.up_proj
    if decoder.cfg.tie_word_embeddings:
        view.decode_head = DecodeLinear(view.embed_tokens.embedding, None, view.dtype)
    else:
        view.decode_head = DecodeLinear.fused([view.lm_head])
        del view.lm_head
    return view


def vocab_parallel_spec(mesh: Any, vocab_size: int) -> jax.P | None:
    """Logits [B, t, V] split along V over the mesh's batch axes; None without a mesh, with one batch
    shard, or when V does not divide."""
    axes = tuple(a for a in shd.BATCH_AXES if a in mesh.axis_names)
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    if shards == 1 or vocab_size % shards:
        return None
    return jax.P(None, None, axes)


def positions_from_mask(attention_mask: Array) -> Array:
    """RoPE positions for a (left- or right-) padded batch: cumsum(mask) - 1, pads at 0. [B, T] -> [B, T]."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)
