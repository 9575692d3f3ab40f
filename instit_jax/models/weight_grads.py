"""The `dot_general` every `nnx.Linear` of the models is built with: weight gradients in the kernel's own
[in, out] layout, and optionally bf16 operands with f32 accumulation.

jax's generic transpose rule builds a Linear's weight gradient as dot(cotangent, x) -> [out, in] and then
transposes it; XLA:CPU moves that transpose onto the [tokens, out] cotangent and fuses it into the
elementwise producer (the SwiGLU backward, the LM-head backward), which then writes a strided, transposed
copy (~12% of a CPU train step, docs/xla_cpu.md). The custom VJP below contracts the token axes of x and
the cotangent directly into [in, out]. `ComputeConfig.direct_weight_grads` turns it on (the trainer does on
CPU meshes).

`ComputeConfig.dot_dtype = "bfloat16"` casts both operands of every Linear product (forward, and the two
backward products) to bf16 and accumulates in the activation dtype (f32): activations, norms, softmax, the
loss and the master weights stay f32, only the matmul inputs are rounded, as a TPU's default matmul
precision does with f32 operands. CPUs with AVX512-BF16 run such a product ~1.9x faster than an f32 one
(XLA:CPU and oneDNN alike; `benchmarks/train_step.py` times both precisions); a plain bf16 x bf16 -> bf16
product is no faster than f32 there, hence the f32 accumulator. The forward keeps the bf16 operands as its
residuals, halving what the backward holds per Linear.

`linear_dot_general(direct, dot_dtype)` returns one shared function per choice (graph definitions that
hold it stay equal, so jit caches hit); the Linear builders (`models/vit.py:dense`, `models/llm.py:_linear`)
receive it from `LlavaNextModel` / `Decoder`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

DOT_DTYPES = ("", "bfloat16")  # "": the operands' own dtype


def _contract_tokens(x: jax.Array, g: jax.Array, out_dtype) -> jax.Array:
    """x [..., in], g [..., out] -> [in, out]: every leading (token) axis contracted."""
    lead = tuple(range(x.ndim - 1))
    return jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=out_dtype)


def _linear_dot(operand_dtype: str) -> Callable:
    """x [..., in] @ w [in, out] -> [..., out], both in one dtype, the result in it too; operands cast to
    `operand_dtype` ("" = as given); the weight gradient built in the kernel's layout. The cotangents take the
    output's dtype, which is x's and w's (`linear_dot_general` routes only equal-dtype operands here)."""
    cast = jnp.dtype(operand_dtype) if operand_dtype else None

    def prep(a: jax.Array) -> jax.Array:
        return a if cast is None else a.astype(cast)

    def product(xc: jax.Array, wc: jax.Array, out_dtype) -> jax.Array:
        return jax.lax.dot_general(xc, wc, (((xc.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype)

    @jax.custom_vjp
    def dot(x, w):
        return product(prep(x), prep(w), x.dtype)

    def fwd(x, w):
        xc, wc = prep(x), prep(w)
        return product(xc, wc, x.dtype), (xc, wc)

    def bwd(res, g):
        xc, wc = res
        gc = prep(g)
        acc = jnp.promote_types(g.dtype, jnp.float32) if cast is not None else g.dtype
        dx = jax.lax.dot_general(gc, wc, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=acc)
        dw = _contract_tokens(xc, gc, acc)  # [in, out]: no transposed copy of the cotangent
        return dx.astype(g.dtype), dw.astype(g.dtype)

    dot.defvjp(fwd, bwd)
    return dot


def _plain_linear_contraction(lhs, rhs, dimension_numbers, precision, preferred_element_type, kwargs) -> bool:
    (lc, rc), (lb, rb) = dimension_numbers
    return (rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
            and precision is None and preferred_element_type is None and kwargs.get("out_sharding") is None
            and lhs.dtype == rhs.dtype)


def linear_dot_general(direct_weight_grads: bool = False, dot_dtype: str = "") -> Callable:
    """The `dot_general` a model's nnx.Linear layers are built with: `lax.dot_general` (nnx.Linear's own
    default) when neither option is set; otherwise a drop-in whose plain [..., in] x [in, out] contraction
    goes through the custom-VJP product above (anything else: batch dims, precision or output-type requests,
    shardings, mixed operand dtypes, goes to lax unchanged). bf16 operands imply the kernel-layout weight
    gradient (it is the same maths on every backend)."""
    if dot_dtype not in DOT_DTYPES:
        raise ValueError(f"dot_dtype must be one of {DOT_DTYPES}, got {dot_dtype!r}")
    return _linear_dot_general(bool(direct_weight_grads), dot_dtype)


@functools.cache
def _linear_dot_general(direct_weight_grads: bool, dot_dtype: str) -> Callable:
    if not direct_weight_grads and not dot_dtype:
        return jax.lax.dot_general
    product = _linear_dot(dot_dtype)

    def linear_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        if _plain_linear_contraction(lhs, rhs, dimension_numbers, precision, preferred_element_type, kwargs):
            return product(lhs, rhs)
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)

    linear_dot.__name__ = linear_dot.__qualname__ = (
        "direct_weight_grad_dot_general" if not dot_dtype else f"{dot_dtype}_operand_dot_general")
    return linear_dot


direct_weight_grad_dot_general = linear_dot_general(True)
