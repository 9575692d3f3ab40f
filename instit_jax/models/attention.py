"""Memory-efficient causal self-attention in pure JAX (flash-style, blockwise online softmax).

`blockwise_attention(q, k, v, key_valid)` computes exactly what the decoder's "xla" path computes
without a cache: causal attention where query t sees keys s <= t whose `key_valid[b, s]` is set, scale
head_dim**-0.5, scores and softmax in f32, probabilities cast to the value dtype before the value matmul.
It never builds the [T, T] score matrix: queries are processed in blocks of `block_q`, each visiting only
the key blocks at or below the diagonal with a running max / normaliser (online softmax). Peak extra
memory is one [B, K, G, block_q, block_k] score block plus the f32 output accumulators.

The backward pass is a `jax.custom_vjp` that recomputes the score blocks from q, k, v and the saved
per-row log-sum-exp (FlashAttention-2): residuals are O(T) per head, never O(T^2). Key/value heads are
not repeated for grouped-query attention: queries are viewed as [B, K, G, T, hd] with G = N / K
(query head n uses key/value head n // G, Hugging Face's `repeat_kv` order).

A query row with no visible key (a LEFT-padding position before the first real token) is don't-care;
it gets a finite average of the values it could see, as with XLA's masked softmax.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Masked scores use a large finite negative (as jax.nn.dot_product_attention does), so that a fully
# masked row softmaxes to a uniform average instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _pad_to(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _scores(q_blk: Array, k_blk: Array, seg_q: Array, seg_k: Array, q0: Array, k0: Array, scale: float,
            causal: bool, segmented: bool) -> Array:
    """Masked f32 scores [B, K, G, bq, bk] for the query block starting at q0 and key block at k0.

    seg_q [B, bq] / seg_k [B, bk] int32: 0 = padding; a key is visible when its id is > 0 and, with
    `segmented`, equal to the query's (block-diagonal attention of packed sequences)."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    visible = (seg_k > 0)[:, None, None, None, :]
    if segmented:
        visible = visible & (seg_q[:, :, None] == seg_k[:, None, :])[:, None, None]
    if causal:
        qi = q0 + jnp.arange(q_blk.shape[3])
        ki = k0 + jnp.arange(k_blk.shape[2])
        visible = (ki[None, :] <= qi[:, None])[None, None, None] & visible
    return jnp.where(visible, s, _MASK_VALUE)


def _num_key_blocks(i: Array, block_q: int, block_k: int, nk: int, causal: bool) -> Array:
    """Key blocks that query block i can see: all, or (causal) ceil((i + 1) * block_q / block_k) <= nk."""
    return jnp.minimum(nk, ((i + 1) * block_q + block_k - 1) // block_k) if causal else nk


def _segment_block_ranges(seg: Array, block_q: int, block_k: int) -> tuple[Array, Array]:
    """For packed rows: (first key block each query block can see [nq], one past the last query block that
    can see each key block [nk]), from the runs of equal segment ids (a query sees only its own run)."""
    b, tp = seg.shape
    t = jnp.arange(tp)
    change = seg[:, 1:] != seg[:, :-1]
    first = jnp.concatenate([jnp.ones((b, 1), bool), change], axis=1)
    last = jnp.concatenate([change, jnp.ones((b, 1), bool)], axis=1)
    start = jax.lax.cummax(jnp.where(first, t, 0), axis=1)  # first position of each token's run
    end = jax.lax.cummin(jnp.where(last, t, tp - 1), axis=1, reverse=True)  # last position of its run
    key_lo = start[:, ::block_q].min(axis=0) // block_k  # runs start no later than a block's first query
    last_key = jnp.minimum(jnp.arange(tp // block_k) * block_k + block_k - 1, tp - 1)
    query_hi = end[:, last_key].max(axis=0) // block_q + 1
    return key_lo.astype(jnp.int32), query_hi.astype(jnp.int32)


def _forward(q: Array, k: Array, v: Array, seg: Array, block_q: int, block_k: int,
             causal: bool, segmented: bool) -> tuple[Array, Array]:
    """q [B, K, G, Tp, hd], k/v [B, K, Tp, hd], seg [B, Tp] int32 -> (out like q, lse [B, K, G, Tp] f32).

    segmented: key blocks wholly before a query block's segments are skipped (never visited)."""
    b, nkv, g, tp, hd = q.shape
    scale = hd ** -0.5
    nq, nk = tp // block_q, tp // block_k
    key_lo = _segment_block_ranges(seg, block_q, block_k)[0] if segmented else jnp.zeros((nq,), jnp.int32)

    def one_query_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=3)
        seg_q = jax.lax.dynamic_slice_in_dim(seg, i * block_q, block_q, axis=1)

        def body(j, carry):
            m, denom, acc = carry
            k_blk = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, axis=2)
            seg_k = jax.lax.dynamic_slice_in_dim(seg, j * block_k, block_k, axis=1)
            s = _scores(q_blk, k_blk, seg_q, seg_k, i * block_q, j * block_k, scale, causal, segmented)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            return m_new, denom, acc * corr[..., None] + pv

        m0 = jnp.full((b, nkv, g, block_q), -jnp.inf, jnp.float32)
        carry = (m0, jnp.zeros_like(m0), jnp.zeros((b, nkv, g, block_q, hd), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(key_lo[i], _num_key_blocks(i, block_q, block_k, nk, causal), body, carry)
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, B, K, G, bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(b, nkv, g, tp, hd)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, nkv, g, tp)
    return out, lse


def _backward(q, k, v, seg, out, lse, d_out, block_q: int, block_k: int, causal: bool, segmented: bool):
    """FlashAttention-2 backward: per key block, loop the query blocks that see it; dq accumulated in f32."""
    b, nkv, g, tp, hd = q.shape
    scale = hd ** -0.5
    nq, nk = tp // block_q, tp // block_k
    query_hi = _segment_block_ranges(seg, block_q, block_k)[1] if segmented else jnp.full((nk,), nq, jnp.int32)
    # D_t = sum_d dO * O: the softmax-gradient row term.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def one_key_block(dq, j):
        k_blk = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, axis=2)
        seg_k = jax.lax.dynamic_slice_in_dim(seg, j * block_k, block_k, axis=1)

        def body(i, carry):
            dk, dv, dq = carry
            sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * block_q, slice_size=block_q, axis=3)
            q_blk, do_blk, lse_blk, delta_blk = sl(q), sl(d_out), sl(lse), sl(delta)
            seg_q = jax.lax.dynamic_slice_in_dim(seg, i * block_q, block_q, axis=1)
            s = _scores(q_blk, k_blk, seg_q, seg_k, i * block_q, j * block_k, scale, causal, segmented)
            p = jnp.exp(s - lse_blk[..., None])  # the forward's probabilities, recomputed
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(d_out.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None]) * scale
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(q.dtype), q_blk, preferred_element_type=jnp.float32)
            dq_blk = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(k.dtype), k_blk, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, sl(dq) + dq_blk, i * block_q, axis=3)
            return dk, dv, dq

        first_q = (j * block_k) // block_q if causal else 0  # (causal) earlier query blocks cannot see it
        zeros = jnp.zeros((b, nkv, block_k, hd), jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(first_q, query_hi[j], body, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, nkv, tp, hd)
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, nkv, tp, hd)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, block_q, block_k, causal, segmented):
    return _forward(q, k, v, seg, block_q, block_k, causal, segmented)[0]


def _flash_fwd(q, k, v, seg, block_q, block_k, causal, segmented):
    out, lse = _forward(q, k, v, seg, block_q, block_k, causal, segmented)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(block_q, block_k, causal, segmented, res, d_out):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, out, lse, d_out, block_q, block_k, causal, segmented)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: Array, k: Array, v: Array, key_valid: Array, *, block_q: int = 512,
                        block_k: int = 512, causal: bool = True, segment_ids: Array | None = None) -> Array:
    """Attention q [B, T, N, hd], k/v [B, T, K, hd], key_valid [B, T] -> [B, T, N, hd] (q.dtype).

    causal=False: every query sees every valid key (a vision tower's bidirectional attention).
    segment_ids [B, T] int32 (packed rows: 0 = padding, k >= 1 = the k-th sequence of the row): a query
    sees only keys of its own segment (block-diagonal), replacing `key_valid`.

    Blocks shrink to T (rounded up to 8) for short sequences; T is zero-padded to a block multiple
    (padded keys are invalid, padded queries dropped).
    """
    b, t, n, hd = q.shape
    nkv = k.shape[2]
    if n % nkv:
        raise ValueError(f"blockwise_attention: {n} query heads are not a multiple of {nkv} key/value heads")
    short = -(-t // 8) * 8
    block_q, block_k = min(block_q, short), min(block_k, short)
    step = block_q * block_k // _gcd(block_q, block_k)
    tp = -(-t // step) * step
    qh = _pad_to(q.reshape(b, t, nkv, n // nkv, hd).transpose(0, 2, 3, 1, 4), 3, tp)  # [B, K, G, Tp, hd]
    kh = _pad_to(k.transpose(0, 2, 1, 3), 2, tp)  # [B, K, Tp, hd]
    vh = _pad_to(v.transpose(0, 2, 1, 3), 2, tp)
    seg = (key_valid > 0) if segment_ids is None else segment_ids
    seg = _pad_to(seg.astype(jnp.int32), 1, tp)
    out = _flash(qh, kh, vh, seg, block_q, block_k, causal, segment_ids is not None)[:, :, :, :t]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def splash_attention(q: Array, k: Array, v: Array, key_valid: Array, *, block_size: int = 512,
                     interpret: bool = False, segment_ids: Array | None = None) -> Array:
    """TPU Pallas splash attention, causal + padding: q [B, T, N, hd], k/v [B, T, K, hd] -> [B, T, N, hd].

    Padding is expressed as segment ids (real tokens 1, pads 0), so every real query sees exactly the
    "xla" impl's keys; a pad query sees earlier pads instead (don't-care rows, never all-masked).
    Packed rows pass their own `segment_ids` [B, T] (0 = padding, k >= 1 = k-th sequence). Needs
    T % 128 == 0 and hd % 128 == 0 (Mosaic tiles). Mosaic kernels cannot be auto-partitioned: when the
    caller traces under a mesh (`jax.set_mesh`), the kernel runs per batch shard in a `jax.shard_map` over
    the mesh's "data"/"fsdp" axes; without one it runs unsharded. `interpret=True` runs it on CPU (tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, hd = q.shape
    blk = min(block_size, t)
    if t % 128 or blk % 128 or t % blk:
        raise ValueError(f"splash attention needs T ({t}) and the block ({blk}) to be multiples of 128, "
                         "the block dividing T; use attention_impl='blockwise' otherwise")
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((t, t))] * n), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)

    def local(q, k, v, segments):  # [b, N, T, hd], [b, K, T, hd], [b, T]
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))  # noqa: E731
        return jax.vmap(one)(q, k, v, segments)

    args = ((q * hd ** -0.5).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            ((key_valid > 0) if segment_ids is None else segment_ids).astype(jnp.int32))
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if batch_axes:
        spec = jax.sharding.PartitionSpec(batch_axes)
        local = jax.shard_map(local, in_specs=(spec, spec, spec, spec), out_specs=spec, check_vma=False)
    return local(*args).transpose(0, 2, 1, 3).astype(q.dtype)
