"""Rematerialisation policies of the vision and decoder blocks (`ComputeConfig.remat_policy`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

# name -> what a rematerialised block keeps for the backward pass (a jax.checkpoint policy); "none" = no remat
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": None,  # save nothing inside a block: recompute everything in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # also keeps attention scores: huge at 6K tokens
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(policy: str) -> str:
    """`policy` if it names a REMAT_POLICIES entry; ValueError listing them otherwise."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {tuple(REMAT_POLICIES)}, got {policy!r}")
    return policy


def remat(fn: Callable, policy: str) -> Callable:
    """`fn(module, *args)` rematerialised with `policy` (fn itself for "none")."""
    if policy == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[policy])
