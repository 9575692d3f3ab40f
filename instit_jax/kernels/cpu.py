"""Multi-threaded CPU kernels for decoding, as XLA FFI custom calls: y = x @ w.T for a few rows of x
(`matmul_wt`), and attention over a KV cache: one query per row (`decode_attention`) and many
(`cached_attention`, prefill).

XLA:CPU runs a product with one row (a decode step at batch 1) as one matrix-vector kernel on one thread,
and products of a few rows not much better (`docs/serving.md`). `cpu_matvec.cc` streams a weight stored
[out, in] through every thread of XLA's intra-op pool instead: each thread takes blocks of consecutive rows
(contiguous memory) and writes the matching outputs, so a decode step reads its weights at about the
machine's full memory bandwidth. `benchmarks/serve.py` measures it (`roofline_fraction`, and the
matrix-vector loop beside XLA's). Attention over a KV cache is slow in XLA's forms there too (batched
one-row products; written as multiply + reduce, a reduction fusion ~20x slower still on XLA 0.10):
`decode_attention` streams each (row, KV head) pair's keys and values on one of the pool's threads, and
`cached_attention` computes register-tiled products over only the slots each block of queries can see.

The source ships with the package and is compiled on first use with the host's C++ compiler (`$CXX`, else
`c++` / `g++`; `-O3 -march=native`, against the XLA FFI headers jaxlib ships) into a cache folder
(`$INSTIT_JAX_CACHE`, else `$XDG_CACHE_HOME/instit_jax`, else `~/.cache/instit_jax`), one library per
source, jaxlib version, compiler and CPU. Without a compiler, when the build fails, or with
`INSTIT_JAX_CPU_KERNELS=0`, all three are XLA's forms (one warning says why): the same numbers up to f32
summation order, slower. Off CPU (TPU, GPU) they are always XLA's.

Forward only (no VJP): the inference view and the decoder's KV-cache path use them; training (no cache)
never does.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = "instit_matvec_f32"
ATTENTION_TARGET = "instit_decode_attention_f32"
CACHED_ATTENTION_TARGET = "instit_cached_attention_f32"
SOURCE = Path(__file__).with_name("cpu_matvec.cc")
MAX_ROWS = 16  # more rows than this (prefill) go to XLA's matrix-matrix product
ENV_SWITCH = "INSTIT_JAX_CPU_KERNELS"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once decided, "why": the reason when not


def cache_dir() -> Path:
    if os.environ.get("INSTIT_JAX_CACHE"):
        return Path(os.environ["INSTIT_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instit_jax"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (a shared cache folder may serve
    several kinds of host)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() + platform.machine()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    parts = [SOURCE.read_text(), jaxlib.__version__, *version, " ".join(FLAGS), _cpu_signature()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_matvec-{key}.so"


def build(cxx: str) -> Path:
    """Compile the kernel (once per key; concurrent builders each write a temporary file and the last
    rename wins, all of them the same library). Raises RuntimeError with the compiler's output."""
    out = library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Whether the kernel is built and registered with XLA (built on the first call; later calls are free)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok, why = False, ""
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            why = f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}"
        elif (cxx := _compiler()) is None:
            why = "no C++ compiler found ($CXX, c++, g++, clang++)"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build(cxx)))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.InstitMatvecF32), platform="cpu")
                jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.InstitDecodeAttentionF32),
                                            platform="cpu")
                jax.ffi.register_ffi_target(CACHED_ATTENTION_TARGET,
                                            jax.ffi.pycapsule(lib.InstitCachedAttentionF32), platform="cpu")
                ok = True
            except (RuntimeError, OSError, AttributeError) as err:
                why = f"building {SOURCE.name} failed: {err}"
        if not ok and not os.environ.get(ENV_SWITCH):
            warnings.warn(f"instit_jax: the CPU decode kernels are off ({why}); decoding uses XLA's forms "
                          f"(slower on CPU, same results)", RuntimeWarning, stacklevel=4)
        _state.update(ok=ok, why=why)
        return ok


def _dispatch(native, xla_form, *args: jax.Array, eligible: bool) -> jax.Array:
    """`native(*args)` when compiled for CPU, `eligible` (operand dtypes and sizes the kernel takes) and the
    library is available; `xla_form(*args)` otherwise (other platforms through `lax.platform_dependent`)."""
    if not eligible or not available():
        return xla_form(*args)
    return jax.lax.platform_dependent(*args, cpu=native, default=xla_form)


def _xla(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _native(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[0],), x.dtype))(x, w)


def matmul_wt(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w[out, in].T -> [..., out], in x's dtype (w cast to it). On CPU, with f32 operands and at
    most MAX_ROWS rows, the native kernel; otherwise XLA's product."""
    w = w.astype(x.dtype)
    rows = x.size // max(x.shape[-1], 1)
    return _dispatch(_native, _xla, x, w, eligible=x.dtype == jnp.float32 and rows <= MAX_ROWS)


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array, scale: float,
                     xla_form) -> jax.Array:
    """q [B, K, G, hd] (G query heads per KV head), keys / values [B, K, S, hd], visible [B, S] bool ->
    [B, K, G, hd]: softmax(scale * q . keys) over the visible slots, applied to the values (a row with none
    visible averages every slot, as masked XLA softmax does). On CPU with f32 operands the native kernel;
    otherwise `xla_form(q, keys, values, visible)`."""
    def native(q, keys, values, visible):
        return jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))(
            q, keys, values, visible.astype(jnp.int32), scale=np.float32(scale))

    return _dispatch(native, xla_form, q, keys, values, visible,
                     eligible=q.dtype == keys.dtype == values.dtype == jnp.float32)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, slot_mask: jax.Array,
                     query_slots: jax.Array, scale: float, xla_form) -> jax.Array:
    """q [B, T, K, G, hd] (G query heads per KV head), keys / values [B, K, S, hd], slot_mask [B, S],
    query_slots [B, T] -> [B, T, K, G, hd]: query (b, t) attends to slot s when slot_mask[b, s] > 0 and
    s <= query_slots[b, t] (none visible: every slot, equally). On CPU with f32 operands the native
    kernel (register-tiled products per (row, KV head, block of queries), only the slots a block can
    see); otherwise `xla_form(q, keys, values, slot_mask, query_slots)`."""
    def native(q, keys, values, slot_mask, query_slots):
        return jax.ffi.ffi_call(CACHED_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))(
            q, keys, values, (slot_mask > 0).astype(jnp.int32), query_slots.astype(jnp.int32),
            scale=np.float32(scale))

    return _dispatch(native, xla_form, q, keys, values, slot_mask, query_slots,
                     eligible=q.dtype == keys.dtype == values.dtype == jnp.float32)
