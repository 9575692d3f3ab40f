"""Grain pipeline over real shards built by instit-build-data: shapes, resume exactness, mixtures."""

import json

import numpy as np
import pytest
from instit_media import build_tiny_shards

from instit_jax import processing
from instit_jax.chat_template import IMAGE_TOKEN
from instit_jax.data.pipeline import PipelineConfig, build_pipeline
from instit_jax.data.records import ShardedRecordSource
from instit_jax.processing import uniform_frame_indices
from instit_jax.tokenizer import train_tiny_tokenizer

TINY_IMAGE = processing.ImageProcessorConfig(tile_size=28, grid_pinpoints=((28, 56), (56, 28), (56, 56)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory, frames_per_video=6, video_shards=2, max_frames=5)


def _cfg(**kw):
    base = dict(batch_size=2, max_length=256, image=TINY_IMAGE, num_tiles=5, num_frames=4,
                length_buckets=(128, 256), seed=3)
    return PipelineConfig(**{**base, **kw})


def test_batches_follow_contract(built):
    out_i, out_v, tok = built
    assert len(ShardedRecordSource(out_v)[0]["media"]) == 5  # capped at build time
    it = iter(build_pipeline([out_i, out_v], tok, _cfg(), weights=[0.5, 0.5], shard_index=0, shard_count=1))
    image_id = tok.token_to_id(IMAGE_TOKEN)
    seen_video = seen_image = False
    for _ in range(4):
        b = next(it)
        B, T = b["input_ids"].shape
        assert (B, T) == (2, 128) or (B, T) == (2, 256)
        assert b["pixel_values"].shape == (2, 5, 28, 28, 3) and b["pixel_values_videos"].shape == (2, 4, 28, 28, 3)
        assert {k: v.dtype for k, v in b.items()} == {
            "input_ids": np.int32, "attention_mask": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "visual_index": np.int32, "pixel_values": np.float32, "pixel_values_videos": np.float32,
            "image_sizes": np.int32}
        np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
        assert np.all((b["visual_index"] >= 0) == (b["input_ids"] == image_id))
        # visual targets are never trained; padding never trained
        assert b["loss_mask"][b["targets"] == image_id].sum() == 0
        assert b["loss_mask"][:, :-1][b["attention_mask"][:, 1:] == 0].sum() == 0
        for r in range(B):
            n_vis = int((b["input_ids"][r] == image_id).sum())
            if b["pixel_values_videos"][r].any():
                seen_video = True
                assert n_vis == 4  # 4 frames (5 stored -> linspace to 4), 1 pooled token each, no newline
                assert b["visual_index"][r].max() == 5 * 4 + 3  # rows after the 5*4 image rows
            else:
                seen_image = True
                h, w = b["image_sizes"][r]
                plan = processing.anyres_token_plan((h, w), TINY_IMAGE.grid_pinpoints, 28, 2)
                assert n_vis == plan.count
                assert np.abs(b["pixel_values"][r, plan.num_views:]).sum() == 0  # unused tiles zero
                assert np.abs(b["pixel_values"][r, :plan.num_views]).sum(axis=(1, 2, 3)).min() > 0
    assert seen_video and seen_image


def test_resume_is_exact(built):
    out_i, out_v, tok = built
    ds = build_pipeline([out_i, out_v], tok, _cfg(), weights=[0.7, 0.3], shard_index=1, shard_count=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it2 = iter(ds)
    it2.set_state(json.loads(json.dumps(state)))
    for want in expected:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_host_shards_are_disjoint_and_mixture_weights(built):
    out_i, out_v, tok = built
    src = [ShardedRecordSource(out_i), ShardedRecordSource(out_v)]
    import grain
    cfg = _cfg(num_epochs=1)
    ids = []
    for host in range(2):
        ds = grain.MapDataset.source(src[0]).shuffle(seed=cfg.seed)[host::2]
        ids.append({ds[i]["id"] for i in range(len(ds))})
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 6
    # mixture weights 0.75/0.25 through the whole pipeline: count video rows over 24 samples
    it = iter(build_pipeline([out_i, out_v], tok, _cfg(), weights=[0.75, 0.25], shard_index=0, shard_count=1))
    videos = sum(int(next(it)["pixel_values_videos"].any(axis=(1, 2, 3, 4)).sum()) for _ in range(12))
    assert abs(videos / 24 - 0.25) <= 0.05
    assert list(uniform_frame_indices(10, 4)) == [0, 3, 6, 9] and list(uniform_frame_indices(3, 4)) == [0, 1, 2]
    assert list(uniform_frame_indices(20, 8)) == [0, 2, 5, 8, 10, 13, 16, 19]  # the reference truncates


def test_overlong_visual_sample_is_named(built):
    out_i, _, tok = built
    it = iter(build_pipeline(out_i, tok, _cfg(max_length=10, length_buckets=()), shard_index=0, shard_count=1))
    with pytest.raises(ValueError, match="sample 'image_.*do not fit max_length=10"):
        next(it)


def test_pipeline_config_for_model():
    from instit_jax.data.pipeline import check_tokenizer, pipeline_config_for
    from instit_jax.models.config import LlavaConfig, TextConfig, VisionConfig

    cfg = pipeline_config_for(LlavaConfig(), batch_size=8, max_length=4096)
    assert (cfg.num_tiles, cfg.patches_per_side, cfg.tokens_per_frame, cfg.template) == (5, 24, 144, "vicuna_v1")
    q = LlavaConfig(vision=VisionConfig(model_type="siglip", image_size=384), text=TextConfig(model_type="qwen2"))
    qc = pipeline_config_for(q, batch_size=1, max_length=6144)
    assert (qc.patches_per_side, qc.tokens_per_frame, qc.template, qc.image.mean) == (27, 196, "qwen_1_5",
                                                                                       (0.5, 0.5, 0.5))
    tok = train_tiny_tokenizer(["a b c"], vocab_size=50)
    with pytest.raises(ValueError, match="image_token_id"):
        check_tokenizer(tok, LlavaConfig())
    check_tokenizer(tok, LlavaConfig(image_token_id=tok.token_to_id(IMAGE_TOKEN)))


def test_bad_conversation_names_sample(tmp_path):
    from instit_jax.data.pipeline import SampleProcessor
    from instit_jax.data.records import parse_sample, sample_features

    tok = train_tiny_tokenizer(["a b c"], vocab_size=60)
    rec = parse_sample(sample_features("t1", "text", [{"from": "human", "value": "<image>\nhi"},
                                                      {"from": "gpt", "value": "yo"}], source="x.json"))
    with pytest.raises(ValueError, match=r"sample 't1' \(x.json\): field 'conversations': .*placeholders"):
        SampleProcessor(tok, _cfg())(rec)


def test_cached_samples_give_the_same_batches_and_resume(built):
    """cache_samples=True processes each record once; batches (and a resumed iterator) equal the uncached ones."""
    out_i, out_v, tok = built
    kw = dict(shard_index=0, shard_count=1, weights=[0.5, 0.5])
    plain = iter(build_pipeline([out_i, out_v], tok, _cfg(), **kw))
    cached_ds = build_pipeline([out_i, out_v], tok, _cfg(cache_samples=True), **kw)
    cached = iter(cached_ds)
    want = [next(plain) for _ in range(8)]  # several epochs of the tiny sources: later batches hit the cache
    got = [next(cached) for _ in range(5)]
    state = cached.get_state()
    got += [next(cached) for _ in range(3)]
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)
    resumed = iter(build_pipeline([out_i, out_v], tok, _cfg(cache_samples=True), **kw))
    resumed.set_state(state)
    for w in want[5:]:
        g = next(resumed)
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_anyres_max_plan_is_the_models(tmp_path):
    """An anyres_max_N image gets the model's (and transformers') downsampled 4-tap plan, which the collator
    refuses by name; pipeline_config_for refuses such a model up front."""
    import dataclasses
    import io

    from flax import nnx
    from PIL import Image

    from instit_jax.data.pipeline import Collator, SampleProcessor, pipeline_config_for
    from instit_jax.data.records import parse_sample, sample_features
    from instit_jax.models.config import LlavaConfig, VisionConfig
    from instit_jax.models.llava_next import LlavaNextModel

    tok = train_tiny_tokenizer(["a b c <image>"], vocab_size=60)
    model_cfg = LlavaConfig(vision=VisionConfig(model_type="siglip", image_size=42, patch_size=14),
                            image_aspect_ratio="anyres_max_9", image_grid_pinpoints=((42, 42), (168, 168)),
                            image_token_id=tok.token_to_id(IMAGE_TOKEN))
    with pytest.raises(NotImplementedError, match="anyres_max_9"):
        pipeline_config_for(model_cfg, batch_size=1, max_length=512)
    plain = pipeline_config_for(dataclasses.replace(model_cfg, image_aspect_ratio="anyres"), batch_size=1,
                                max_length=512)
    pcfg = dataclasses.replace(plain, max_num_patches=9, num_frames=0)
    assert pcfg.token_planner == processing.token_planner(model_cfg)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((160, 170, 3), np.uint8)).save(buf, format="PNG")
    rec = parse_sample(sample_features("big", "image", [{"from": "human", "value": "<image>\nhi"},
                                                        {"from": "gpt", "value": "a"}], [buf.getvalue()]))
    sample = SampleProcessor(tok, pcfg)(rec)
    (plan,) = sample["plans"]
    want = processing.token_planner(model_cfg).image((160, 170))
    assert want.weights is not None  # 12x12 grid tokens -> 9x9 (anyres_max_9), as transformers downsamples
    np.testing.assert_array_equal(plan.index, want.index)
    np.testing.assert_array_equal(plan.weights, want.weights)
    model = nnx.eval_shape(lambda: LlavaNextModel(model_cfg, rngs=nnx.Rngs(0)))
    ids = sample["input_ids"][None]
    index, weights = model.visual_index_for(ids, np.array([[160, 170]]), np.array([True]), len(sample["tiles"]), 0)
    kw = dict(tokens_per_tile=model.tokens_per_tile, num_tiles=len(sample["tiles"]))
    np.testing.assert_array_equal((index, weights), processing.build_visual_taps(ids, [[plan]], model_cfg.image_token_id,
                                                                                 **kw))
    with pytest.raises(ValueError, match="sample 'big'.*anyres_max_N"):
        Collator(tok, pcfg)([sample])
