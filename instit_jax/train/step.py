"""The jitted train step: micro-batch scan, token-normalised masked cross-entropy, NaN guard, AdamW.

`make_train_step(...)` returns `step(state, batch) -> (state, metrics)` compiled with explicit in/out
shardings and the state donated. The step computes the loss and the update of the model it is given; how
the model computes (attention kernels, remat, chunking, the vocabulary-parallel head) was fixed when it was
built (`models.config.ComputeConfig`). Batch arrays follow the layout in `instit_jax/data/pipeline.py`
(`input_ids`, `attention_mask`, `targets`, `loss_mask`, `visual_index`, `pixel_values`,
`pixel_values_videos`), all [G, ...] with G the global batch.

`loss_index` [G, K] (optional, `supervised_index`, added by the trainer with `train.head_on_supervised`):
the positions of each row's trained tokens, padded with -1. The step then gathers those K hidden states
before the LM head, so the head and the cross-entropy run on K positions instead of all T (the answers of
an SFT row are a small part of it); loss and gradients are the same.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instit_jax import sharding as shd
from instit_jax.models import lora
from instit_jax.models.llm import positions_from_mask
from instit_jax.train.state import SplitModel, TrainState

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", "visual_index", "pixel_values",
              "pixel_values_videos", "segment_ids", "positions", "views", "loss_index")


def supervised_width(count: int, length: int, chunk: int = 0) -> int:
    """The K of `supervised_index` for a batch whose fullest row trains `count` tokens of `length`: the next
    step of 32, 48, 64, 96, 128, ... (few distinct shapes, so few compiles), a multiple of `chunk` when it
    exceeds one chunk, at most `length`."""
    k = 32
    while k < count:
        k = k * 3 // 2 if (k & (k - 1)) == 0 else k * 4 // 3
    if 0 < chunk < k:
        k = -(-k // chunk) * chunk
    return min(k, length)


def supervised_index(loss_mask: np.ndarray, chunk: int = 0, width: int | None = None) -> np.ndarray:
    """loss_mask [B, T] -> int32 [B, K]: each row's trained positions in order, then -1 (K from
    `supervised_width` of the fullest row, or `width`, which must hold it)."""
    m = np.asarray(loss_mask) > 0
    counts = m.sum(axis=1)
    k = supervised_width(int(counts.max(initial=0)), m.shape[1], chunk) if width is None else width
    if counts.max(initial=0) > k:
        raise ValueError(f"supervised_index: a row trains {int(counts.max())} tokens, more than width {k}")
    # stable sort puts trained positions first, in their order
    order = np.argsort(~m, axis=1, kind="stable")[:, :k].astype(np.int32)
    return np.where(np.arange(k)[None, :] < counts[:, None], order, -1).astype(np.int32)


def masked_cross_entropy(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets: jax.Array,
                         loss_mask: jax.Array, z_loss: float, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of masked NLL, sum of masked z-loss) over [B, T]; LM head applied `chunk` positions at a time.

    hidden [B,T,D], targets [B,T] int32, loss_mask [B,T] float32; logits_fn: hidden [B, chunk, D] ->
    logits [B, chunk, V] (`Decoder.logits_fn`, which may keep them split along V). Each chunk is
    rematerialised, so the full [B,T,V] logits never exist at once (in f32 or at all).
    """
    b, t, d = hidden.shape
    if chunk <= 0 or t % chunk or chunk >= t:
        chunk = t
    n = t // chunk

    @jax.checkpoint
    def one(h, tgt, m):
        logits = logits_fn(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        # a masked sum instead of a gather, so vocab-split logits need no all-gather
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        picked = jnp.sum(jnp.where(vocab == tgt[..., None], logits, 0.0), axis=-1)
        return jnp.sum((lse - picked) * m), jnp.sum(jnp.square(lse) * m) * z_loss

    if n == 1:
        return one(hidden, targets, loss_mask)
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = loss_mask.reshape(b, n, chunk).swapaxes(0, 1)

    def body(carry, xs):
        nll, z = one(*xs)
        return (carry[0] + nll, carry[1] + z), None

    (nll, z), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), (hs, ts, ms))
    return nll, z


def make_loss_fn(split: SplitModel, *, frozen_layers: int, z_loss: float, chunk: int
                 ) -> Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]]:
    """loss_fn(params, micro_batch, rng=None) -> (objective sum, (nll sum, trained-token count)).

    rng: a key for LoRA dropout (None: no dropout). chunk: see masked_cross_entropy."""

    def loss_fn(params: dict, mb: Mapping[str, jax.Array], rng: jax.Array | None = None):
        model = nnx.merge(split.graphdef, params, split.rest)
        if rng is not None:
            lora.set_dropout_key(model, rng)
        if "views" in mb:  # packed rows (instit_jax/data/pipeline.py, PackedCollator)
            embeds = model.embed_views(mb["input_ids"], mb["views"], mb["visual_index"], frozen_layers=frozen_layers)
        else:
            embeds = model.embed_inputs(
                mb["input_ids"], mb.get("pixel_values"), mb.get("pixel_values_videos"), mb["visual_index"],
                frozen_layers=frozen_layers)
        lm = model.language_model
        mask = mb["attention_mask"]
        positions = mb["positions"] if "positions" in mb else positions_from_mask(mask)
        hidden, _ = lm.hidden_states(embeds, positions, mask, segment_ids=mb.get("segment_ids"))
        loss_mask, targets = mb["loss_mask"].astype(jnp.float32), mb["targets"]
        if "loss_index" in mb:  # the head on the trained positions only (module docstring)
            idx = mb["loss_index"]
            safe = jnp.maximum(idx, 0)
            hidden = jnp.take_along_axis(hidden, safe[..., None], axis=1)
            targets = jnp.take_along_axis(targets, safe, axis=1)
            loss_mask = jnp.take_along_axis(loss_mask, safe, axis=1) * (idx >= 0)
        nll, z = masked_cross_entropy(hidden, lm.logits_fn(), targets, loss_mask, z_loss, chunk)
        return nll + z, (nll, jnp.sum(loss_mask))

    return loss_fn


def _split_micro(x: jax.Array, m: int, mesh: Mesh) -> jax.Array:
    """[G, ...] -> [m, G/m, ...] keeping every device's rows on that device (row = i*m + micro)."""
    g = x.shape[0]
    y = x.reshape(g // m, m, *x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, shd.BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))


def step_options(config: Any) -> dict[str, Any]:
    """make_train_step's keyword arguments that come from a training config (shared by instit-train and
    instit-compile, so the compiled memory is the memory of the real run)."""
    return {"frozen_layers": config.freeze.frozen_vision_layers, "z_loss": config.optim.z_loss,
            "loss_chunk": config.train.loss_chunk_tokens}


def make_train_step(split: SplitModel, tx: optax.GradientTransformation, labels: Any, *, mesh: Mesh,
                    shardings: TrainState, batch_shapes: Mapping[str, jax.ShapeDtypeStruct],
                    num_microbatches: int, frozen_layers: int, z_loss: float = 0.0, loss_chunk: int = 0,
                    lr_schedule: optax.Schedule | None = None, donate: bool = True, dropout_seed: int | None = None):
    """A jitted `step(state, batch) -> (state, metrics)` with explicit shardings; state donated.

    dropout_seed: LoRA dropout keys are fold_in(key(seed), step, micro-batch); None = no dropout.
    Trace it under `sharding.use_mesh(mesh, rules)`, as instit-train and instit-compile do, so the model's
    mesh-aware parts (splash attention, the vocabulary-parallel head, the activation layouts) see it."""
    loss_fn = make_loss_fn(split, frozen_layers=frozen_layers, z_loss=z_loss, chunk=loss_chunk)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    frozen = jax.tree.map(lambda lab: lab == "frozen", labels)

    def masked_grads(params, mb, rng=None):
        g, aux = grad_fn(params, mb, rng)
        # Zeroing frozen grads makes their weight-gradient computations dead code for XLA.
        g = jax.tree.map(lambda gi, fr: jnp.zeros_like(gi) if fr else gi.astype(jnp.float32), g, frozen)
        return jax.lax.with_sharding_constraint(g, shardings.params), aux

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        params = state.params
        rng = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        if num_microbatches == 1:
            grads, (nll, ntok) = masked_grads(params, batch, rng)
        else:
            micro = {k: _split_micro(v, num_microbatches, mesh) for k, v in batch.items()}
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)

            def body(carry, xs):
                acc, nll_acc, tok_acc = carry
                mb, i = xs
                g, (nll_i, tok_i) = masked_grads(params, mb, None if rng is None else jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, acc, g), nll_acc + nll_i, tok_acc + tok_i), None

            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, nll, ntok), _ = jax.lax.scan(body, init, (micro, jnp.arange(num_microbatches)))
        denom = jnp.maximum(ntok, 1.0)  # normalise by trained tokens over ALL micro-batches
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll / denom
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(ok, new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=jax.tree.map(keep, new_params, params),
            opt_state=jax.tree.map(keep, new_opt, state.opt_state),
            nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
            skipped=(state.skipped + (~ok).astype(jnp.int32)).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": ntok, "finite": ok,
                   "nonfinite_streak": new_state.nonfinite_streak, "skipped": new_state.skipped}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}
    return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, shd.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())
