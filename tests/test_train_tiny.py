"""The tiny config trains on 8 fake devices: loss falls, sharded == single device, frozen is frozen, NaN guard;
and `instit-train` in real subprocesses survives SIGTERM (saves, exits 143) and kill -9 (resumes), logging
exactly the loss sequence of the uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from instit_jax import sharding as shd
from instit_jax.train import optim
from instit_jax.train import state as st
from instit_jax.train.checkpoint import params_from_workdir
from instit_jax.train.config import llava_config, load_config
from instit_jax.train.metrics import read_metrics
from instit_jax.train.random_data import RandomBatches
from instit_jax.train.trainer import NonFiniteError, _init_params, _model_factory, train

OVERRIDES = ["data.max_tiles=2", "data.max_frames=2", "data.max_tokens=64", "train.total_steps=8",
             "train.checkpoint_every=3", "mesh.data=2", "mesh.fsdp=4"]


def _numpy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    config = load_config("configs/tiny.py", OVERRIDES)
    cfg = llava_config(config)
    split = st.split_abstract_model(_model_factory(cfg, config.seed))
    param_sh = shd.param_shardings(split.abstract_params, shd.make_mesh(config.mesh), config.mesh.rules)
    initial = _numpy(_init_params(config, cfg, split, param_sh, None))  # what train() starts from
    sharded = train(config, str(tmp_path_factory.mktemp("sharded")))
    single_mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    single = train(config, str(tmp_path_factory.mktemp("single")), mesh=single_mesh)
    return config, initial, sharded, single


def test_loss_falls(runs):
    _, _, sharded, _ = runs
    losses = [r["loss"] for r in sharded.history]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    assert sharded.history[-1]["skipped_steps"] == 0


def test_sharded_matches_single_device(runs):
    _, _, sharded, single = runs
    assert dict(sharded.state.params["language_model"]["norm"]["weight"].sharding.mesh.shape)["fsdp"] == 4
    np.testing.assert_allclose([r["loss"] for r in sharded.history], [r["loss"] for r in single.history],
                               rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-3),
                 sharded.state.params, single.state.params)


def test_frozen_params_bit_identical_and_stateless(runs):
    config, initial, sharded, _ = runs
    final = _numpy(sharded.state.params)
    labels = optim.param_labels(final, config)
    flat = {jax.tree_util.keystr(p): (lab, a, b) for (p, lab), a, b in zip(
        jax.tree_util.tree_leaves_with_path(labels), jax.tree.leaves(initial), jax.tree.leaves(final))}
    frozen = [k for k, (lab, _, _) in flat.items() if lab == "frozen"]
    assert any("['vision_tower']['layers'][0]" in k for k in frozen)
    assert any("['vision_tower']['layers'][3]" in k for k in frozen)  # beyond the feature layer: unused
    for k, (lab, a, b) in flat.items():
        if lab == "frozen":
            assert np.array_equal(a, b), f"frozen param changed: {k}"
    assert not np.array_equal(*flat["['vision_tower']['layers'][2]['mlp']['fc1']['kernel']"][1:])  # trainable
    assert not np.array_equal(*flat["['language_model']['layers'][0]['mlp']['up_proj']['kernel']"][1:])
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(sharded.state.opt_state)]
    for k in frozen:
        assert not any(p.endswith(k) for p in opt_paths), f"optimizer state exists for frozen {k}"
    assert any(p.endswith("['vision_tower']['layers'][2]['mlp']['fc1']['kernel']") for p in opt_paths)


def test_memory_settings_give_the_same_training(runs, tmp_path):
    """train.vision_chunk_views / vocab_parallel_loss / mlp_sequence_pieces reach the step and change no number."""
    config, _, sharded, _ = runs
    memory = load_config("configs/tiny.py", OVERRIDES + [
        "train.vision_chunk_views=1", "train.vocab_parallel_loss=True", "train.mlp_sequence_pieces=2"])
    run = train(memory, str(tmp_path / "memory"))
    np.testing.assert_allclose([r["loss"] for r in run.history], [r["loss"] for r in sharded.history], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-3),
                 run.state.params, sharded.state.params)


def test_memory_settings_are_validated():
    with pytest.raises(ValueError, match="train.mlp_sequence_pieces"):
        load_config("configs/tiny.py", ["train.mlp_sequence_pieces=-1"])


def test_splash_attention_is_shard_mapped_in_training(tmp_path, monkeypatch):
    """instit-train traces under the mesh (as instit-compile does): the splash kernel runs per batch shard."""
    calls = []
    real_shard_map = jax.shard_map

    def spy(f, **kw):
        calls.append(kw["in_specs"][0])
        return real_shard_map(f, **kw)

    short = OVERRIDES[:2] + ["data.max_tokens=128", "train.total_steps=2", "mesh.data=2", "mesh.fsdp=4"]
    plain = train(load_config("configs/tiny.py", short), str(tmp_path / "xla"))
    monkeypatch.setattr(jax, "shard_map", spy)
    splash = train(load_config("configs/tiny.py", short + ["model.attention_impl=splash_interpret"]),
                   str(tmp_path / "splash"))
    assert calls and all(tuple(spec[0]) == ("data", "fsdp") for spec in calls), calls
    np.testing.assert_allclose([r["loss"] for r in splash.history], [r["loss"] for r in plain.history], rtol=2e-5)


class _NaNPixels:
    """Random batches whose pixels are NaN: every step is non-finite."""

    def __init__(self, config):
        self.inner = RandomBatches(config, tokens_per_tile=16, tokens_per_frame=4)

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.inner)
        b["pixel_values"] = np.full_like(b["pixel_values"], np.nan)
        return b


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    config = load_config("configs/tiny.py", OVERRIDES[:3] + ["train.max_nonfinite_steps=3", "train.total_steps=6",
                                                              "mesh.data=1", "mesh.fsdp=1"])
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        train(config, str(tmp_path), train_iter=_NaNPixels(config), mesh=mesh)


def _start(workdir, env):
    cmd = [sys.executable, "-m", "instit_jax.train.cli", "--config", "configs/tiny.py", "--workdir", str(workdir),
           *[f"--config.{o}" for o in OVERRIDES]]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_lines(proc, workdir, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(read_metrics(str(workdir))) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("trainer made no progress")


def test_sigterm_then_kill9_then_resume_matches_uninterrupted(tmp_path, runs):
    reference = [(r["step"], r["loss"]) for r in runs[2].history]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    workdir = tmp_path / "run"
    # 1) SIGTERM (preemption): the trainer saves a checkpoint at its current step and exits with 143.
    proc = _start(workdir, env)
    _wait_for_lines(proc, workdir, 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    logged = read_metrics(str(workdir))[-1]["step"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == logged and logged < 8, (steps, logged)
    # 2) Restart, then kill -9 mid-run (no chance to save anything).
    proc = _start(workdir, env)
    _wait_for_lines(proc, workdir, logged + 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # 3) Restart again: resumes from the last complete checkpoint and finishes.
    proc = _start(workdir, env)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    got = [(r["step"], r["loss"]) for r in read_metrics(str(workdir))]
    assert got == reference
    cfg, params = params_from_workdir(str(workdir))
    assert cfg.text.hidden_size == 64 and "language_model" in params


def test_load_pretrained_reads_a_training_workdir(runs):
    """`instit_jax.load_pretrained(workdir)` returns the model of the workdir's latest checkpoint."""
    from flax import nnx

    import instit_jax

    _, _, _, single = runs
    model = instit_jax.load_pretrained(single.workdir)
    got = _numpy(nnx.state(model, nnx.Param).to_pure_dict())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, _numpy(single.state.params))
