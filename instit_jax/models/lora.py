"""LoRA on the decoder's linear layers: wrap, train only the low-rank factors, fold them back for export.

`apply_lora(decoder, rank, alpha)` swaps the targeted `nnx.Linear` modules of every decoder block for
`LoRALinear` modules that keep the SAME base `kernel`/`bias` Param objects at the same attribute names,
so the param tree is the base tree plus two leaves per wrapped layer:

  language_model/layers/N/self_attn/q_proj/kernel    base weight [in, out] (frozen)
  language_model/layers/N/self_attn/q_proj/lora_a    LoRAParam [in, r]   (Kaiming-uniform init)
  language_model/layers/N/self_attn/q_proj/lora_b    LoRAParam [r, out]  (zeros: wrapped == base at init)

y = x @ W (+ b) + (alpha / r) * dropout(x) @ A @ B. `merge_lora(model)` folds W + (alpha / r) * A @ B
into plain `nnx.Linear` modules again (the original graph and param tree), and `merge_lora_params` does
the same on a pure param dict (checkpoints), so save_pretrained / HF export / generate see a normal model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_PARAM_NAMES = ("lora_a", "lora_b")
_PARENTS = ("self_attn", "mlp")  # DecoderLayer attributes holding the targeted Linear modules


class LoRAParam(nnx.Param):
    """A LoRA factor (a subclass of nnx.Param, so it trains and checkpoints like any param)."""


class LoRALinear(nnx.Module):
    """`nnx.Linear` plus a low-rank update: x [..., in] -> [..., out]; the base weights get no gradient."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, dropout: float = 0.0, rngs: nnx.Rngs):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.kernel = base.kernel  # the base Param objects themselves: same paths, same sharding metadata
        self.bias = base.bias
        for name in ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision",
                     "dot_general", "promote_dtype", "preferred_element_type"):
            setattr(self, name, getattr(base, name))
        self.rank, self.alpha, self.dropout_rate = int(rank), float(alpha), float(dropout)
        self.scale = self.alpha / self.rank
        base_meta = base.kernel.get_metadata()
        meta_a, meta_b = {}, {}
        if base_meta.get("out_sharding"):  # A shards like the kernel's input axis, B like its output axis
            in_name, out_name = tuple(base_meta["out_sharding"])
            shared = {k: v for k, v in base_meta.items() if k == "eager_sharding"}
            meta_a, meta_b = {"out_sharding": (in_name, None), **shared}, {"out_sharding": (None, out_name), **shared}
        # A: Kaiming-uniform with a = sqrt(5) (PEFT's choice), bound = 1 / sqrt(in); B: zeros.
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_a = LoRAParam(
            jax.random.uniform(rngs.params(), (self.in_features, self.rank), self.param_dtype, -bound, bound),
            **meta_a)
        self.lora_b = LoRAParam(jnp.zeros((self.rank, self.out_features), self.param_dtype), **meta_b)
        self.dropout_key = nnx.data(None)  # a jax key set per step by the trainer; None = no dropout

    def _dot(self, x: jax.Array, w: jax.Array) -> jax.Array:
        kw = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        return self.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kw)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """inputs [..., in] -> [..., out]: the base Linear (exactly as nnx.Linear computes it) + scaled A @ B."""
        kernel = jax.lax.stop_gradient(self.kernel[...])  # frozen base: no weight gradient is ever formed
        bias = jax.lax.stop_gradient(self.bias[...]) if self.bias is not None else None
        x, kernel, bias, a, b = self.promote_dtype((inputs, kernel, bias, self.lora_a[...], self.lora_b[...]),
                                                   dtype=self.dtype)
        y = self._dot(x, kernel)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        h = x
        if self.dropout_rate > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout_rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout_rate), jnp.zeros((), h.dtype)).astype(h.dtype)
        return y + self._dot(self._dot(h, a), b) * jnp.asarray(self.scale, y.dtype)


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """`targets` as a tuple; ValueError naming any unknown name and the known ones."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: unknown {unknown or 'empty list'}; "
                         f"choose from {list(LORA_TARGETS)}")
    return targets


def apply_lora(decoder: nnx.Module, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS, *,
               dropout: float = 0.0, rngs: nnx.Rngs) -> nnx.Module:
    """Replace the targeted Linear modules of every decoder block by LoRALinear (in place); returns decoder."""
    targets = check_targets(targets)
    for block in decoder.layers:
        for parent_name in _PARENTS:
            parent = getattr(block, parent_name)
            for name in targets:
                base = getattr(parent, name, None)
                if isinstance(base, nnx.Linear):
                    setattr(parent, name, LoRALinear(base, rank, alpha, dropout=dropout, rngs=rngs))
                elif base is not None and not isinstance(base, LoRALinear):
                    raise TypeError(f"{parent_name}.{name} is a {type(base).__name__}, not an nnx.Linear")
    return decoder


def lora_modules(model: nnx.Module) -> list[LoRALinear]:
    """Every LoRALinear inside `model` (any depth)."""
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]


def has_lora(model: nnx.Module) -> bool:
    """True when `model` holds at least one LoRALinear."""
    return any(isinstance(m, LoRALinear) for _, m in nnx.iter_graph(model))


def set_dropout_key(model: nnx.Module, key: jax.Array | None) -> None:
    """Give every LoRALinear of `model` its own dropout key derived from `key` (None switches dropout off)."""
    for i, m in enumerate(lora_modules(model)):
        m.dropout_key = None if key is None else jax.random.fold_in(key, i)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A @ B in f32 at full matmul precision, cast back to W's dtype. [in,out],[in,r],[r,out]."""
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def _plain_linear(m: LoRALinear) -> nnx.Linear:
    """An nnx.Linear with m's settings holding m's base Param objects (no weight is allocated)."""
    lin = nnx.eval_shape(lambda: nnx.Linear(
        m.in_features, m.out_features, use_bias=m.use_bias, dtype=m.dtype, param_dtype=m.param_dtype,
        precision=m.precision, dot_general=m.dot_general, promote_dtype=m.promote_dtype,
        preferred_element_type=m.preferred_element_type, rngs=nnx.Rngs(0)))
    lin.kernel = m.kernel
    lin.bias = m.bias
    return lin


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every LoRALinear into its base kernel and put plain nnx.Linear modules back (in place).

    Afterwards the model has exactly the param tree and graph it had before `apply_lora`.
    Use `merge_lora(nnx.clone(model))` to keep the LoRA model (clone shares the unchanged arrays)."""
    for _, parent in list(nnx.iter_graph(model)):
        if not isinstance(parent, nnx.Module) or isinstance(parent, LoRALinear):
            continue
        for name, child in list(vars(parent).items()):
            if isinstance(child, LoRALinear):
                w = child.kernel.get_value()
                if not isinstance(w, jax.ShapeDtypeStruct):  # abstract models (nnx.eval_shape) stay abstract
                    child.kernel.set_value(merged_kernel(w, child.lora_a.get_value(), child.lora_b.get_value(),
                                                         child.scale))
                setattr(parent, name, _plain_linear(child))
    return model


def merge_lora_params(params: dict, alpha: float) -> dict:
    """A pure param dict with every {kernel, lora_a, lora_b} node folded (scale = alpha / rank)."""
    if not isinstance(params, dict):
        return params
    if "lora_a" in params or "lora_b" in params:
        a, b = params["lora_a"], params["lora_b"]
        rest = {k: v for k, v in params.items() if k not in LORA_PARAM_NAMES}
        rest["kernel"] = merged_kernel(rest["kernel"], a, b, alpha / a.shape[-1])
        return rest
    return {k: merge_lora_params(v, alpha) for k, v in params.items()}


def has_lora_params(params: Any) -> bool:
    """True when a pure param dict holds LoRA factors."""
    if not isinstance(params, dict):
        return False
    return "lora_a" in params or any(has_lora_params(v) for v in params.values())


def merged_copy(model: nnx.Module) -> nnx.Module:
    """`model` itself when it has no LoRA, else a merged clone (the LoRA model stays usable)."""
    return merge_lora(nnx.clone(model)) if has_lora(model) else model
