"""Multimodal packing: several conversations per row, block-diagonal attention, the tower on real views.

The equivalence tests build the same conversations (images and videos) as one padded batch and as packed
rows and check that the loss sum, the trained-token count and every gradient agree (fp32, rtol 1e-5), for
the xla and blockwise attention implementations."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from instit_media import build_tiny_shards

from instit_jax import processing
from instit_jax.chat_template import IMAGE_TOKEN
from instit_jax.data.pipeline import (
    Collator,
    Packable,
    PackedCollator,
    PipelineConfig,
    SampleProcessor,
    build_pipeline,
)
from instit_jax.data.records import ShardedRecordSource
from instit_jax.models.attention import blockwise_attention, splash_attention
from instit_jax.models.config import ComputeConfig, LlavaConfig, TextConfig, VisionConfig
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.train import step as stp
from instit_jax.train.state import split_model

TINY_IMAGE = processing.ImageProcessorConfig(tile_size=28, grid_pinpoints=((28, 56), (56, 28), (56, 56)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory, frames_per_video=2, video_shards=1, max_frames=2)


def _cfg(**kw):
    base = dict(batch_size=2, max_length=1024, image=TINY_IMAGE, num_tiles=5, num_frames=4, seed=3,
                packing=True, max_views=16, packing_bins=4)
    return PipelineConfig(**{**base, **kw})


def _samples(built, cfg):
    """Every image and video conversation of the tiny world, processed (images and videos interleaved)."""
    out_i, out_v, tok = built
    proc = SampleProcessor(tok, cfg)
    imgs = [proc(r) for r in ShardedRecordSource(out_i)]
    vids = [proc(r) for r in ShardedRecordSource(out_v)]
    mixed = []
    for k in range(max(len(imgs), len(vids))):
        mixed += imgs[k:k + 1] + vids[k:k + 1]
    return mixed


def _pack(samples, tok, cfg, bins):
    """The samples packed into `bins` rows by grain's first-fit packer and our row collator."""
    pk = Packable(tok, cfg)
    ds = grain.MapDataset.source([pk(s) for s in samples]).to_iter_dataset()
    t = cfg.max_length
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"input_ids": t, "token_mask": t, "vkind": t, "vview": t, "vrow": t, "views": cfg.max_views},
        num_packing_bins=bins, shuffle_bins=False)
    rows = list(packed)
    assert len(rows) == bins, "the test wants every sample in one group of rows"
    return PackedCollator(tok, cfg)(rows)


def _model(tok, seed=0, compute=None):
    cfg = LlavaConfig(
        vision=VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2),
        text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_id=tok.token_to_id(IMAGE_TOKEN), image_aspect_ratio="anyres",
        image_grid_pinpoints=TINY_IMAGE.grid_pinpoints, vision_feature_layer=-2,
        vision_feature_select_strategy="default", video_pool_stride=2, video_pooling="bilinear",
        video_newline="no_token")
    return LlavaNextModel(cfg, rngs=nnx.Rngs(seed), compute=compute)


def test_packed_rows_follow_the_layout(built):
    out_i, out_v, tok = built
    cfg = _cfg()
    samples = _samples(built, cfg)
    b = _pack(samples, tok, cfg, bins=4)
    image_id = tok.token_to_id(IMAGE_TOKEN)
    r, t = b["input_ids"].shape
    assert (r, t) == (4, 1024) and b["views"].shape == (4, 16, 28, 28, 3)
    seg, pos = b["segment_ids"], b["positions"]
    # every conversation is in exactly one segment; the segments hold exactly the conversations' tokens
    seqs = sorted(tuple(b["input_ids"][i][seg[i] == s]) for i in range(r) for s in range(1, seg[i].max() + 1))
    assert seqs == sorted(tuple(s["input_ids"]) for s in samples)
    for i in range(r):
        for s in range(1, seg[i].max() + 1):
            np.testing.assert_array_equal(pos[i][seg[i] == s], np.arange((seg[i] == s).sum()))  # RoPE restarts
    assert np.all(b["attention_mask"] == (seg > 0))
    # targets never cross a conversation, pads never trained, visual tokens never trained
    assert b["loss_mask"][:, :-1][seg[:, 1:] != seg[:, :-1]].sum() == 0
    assert b["loss_mask"][b["targets"] == image_id].sum() == 0
    assert np.all((b["visual_index"] >= 0) == (b["input_ids"] == image_id))
    assert b["loss_mask"].sum() == sum(s["token_mask"][1:].sum() for s in samples)
    # the tower's budget holds real views only, in conversation order; unused slots are zero
    n_views = sum(len(s["tiles"]) + len(s["frames"]) for s in samples)
    used = np.abs(b["views"]).sum(axis=(2, 3, 4)) > 0
    assert used.sum() == n_views
    assert (1 - b["attention_mask"]).sum() / b["attention_mask"].size < 0.5


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_packed_loss_and_gradients_equal_unpacked(built, impl):
    out_i, out_v, tok = built
    cfg = _cfg()
    samples = _samples(built, cfg)
    packed = _pack(samples, tok, cfg, bins=4)
    # one conversation per row, padded, the old tile/frame layout
    ucfg = _cfg(packing=False)
    unpacked = Collator(tok, ucfg)(samples)
    assert sorted(np.unique(packed["segment_ids"][0])[1:].tolist())  # row 0 holds conversations
    assert any(len(s["frames"]) for s in samples) and any(len(s["tiles"]) for s in samples)
    # images and videos share a packed row
    kinds = [set() for _ in range(4)]
    for i in range(4):
        for s in range(1, packed["segment_ids"][i].max() + 1):
            ids = tuple(packed["input_ids"][i][packed["segment_ids"][i] == s])
            kinds[i].add(next(bool(len(x["frames"])) for x in samples if tuple(x["input_ids"]) == ids))
    assert any(k == {True, False} for k in kinds)

    model = _model(tok, compute=ComputeConfig(attention_impl=impl, attention_block_size=64))
    split, params = split_model(model)
    loss_fn = stp.make_loss_fn(split, frozen_layers=1, z_loss=1e-4, chunk=0)

    def grads(batch):
        keys = [k for k in stp.BATCH_KEYS if k in batch]
        mb = {k: jnp.asarray(batch[k]) for k in keys}
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, mb)

    (obj_u, (nll_u, tok_u)), g_u = grads(unpacked)
    (obj_p, (nll_p, tok_p)), g_p = grads(packed)
    assert float(tok_u) == float(tok_p) > 0
    np.testing.assert_allclose(float(nll_p), float(nll_u), rtol=1e-5)
    np.testing.assert_allclose(float(obj_p), float(obj_u), rtol=1e-5)
    flat_u, flat_p = jax.tree.leaves_with_path(g_u), jax.tree.leaves(g_p)
    nonzero = 0
    overall = max(float(jnp.abs(g).max()) for g in flat_p)  # (the key biases' true gradient is 0: noise)
    for (path, gu), gp in zip(flat_u, flat_p, strict=True):
        scale = float(jnp.abs(gu).max()) + 1e-12
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gu), rtol=1e-5, atol=1e-5 * scale + 1e-7 * overall,
                                   err_msg=jax.tree_util.keystr(path))
        nonzero += bool(scale > 1e-8)
    assert nonzero > len(flat_u) // 2  # the tower's trained blocks, projector, decoder all get gradients


def test_segment_attention_agrees_across_impls():
    rng = np.random.default_rng(0)
    b, t, n, kv, hd = 2, 24, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32) for h in (n, kv, kv))
    seg = jnp.asarray(np.array([[1] * 10 + [2] * 9 + [0] * 5, [1] * 3 + [2] * 3 + [3] * 18]), jnp.int32)
    # reference: each segment attended on its own
    want = np.zeros((b, t, n, hd), np.float32)
    for i in range(b):
        for s in range(1, int(seg[i].max()) + 1):
            idx = np.flatnonzero(np.asarray(seg[i]) == s)
            out = jax.nn.dot_product_attention(q[i:i + 1, idx], k[i:i + 1, idx], v[i:i + 1, idx], is_causal=True)
            want[i, idx] = np.asarray(out[0])
    real = np.asarray(seg > 0)
    got_block = blockwise_attention(q, k, v, seg > 0, block_q=8, block_k=8, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got_block)[real], want[real], rtol=1e-5, atol=1e-6)
    qp, kp, vp = (jnp.pad(x, ((0, 0), (0, 128 - t), (0, 0), (0, 128 - hd))) for x in (q, k, v))
    segp = jnp.pad(seg, ((0, 0), (0, 128 - t)))
    # splash scales by its padded head_dim (128); undo that on the scores by scaling q
    got_splash = splash_attention(qp * (128 / hd) ** 0.5, kp, vp, segp > 0, block_size=128, interpret=True,
                                  segment_ids=segp)[:, :t, :, :hd]
    np.testing.assert_allclose(np.asarray(got_splash)[real], want[real], rtol=1e-4, atol=1e-5)


def test_pipeline_packs_resumes_and_names_oversized_samples(built):
    out_i, out_v, tok = built
    cfg = _cfg(packing_bins=4, batch_size=2)
    ds = build_pipeline([out_i, out_v], tok, cfg, weights=[0.5, 0.5], shard_index=0, shard_count=1)
    it = iter(ds)
    first = next(it)
    assert first["input_ids"].shape == (2, 1024) and first["views"].shape == (2, 16, 28, 28, 3)
    assert first["segment_ids"].max() >= 2  # several conversations per row
    next(it)
    state = it.get_state()  # mid group: 2 of 4 packed rows were emitted
    expected = [next(it) for _ in range(3)]
    it2 = iter(build_pipeline([out_i, out_v], tok, cfg, weights=[0.5, 0.5], shard_index=0, shard_count=1))
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # a conversation with more views than a row holds is an error that names it
    small = _cfg(max_views=2)
    with pytest.raises(ValueError, match=r"sample .image_\d.*views.*data.max_views=2"):
        next(iter(build_pipeline([out_i], tok, small, shard_index=0, shard_count=1)))


def test_packed_and_unpacked_training_generate_the_same_answers(built):
    """Six AdamW steps on the same conversations, packed (4 rows) vs padded (one per row), from one init:
    the weights stay equal and greedy decoding gives the same answers."""
    from instit_jax import sharding as shd
    from instit_jax.generate import generate_llava
    from instit_jax.train import optim
    from instit_jax.train import state as st
    from instit_jax.train.config import load_config

    out_i, out_v, tok = built
    cfg = _cfg()
    samples = _samples(built, cfg)
    batches = {"packed": _pack(samples, tok, cfg, bins=4), "padded": Collator(tok, _cfg(packing=False))(samples)}
    config = load_config("configs/tiny.py", ["optim.lr=3e-3", "optim.vision_lr=3e-3", "optim.warmup_ratio=0.0",
                                             "optim.schedule=constant", "freeze.frozen_vision_layers=1"])
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trained = {}
    for name, batch in batches.items():
        split, params = split_model(_model(tok))
        tx, labels, _ = optim.make_optimizer(config, params, 100)
        shardings = st.state_shardings(split, tx, mesh, "replicated")
        state = st.init_state(params, tx, shardings)
        batch = {k: v for k, v in batch.items() if k in stp.BATCH_KEYS}
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        step = stp.make_train_step(split, tx, labels, mesh=mesh, shardings=shardings, batch_shapes=shapes,
                                   num_microbatches=1, frozen_layers=1, donate=False)
        losses = []
        for _ in range(6):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert losses[-1] < losses[0]
        trained[name] = (losses, st.merge_model(split, jax.device_get(state.params)))
    np.testing.assert_allclose(trained["packed"][0], trained["padded"][0], rtol=1e-4)
    # prompts: every conversation up to its first trained token
    prompts = []
    for s in samples:
        cut = int(np.flatnonzero(s["token_mask"])[0])
        prompts.append({**s, "input_ids": s["input_ids"][:cut], "token_mask": s["token_mask"][:cut] * 0})
    pb = Collator(tok, _cfg(packing=False))(prompts)
    answers = {}
    for name, (_, model) in trained.items():
        out = generate_llava(model, pb["input_ids"], pb["attention_mask"], visual_index=pb["visual_index"],
                             pixel_values=pb["pixel_values"], pixel_values_videos=pb["pixel_values_videos"],
                             max_new_tokens=6)
        answers[name] = out.token_lists()
    assert answers["packed"] == answers["padded"]
    assert len({tuple(a) for a in answers["packed"]}) > 1 or any(answers["packed"])
