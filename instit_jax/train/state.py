"""The functional train state (pure pytrees) and its shardings.

The NNX model is split once: `graphdef` (static structure), `params` (nnx.Param values as a pure nested
dict, the f32 master weights) and `rest` (other variables, normally empty). The jitted step works on
`TrainState` only and merges a model inside the trace; `nnx.merge` outside jit happens only for export.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from instit_jax import sharding as shd


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step [], params (pure dict of f32), opt_state, nonfinite_streak [], skipped [] (int32 scalars)."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_streak: jax.Array
    skipped: jax.Array


@dataclasses.dataclass
class SplitModel:
    """The static parts of a split NNX model plus its abstract param state (with sharding metadata)."""

    graphdef: Any
    abstract_params: nnx.State  # ShapeDtypeStructs inside nnx.Param, with logical axis metadata
    rest: Any  # non-param variables (merged back unchanged)


def split_model(model: nnx.Module) -> tuple[SplitModel, dict]:
    """(SplitModel, params as a pure dict) from a concrete model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return SplitModel(graphdef, abstract, rest), nnx.to_pure_dict(params)


def split_abstract_model(model_fn: Any) -> SplitModel:
    """SplitModel of `model_fn()` without allocating any weight (nnx.eval_shape)."""
    abstract_model = nnx.eval_shape(model_fn)
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    return SplitModel(graphdef, params, rest)


def merge_model(split: SplitModel, params: dict) -> nnx.Module:
    """An NNX model from the static parts and a pure params dict."""
    return nnx.merge(split.graphdef, params, split.rest)


def state_shardings(split: SplitModel, tx: optax.GradientTransformation, mesh: Mesh, rules: str
                    ) -> TrainState:
    """A TrainState of NamedShardings: params by logical rules, optimizer moments like their params."""
    param_sh = shd.param_shardings(split.abstract_params, mesh, rules)
    abstract_params = nnx.to_pure_dict(split.abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = shd.replicated(mesh)
    by_path = {shd.path_names(p): (s, x.shape) for (p, s), x in zip(
        jax.tree_util.tree_leaves_with_path(param_sh, is_leaf=lambda x: isinstance(x, NamedSharding)),
        jax.tree.leaves(abstract_params))}

    def opt_leaf(path, x):
        names = shd.path_names(path)
        for i in range(len(names)):  # an optimizer leaf mirrors the param whose path is its suffix
            hit = by_path.get(names[i:])
            if hit is not None and tuple(hit[1]) == tuple(x.shape):
                return hit[0]
        return repl

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_opt)
    return TrainState(step=repl, params=param_sh, opt_state=opt_sh, nonfinite_streak=repl, skipped=repl)


def abstract_state(split: SplitModel, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the whole TrainState: for AOT compile and Orbax restore."""
    params = nnx.to_pure_dict(split.abstract_params)
    opt = jax.eval_shape(tx.init, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = TrainState(step=scalar, params=params, opt_state=opt, nonfinite_streak=scalar, skipped=scalar)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_state(params: dict, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """Place `params` with their shardings and create the optimizer state directly sharded."""

    def make(p: dict) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=p, opt_state=tx.init(p), nonfinite_streak=zero, skipped=zero)

    params = jax.device_put(params, shardings.params)
    return jax.jit(make, in_shardings=(shardings.params,), out_shardings=shardings)(params)
