"""LoRA on the tiny LLaVA-NeXT: the wrapped model equals the base at init; training moves only the factors
(base kernels bit-identical, no Adam state for them); merging gives the same logits; a trained workdir
resumes with its factors, and exports (instit-convert jax-to-hf, save_pretrained) hold the merged weights."""
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import instit_jax
from instit_jax import sharding as shd
from instit_jax.convert import cli as convert_cli
from instit_jax.models import lora
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.models.llm import Decoder, positions_from_mask
from instit_jax.train import optim
from instit_jax.train import state as st
from instit_jax.train.checkpoint import Checkpointer, params_from_workdir
from instit_jax.train.config import ConfigError, compute_config, llava_config, load_config
from instit_jax.train.random_data import RandomBatches
from instit_jax.train.trainer import _lora_factors, _lora_settings, _model_factory, train

OVERRIDES = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", "data.max_tiles=2", "data.max_frames=2",
             "data.max_tokens=64", "train.global_batch_size=2", "train.total_steps=6", "train.checkpoint_every=3",
             "optim.lr=1e-2", "optim.warmup_ratio=0", "optim.schedule=constant", "mesh.data=1", "mesh.fsdp=1"]


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """LoRA on a plain starting model, one repeated batch (so a few steps must lower the loss), one device."""
    config = load_config("configs/tiny.py", OVERRIDES)
    cfg = llava_config(config)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    base = LlavaNextModel(cfg, rngs=nnx.Rngs(config.seed))
    initial = _numpy(nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    batch = next(RandomBatches(config, tokens_per_tile=base.tokens_per_tile, tokens_per_frame=base.tokens_per_frame))
    workdir = tmp_path_factory.mktemp("lora_run")
    result = train(config, str(workdir), train_iter=itertools.repeat(batch), mesh=mesh, model=base)
    return config, mesh, batch, initial, result


def _canon(tree) -> dict[str, np.ndarray]:
    """path "a/0/b" -> array (Orbax restores list indices as strings, nnx gives ints)."""
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees(a, b, **tol):
    a, b = _canon(a), _canon(b)
    assert sorted(a) == sorted(b)
    for k in a:
        if tol:
            np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@nnx.jit
def _decoder_logits(model, input_ids, attention_mask):
    lm = model.language_model
    return lm(lm.embed(input_ids), positions_from_mask(attention_mask), attention_mask)[0]


def _text_logits(model, batch):
    """Logits [B, T, V] of the language model on the batch's text (LoRA lives in the decoder only)."""
    return np.asarray(_decoder_logits(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))


def test_wrapped_decoder_equals_base_at_init_and_merge_restores_the_plain_tree():
    config = load_config("configs/tiny.py", ["model.text.attention_bias=True"])  # Qwen2-style q/k/v biases
    tcfg = llava_config(config).text
    dec = Decoder(tcfg, rngs=nnx.Rngs(0))
    graph0, params0 = nnx.graphdef(dec), nnx.to_pure_dict(nnx.state(dec, nnx.Param))
    x = jax.random.normal(jax.random.key(1), (2, 5, tcfg.hidden_size))
    pos, mask = jnp.broadcast_to(jnp.arange(5), (2, 5)), jnp.ones((2, 5), jnp.int32)
    forward = nnx.jit(lambda d, x: d(x, pos, mask)[0])
    base = np.asarray(forward(dec, x))
    lora.apply_lora(dec, 2, 4.0, ("q_proj", "v_proj", "down_proj"), rngs=nnx.Rngs(1))
    assert isinstance(dec.layers[1].self_attn.v_proj, lora.LoRALinear)
    assert isinstance(dec.layers[1].self_attn.k_proj, nnx.Linear)
    np.testing.assert_array_equal(np.asarray(forward(dec, x)), base)  # B = 0: exactly the base
    for m in lora.lora_modules(dec):
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(2), m.lora_b.shape))
    wrapped = np.asarray(forward(dec, x))
    assert np.abs(wrapped - base).max() > 1e-3
    lora.merge_lora(dec)
    np.testing.assert_allclose(np.asarray(forward(dec, x)), wrapped, atol=1e-5, rtol=1e-5)
    assert nnx.graphdef(dec) == graph0 and not lora.has_lora(dec)
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(dec, nnx.Param))) == jax.tree.structure(params0)
    with pytest.raises(ValueError, match="unknown \\['qkv'\\]"):
        lora.apply_lora(dec, 2, 4.0, ("qkv",), rngs=nnx.Rngs(1))


def test_dropout_acts_on_the_adapter_branch_only_when_keyed():
    m = lora.LoRALinear(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), 4, 8.0, dropout=0.5, rngs=nnx.Rngs(1))
    x = jnp.ones((3, 16))
    plain = np.asarray(m(x))
    m.dropout_key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(m(x)), plain)  # B = 0: the adapter adds nothing, dropped or not
    m.lora_b.set_value(jnp.ones((4, 8)))
    m.dropout_key = None
    eval_out = np.asarray(m(x))
    outs = []
    for seed in (0, 1):
        m.dropout_key = jax.random.key(seed)
        outs.append(np.asarray(m(x)))
    assert not np.allclose(outs[0], eval_out) and not np.allclose(outs[0], outs[1])
    model = nnx.Dict(a=m, b=lora.LoRALinear(nnx.Linear(16, 8, rngs=nnx.Rngs(2)), 4, 8.0, rngs=nnx.Rngs(3)))
    lora.set_dropout_key(model, jax.random.key(5))
    assert not np.array_equal(jax.random.key_data(model["a"].dropout_key), jax.random.key_data(model["b"].dropout_key))


def test_loss_falls_and_only_the_factors_train(run):
    config, _, _, initial, result = run
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses
    final = _numpy(result.state.params)
    labels = _flat(optim.param_labels(final, config))
    before, after = _flat(initial), _flat(final)
    lm_base = [k for k in after if k.startswith("['language_model']") and "lora_" not in k]
    assert sorted(lm_base) == sorted(k for k in before if k.startswith("['language_model']"))
    for k in lm_base:
        assert labels[k] == "frozen" and np.array_equal(before[k], after[k]), f"base param changed: {k}"
    factors = [k for k in after if "lora_" in k]
    assert len(factors) == 2 * 7 * config.model.text.num_hidden_layers
    assert all(labels[k] == "llm" for k in factors)
    assert all(np.abs(after[k]).max() > 0 for k in factors if k.endswith("['lora_b']"))  # B left zero: trained
    assert not np.array_equal(before["['multi_modal_projector']['linear_1']['kernel']"],
                              after["['multi_modal_projector']['linear_1']['kernel']"])  # projector still trains
    opt_paths = list(_flat(result.state.opt_state))
    for k in lm_base:
        assert not any(p.endswith(k) for p in opt_paths), f"optimizer state exists for frozen {k}"
    assert sum(p.endswith("['self_attn']['q_proj']['lora_a']") for p in opt_paths) == 2 * 2  # mu, nu x layers


def test_fresh_factors_match_a_random_init_lora_model():
    """Factors added to a given plain model are the ones a random-init LoRA run draws (same seed)."""
    config = load_config("configs/tiny.py", ["lora.rank=2", "lora.targets=('o_proj','up_proj')"])
    cfg = llava_config(config)
    model = _model_factory(cfg, config.seed, compute_config(config), _lora_settings(config))()
    _assert_trees(_lora_factors(config, cfg), nnx.to_pure_dict(nnx.state(model, lora.LoRAParam)))


def test_merged_model_equals_lora_model(run):
    _, _, batch, _, result = run
    wrapped, merged = result.model(merge_lora=False), result.model()
    assert lora.has_lora(wrapped) and not lora.has_lora(merged)
    # a plain model computing as the trained one does (the trainer's CPU choice: direct_weight_grads)
    plain = nnx.eval_shape(lambda: LlavaNextModel(result.model_config, rngs=nnx.Rngs(0), compute=merged.compute))
    assert nnx.graphdef(merged.language_model) == nnx.graphdef(plain.language_model)
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(merged, nnx.Param))) == jax.tree.structure(
        nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    a, b = _text_logits(wrapped, batch), _text_logits(merged, batch)
    assert np.abs(a - _text_logits(_without_factors(result), batch)).max() > 1e-4  # LoRA changed the function
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def _without_factors(result):
    """The trained model with B = 0 everywhere (the frozen base function)."""
    return st.merge_model(result.split, jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if getattr(p[-1], "key", None) == "lora_b" else x, result.state.params))


def test_workdir_resumes_factors_and_exports_merged(run, tmp_path):
    config, mesh, _, _, result = run
    _, raw = params_from_workdir(result.workdir, merge_lora=False)
    _assert_trees(raw, result.state.params)
    assert json.loads((Path(result.workdir) / "train_config.json").read_text())["lora"]["rank"] == 4
    merged_ref = nnx.to_pure_dict(nnx.state(result.model(), nnx.Param))
    _, merged = params_from_workdir(result.workdir)
    _assert_trees(merged, merged_ref, atol=1e-6, rtol=1e-6)
    # instit-convert jax-to-hf straight from the training workdir, read back with our HF loader.
    out = tmp_path / "hf"
    convert_cli.main(["jax-to-hf", "--ckpt", result.workdir, "--out", str(out)])
    hf_model = instit_jax.load_pretrained(out)
    _assert_trees(nnx.to_pure_dict(nnx.state(hf_model, nnx.Param)), merged_ref, atol=1e-6, rtol=1e-6)
    # save_pretrained of the LoRA-wrapped model writes the merged, plain layout.
    wrapped = result.model(merge_lora=False)
    instit_jax.save_pretrained(wrapped, tmp_path / "ours")
    assert lora.has_lora(wrapped)  # the caller's model is left as it was
    _assert_trees(nnx.to_pure_dict(nnx.state(instit_jax.load_pretrained(tmp_path / "ours"), nnx.Param)), merged_ref)
    # Resume: the trainer's restore path brings back the factors and their Adam moments exactly.
    split = st.split_abstract_model(_model_factory(result.model_config, config.seed, compute_config(config),
                                                   _lora_settings(config)))
    tx, _, _ = optim.make_optimizer(config, nnx.to_pure_dict(split.abstract_params), 6)
    abstract = st.abstract_state(split, tx, st.state_shardings(split, tx, mesh, config.mesh.rules))
    restored = Checkpointer(result.workdir, async_save=False).restore(abstract)
    assert int(restored.step) == 6
    _assert_trees(restored.params, result.state.params)
    _assert_trees(restored.opt_state, result.state.opt_state)


@pytest.mark.parametrize("override, field", [
    ("lora.rank=-1", "lora.rank"), ("lora.targets=('q_proj','qkv_proj')", "lora.targets"),
    ("lora.alpha=0", "lora.alpha"), ("lora.dropout=1.0", "lora.dropout"), ("freeze.train_llm=False", "train_llm"),
])
def test_config_rejects_nonsense(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", "\\.")):
        load_config("configs/tiny.py", ["lora.rank=8", override])
