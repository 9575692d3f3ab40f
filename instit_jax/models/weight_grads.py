"""A `dot_general` for `nnx.Linear` whose weight gradient comes out in the kernel's own [in, out] layout.

jax's generic transpose rule builds a Linear's weight gradient as dot(cotangent, x) -> [out, in] and then
transposes it; XLA:CPU moves that transpose onto the [tokens, out] cotangent and fuses it into the
elementwise producer (the SwiGLU backward, the LM-head backward), which then writes a strided, transposed
copy (~12% of a CPU train step, docs/xla_cpu.md). The custom VJP below contracts the token axes of x and
the cotangent directly into [in, out]. Same maths and dtypes; `ComputeConfig.direct_weight_grads` turns
it on (the trainer does on CPU meshes).
"""
from __future__ import annotations

import jax
from flax import nnx


@jax.custom_vjp
def _linear_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out]."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_dot_fwd(x, w):
    return _linear_dot(x, w), (x, w)


def _linear_dot_bwd(res, g):
    x, w = res
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    lead = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())))  # [in, out]: the token axes contracted
    return dx.astype(x.dtype), dw.astype(w.dtype)


_linear_dot.defvjp(_linear_dot_fwd, _linear_dot_bwd)


def direct_weight_grad_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                                   **kwargs):
    """Drop-in `lax.dot_general` for nnx.Linear: the plain [..., in] x [in, out] contraction goes through
    `_linear_dot`; anything else (batch dims, precision or output-type requests, shardings) to lax."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
            and precision is None and preferred_element_type is None and kwargs.get("out_sharding") is None):
        return _linear_dot(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def use_direct_weight_grads(module: nnx.Module) -> None:
    """Give every nnx.Linear under `module` (LoRA's base layers too) `direct_weight_grad_dot_general`."""
    for _, m in module.iter_modules():
        if isinstance(m, nnx.Linear):
            m.dot_general = direct_weight_grad_dot_general
