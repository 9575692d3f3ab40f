"""Mesh sizes (-1 fill), logical-axis rules with divisibility fallback, host batches -> global arrays."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from instit_jax import sharding as shd
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.train.config import llava_config, load_config


def test_mesh_fill_and_errors():
    mesh = shd.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert shd.num_batch_shards(mesh) == 8
    assert shd.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2, "dcn_data": -1}, 16, num_slices=2) == ([1, 4, 2], [2, 1, 1])
    with pytest.raises(ValueError, match="devices"):
        shd.make_mesh({"data": 3, "fsdp": 2, "tensor": 1})


def test_logical_rules_with_fallback():
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    fsdp_tp = shd.RULES["fsdp_tp"]
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh, fsdp_tp) == P("fsdp", "tensor")
    # 66 is not divisible by fsdp=4: that dim replicates, the big param then shards its other dim on fsdp.
    assert shd.logical_to_spec(("embed", "vocab"), (66, 4096), mesh, shd.RULES["fsdp"]) == P(None, "fsdp")
    assert shd.logical_to_spec(("norm",), (64,), mesh, fsdp_tp) == P(None)  # 1-D: replicated
    assert shd.logical_to_spec(None, (4, 4), mesh, fsdp_tp) == P(None, None)  # small, unnamed


def test_model_param_shardings_cover_every_param():
    config = load_config("configs/tiny.py")
    cfg = llava_config(config)
    abstract = nnx.eval_shape(lambda: LlavaNextModel(cfg, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sh = shd.param_shardings(params, mesh, "fsdp")
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}
    assert len(specs) == len(jax.tree.leaves(params.to_pure_dict()))
    assert specs["['language_model']['layers'][0]['mlp']['gate_proj']['kernel']"] == P("fsdp", None)
    assert specs["['language_model']['embed_tokens']['embedding']"] == P(None, "fsdp")
    assert specs["['image_newline']"] == P(None)


def test_global_batch_from_host_data():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    local = {"input_ids": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
    out = shd.global_batch(local, mesh)["input_ids"]
    assert out.shape == (16, 3) and out.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(out), local["input_ids"])


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_load_pretrained_places_params_as_the_trainer_does(rules, tmp_path):
    """Every param of `load_pretrained(mesh=...)` (Orbax and llava-hf layouts) has the sharding the
    trainer's state gives it on the same 8-device mesh."""
    import optax

    from instit_jax.convert.cli import jax_to_hf
    from instit_jax.loading import load_pretrained, save_pretrained
    from instit_jax.train.state import split_abstract_model, state_shardings

    cfg = llava_config(load_config("configs/tiny.py"))
    save_pretrained(LlavaNextModel(cfg, rngs=nnx.Rngs(0)), tmp_path / "ours")
    jax_to_hf(tmp_path / "ours", tmp_path / "hf")
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    split = split_abstract_model(lambda: LlavaNextModel(cfg, rngs=nnx.Rngs(0)))
    train = {shd.path_key(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        state_shardings(split, optax.adamw(1e-3), mesh, rules).params)}
    assert any(s.spec != P(*([None] * len(s.spec))) for s in train.values())  # something is actually sharded
    for layout in ("ours", "hf"):
        model = load_pretrained(tmp_path / layout, mesh=mesh, rules=rules)
        got = {shd.path_key(p): x for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert got.keys() == train.keys(), layout
        for key, var in got.items():
            x = var.get_value()
            assert x.sharding.mesh == mesh and x.sharding.is_equivalent_to(train[key], x.ndim), (layout, key)


def test_activation_layouts_pinned_only_under_use_mesh():
    x = jax.numpy.zeros((8, 4, 6))
    assert shd.with_logical_constraint(x, ("act_batch", "act_len", "act_embed")) is x  # no mesh, no rules
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.RULES["fsdp_tp"]
    assert shd.activation_spec(("act_batch", "act_len", "act_heads", None), (8, 4, 6, 2), mesh, rules) == P(
        ("data", "fsdp"), None, "tensor", None)
    # 3 heads do not split over tensor=2: replicated; act_embed is whole in every table
    assert shd.activation_spec(("act_batch", "act_len", "act_heads", None), (8, 4, 3, 2), mesh, rules) == P(
        ("data", "fsdp"), None, None, None)
    assert shd.activation_spec(("act_batch", "act_len", "act_embed"), (8, 4, 6), mesh, shd.RULES["fsdp"]) == P(
        ("data", "fsdp"), None, None)


def test_sharded_loss_and_grads_equal_one_device_with_activation_layouts():
    """The train loss traced under `use_mesh` on a data x fsdp x tensor mesh (fsdp_tp: params and the
    heads / MLP activations split over tensor, the batch over data x fsdp) equals the one-device loss, and
    its gradients too; the lowered program carries the model's activation constraints."""
    from instit_jax.train import state as st
    from instit_jax.train import step as stp
    from instit_jax.train.random_data import RandomBatches

    config = load_config("configs/tiny.py", ["data.max_tokens=96", "data.max_tiles=2", "data.max_frames=2"])
    cfg = llava_config(config)
    model = LlavaNextModel(cfg, rngs=nnx.Rngs(0))
    split, params = st.split_model(model)
    batches = RandomBatches(config, tokens_per_tile=model.tokens_per_tile, tokens_per_frame=model.tokens_per_frame)
    batch = {k: v for k, v in next(batches).items() if k in stp.BATCH_KEYS}
    loss_fn = stp.make_loss_fn(split, frozen_layers=config.freeze.frozen_vision_layers, z_loss=1e-4, chunk=32)
    grads_of = lambda p, b: jax.value_and_grad(loss_fn, has_aux=True)(p, b)  # noqa: E731

    (ref_loss, (ref_nll, ref_tokens)), ref_grads = jax.jit(grads_of)(params, batch)

    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = st.split_abstract_model(lambda: LlavaNextModel(cfg, rngs=nnx.Rngs(0))).abstract_params
    placed = jax.device_put(params, shd.param_shardings(abstract, mesh, "fsdp_tp"))
    global_batch = shd.global_batch(batch, mesh)
    with shd.use_mesh(mesh, "fsdp_tp"):
        sharded = jax.jit(grads_of)
        hlo = sharded.lower(placed, global_batch).as_text()
        (loss, (nll, tokens)), grads = sharded(placed, global_batch)
    assert '"tensor"' in hlo and "sharding_constraint" in hlo
    assert float(tokens) == float(ref_tokens)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6)
    np.testing.assert_allclose(float(nll), float(ref_nll), rtol=2e-6)
    # f32 sums split across 8 devices add in another order than on one: single elements of ~1e-2 differ by
    # ~2e-6 (seen on the CI-like box), far below what a wrong layout gives (O(1) differences)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 grads, ref_grads)
