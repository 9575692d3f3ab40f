"""The Linear product of `models/weight_grads.py`: direct_weight_grads gives the same loss and gradients as jax's
transpose rule; dot_dtype="bfloat16" is the bf16-rounded maths with f32 accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instit_jax.models.config import ComputeConfig, LlavaConfig, TextConfig, VisionConfig
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.models.weight_grads import direct_weight_grad_dot_general, linear_dot_general


def _cfg() -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2),
        text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        image_token_id=63, image_grid_pinpoints=((28, 28),))


def test_linear_dot_matches_lax_values_and_grads():
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 6))
    dn = (((2,), (0,)), ((), ()))

    def f(dot, x, w):
        return jnp.sum(jnp.tanh(dot(x, w, dn)) * jnp.arange(6.0))

    ref = jax.grad(lambda x, w: f(jax.lax.dot_general, x, w), argnums=(0, 1))(x, w)
    got = jax.grad(lambda x, w: f(direct_weight_grad_dot_general, x, w), argnums=(0, 1))(x, w)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    # a contraction that is not the plain Linear one goes to lax unchanged
    y = direct_weight_grad_dot_general(x, x, (((2,), (2,)), ((0,), (0,))))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.lax.dot_general(x, x, (((2,), (2,)), ((0,), (0,))))))


def test_model_loss_and_every_gradient_equal_with_direct_weight_grads():
    cfg = _cfg()
    plain = LlavaNextModel(cfg, rngs=nnx.Rngs(0))
    direct = plain.with_compute(ComputeConfig(direct_weight_grads=True))
    linears = [m for _, m in direct.iter_modules() if isinstance(m, nnx.Linear)]
    assert linears and all(m.dot_general is direct_weight_grad_dot_general for m in linears)
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 60)
    mask = jnp.ones_like(ids)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    pixels = jax.random.uniform(jax.random.key(3), (2, 28, 28, 3))

    def loss(model):
        feats = model.image_features(pixels)  # tower + projector Linears
        logits, _ = model.language_model(model.language_model.embed(ids) + feats.mean((0, 1)), pos, mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    la, ga = nnx.value_and_grad(loss)(plain)
    lb, gb = nnx.value_and_grad(loss)(direct)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    fa, fb = nnx.to_flat_state(ga), dict(nnx.to_flat_state(gb))
    assert len(fa) == len(fb)
    for path, v in fa:
        np.testing.assert_allclose(np.asarray(fb[path][...]), np.asarray(v[...]), rtol=1e-5, atol=1e-7,
                                   err_msg=str(path))


def test_bf16_operand_product_is_the_bf16_rounded_maths():
    """dot_dtype="bfloat16": forward and both backward products take bf16-rounded operands and accumulate in f32;
    the result and cotangents keep f32 (checked against the same maths written out with lax)."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 6))
    g = jax.random.normal(jax.random.key(4), (3, 5, 6))
    dn = (((2,), (0,)), ((), ()))
    dot = linear_dot_general(False, "bfloat16")
    assert linear_dot_general(True, "bfloat16") is linear_dot_general(True, "bfloat16")  # one function per choice
    bf = jnp.bfloat16
    y, vjp = jax.vjp(lambda x, w: dot(x, w, dn), x, w)
    assert y.dtype == jnp.float32
    ref = jax.lax.dot_general(x.astype(bf), w.astype(bf), dn, preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == jnp.float32
    ref_dx = jax.lax.dot_general(g.astype(bf), w.astype(bf), (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ref_dw = jax.lax.dot_general(x.astype(bf), g.astype(bf), (((0, 1), (0, 1)), ((), ())),
                                 preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref_dx), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(ref_dw), rtol=1e-6, atol=1e-6)
    # and the rounding is real: the f32 product differs
    assert not np.array_equal(np.asarray(y), np.asarray(jax.lax.dot_general(x, w, dn)))
    with pytest.raises(ValueError, match="dot_dtype"):
        linear_dot_general(False, "float8")


def test_model_with_bf16_operands_tracks_f32_loss_and_gradients():
    cfg = _cfg()
    plain = LlavaNextModel(cfg, rngs=nnx.Rngs(0))
    bf = plain.with_compute(ComputeConfig(dot_dtype="bfloat16"))
    linears = [m for _, m in bf.iter_modules() if isinstance(m, nnx.Linear)]
    assert linears and all(m.dot_general is linear_dot_general(False, "bfloat16") for m in linears)
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 60)
    mask = jnp.ones_like(ids)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    pixels = jax.random.uniform(jax.random.key(3), (2, 28, 28, 3))

    def loss(model):
        feats = model.image_features(pixels)
        logits, _ = model.language_model(model.language_model.embed(ids) + feats.mean((0, 1)), pos, mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    la, ga = nnx.value_and_grad(loss)(plain)
    lb, gb = nnx.value_and_grad(loss)(bf)
    assert abs(float(lb) - float(la)) < 1e-2 * abs(float(la)) and float(lb) != float(la)
    fa, fb = nnx.to_flat_state(ga), dict(nnx.to_flat_state(gb))
    scale = max(float(np.abs(np.asarray(v[...])).max()) for _, v in fa)
    for path, v in fa:
        got = np.asarray(fb[path][...])
        assert got.dtype == np.float32, path
        np.testing.assert_allclose(got, np.asarray(v[...]), atol=2e-2 * scale, err_msg=str(path))
