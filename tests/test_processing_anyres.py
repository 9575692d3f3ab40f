"""Pixel and token-count parity of instit_jax.processing against transformers' LLaVA-NeXT processors.

Tolerance: 1e-5 absolute on normalised pixels (both resize uint8 with Pillow bicubic; only float
rounding of the normalisation differs).
"""
import dataclasses

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from instit_jax import processing as P

SIZES = [(40, 90), (90, 40), (56, 56), (30, 100), (77, 33), (300, 200), (13, 71)]
TINY_PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))


def _image(h, w, seed=0):
    return np.random.default_rng(seed + h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw", SIZES)
def test_anyres_pixels_match_llava_next(hw):
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS])
    cfg = P.ImageProcessorConfig(tile_size=28, grid_pinpoints=TINY_PINPOINTS)
    img = _image(*hw)
    ref = hf(images=[img], return_tensors="np")
    ours, sizes = P.preprocess_images([img], cfg)
    assert ours.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(sizes, ref["image_sizes"])


def test_anyres_batch_padding_and_full_size_clip():
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    cfg = P.ImageProcessorConfig()
    imgs = [_image(480, 640), _image(300, 1000), _image(500, 500)]
    ref = hf(images=imgs, return_tensors="np")
    ours, sizes = P.preprocess_images(imgs, cfg)
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(sizes, ref["image_sizes"])


def test_onevision_siglip_pixels():
    pins = ((42, 42), (42, 84), (84, 42), (84, 84))
    hf = LlavaOnevisionImageProcessorPil(size={"height": 42, "width": 42}, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3, image_grid_pinpoints=[list(p) for p in pins])
    cfg = P.ImageProcessorConfig(tile_size=42, mean=P.SIGLIP_MEAN, std=P.SIGLIP_STD, grid_pinpoints=pins)
    for hw in [(50, 120), (120, 50), (60, 61)]:
        img = _image(*hw)
        ref = hf(images=[img], return_tensors="np")
        ours, _ = P.preprocess_images([img], cfg)
        np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def hf_processor():
    vocab = {"<unk>": 0, "<image>": 1, "hello": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS])
    return LlavaNextProcessor(image_processor=ip, tokenizer=fast, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.mark.parametrize("hw", SIZES)
def test_token_count_matches_processor_expansion(hf_processor, hw):
    out = hf_processor(images=[_image(*hw)], text=["hello <image> hello"], return_tensors="np")
    n_hf = int((out["input_ids"] == 1).sum())
    plan = P.anyres_token_plan(hw, TINY_PINPOINTS, 28, 2)
    assert plan.count == n_hf
    assert P.hf_image_token_count(plan, num_additional_image_tokens=1) == n_hf
    assert P.hf_image_token_count(plan, num_additional_image_tokens=0) == n_hf - 1  # the llava-hf quirk


def test_plan_structure_unpads_rows_and_columns():
    # wide image on a 2x2 grid of 2x2-patch tiles: rows are trimmed, every row ends with a newline
    wide = P.anyres_token_plan((20, 60), ((56, 56),), 28, 2)
    grid = wide.index[4:].reshape(-1, 5)
    assert grid.shape[0] < 4 and (grid[:, -1] == P.NEWLINE).all()
    tall = P.anyres_token_plan((60, 20), ((56, 56),), 28, 2)
    assert tall.index[4:].reshape(4, -1).shape[1] - 1 < 4
    full = P.anyres_token_plan((56, 56), ((56, 56),), 28, 2)
    assert full.count == 4 + 4 * 5 and full.num_views == 5
    assert list(full.index[4:9]) == [4, 5, 8, 9, P.NEWLINE]  # row 0 crosses tiles 1 and 2


def test_real_size_counts():
    pins = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert P.anyres_token_plan((672, 672), pins, 336, 24).count == 576 + 48 * 49 == 2928
    assert P.video_token_plan(8, P.pooled_side(24, 2, "bilinear")).count == 8 * 144
    assert P.video_token_plan(8, P.pooled_side(27, 2, "bilinear"), "one_token").count == 8 * 196 + 1
    assert P.video_token_plan(2, 2, "grid").count == 2 * 2 * 3
    assert P.video_token_plan(2, 2, "frame").count == 2 * 5


def test_build_visual_index_layout_and_errors():
    img = P.anyres_token_plan((56, 56), ((56, 56),), 28, 2)
    vid = P.video_token_plan(2, 1, "one_token")
    ids = np.array([[5] + [1] * img.count + [5] + [1] * vid.count + [0, 0]])
    vi = P.build_visual_index(ids, [[img, vid]], 1, tokens_per_tile=4, num_tiles=6, tokens_per_frame=1,
                              num_frames=3)
    newline_row = 6 * 4 + 3
    assert vi[0, 0] == -1 and vi[0, 1] == 0 and vi[0, -1] == -1
    assert (vi[0] == newline_row).sum() == 4 + 1
    video_part = vi[0, 2 + img.count:2 + img.count + vid.count]
    assert list(video_part) == [24, 25, newline_row]
    with pytest.raises(ValueError, match="placeholder"):
        P.build_visual_index(ids[:, :-5], [[img, vid]], 1, tokens_per_tile=4, num_tiles=6, tokens_per_frame=1,
                             num_frames=3)
    with pytest.raises(ValueError, match="tiles"):
        P.build_visual_index(ids, [[img, vid]], 1, tokens_per_tile=4, num_tiles=2, tokens_per_frame=1,
                             num_frames=3)


def test_single_view_pads_with_mean_colour():
    cfg = P.ImageProcessorConfig(tile_size=28, mode="single")
    px, _ = P.preprocess_images([np.full((10, 40, 3), 255, np.uint8)], cfg)
    assert px.shape == (1, 1, 3, 28, 28)
    assert abs(px[0, 0, 0, 0, 0] - ((int(P.CLIP_MEAN[0] * 255) / 255 - P.CLIP_MEAN[0]) / P.CLIP_STD[0])) < 1e-5
    assert P.single_view_token_plan(2).count == 4


def test_single_view_matches_llava_1_5_processor():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    hf = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    cfg = P.ImageProcessorConfig(tile_size=28, mode="single")
    for hw in [(20, 50), (50, 20), (33, 33)]:
        img = _image(*hw)
        ref = hf(images=[img], return_tensors="np")["pixel_values"]
        ours, _ = P.preprocess_images([img], cfg)
        np.testing.assert_allclose(ours[:, 0], ref, atol=1e-5, rtol=0)


def test_video_frames_match_onevision_resize_and_normalize():
    from transformers.image_processing_utils import SizeDict
    from transformers.image_utils import PILImageResampling

    hf = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    cfg = P.ImageProcessorConfig(tile_size=42, mean=P.SIGLIP_MEAN, std=P.SIGLIP_STD, family="siglip")
    frames = [_image(60, 80, seed=s) for s in range(3)]
    ours = P.preprocess_video(frames, cfg)
    for f, got in zip(frames, ours):
        x = hf.resize(f.transpose(2, 0, 1), SizeDict(height=42, width=42), resample=PILImageResampling.BICUBIC)
        x = hf.normalize(hf.rescale(x, 1 / 255), [0.5] * 3, [0.5] * 3)
        np.testing.assert_allclose(got, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(60, 80), (80, 60), (31, 97), (50, 28), (28, 28), (45, 45)])
def test_video_frames_follow_the_tower_family_processor(hw):
    """CLIP: CLIPImageProcessor (shortest edge to S, centre crop); SigLIP: SiglipImageProcessor (squash)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    frames = [_image(*hw, seed=s) for s in range(2)]
    clip = P.image_processor_config(_model_cfg("clip", 28))
    siglip = P.image_processor_config(_model_cfg("siglip", 28))
    assert (clip.family, siglip.family) == ("clip", "siglip")
    ref_clip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    ref_siglip = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    ours_clip, ours_siglip = P.preprocess_video(frames, clip), P.preprocess_video(frames, siglip)
    np.testing.assert_allclose(ours_clip, ref_clip(images=frames, return_tensors="np")["pixel_values"],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_siglip, ref_siglip(images=frames, return_tensors="np")["pixel_values"],
                               atol=1e-5, rtol=0)
    if hw[0] == hw[1]:  # square frames: cropping removes nothing, both are one resize to SxS
        squashed = np.stack([P._normalize(P._resize(f, (28, 28), clip.resample), clip.mean, clip.std)
                             for f in frames])
        np.testing.assert_array_equal(ours_clip, squashed)
    else:
        assert np.abs(ours_clip - P.preprocess_video(frames, dataclasses.replace(clip, family="siglip"))).max() > 0.1


def _model_cfg(tower: str, size: int):
    from instit_jax.models.config import LlavaConfig, VisionConfig

    return LlavaConfig(vision=VisionConfig(model_type=tower, image_size=size))


def test_anyres_max_downsample_plan_is_four_tap():
    pins = ((168, 168),)
    plan = P.anyres_token_plan((160, 170), pins, 42, 3, max_num_patches=9)
    assert plan.weights is not None and plan.count == 9 + 9 * 10  # 12x12 grid -> 9x9 (+ newline per row)
    np.testing.assert_allclose(plan.weights.sum(1), 1, atol=1e-6)
    ids = np.array([[3] + [1] * plan.count])
    with pytest.raises(ValueError, match="build_visual_taps"):
        P.build_visual_index(ids, [[plan]], 1, tokens_per_tile=9, num_tiles=17)
    idx, w = P.build_visual_taps(ids, [[plan]], 1, tokens_per_tile=9, num_tiles=17)
    assert idx.shape == (1, 1 + plan.count, 4) and (idx[0, 0] == -1).all() and idx.max() == 17 * 9
    assert P.anyres_token_plan((160, 170), pins, 42, 3).weights is None  # plain anyres never downsamples


def test_channels_last_and_frame_sampling():
    cfg = P.ImageProcessorConfig(tile_size=28, grid_pinpoints=TINY_PINPOINTS)
    img = _image(40, 90)
    nchw, _ = P.preprocess_images([img], cfg, num_tiles=6)
    nhwc, _ = P.preprocess_images([img], cfg, num_tiles=6, channels_last=True)
    gh, gw = P.select_anyres_grid((40, 90), TINY_PINPOINTS)
    used = 1 + (gh // 28) * (gw // 28)
    assert (gh, gw) == (28, 84) and nchw.shape == (1, 6, 3, 28, 28)
    assert nchw[0, used - 1].any() and not nchw[0, used:].any()  # base + tiles, then zero padding
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 1, 3, 4, 2))
    with pytest.raises(ValueError, match="num_tiles"):
        P.preprocess_images([img], cfg, num_tiles=2)
    assert P.preprocess_video([img, img], cfg, channels_last=True).shape == (2, 28, 28, 3)
    assert list(P.uniform_frame_indices(10, 4)) == [0, 3, 6, 9] and list(P.uniform_frame_indices(3, 8)) == [0, 1, 2]
