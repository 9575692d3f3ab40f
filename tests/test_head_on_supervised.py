"""The LM head on each row's trained positions only (`train.head_on_supervised`): the index helper, and one
train step (two micro-batches, chunked loss, z-loss) giving the same loss, gradient norm and update as the
head over every position."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instit_jax import sharding as shd
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.train import optim
from instit_jax.train import state as st
from instit_jax.train import step as stp
from instit_jax.train.config import llava_config, load_config
from instit_jax.train.random_data import RandomBatches


def test_supervised_index_and_width():
    m = np.zeros((3, 12), np.float32)
    m[0, [2, 5, 7]] = 1
    m[1, 11] = 1
    idx = stp.supervised_index(m)
    assert idx.shape == (3, 12)  # width 32 capped at the row length
    np.testing.assert_array_equal(idx[0, :4], [2, 5, 7, -1])
    np.testing.assert_array_equal(idx[1, :2], [11, -1])
    assert (idx[2] == -1).all()
    np.testing.assert_array_equal(stp.supervised_index(m, width=3)[0], [2, 5, 7])
    with pytest.raises(ValueError, match="trains 3 tokens, more than width 2"):
        stp.supervised_index(m, width=2)
    # few distinct widths: 32, 48, 64, 96, 128, 192, 256, ...; multiples of the loss chunk above one chunk
    assert [stp.supervised_width(c, 4096) for c in (1, 33, 49, 65, 97, 129, 193)] == [32, 48, 64, 96, 128, 192, 256]
    assert stp.supervised_width(300, 4096, chunk=256) == 512
    assert stp.supervised_width(100, 4096, chunk=256) == 128
    assert stp.supervised_width(5000, 4096) == 4096


def test_step_equal_with_the_head_on_trained_positions_only():
    config = load_config("configs/tiny.py", ["data.max_tiles=2", "data.max_frames=2", "data.max_tokens=96",
                                             "train.global_batch_size=4", "optim.z_loss=1e-4"])
    cfg = llava_config(config)
    model = LlavaNextModel(cfg, rngs=nnx.Rngs(0))
    split, params = st.split_model(model)
    data = RandomBatches(config, tokens_per_tile=model.tokens_per_tile, tokens_per_frame=model.tokens_per_frame)
    batch = {k: v for k, v in next(data).items() if k in stp.BATCH_KEYS}
    batch["loss_mask"] = batch["loss_mask"].copy()
    batch["loss_mask"][1, : batch["loss_mask"].shape[1] // 2] = 0  # rows train different token counts
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx, labels, _ = optim.make_optimizer(config, params, 10)
    shardings = st.state_shardings(split, tx, mesh, "replicated")
    gathered = dict(batch, loss_index=stp.supervised_index(batch["loss_mask"], chunk=16))
    assert gathered["loss_index"].shape[1] < batch["loss_mask"].shape[1]

    out = []
    for b in (batch, gathered):
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
        step = stp.make_train_step(split, tx, labels, mesh=mesh, shardings=shardings, batch_shapes=shapes,
                                   num_microbatches=2, frozen_layers=1, z_loss=1e-4, loss_chunk=16)
        state = st.init_state(jax.tree.map(jnp.copy, params), tx, shardings)
        new, metrics = step(state, jax.device_put(b))
        out.append((jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in metrics.items()}))
    (p_full, m_full), (p_gath, m_gath) = out
    assert m_full["tokens"] == m_gath["tokens"] > 0
    np.testing.assert_allclose(m_gath["loss"], m_full["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_gath["grad_norm"], m_full["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p_gath, p_full)
