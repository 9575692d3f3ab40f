"""instit-compile compiles the real train step without allocating weights and reports memory and FLOPs.

CI has no libtpu, so this uses the `cpu:8` topology (the same code path: abstract state with shardings,
lower, compile, memory/cost analysis); TPU topologies run where libtpu is installed (see docs/tpu_pods.md).
"""
import json

from instit_jax.aot import main


def test_compile_tiny_on_cpu_topology(capsys):
    assert main(["--config", "configs/tiny.py", "--topology", "cpu:8", "--json", "--micro-batch", "1",
                 "--config.data.max_tiles=2", "--config.data.max_frames=2", "--config.data.max_tokens=64",
                 "--config.mesh.data=2", "--config.train.remat=full"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert (r["per_device_batch"], r["micro_batch_per_device"], r["num_microbatches"]) == (1, 1, 1)
    m = r["memory_gib"]
    assert m["arguments"] > 0 and m["total"] >= m["arguments"] and r["fits"] is True and r["xla_compiled"] is True
    # XLA's FLOP count of the step is close to the analytic model count (remat recomputes the forward).
    assert 0.8 < r["compiled_over_model"] < 2.5, r


def _temporaries(capsys, impl: str) -> float:
    assert main(["--config", "configs/tiny.py", "--topology", "cpu:8", "--json", "--micro-batch", "1",
                 "--config.data.max_tiles=2", "--config.data.max_frames=2", "--config.data.max_tokens=1024",
                 "--config.train.remat=full", f"--config.model.attention_impl={impl}"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory_gib"]["temporaries"]


def test_blockwise_attention_step_compiles_with_remat_and_needs_less_memory(capsys):
    """At T=1024 the XLA step holds [heads, T, T] f32 scores; blockwise (512-blocks) holds a quarter."""
    xla, blockwise = _temporaries(capsys, "xla"), _temporaries(capsys, "blockwise")
    assert blockwise < 0.75 * xla, (blockwise, xla)


def test_bf16_adam_first_moment_option():
    """optim.mu_dtype=bfloat16 (the 16 GiB-chip option) stores Adam's first moment in bf16, second in f32."""
    import jax
    import jax.numpy as jnp

    from instit_jax.aot import _oom_bytes
    from instit_jax.train import optim
    from instit_jax.train.config import load_config

    config = load_config("configs/tiny.py", ["--config.optim.mu_dtype=bfloat16"])
    params = {"language_model": {"w": jnp.ones((4, 4))}}
    tx, _, _ = optim.make_optimizer(config, params, 10)
    dtypes = sorted(str(x.dtype) for x in jax.tree.leaves(jax.eval_shape(tx.init, params)) if x.ndim == 2)
    assert dtypes == ["bfloat16", "float32"]
    # XLA:TPU's out-of-memory text is parsed into bytes for the does-not-fit report.
    msg = "RESOURCE_EXHAUSTED: ...\nTotal hbm usage >= 16.02G:\n    reserved        258.01M \n    program  10.05G \n"
    assert _oom_bytes(msg, r"\n\s*program\s+") == int(10.05 * 2**30)
