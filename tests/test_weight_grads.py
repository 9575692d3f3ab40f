"""direct_weight_grads: the custom-VJP Linear gives the same loss and gradients as jax's transpose rule."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instit_jax.models.config import ComputeConfig, LlavaConfig, TextConfig, VisionConfig
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.models.weight_grads import direct_weight_grad_dot_general


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
