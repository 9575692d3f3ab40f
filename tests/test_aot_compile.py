"""instit-compile compiles the real train step without allocating weights and reports memory and FLOPs.

CI has no libtpu, so this uses the `cpu:8` topology (the same code path: abstract state with shardings,
lower, compile, memory/cost analysis); TPU topologies run where libtpu is installed (see docs/tpu_pods.md).
"""
import json

import pytest

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


@pytest.mark.parametrize("tied", [False, True])
def test_vocab_parallel_head_matches_plain(tied):
    """ComputeConfig.vocab_parallel_head (train.vocab_parallel_loss): traced under an 8-device mesh, the LM
    head is resharded along V and the logits stay split along V; loss and gradients equal the plain head's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from instit_jax import sharding as shd
    from instit_jax.models.config import TextConfig
    from instit_jax.models.llm import Decoder, vocab_parallel_spec
    from instit_jax.train.step import masked_cross_entropy

    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8])
    assert vocab_parallel_spec(mesh, 64) == jax.P(None, None, ("data", "fsdp"))
    assert vocab_parallel_spec(mesh, 63) is None
    cfg = TextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, tie_word_embeddings=tied)
    plain = Decoder(cfg, rngs=nnx.Rngs(0))
    split_head = Decoder(cfg, rngs=nnx.Rngs(0), vocab_parallel_head=True)
    assert split_head.logits_fn() == split_head.logits  # no mesh: the plain head
    keys = jax.random.split(jax.random.key(0), 2)
    hidden = jax.random.normal(keys[0], (8, 16, 8))
    targets = jax.random.randint(keys[1], (8, 16), 0, 64)
    mask = (jnp.arange(16) % 3 != 0).astype(jnp.float32)[None].repeat(8, 0)

    def value_and_grads(decoder, **jit_kw):
        graphdef, params = nnx.split(decoder)

        def loss(params, hidden):
            nll, z = masked_cross_entropy(hidden, nnx.merge(graphdef, params).logits_fn(), targets, mask, 1e-4, 4)
            return nll + z

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), **jit_kw)
        return fn.lower(params, hidden).as_text(), fn(params, hidden)

    plain_text, want = value_and_grads(plain)
    with jax.set_mesh(mesh):
        split_text, got = value_and_grads(split_head, in_shardings=(None, shd.batch_sharding(mesh, 3)))
    assert "sharding_constraint" not in plain_text and "sharding_constraint" in split_text
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_mlp_sequence_pieces_match_whole_sequence():
    """train.mlp_sequence_pieces: the decoder MLP over 4 sequence slices equals the whole-sequence MLP."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from instit_jax.models.config import TextConfig
    from instit_jax.models.llm import MLP

    cfg = TextConfig(hidden_size=8, intermediate_size=16)
    x = jax.random.normal(jax.random.key(1), (2, 12, 8))

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x)))

    results = []
    for pieces in (4, 1):  # 1 = the plain MLP over the whole sequence
        mlp = MLP(cfg, dtype=jnp.float32, param_dtype=jnp.float32, std=0.5, rngs=nnx.Rngs(0), sequence_pieces=pieces)
        graphdef, params = nnx.split(mlp)
        fn = jax.value_and_grad(lambda p, x: loss(nnx.merge(graphdef, p), x), argnums=(0, 1))  # noqa: B023
        results.append((params, jax.jit(fn)(params, x)))
    jax.tree.map(np.testing.assert_array_equal, results[0][0], results[1][0])  # the same weights
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_topology_errors_say_what_to_do():
    from instit_jax.aot import _topology_hint, topology_devices

    assert "ALLOW_MULTIPLE_LIBTPU_LOAD" in _topology_hint("TPU is already in use by process with pid 42")
    assert "jax[tpu]" in _topology_hint("No module named libtpu")
    with pytest.raises(SystemExit, match="needs 4096 CPU devices"):
        topology_devices("cpu:4096")
