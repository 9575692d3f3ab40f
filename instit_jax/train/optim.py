"""Parameter groups (labels), learning-rate schedules and the AdamW multi_transform optimizer.

Labels: "llm" (language model + image_newline), "projector", "vision" (trainable vision blocks),
"frozen". With LoRA (`config.lora.rank > 0`) the language model's own weights are "frozen" and its
LoRA factors (`lora_a` / `lora_b` leaves) form the "llm" group. Frozen leaves go to `optax.set_to_zero()`
inside `optax.multi_transform`, so no Adam moments exist for them; the train step also zeroes their
gradients, which lets XLA drop their weight-gradient computation, and the vision tower stops the
gradient at the freeze boundary (no backward pass at all).
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from instit_jax.models.lora import LORA_PARAM_NAMES
from instit_jax.sharding import path_names

LABELS = ("llm", "projector", "vision", "frozen")


def label_for_path(path: tuple[str, ...], config: ml_collections.ConfigDict) -> str:
    """The optimizer group of one parameter, from its path like ('vision_tower', 'layers', '3', ...)."""
    f = config.freeze
    top = path[0]
    if top == "vision_tower":
        if not f.train_vision:
            return "frozen"
        v = config.model.vision
        n_states = v.num_hidden_layers + 1
        used_blocks = config.model.vision_feature_layer % n_states  # blocks that feed the projector
        if path[1] == "layers":
            i = int(path[2])
            return "vision" if f.frozen_vision_layers <= i < used_blocks else "frozen"
        if path[1] == "post_layernorm":  # LLaVA reads features before it: never used
            return "frozen"
        return "frozen" if f.frozen_vision_layers > 0 else "vision"  # embeddings, pre-layernorm
    if top == "multi_modal_projector":
        return "projector" if f.train_projector else "frozen"
    if top == "language_model" and "lora" in config and config.lora.rank > 0:
        return "llm" if f.train_llm and path[-1] in LORA_PARAM_NAMES else "frozen"
    return "llm" if f.train_llm else "frozen"


def param_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """A tree like `params` (pure dict) holding each leaf's label."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: label_for_path(path_names(p), config), params)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices only (never norms, biases or 1-D vectors)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_schedule(peak: float, total_steps: int, optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup over warmup_ratio * total_steps, then cosine to end_lr_ratio * peak (or constant)."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    if optim.schedule == "constant":
        rest = optax.constant_schedule(peak)
    else:
        rest = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=optim.end_lr_ratio)
    if warmup == 0:
        return rest
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), rest], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Any, dict[str, optax.Schedule]]:
    """(optimizer, labels tree, schedules by group) for `params` (a pure dict, real or abstract)."""
    o = config.optim
    labels = param_labels(params, config)
    schedules = {
        "llm": make_schedule(o.lr, total_steps, o),
        "projector": make_schedule(o.lr, total_steps, o),
        "vision": make_schedule(o.vision_lr, total_steps, o),
    }

    def adamw(schedule: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=decay_mask, mu_dtype=jax.numpy.dtype(o.mu_dtype))

    groups = {name: adamw(s) for name, s in schedules.items()}
    groups["frozen"] = optax.set_to_zero()
    parts = [optax.multi_transform(groups, labels)]
    if o.grad_clip > 0:
        parts.insert(0, optax.clip_by_global_norm(o.grad_clip))
    return optax.chain(*parts), labels, schedules


def count_by_label(params: Any, labels: Any) -> dict[str, int]:
    """Number of parameters in each group."""
    out = dict.fromkeys(LABELS, 0)
    for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        out[lab] += int(x.size)
    return out
