"""Memory-saving vision paths equal the plain ones: blockwise tower attention and chunked views (f32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instit_jax.models.config import ComputeConfig, LlavaConfig, TextConfig, VisionConfig
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.models.vit import VisionTower

VISION = VisionConfig(model_type="siglip", image_size=42, patch_size=14, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, layer_norm_eps=1e-6,
                      hidden_act="gelu_pytorch_tanh")
TEXT = TextConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model() -> LlavaNextModel:
    cfg = LlavaConfig(vision=VISION, text=TEXT, image_token_id=60, vision_feature_layer=-1,
                      vision_feature_select_strategy="full", dtype="float32", param_dtype="float32")
    return LlavaNextModel(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def pixels() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (2, 5, 42, 42, 3), jnp.float32)  # [B, N, H, W, C]


def _features_and_grads(model: LlavaNextModel, pixels: jax.Array, *, impl: str, chunk: int, frozen: int):
    """(features [M, P, D], grads of a weighted feature sum) with the given tower attention and chunking
    (blocks rematerialised)."""
    # a blockwise decoder gives the blockwise tower; 9 tokens -> 2 key blocks of 8 with padding
    compute = ComputeConfig(attention_impl=impl, vision_attention_block_size=8, vision_chunk_views=chunk,
                            remat_policy="full")
    variant = model.with_compute(compute)
    assert variant.vision_tower.layers[0].attn.impl == impl and variant.vision_chunk_views == chunk
    graphdef, params = nnx.split((variant.vision_tower, variant.multi_modal_projector, variant))
    weights = jax.random.normal(jax.random.key(2), (*pixels.shape[:2], 9, TEXT.hidden_size))

    @jax.jit
    def run(params, pixels):
        def loss(params):
            _, _, m = nnx.merge(graphdef, params)
            feats = m.view_features(pixels, frozen_layers=frozen)
            return jnp.sum(feats * weights), feats
        return jax.grad(loss, has_aux=True)(params)

    grads, feats = run(params, pixels)
    return feats, grads


def _assert_close(a, b):
    """Within 1e-5 of each leaf's scale (gradients sum 10 views in a different order)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(y).max())))


@pytest.fixture(scope="module")
def reference(model, pixels):
    return _features_and_grads(model, pixels, impl="xla", chunk=0, frozen=1)


@pytest.mark.parametrize("impl,chunk", [("xla", 2), ("blockwise", 2)])
def test_memory_saving_vision_paths_match_plain(model, pixels, reference, impl, chunk):
    """Blockwise (non-causal) tower attention and 2-view chunks (5 views per sample: 3 chunks, one padded)
    give the XLA path's features and parameter gradients; frozen block 0 gets no gradient."""
    ref_feats, ref_grads = reference
    feats, grads = _features_and_grads(model, pixels, impl=impl, chunk=chunk, frozen=1)
    assert feats.shape == (2, 5, 9, TEXT.hidden_size)
    _assert_close(feats, ref_feats)
    _assert_close(grads, ref_grads)
    tower = grads[0]
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(tower["layers"][0]))
    assert np.any(np.asarray(tower["layers"][1]["mlp"]["fc1"]["kernel"][...]))


def test_unknown_vision_attention_is_rejected():
    with pytest.raises(ValueError, match="vision attention_impl"):
        VisionTower(VISION, attention_impl="splash", rngs=nnx.Rngs(0))
