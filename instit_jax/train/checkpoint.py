"""Training checkpoints: an Orbax CheckpointManager over params, optimizer state, counters and the data
iterator state of every process, with the model config beside it.

Layout of a workdir:
  instit_config.json          LlavaConfig (so `model_from_workdir` / load_pretrained need nothing else)
  train_config.json           the resolved training config
  tokenizer.json, ...         the run's tokenizer (init.tokenizer, or the files beside init.checkpoint)
  checkpoints/<step>/params   Orbax StandardSave of the params (pure nested dict, f32)
  checkpoints/<step>/opt_state
  checkpoints/<step>/meta     JSON: step, skipped, nonfinite_streak
  checkpoints/<step>/data     process_<i>-of-<n>.json: each process's iterator state
  best/<step>/params          the keep_best lowest-loss params (optional)
With LoRA (train_config.json: lora.rank > 0) the saved params also hold the `lora_a` / `lora_b` factors;
`params_from_workdir` (and so load_pretrained / export / instit-convert) folds them into the base kernels.
Paths may be local or gs:// (etils.epath).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from instit_jax.convert.orbax_io import directory_path
from instit_jax.models import lora
from instit_jax.models.config import LlavaConfig
from instit_jax.train.state import TrainState

CONFIG_NAME = "instit_config.json"
TRAIN_CONFIG_NAME = "train_config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"  # keep-best params (train.keep_best_checkpoints > 0)


class IteratorStateHandler(ocp.CheckpointHandler):
    """Saves `iterator.get_state()` (dict or bytes, e.g. a Grain iterator) once per process as JSON."""

    def save(self, directory: epath.Path, args: IteratorSave) -> None:
        state = args.item.get_state()
        text = state.decode() if isinstance(state, bytes) else json.dumps(state)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(text)

    def restore(self, directory: epath.Path, args: IteratorRestore) -> Any:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = epath.Path(directory) / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: no data-iterator state for this process (was the job resized?)")
        text = path.read_text()
        state = text.encode() if isinstance(args.item.get_state(), bytes) else json.loads(text)
        args.item.set_state(state)
        return args.item

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    """Keep-N async checkpoints of a TrainState (+ data iterator) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, keep_best: int = 0):
        self.workdir = directory_path(workdir)  # Orbax needs local paths absolute
        self.workdir.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.workdir / CHECKPOINT_DIR, options=options)
        self.best = None
        if keep_best > 0:  # params only, ranked by the training loss logged at save time (lower is better)
            best_options = ocp.CheckpointManagerOptions(
                max_to_keep=keep_best, best_fn=lambda m: m["loss"], best_mode="min",
                keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save, create=True)
            self.best = ocp.CheckpointManager(self.workdir / BEST_DIR, options=best_options)

    def write_configs(self, model_config: LlavaConfig, train_config_json: str) -> None:
        """instit_config.json and train_config.json beside the checkpoints (process 0 only)."""
        if jax.process_index() == 0:
            (self.workdir / CONFIG_NAME).write_text(model_config.to_json())
            (self.workdir / TRAIN_CONFIG_NAME).write_text(train_config_json)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iter: Any = None, *, force: bool = False,
             loss: float | None = None) -> bool:
        """Save at int(state.step) (asynchronously unless configured otherwise). True if a save started.

        With keep_best, the params also go to `best/` ranked by `loss` (when given)."""
        step = int(jax.device_get(state.step))
        if self.best is not None and loss is not None:
            self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params)),
                           metrics={"loss": float(loss)}, force=force)
        items = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "meta": ocp.args.JsonSave({"step": step, "skipped": int(jax.device_get(state.skipped)),
                                       "nonfinite_streak": int(jax.device_get(state.nonfinite_streak))}),
        }
        if data_iter is not None:
            items["data"] = IteratorSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract: TrainState, data_iter: Any = None, step: int | None = None) -> TrainState:
        """Restore `step` (default latest) into the shardings of `abstract`; sets data_iter's state too."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.workdir / CHECKPOINT_DIR}: no checkpoint to restore")
        items = {
            "params": ocp.args.StandardRestore(abstract.params),
            "opt_state": ocp.args.StandardRestore(abstract.opt_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iter is not None:
            items["data"] = IteratorRestore(data_iter)
        r = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = r["meta"]
        scalar = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), abstract.step.sharding)
        return TrainState(step=scalar(meta["step"]), params=r["params"], opt_state=r["opt_state"],
                          nonfinite_streak=scalar(meta["nonfinite_streak"]), skipped=scalar(meta["skipped"]))

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        for m in (self.manager, self.best):
            if m is not None:
                m.wait_until_finished()
                m.close()


def write_tokenizer(workdir: str, source: str) -> list[str]:
    """Copy a run's tokenizer into its workdir (process 0 only), so evaluation, export and generation find
    it there. `source`: a tokenizer.json file, or a directory whose tokenizer/processor files are copied
    ("" = none). Returns the names written."""
    from instit_jax.convert.orbax_io import copy_tokenizer_files

    if not source or jax.process_index() != 0:
        return []
    src, dst = epath.Path(source), epath.Path(workdir)
    if src.is_dir():
        if str(directory_path(src)) == str(directory_path(dst)):
            return []
        return copy_tokenizer_files(src, dst)
    if not src.exists():
        raise FileNotFoundError(f"{source}: tokenizer not found (init.tokenizer: a tokenizer.json or its folder)")
    src.copy(dst / "tokenizer.json", overwrite=True)
    return ["tokenizer.json"]


def read_model_config(workdir: str) -> LlavaConfig:
    """The LlavaConfig a training run saved in `workdir`."""
    path = epath.Path(workdir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not an instit-jax training workdir")
    return LlavaConfig.from_dict(json.loads(path.read_text()))


def is_workdir(path: str) -> bool:
    """True when `path` looks like a training workdir (instit_config.json + checkpoints/)."""
    p = epath.Path(path)
    return (p / CONFIG_NAME).exists() and (p / CHECKPOINT_DIR).is_dir()


def lora_alpha(workdir: str) -> float:
    """lora.alpha of the run that wrote `workdir` (from train_config.json)."""
    path = epath.Path(workdir) / TRAIN_CONFIG_NAME
    try:
        return float(json.loads(path.read_text())["lora"]["alpha"])
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint holds LoRA factors but lora.alpha cannot be read ({e!r}); "
                         "it is needed to merge them into the base weights") from e


def params_from_workdir(workdir: str, step: int | None = None, *, best: bool = False,
                        merge_lora: bool = True) -> tuple[LlavaConfig, dict]:
    """(LlavaConfig, params as a pure nested dict of arrays) from a training workdir.

    Default: the latest checkpoint; `step` picks one; best=True the lowest-loss one under best/.
    LoRA factors are folded into the base kernels unless merge_lora=False (then they stay as leaves)."""
    cfg = read_model_config(workdir)
    if best:
        options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
        mgr = ocp.CheckpointManager(directory_path(workdir) / BEST_DIR, options=options)
        step = mgr.best_step() if step is None else step
    else:
        mgr = ocp.CheckpointManager(directory_path(workdir) / CHECKPOINT_DIR)
        step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/{CHECKPOINT_DIR}: no checkpoint")
    params = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    mgr.close()
    if merge_lora and lora.has_lora_params(params):
        params = lora.merge_lora_params(params, lora_alpha(workdir))
    return cfg, params


def model_from_workdir(workdir: str, step: int | None = None, *, dtype: str | None = None) -> Any:
    """A LlavaNextModel holding the params of a training checkpoint (for load_pretrained / export)."""
    from flax import nnx

    from instit_jax.models.llava_next import LlavaNextModel

    cfg, params = params_from_workdir(workdir, step)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    abstract = nnx.eval_shape(lambda: LlavaNextModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, params, rest)


def export_workdir(workdir: str, out_dir: str, step: int | None = None, tokenizer: Any = None) -> str:
    """Write a training checkpoint in our inference layout (instit_config.json + params/) for convert/eval,
    with `tokenizer` (default: the tokenizer files in the workdir)."""
    from instit_jax.loading import save_pretrained

    tokenizer = workdir if tokenizer is None else tokenizer
    return str(save_pretrained(model_from_workdir(workdir, step), out_dir, tokenizer))
