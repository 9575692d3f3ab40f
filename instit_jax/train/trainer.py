"""The training loop: `train(config, workdir)` builds mesh, model, data and optimizer, resumes from the
workdir's latest checkpoint if any, runs the jitted step, logs, checkpoints and handles preemption.

Python API (what `instit-train` and the demo call):

    from instit_jax.train import load_config, train
    config = load_config("configs/tiny_synthetic.py", ["train.total_steps=50"])
    result = train(config, "/tmp/run")          # or train(config, workdir, train_iter=my_iterator)
    model = result.model()                       # LlavaNextModel with the trained params
    result.history[-1]["loss"]                   # the metrics.jsonl records of this call

`train_iter` may be any iterator of per-host batch dicts (the layout of `instit_jax/data/pipeline.py`); give it `get_state()/set_state()`
(Grain iterators have them) to make resume exact.

`setup_training(config, model=..., mesh=...)` builds what `train` runs without the loop (mesh, state
shardings, data iterator, the step compiled per batch shape): `setup.init_state(model)`,
`setup.next_batch()`, `setup.step(state, batch)`; benchmarks/packing.py times training through it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from instit_jax import sharding as shd
from instit_jax.models import lora
from instit_jax.models.config import ComputeConfig, LlavaConfig
from instit_jax.train import checkpoint as ckpt
from instit_jax.train import optim
from instit_jax.train import state as st
from instit_jax.train import step as stp
from instit_jax.train.config import check_batch_geometry, compute_config, llava_config, lora_rank, validate
from instit_jax.train.metrics import MetricsWriter, model_flops_per_step, peak_flops_per_device

log = logging.getLogger("instit_jax.train")
LORA_SEED_OFFSET = 0x10A  # LoRA factors draw from fold_in(key(seed), this), apart from the base init


class NonFiniteError(FloatingPointError):
    """Raised after `train.max_nonfinite_steps` non-finite steps in a row."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: final state, this call's logged records, and how it ended."""

    state: st.TrainState
    split: st.SplitModel
    model_config: LlavaConfig
    history: list[dict[str, Any]]
    workdir: str
    final_step: int
    preempted: bool

    def model(self, merge_lora: bool = True) -> nnx.Module:
        """The trained LlavaNextModel (params as they are sharded); LoRA layers merged unless merge_lora=False."""
        model = st.merge_model(self.split, self.state.params)
        return lora.merge_lora(model) if merge_lora and lora.has_lora(model) else model


def _model_factory(cfg: LlavaConfig, seed: int, compute: ComputeConfig | None = None,
                   lora_settings: ml_collections.ConfigDict | None = None):
    """model_fn() building the model to train, computing as `compute` says (`compute_config`), with LoRA
    layers when lora_settings.rank > 0."""
    from instit_jax.models.llava_next import LlavaNextModel

    def make() -> LlavaNextModel:
        model = LlavaNextModel(cfg, rngs=nnx.Rngs(seed), compute=compute)
        if lora_settings is not None and lora_settings.rank > 0:
            _apply_lora(model, lora_settings, seed)
        return model

    return make


def _apply_lora(model: nnx.Module, lora_settings: ml_collections.ConfigDict, seed: int) -> None:
    """LoRA layers on the language model; factors drawn from fold_in(key(seed), LORA_SEED_OFFSET)."""
    lora.apply_lora(model.language_model, lora_settings.rank, lora_settings.alpha, tuple(lora_settings.targets),
                    dropout=lora_settings.dropout,
                    rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(seed), LORA_SEED_OFFSET)))


def _lora_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    return config.lora if lora_rank(config) > 0 else None


def _lora_factors(config: ml_collections.ConfigDict, cfg: LlavaConfig) -> dict:
    """Fresh LoRA factors (pure dict) for a plain starting model: the same values a random-init LoRA run
    draws, made without allocating any base weight (the wrapped model is abstract apart from A and B)."""
    abstract = nnx.eval_shape(_model_factory(cfg, config.seed))
    _apply_lora(abstract, config.lora, config.seed)
    return nnx.to_pure_dict(nnx.state(abstract, lora.LoRAParam))


def _init_params(config: ml_collections.ConfigDict, cfg: LlavaConfig, split: st.SplitModel, shardings: Any,
                 model: nnx.Module | None) -> dict:
    """Initial params placed with `shardings`: a given model, init.checkpoint, or random init on device.

    With LoRA, a plain starting model gets freshly initialised factors (B = 0: same function)."""
    factory = _model_factory(cfg, config.seed, compute_config(config), _lora_settings(config))
    if model is None and config.init.checkpoint:
        import instit_jax

        mesh = jax.tree.leaves(shardings)[0].mesh  # each param loads straight onto the training mesh
        model = instit_jax.load_pretrained(config.init.checkpoint, dtype=cfg.dtype, mesh=mesh,
                                           rules=shd.RULES[config.mesh.rules])
    if model is not None:
        _, params = st.split_model(model)
        if lora_rank(config) > 0 and not lora.has_lora_params(params):
            params = _deep_merge(params, _lora_factors(config, cfg))
        params = jax.device_put(params, shardings)  # params held elsewhere (a given model, a workdir's) move
        # A fresh copy: the step donates its state, and the caller's model must stay usable.
        return jax.jit(lambda p: jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), p), out_shardings=shardings)(params)
    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(factory(), nnx.Param)), out_shardings=shardings)()


def _deep_merge(a: dict, b: dict) -> dict:
    """Nested dicts: b's leaves added to a's (a new dict)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_data_iter(config: ml_collections.ConfigDict, cfg: LlavaConfig, tokens_per_tile: int,
                   tokens_per_frame: int) -> Iterator[dict]:
    """This host's batch iterator for `config.data` (random tokens or the Grain TFRecord mixture)."""
    d = config.data
    if d.kind == "random":
        from instit_jax.train.random_data import RandomBatches

        return RandomBatches(config, tokens_per_tile=tokens_per_tile, tokens_per_frame=tokens_per_frame,
                             process_index=jax.process_index(), process_count=jax.process_count())
    import instit_jax
    from instit_jax.data.pipeline import build_pipeline, pipeline_config_for

    buckets = tuple(int(b) for b in d.get("length_buckets", ()) if int(b) <= d.max_tokens)  # larger: unused
    if buckets and jax.process_count() > 1:
        raise ValueError("data.length_buckets: hosts would pad their batches to different lengths; use it only "
                         "in single-process runs (or set data.length_buckets=())")
    if any(b < 2 for b in buckets):
        raise ValueError(f"data.length_buckets: every bucket must be >= 2 tokens, got {tuple(d.length_buckets)}")
    # Shapes, normalisation and pooling from the model config (one derivation, shared with eval/tools).
    pcfg = pipeline_config_for(
        cfg, batch_size=config.train.global_batch_size // jax.process_count(), max_length=d.max_tokens,
        template=d.template, mask_policy=d.mask_policy,
        num_tiles=d.max_tiles if d.images_per_batch else 0, num_frames=d.max_frames if d.videos_per_batch else 0,
        seed=config.seed, shuffle=d.shuffle, num_epochs=None, num_workers=d.worker_count, length_buckets=buckets,
        cache_samples=bool(d.get("cache_samples", False)), **packing_options(config))
    tokenizer = instit_jax.load_tokenizer(config.init.tokenizer or config.init.checkpoint)
    names = sorted(d.sources)
    return iter(build_pipeline([d.sources[n].path for n in names], tokenizer, pcfg,
                               weights=[d.sources[n].weight for n in names]))


def packing_options(config: ml_collections.ConfigDict) -> dict:
    """PipelineConfig packing fields from `config.data` ({} when packing is off)."""
    d = config.data
    if not d.get("packing", False):
        return {}
    views = d.max_views or (d.max_tiles if d.images_per_batch else 0) + (d.max_frames if d.videos_per_batch else 0)
    return {"packing": True, "max_views": int(views), "packing_bins": int(d.packing_bins)}


def total_steps(config: ml_collections.ConfigDict) -> int:
    """train.total_steps, else epochs * examples / global batch (examples counted from the sources)."""
    t = config.train
    if t.total_steps > 0:
        return int(t.total_steps)
    n = config.data.num_examples
    if n <= 0 and config.data.kind == "grain":
        from instit_jax.data.records import ShardedRecordSource

        n = sum(len(ShardedRecordSource(s.path)) for s in config.data.sources.values())
    if n <= 0:
        raise ValueError("config.train.total_steps = 0 and the number of examples is unknown: set one of them")
    if config.data.get("packing", False):
        raise ValueError("config.train.total_steps = 0 with data.packing: an epoch's number of packed rows is only "
                         "known after packing; set train.total_steps")
    return max(1, config.data.num_epochs * n // t.global_batch_size)


class _Preemption:
    """Sets `.requested` on SIGTERM (main thread only); restores the previous handler on exit."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        # Multi-host: JAX's preemption notifier owns SIGTERM and Orbax's reached_preemption() syncs hosts.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class TrainSetup:
    """Everything `train` runs, built from a config (`setup_training`): the mesh, the split model, the
    optimizer and state shardings, this host's batch iterator and the jitted step, compiled once per batch
    shape. Benchmarks and tools that want exactly the training step use this rather than rebuilding it."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model_config: LlavaConfig
    split: st.SplitModel
    tx: Any  # optax.GradientTransformation
    labels: Any  # optimizer labels per param ("frozen", "vision", "llm", ...)
    schedules: dict[str, Any]
    shardings: st.TrainState  # NamedShardings of the whole state
    abstract: st.TrainState  # ShapeDtypeStructs (with shardings) of the whole state
    data: Iterator[dict]
    num_microbatches: int
    total_steps: int
    tokens_per_tile: int
    tokens_per_frame: int
    _jitted: Any = None
    _compiled: dict = dataclasses.field(default_factory=dict)

    def init_state(self, model: nnx.Module | None = None) -> st.TrainState:
        """A fresh TrainState: params of `model`, else init.checkpoint, else random init (config.seed)."""
        params = _init_params(self.config, self.model_config, self.split, self.shardings.params, model)
        return st.init_state(params, self.tx, self.shardings)

    def next_batch(self) -> dict:
        """This host's next batch, the step's keys only (numpy, per-host rows); with
        `train.head_on_supervised`, plus `loss_index` (the trained positions, `step.supervised_index`)."""
        batch = {k: v for k, v in next(self.data).items() if k in stp.BATCH_KEYS}
        if self.config.train.head_on_supervised and "loss_mask" in batch:
            lm = batch["loss_mask"]
            count = int((np.asarray(lm) > 0).sum(axis=1).max(initial=0))
            if jax.process_count() > 1:  # every host must build the same global shape
                from jax.experimental import multihost_utils
                count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
            width = stp.supervised_width(count, lm.shape[1], self.config.train.loss_chunk_tokens)
            batch["loss_index"] = stp.supervised_index(lm, width=width)
        return batch

    def global_shapes(self, batch: dict) -> dict:
        """ShapeDtypeStructs of the global batch (train.global_batch_size rows) of a per-host batch."""
        g = self.config.train.global_batch_size
        return {k: jax.ShapeDtypeStruct((g, *v.shape[1:]), v.dtype) for k, v in batch.items()}

    def compiled_step(self, batch: dict) -> Any:
        """The train step compiled for this batch's shapes (a per-host batch, or ShapeDtypeStructs); one
        executable per shape (data.length_buckets gives a few), compiled on first use."""
        key = tuple(sorted((k, v.shape[1:]) for k, v in batch.items()))
        if key not in self._compiled:
            config = self.config
            if self._jitted is None:
                self._jitted = stp.make_train_step(
                    self.split, self.tx, self.labels, mesh=self.mesh, shardings=self.shardings,
                    batch_shapes=self.global_shapes(batch), num_microbatches=self.num_microbatches,
                    lr_schedule=self.schedules["llm"],
                    dropout_seed=config.seed if lora_rank(config) > 0 and config.lora.dropout > 0 else None,
                    **stp.step_options(config))
            t0 = time.time()
            # as in instit-compile: Pallas kernels (splash) shard_map over the mesh, activations follow the rules
            with shd.use_mesh(self.mesh, config.mesh.rules):
                self._compiled[key] = self._jitted.lower(self.abstract, self.global_shapes(batch)).compile()
            log.info("compiled the train step for sequence length %d in %.1fs", batch["input_ids"].shape[1],
                     time.time() - t0)
        return self._compiled[key]

    def step(self, state: st.TrainState, batch: dict) -> tuple[st.TrainState, dict]:
        """One train step on this host's batch (numpy): (new state, metrics); `state` is donated."""
        return self.compiled_step(batch)(state, shd.global_batch(batch, self.mesh))


def setup_training(config: ml_collections.ConfigDict, *, model: nnx.Module | None = None,
                   mesh: jax.sharding.Mesh | None = None, train_iter: Iterator[dict] | None = None) -> TrainSetup:
    """Validate `config` and build what `train` runs (no weight allocated yet: `TrainSetup.init_state`).

    model: its config (and dtype from config.model.dtype) is the one trained; mesh: default from config.mesh;
    train_iter: per-host batches instead of `config.data`."""
    validate(config)  # configs built in Python (not via load_config) get the same checks
    shd.initialize_distributed(config.mesh.distributed)
    mesh = mesh or shd.make_mesh(config.mesh)
    cfg = model.cfg if model is not None else llava_config(config)
    if model is not None and cfg.dtype != config.model.dtype:
        cfg = dataclasses.replace(cfg, dtype=config.model.dtype)
    _, num_micro = check_batch_geometry(config, shd.num_batch_shards(mesh))
    steps = total_steps(config)
    factory = _model_factory(cfg, config.seed, compute_config(config, mesh.devices.flat[0].platform),
                             _lora_settings(config))
    split = st.split_abstract_model(factory)
    abstract_params = nnx.to_pure_dict(split.abstract_params)
    tx, labels, schedules = optim.make_optimizer(config, abstract_params, steps)
    shardings = st.state_shardings(split, tx, mesh, config.mesh.rules)
    abstract = st.abstract_state(split, tx, shardings)

    abstract_model = nnx.eval_shape(factory)
    tpt, tpf = abstract_model.tokens_per_tile, abstract_model.tokens_per_frame
    data = train_iter if train_iter is not None else make_data_iter(config, cfg, tpt, tpf)
    return TrainSetup(config=config, mesh=mesh, model_config=cfg, split=split, tx=tx, labels=labels,
                      schedules=schedules, shardings=shardings, abstract=abstract, data=data,
                      num_microbatches=num_micro, total_steps=steps, tokens_per_tile=tpt, tokens_per_frame=tpf)


def train(config: ml_collections.ConfigDict, workdir: str, *, train_iter: Iterator[dict] | None = None,
          model: nnx.Module | None = None, mesh: jax.sharding.Mesh | None = None) -> TrainResult:
    """Train (or resume) per `config` in `workdir`; returns the final state and this call's metrics.

    model: start from this LlavaNextModel instead of init.checkpoint / random init (ignored on resume).
    train_iter: per-host batches (the layout of `instit_jax/data/pipeline.py`) instead of `config.data`.
    """
    setup = setup_training(config, model=model, mesh=mesh, train_iter=train_iter)
    mesh, cfg, data, steps = setup.mesh, setup.model_config, setup.data, setup.total_steps
    tpt, tpf = setup.tokens_per_tile, setup.tokens_per_frame
    checkpointer = ckpt.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                     async_save=config.train.async_checkpointing,
                                     keep_best=config.train.keep_best_checkpoints)
    checkpointer.write_configs(cfg, config.to_json_best_effort(indent=2))
    ckpt.write_tokenizer(workdir, config.init.tokenizer or config.init.checkpoint)
    resume = checkpointer.latest_step()
    can_save_data = hasattr(data, "get_state") and hasattr(data, "set_state")
    if resume is not None:
        state = checkpointer.restore(setup.abstract, data if can_save_data else None)
        log.info("resumed from %s at step %d", workdir, resume)
    else:
        state = setup.init_state(model)
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, resume_step=start)

    first = setup.next_batch()
    setup.compiled_step(first)

    n_dev = mesh.devices.size
    n_tiles = first["pixel_values"].shape[1] if "pixel_values" in first else 0
    n_tiles = first["views"].shape[1] if "views" in first else n_tiles  # packed rows: the view budget
    n_frames = first["pixel_values_videos"].shape[1] if "pixel_values_videos" in first else 0
    flops_at: dict[int, float] = {}  # model FLOPs of one step per padded sequence length

    def step_flops(seq_len: int) -> float:
        if seq_len not in flops_at:
            flops_at[seq_len] = model_flops_per_step(config, tpt, tpf, n_tiles, n_frames, seq_len=seq_len)
        return flops_at[seq_len]

    window_flops = 0.0
    peak = peak_flops_per_device(config.train.peak_flops_per_device, mesh.devices.flat[0])
    window_tokens = 0  # padded sequence tokens since the last log line (lengths vary with buckets)
    bar = None
    if config.train.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=config.name, dynamic_ncols=True)

    history: list[dict[str, Any]] = []
    preempted = False
    pending = None  # (step, metrics) of the previous step, checked while the next one runs
    last_t, last_step = time.time(), start
    batch = first
    with _Preemption() as preemption:
        for step in range(start, steps):
            if batch is None:
                batch = setup.next_batch()
            state, metrics = setup.step(state, batch)
            window_tokens += config.train.global_batch_size * batch["input_ids"].shape[1]
            window_flops += step_flops(batch["input_ids"].shape[1])
            batch = None
            if pending is not None:
                _check_finite(*pending, config.train.max_nonfinite_steps)
            pending = (step + 1, metrics)
            done = step + 1
            if done % config.train.log_every == 0 or done == steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                dt = (now - last_t) / max(done - last_step, 1)
                rec = {"step": done, "loss": m["loss"], "lr": m.get("lr", 0.0), "grad_norm": m["grad_norm"],
                       "tokens_per_s": window_tokens / (now - last_t), "step_time_s": dt,
                       "mfu": window_flops / (now - last_t) / (peak * n_dev) if peak else None,
                       "trained_tokens": m["tokens"], "skipped_steps": int(m["skipped"])}
                last_t, last_step, window_tokens, window_flops = now, done, 0, 0.0
                writer.write(rec)
                history.append(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            if bar is not None:
                bar.update(1)
            if jax.process_count() > 1:
                stop = checkpointer.manager.reached_preemption(done)  # all hosts agree on the step
            else:
                stop = preemption.requested
            if done % config.train.checkpoint_every == 0 or done == steps or stop:
                checkpointer.save(state, data if can_save_data else None, force=stop or done == steps,
                                  loss=history[-1]["loss"] if history and history[-1]["step"] == done else None)
            if stop:
                preempted = True
                break
    if pending is not None and not preempted:
        _check_finite(*pending, config.train.max_nonfinite_steps)
    checkpointer.close()
    writer.close()
    if bar is not None:
        bar.close()
    return TrainResult(state=state, split=setup.split, model_config=cfg, history=history, workdir=str(workdir),
                       final_step=int(jax.device_get(state.step)), preempted=preempted)


def _check_finite(step: int, metrics: dict, max_in_a_row: int) -> None:
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if streak == 0:
        return
    loss, gnorm = float(jax.device_get(metrics["loss"])), float(jax.device_get(metrics["grad_norm"]))
    log.warning("step %d: non-finite loss %s / grad norm %s: update skipped (%d in a row)", step, loss, gnorm,
                streak)
    if streak >= max_in_a_row:
        raise NonFiniteError(
            f"step {step}: {streak} non-finite steps in a row (loss={loss}, grad_norm={gnorm}); params are "
            "those of the last finite step. Lower optim.lr, enable optim.grad_clip, check the data for empty "
            "loss masks or broken pixels, or run with model.dtype=float32 to rule out bf16 overflow.")


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config as plain JSON data."""
    return json.loads(config.to_json_best_effort())
