"""A `dot_general` for `nnx.Linear` whose weight gradient comes out in the kernel's own [in, out] layout.

jax's generic transpose rule builds a Linear's weight gradient as dot(cotangent, x) -> [out, in] and then
transposes it; XLA:CPU moves that transpose onto the [tokens, out] cotangent and fuses it into the
elementwise producer (the SwiGLU backward, the LM-head backward), which then writes a strided, transposed
copy (~12% of a CPU train step, docs/xla_cpu.md). The custom VJP below contracts the token axes of x and
the cotangent directly into [in, out]. Same maths and dtypes; `ComputeConfig.direct_weight_grads` turns
it on (the trainer does on CPU meshes), and the Linear builders (`models/vit.py:dense`, `models/llm.py:_linear`)
take their `dot_general` from `linear_dot_general`.
"""
from __future__ import annotations

from collections.abc import Callable

import jax


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


def linear_dot_general(direct_weight_grads: bool) -> Callable:
    """The `dot_general` a model's nnx.Linear layers are built with: `direct_weight_grad_dot_general` when
    `direct_weight_grads` is set, else `lax.dot_general` (nnx.Linear's own default)."""
    return direct_weight_grad_dot_general if direct_weight_grads else jax.lax.dot_general
