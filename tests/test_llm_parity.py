"""Decoder parity vs transformers (fp32, CPU): RMSNorm, RoPE, one block, whole model, KV cache."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from llm_hf_fixtures import decoder_from_hf, tiny_hf_lm
from transformers.models.llama import modeling_llama

from instit_jax.kernels import cpu as cpu_kernels
from instit_jax.models.llm import (
    apply_rope,
    inference_view,
    init_cache,
    positions_from_mask,
    rope_tables,
    write_slots,
)

CASES = {  # (family, kv heads, tied)
    "llama_mha_untied": ("llama", 4, False),
    "llama_gqa_tied": ("llama", 2, True),
    "qwen2_gqa_untied": ("qwen2", 2, False),
    "qwen2_mqa_tied": ("qwen2", 1, True),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    kind, kv, tied = CASES[request.param]
    hf = tiny_hf_lm(kind, kv_heads=kv, tied=tied, seed=len(request.param))
    return hf, decoder_from_hf(hf)


def _batch(seed=0, b=3, t=12):
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, 96, (b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, :5] = 0  # left padded row
    mask[2, :1] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _cached_call(graphdef, state, ids, pos, mask, cache):
    dec = nnx.merge(graphdef, state)
    return dec(dec.embed(ids), pos, mask, cache)


def test_rope_matches_hf(pair):
    hf, dec = pair
    pos = np.array([[0, 1, 2, 7, 100]])
    x = np.random.RandomState(0).randn(1, 5, 4, 8).astype(np.float32)  # [B, T, N, hd]
    cos, sin = hf.model.rotary_emb(torch.tensor(x), torch.tensor(pos))
    ref, _ = modeling_llama.apply_rotary_pos_emb(torch.tensor(x), torch.tensor(x), cos, sin, unsqueeze_dim=2)
    ours = apply_rope(jnp.asarray(x), *rope_tables(jnp.asarray(pos), 8, dec.cfg.rope_theta))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)


def test_block_and_norm_match_hf(pair):
    hf, dec = pair
    rs = np.random.RandomState(1)
    x = rs.randn(2, 6, 32).astype(np.float32)
    pos = np.tile(np.arange(6), (2, 1))
    with torch.no_grad():
        xt = torch.tensor(x)
        ref_norm = hf.model.layers[0].input_layernorm(xt).numpy()
        causal = torch.full((6, 6), float("-inf")).triu(1)[None, None].expand(2, 1, 6, 6)
        pe = hf.model.rotary_emb(xt, torch.tensor(pos))
        ref_block = hf.model.layers[0](xt, attention_mask=causal, position_embeddings=pe,
                                       position_ids=torch.tensor(pos))
        ref_block = (ref_block[0] if isinstance(ref_block, tuple) else ref_block).numpy()
    layer = dec.layers[0]
    np.testing.assert_allclose(np.asarray(layer.input_layernorm(jnp.asarray(x))), ref_norm, atol=1e-5)
    cos, sin = rope_tables(jnp.asarray(pos), dec.cfg.resolved_head_dim, dec.cfg.rope_theta)
    ours, _ = layer(jnp.asarray(x), cos, sin, jnp.ones((2, 6), jnp.int32))
    assert np.abs(np.asarray(ours) - ref_block).max() <= 1e-4


def test_decoder_logits_match_hf(pair):
    hf, dec = pair
    ids, mask = _batch()
    ref = _hf_logits(hf, ids, mask)
    graphdef, state = nnx.split(dec)
    ours, cache = _cached_call(graphdef, state, jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)),
                               jnp.asarray(mask), None)
    assert cache is None
    err = np.abs(np.asarray(ours) - ref)[mask > 0].max()
    assert err <= 1e-4, err


def test_cached_prefill_then_decode_equals_full_forward(pair):
    hf, dec = pair
    ids, mask = _batch(seed=2)
    ref = _hf_logits(hf, ids, mask)
    steps, cache = _prefill_then_decode(dec, ids, mask, prefill=8)  # then one token at a time, as generation does
    assert cache.index.tolist() == [12] * 3 and cache.keys[0].shape == (3, dec.cfg.num_key_value_heads, 16, 8)
    ours = np.concatenate([np.asarray(s) for s in steps], axis=1)
    err = np.abs(ours - ref)[mask > 0].max()
    assert err <= 1e-4, err


@functools.partial(jax.jit, static_argnums=(0, 6))
def _hidden(graphdef, state, ids, pos, mask, cache, last_only):
    dec = nnx.merge(graphdef, state)
    return dec.hidden_states(dec.embed(ids), pos, mask, cache, last_only=last_only)


@pytest.mark.parametrize("view", [False, True])
def test_last_only_prefill_gives_the_last_hidden_state_and_the_same_cache(pair, view):
    """`last_only` (what the engine's and generate's prefills use): the last block queries, projects and runs
    its MLP for the last position only; that position's hidden state and the whole cache are those of the full
    prefill (left-padded rows), and the decode step after it gives the same logits."""
    _, dec = pair
    module = inference_view(dec) if view else dec
    ids, mask = _batch(seed=5)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    pos = positions_from_mask(mask)
    graphdef, state = nnx.split(module)
    full, c_full = _hidden(graphdef, state, ids, pos, mask, init_cache(module.cfg, 3, 16), False)
    last, c_last = _hidden(graphdef, state, ids, pos, mask, init_cache(module.cfg, 3, 16), True)
    assert last.shape == (3, 1, full.shape[-1])
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), atol=1e-5)
    for a, b in zip(jax.tree.leaves(c_full), jax.tree.leaves(c_last)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="last_only"):
        module.hidden_states(module.embed(ids), pos, mask, None, last_only=True)


def test_rows_at_different_write_positions_equal_full_forward(pair):
    """Each cache row writes at its own index (what continuous batching does): rows starting at slots 0, 3
    and 7 (the slots before them hold masked garbage), prefilled then decoded one token at a time, give the
    full forward's logits."""
    hf, dec = pair
    ids, mask = _batch(seed=3)
    ref = _hf_logits(hf, ids, mask)
    pos = positions_from_mask(jnp.asarray(mask))
    graphdef, state = nnx.split(dec)
    call = lambda a, b, cache: _cached_call(graphdef, state, jnp.asarray(ids[:, a:b]), pos[:, a:b],
                                            jnp.asarray(mask[:, a:b]), cache)
    start = jnp.asarray([0, 3, 7], jnp.int32)
    _, cache = call(0, 7, init_cache(dec.cfg, 3, 24))  # garbage keys, then hidden behind the masks below
    cache = dataclasses.replace(cache, slot_mask=jnp.zeros_like(cache.slot_mask), index=start)
    logits, cache = call(0, 9, cache)
    steps = [logits]
    for t in range(9, 12):
        lg, cache = call(t, t + 1, cache)
        steps.append(lg)
    assert cache.index.tolist() == (start + 12).tolist()
    assert np.asarray(cache.slot_mask).sum(axis=1).tolist() == mask.sum(axis=1).tolist()
    ours = np.concatenate([np.asarray(s) for s in steps], axis=1)
    err = np.abs(ours - ref)[mask > 0].max()
    assert err <= 1e-4, err


def _param_paths(module) -> list[str]:
    return sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param)))


def test_inference_view_gives_the_decoders_logits(pair):
    """`inference_view` (every block matrix and the head stored [out, in], q/k/v and gate/up concatenated: what
    BatchEngine serves): the cache-free forward, a cached prefill and one-token decode steps give the decoder's
    logits to 1e-5, the decode steps through the native CPU kernels; the decoder keeps its parameter names and
    a tied head reads the embedding table itself."""
    _, dec = pair
    before = _param_paths(dec)
    view = inference_view(dec)
    assert _param_paths(dec) == before
    projections = {p.split("'")[5] for p in _param_paths(view) if p.startswith("['layers'][0]") and "proj" in p}
    assert projections == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    o = dec.layers[0].self_attn.o_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(view.layers[0].self_attn.o_proj.kernel[...]), np.asarray(o).T)
    if dec.cfg.tie_word_embeddings:
        assert view.decode_head.kernel is view.embed_tokens.embedding
        table = view.embed_tokens.embedding[...]
        assert sum(x is table for x in jax.tree.leaves(nnx.state(view, nnx.Param))) == 1  # held once
    else:
        assert not hasattr(view, "lm_head") and view.decode_head.kernel.shape == dec.lm_head.kernel.shape[::-1]
    ids, mask = _batch(seed=4)
    for ours, ref in zip(_prefill_decode_free(view, ids, mask), _prefill_decode_free(dec, ids, mask)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    graphdef, state = nnx.split(view)
    one = jnp.asarray(ids[:, :1])
    hlo = _cached_call.lower(graphdef, state, one, jnp.zeros_like(one), jnp.ones_like(one),
                             init_cache(view.cfg, ids.shape[0], 16)).compile().as_text()
    assert cpu_kernels.available() and hlo.count(f'custom_call_target="{cpu_kernels.TARGET}"') == \
        4 * len(view.layers) + 1
    assert hlo.count(f'custom_call_target="{cpu_kernels.ATTENTION_TARGET}"') == len(view.layers)


def _prefill_then_decode(module, ids, mask, prefill: int):
    """Logits of a cached prefill of the first `prefill` tokens, then of one-token decode steps to the end
    of `ids`, and the final cache."""
    pos = positions_from_mask(jnp.asarray(mask))
    graphdef, state = nnx.split(module)
    call = lambda a, b, cache: _cached_call(graphdef, state, jnp.asarray(ids[:, a:b]), pos[:, a:b],
                                            jnp.asarray(mask[:, a:b]), cache)
    logits, cache = call(0, prefill, init_cache(module.cfg, ids.shape[0], 16))
    out = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = call(t, t + 1, cache)
        out.append(logits)
    return out, cache


def _prefill_decode_free(module, ids, mask) -> list:
    """Logits of a 9-token cached prefill, 3 one-token decode steps, and the 12-token cache-free forward."""
    steps, _ = _prefill_then_decode(module, ids, mask, prefill=9)
    graphdef, state = nnx.split(module)
    free, _ = _cached_call(graphdef, state, jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)),
                           jnp.asarray(mask), None)
    return steps + [free]


def test_one_token_cache_write_matches_the_scatter_and_drops_past_the_end():
    """write_slots' one-token path (a dynamic_update_slice per row) writes what the [B, T] scatter writes;
    a slot at or past the cache's end leaves the row unchanged."""
    rs = np.random.RandomState(0)
    cache = jnp.asarray(rs.randn(4, 2, 6, 3).astype(np.float32))
    new = jnp.asarray(rs.randn(4, 1, 2, 3).astype(np.float32))
    slots = jnp.asarray([[0], [5], [6], [9]], jnp.int32)
    ours = write_slots(cache, new, slots)
    ref = cache.at[jnp.arange(4)[:, None], :, slots].set(new, mode="drop")
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(ours[2:]), np.asarray(cache[2:]))


def test_params_carry_logical_axes_and_bf16_compute_runs(pair):
    hf, dec = pair
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(dec, nnx.Param)),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert specs and all(len(s) > 0 for s in specs)
    names = {n for s in specs for n in s}
    assert {"vocab", "embed", "mlp", "q_heads", "kv_heads", "norm"} <= names
    assert ("lm_head" in nnx.state(dec)) != dec.cfg.tie_word_embeddings
    if dec.cfg.num_key_value_heads != 2:
        return  # one bf16 run per family is enough
    ids, mask = _batch()
    bf = decoder_from_hf(hf, dtype=jnp.bfloat16)
    lg, _ = _cached_call(*nnx.split(bf), jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)),
                         jnp.asarray(mask), None)
    assert lg.dtype == jnp.bfloat16
    ref = _hf_logits(hf, ids, mask)
    assert np.abs(np.asarray(lg, np.float32) - ref)[mask > 0].max() < 0.5  # bf16 is close, not exact


def test_cudnn_style_attention_equals_masked_on_right_padding(pair):
    hf, dec = pair
    if dec.cfg.model_type != "qwen2" or dec.cfg.num_key_value_heads != 2:
        pytest.skip("one family/GQA case is enough for the attention switch")
    ids, _ = _batch(seed=4)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padded, as training batches are
    mask[2, 11:] = 0
    ref = _hf_logits(hf, ids, mask)
    args = (jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask), None)
    ours, _ = _cached_call(*nnx.split(decoder_from_hf(hf, attention_impl="cudnn")), *args)
    err = np.abs(np.asarray(ours) - ref)[mask > 0].max()
    assert err <= 1e-4, err
    remat = decoder_from_hf(hf, attention_impl="cudnn", remat_policy="full")
    np.testing.assert_allclose(np.asarray(_cached_call(*nnx.split(remat), *args)[0]), np.asarray(ours), atol=1e-5)
