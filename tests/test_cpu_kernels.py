"""The native CPU decode product (`instit_jax/kernels/cpu.py`): built with the host compiler on first use,
equal to XLA's product over row counts, odd sizes and leading axes, used only where it should be, safe
under concurrent calls, and replaced by XLA's product (with one warning) where it cannot be built."""
import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instit_jax.kernels import cpu

CALL = f'custom_call_target="{cpu.TARGET}"'


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_the_kernel_builds_here_and_is_cached_by_key():
    assert cpu.available(), cpu._state.get("why")
    lib = cpu.library_path(cpu._compiler())
    assert lib.exists() and lib.parent.parent == cpu.cache_dir()


@pytest.mark.parametrize("lead", [(1,), (3,), (4,), (5,), (16,), (2, 1), (3, 2)])
@pytest.mark.parametrize("k,n", [(1, 1), (15, 3), (16, 2), (17, 37), (100, 513), (1027, 64), (64, 5001)])
def test_equals_xlas_product(lead, k, n):
    rs = np.random.RandomState(k * 7 + n)
    x = jnp.asarray(rs.randn(*lead, k).astype(np.float32))
    w = jnp.asarray(rs.randn(n, k).astype(np.float32))
    assert CALL in _hlo(cpu.matmul_wt, x, w)
    got = np.asarray(jax.jit(cpu.matmul_wt)(x, w))
    ref = np.einsum("...k,nk->...n", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert got.shape == lead + (n,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_wide_inputs_other_dtypes_and_empty_shapes_go_to_xla():
    w = jnp.ones((8, 32), jnp.float32)
    wide = jnp.ones((cpu.MAX_ROWS + 1, 32), jnp.float32)
    assert CALL not in _hlo(cpu.matmul_wt, wide, w)  # prefill: XLA's matrix-matrix product
    np.testing.assert_array_equal(np.asarray(cpu.matmul_wt(wide, w)), np.full((cpu.MAX_ROWS + 1, 8), 32.0))
    half = jnp.ones((2, 32), jnp.bfloat16)
    assert CALL not in _hlo(cpu.matmul_wt, half, w.astype(jnp.bfloat16))
    assert cpu.matmul_wt(half, w).dtype == jnp.bfloat16
    assert cpu.matmul_wt(jnp.ones((0, 32)), w).shape == (0, 8)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu.matmul_wt)(jnp.ones((2, 32)), jnp.ones((0, 32)))),
                                  np.zeros((2, 0)))


ATTN = f'custom_call_target="{cpu.ATTENTION_TARGET}"'


def _attention_ref(q, keys, values, visible, scale):
    """float64 numpy: softmax over visible slots (all slots when none is visible)."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    logits = np.einsum("bkgd,bksd->bkgs", q, keys) * scale
    vis = np.asarray(visible)[:, None, None, :]
    none = ~vis.any(-1, keepdims=True)
    logits = np.where(none, 0.0, np.where(vis, logits, -np.inf))  # nothing visible: equal weights
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bkgs,bksd->bkgd", p / p.sum(-1, keepdims=True), values)


@pytest.mark.parametrize("b,k,g,s,d", [(1, 1, 1, 1, 1), (3, 2, 4, 37, 64), (16, 8, 1, 320, 32), (2, 1, 7, 1000, 17),
                                       (2, 4, 2, 5, 128)])
def test_decode_attention_equals_softmax_over_the_visible_slots(b, k, g, s, d):
    rs = np.random.RandomState(b * 100 + s)
    q = jnp.asarray(rs.randn(b, k, g, d).astype(np.float32))
    keys = jnp.asarray(rs.randn(b, k, s, d).astype(np.float32))
    values = jnp.asarray(rs.randn(b, k, s, d).astype(np.float32))
    visible = rs.rand(b, s) > 0.3
    visible[0] = False  # a row with nothing visible averages every slot
    if b > 1:
        visible[1, : s // 2] = False  # a left-padded row
        visible[1, -1] = True
    visible = jnp.asarray(visible)
    call = jax.jit(lambda *a: cpu.decode_attention(*a, 0.3, lambda *x: jnp.zeros_like(x[0])))
    assert ATTN in call.lower(q, keys, values, visible).compile().as_text()
    got = np.asarray(call(q, keys, values, visible))
    np.testing.assert_allclose(got, _attention_ref(q, keys, values, visible, 0.3), rtol=2e-5, atol=2e-6)
    half = [a.astype(jnp.bfloat16) for a in (q, keys, values)]  # other dtypes: the XLA form given
    assert float(jnp.abs(cpu.decode_attention(*half, visible, 0.3, lambda *x: jnp.zeros_like(x[0]))).max()) == 0


CACHED = f'custom_call_target="{cpu.CACHED_ATTENTION_TARGET}"'


@pytest.mark.parametrize("b,t,k,g,s,d", [(1, 1, 1, 1, 1, 1), (1, 128, 4, 2, 128, 64), (2, 37, 1, 4, 50, 17),
                                         (3, 9, 2, 3, 16, 8), (1, 70, 8, 1, 300, 32), (2, 5, 2, 1, 40, 130)])
def test_cached_attention_equals_masked_softmax_per_query(b, t, k, g, s, d):
    """Queries at their own slots (causal), a left-padded row, queries that see nothing, slots past the
    queries: the kernel against float64 numpy."""
    rs = np.random.RandomState(t * 10 + s)
    q = rs.randn(b, t, k, g, d).astype(np.float32)
    keys, values = (rs.randn(b, k, s, d).astype(np.float32) for _ in range(2))
    mask = (rs.rand(b, s) > 0.1).astype(np.int32)
    mask[-1, : s // 3] = 0  # left padding
    slots = np.tile(np.arange(s - t, s)[None], (b, 1)).astype(np.int32)
    slots[0, : min(2, t)] = -1  # these queries see nothing: every slot, equally
    call = jax.jit(lambda *a: cpu.cached_attention(*a, 0.2, lambda *x: jnp.zeros_like(x[0])))
    args = [jnp.asarray(a) for a in (q, keys, values, mask, slots)]
    assert CACHED in call.lower(*args).compile().as_text()
    got = np.asarray(call(*args))
    vis = (mask[:, None, :] > 0) & (np.arange(s)[None, None, :] <= slots[:, :, None])  # [b, t, s]
    logits = np.einsum("btkgd,bksd->btkgs", q.astype(np.float64), keys.astype(np.float64)) * 0.2
    none = ~vis.any(-1)[:, :, None, None, None]
    logits = np.where(none, 0.0, np.where(vis[:, :, None, None, :], logits, -np.inf))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("btkgs,bksd->btkgd", p / p.sum(-1, keepdims=True), values.astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


def test_concurrent_calls_and_independent_products_in_one_program():
    """Two products with no dependence in one program (XLA may run them at once on its pool) and four
    Python threads calling at once: every result right, nothing hangs."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(1, 512).astype(np.float32))
    ws = [jnp.asarray(rs.randn(2048, 512).astype(np.float32)) for _ in range(4)]
    both = jax.jit(lambda x, a, b, c, d: (cpu.matmul_wt(x, a) + cpu.matmul_wt(x, b),
                                          cpu.matmul_wt(jnp.tanh(cpu.matmul_wt(x, c)[:, :512]), d)))
    ref = both(x, *ws)
    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(both(x, *ws))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads) and len(results) == 80
    for r in results:
        for a, b in zip(r, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(ref[0]), np.asarray(x @ ws[0].T + x @ ws[1].T), rtol=1e-5, atol=1e-4)


def _run(env: dict, tmp_path) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        import jax, jax.numpy as jnp, numpy as np
        from instit_jax.kernels import cpu
        x, w = jnp.ones((1, 40)), jnp.arange(120.0).reshape(3, 40) / 100
        with warnings.catch_warnings(record=True) as caught:
            y = jax.jit(cpu.matmul_wt)(x, w)
            y2 = jax.jit(cpu.matmul_wt)(x, 2 * w)
        hlo = jax.jit(cpu.matmul_wt).lower(x, w).compile().as_text()
        print("available", cpu.available(), "warnings", len(caught), "custom", cpu.TARGET in hlo)
        for c in caught:
            print("WARNING", c.message)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w.T), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y2), 2 * np.asarray(y), rtol=1e-6)
    """)
    full = {**os.environ, "JAX_PLATFORMS": "cpu", "INSTIT_JAX_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_without_a_compiler_xla_answers_after_one_warning(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    res = _run({"PATH": str(empty), "CXX": ""}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "available False warnings 1 custom False" in res.stdout
    assert "no C++ compiler found" in res.stdout and not (tmp_path / "cache").exists()


def test_a_failed_build_warns_with_the_compilers_message_and_the_switch_turns_it_off(tmp_path):
    bad = tmp_path / "cxx"
    bad.write_text("#!/bin/sh\necho 'this compiler always fails' >&2\nexit 3\n")
    bad.chmod(0o755)
    res = _run({"CXX": str(bad)}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "available False warnings 1 custom False" in res.stdout
    assert "this compiler always fails" in res.stdout and "failed (3)" in res.stdout
    assert not list((tmp_path / "cache" / "kernels").glob("*.so*"))  # no half-written library left
    off = _run({cpu.ENV_SWITCH: "0"}, tmp_path)
    assert off.returncode == 0 and "available False warnings 0 custom False" in off.stdout, off.stderr


def test_a_fresh_cache_builds_then_reuses_the_library(tmp_path):
    first = _run({}, tmp_path)
    assert first.returncode == 0 and "available True warnings 0 custom True" in first.stdout, first.stderr
    (lib,) = (tmp_path / "cache" / "kernels").glob("cpu_matvec-*.so")
    stamp = lib.stat().st_mtime_ns
    second = _run({}, tmp_path)
    assert second.returncode == 0 and "available True" in second.stdout
    assert lib.stat().st_mtime_ns == stamp and len(list(lib.parent.iterdir())) == 1
