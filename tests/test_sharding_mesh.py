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
