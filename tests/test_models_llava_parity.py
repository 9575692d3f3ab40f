"""Layer and whole-model parity of the NNX LLaVA-NeXT / OneVision stack against transformers (CPU, fp32).

Tiny random transformers models are saved to a tmp dir and loaded with `instit_jax.load_pretrained`.
Tolerance: max |logits difference| <= 1e-4 (measured ~1e-6).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from instit_jax import processing as P
from instit_jax.loading import load_pretrained
from instit_jax.models.llava_next import pool_video_tokens

NEXT_PINS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
OV_PINS = [[42, 42], [42, 84], [84, 42], [84, 84], [126, 168], [168, 168]]
IMG_TOKEN, VID_TOKEN = 125, 126


def _rng_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    torch.manual_seed(0)
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = T.LlavaNextConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=IMG_TOKEN,
                            image_grid_pinpoints=NEXT_PINS, vision_feature_layer=-2)
    hf = T.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random (non-zero) biases and newline so every param matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("llava_next_hf")
    hf.save_pretrained(d)
    return hf, load_pretrained(d), d


@pytest.fixture(scope="module")
def onevision_pair(tmp_path_factory):
    torch.manual_seed(1)
    vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=42, patch_size=14, vision_use_head=False)
    tc = T.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = T.LlavaOnevisionConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=IMG_TOKEN,
                                 video_token_index=VID_TOKEN, image_grid_pinpoints=OV_PINS, vision_feature_layer=-1,
                                 vision_feature_select_strategy="full")
    hf = T.LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("llava_ov_hf")
    hf.save_pretrained(d)
    return hf, load_pretrained(d), d


def _tower_parity(hf_tower, tower, pixels_nchw, layer):
    with torch.no_grad():
        ref = hf_tower(torch.from_numpy(pixels_nchw), output_hidden_states=True).hidden_states[layer].numpy()
    ours = np.asarray(tower.hidden_state(jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))))
    return float(np.abs(ours - ref).max())


def test_vision_tower_layers(next_pair, onevision_pair):
    px = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    hf, ours, _ = next_pair
    assert _tower_parity(hf.model.vision_tower, ours.vision_tower, px, -2) < 1e-5
    px = np.random.default_rng(1).standard_normal((2, 3, 42, 42)).astype(np.float32)
    hf, ours, _ = onevision_pair
    assert _tower_parity(hf.model.vision_tower, ours.vision_tower, px, -1) < 1e-5
    assert ours.vision_tower.num_feature_blocks == 3 and next_pair[1].vision_tower.num_feature_blocks == 2


def _batch(sizes, plans_for, seed, extra=None):
    """Right-padded batch: 3 text tokens, the image placeholders, a varying text tail."""
    rows = []
    for i, hw in enumerate(sizes):
        n = sum(p.count for p in plans_for(hw))
        ids = [1, 5, 7]
        for p in plans_for(hw):
            ids += [IMG_TOKEN if p.kind == "image" else VID_TOKEN] * p.count
        rows.append(ids + list(range(10, 10 + 2 + i)))
        assert n
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def test_llava_next_logits_match_several_aspect_ratios(next_pair):
    hf, ours, _ = next_pair
    sizes = [(40, 90), (90, 40), (56, 56), (30, 100)]  # rows trimmed, columns trimmed, none, many rows
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                      image_grid_pinpoints=NEXT_PINS)
    imgs = [_rng_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    enc = proc(images=imgs, return_tensors="np")
    ids, mask = _batch(sizes, lambda hw: [P.anyres_token_plan(hw, NEXT_PINS, 28, 2)], 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(enc["pixel_values"]),
                 image_sizes=torch.from_numpy(enc["image_sizes"])).logits.numpy()
    got = np.asarray(ours(ids, mask, enc["pixel_values"], enc["image_sizes"]))
    err = np.abs(got - ref)[mask.astype(bool)].max()
    print(f"llava-next CLIP+Llama max|dlogits| = {err:.2e}")
    assert err <= 1e-4


def test_onevision_images_and_videos_match(onevision_pair):
    hf, ours, _ = onevision_pair
    sizes = [(50, 120), (120, 50), (160, 170)]  # the last is downsampled (anyres_max_9)
    frames = 3
    cfg = P.ImageProcessorConfig(tile_size=42, mean=P.SIGLIP_MEAN, std=P.SIGLIP_STD,
                                 grid_pinpoints=tuple(map(tuple, OV_PINS)), family="siglip")
    imgs = [_rng_image(h, w, 10 + i) for i, (h, w) in enumerate(sizes)]
    pixel_values, image_sizes = P.preprocess_images(imgs, cfg)
    videos = np.stack([P.preprocess_video([_rng_image(60, 80, 20 + 10 * b + f) for f in range(frames)], cfg)
                       for b in range(3)])

    planner = P.token_planner(ours.cfg)  # anyres_max_9, SigLIP 3x3 patches, pooled 2x2, one_token newline

    def plans(hw):
        return [planner.image(hw), planner.video(frames)]

    assert plans(sizes[2])[0].weights is not None and plans(sizes[0])[0].weights is None
    ids, mask = _batch(sizes, plans, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(pixel_values), image_sizes=torch.from_numpy(image_sizes),
                 pixel_values_videos=torch.from_numpy(videos)).logits.numpy()
    got = np.asarray(ours(ids, mask, pixel_values, image_sizes, videos))
    err = np.abs(got - ref)[mask.astype(bool)].max()
    print(f"onevision SigLIP+Qwen2 image+video max|dlogits| = {err:.2e}")
    assert err <= 1e-4


def test_bilinear_pooling_matches_torch_interpolate():
    x = np.random.default_rng(3).standard_normal((2, 27, 27, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=[14, 14],
                                          mode="bilinear").permute(0, 2, 3, 1).numpy()
    got = np.asarray(pool_video_tokens(jnp.asarray(x), 2, "bilinear"))
    assert got.shape == (2, 14, 14, 5) and np.abs(got - ref).max() < 1e-5
    avg = np.asarray(pool_video_tokens(jnp.asarray(x[:, :24, :24]), 2, "average"))
    np.testing.assert_allclose(avg, x[:, :24, :24].reshape(2, 12, 2, 12, 2, 5).mean((2, 4)), atol=1e-6)


def test_frozen_layers_stop_gradient(next_pair):
    _, model, _ = next_pair
    tower = model.vision_tower
    px = jnp.asarray(np.random.default_rng(4).standard_normal((1, 28, 28, 3)).astype(np.float32))

    def loss(t):
        return (t(px, frozen_layers=1) ** 2).sum()

    grads = nnx.jit(nnx.grad(loss))(tower)
    zero = lambda g: all(not np.asarray(x).any() for x in jax.tree.leaves(g))
    assert zero(nnx.state(grads.layers[0])) and zero(nnx.state(grads.patch_embed))
    assert zero(nnx.state(grads.pre_layernorm)) and not np.asarray(grads.class_embedding[...]).any()
    assert not zero(nnx.state(grads.layers[1]))
    assert zero(nnx.state(grads.layers[2]))  # beyond the feature layer: never computed


def test_llava_1_5_single_view_matches_and_round_trips(tmp_path):
    import json

    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from instit_jax.convert.hf_config import to_llava_hf
    from instit_jax.convert.hf_weights import save_hf_weights

    torch.manual_seed(3)
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    hf = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                                                       image_token_index=IMG_TOKEN)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.cfg.image_aspect_ratio == "single" and not ours.cfg.use_image_newline
    proc = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    px = proc(images=[_rng_image(20, 50, 0), _rng_image(50, 20, 1)], return_tensors="np")["pixel_values"]
    ids = np.array([[1, 2] + [IMG_TOKEN] * 4 + [3, 4, 5]] * 2)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px)).logits.numpy()
    got = np.asarray(ours(ids, np.ones_like(ids), px))
    assert np.abs(got - ref).max() <= 1e-4
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(to_llava_hf(ours.cfg)))
    save_hf_weights(ours, tmp_path / "out")
    back = T.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    sd, sd0 = back.state_dict(), hf.state_dict()
    assert set(sd) == set(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
