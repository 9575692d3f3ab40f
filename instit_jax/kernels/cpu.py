"""A multi-threaded CPU product for decoding: y = x @ w.T for a few rows of x, as an XLA FFI custom call.

XLA:CPU runs a product with one row (a decode step at batch 1) as one matrix-vector kernel on one thread,
and products of a few rows not much better (`docs/serving.md`). `cpu_matvec.cc` streams a weight stored
[out, in] through every thread of XLA's intra-op pool instead: each thread takes blocks of consecutive rows
(contiguous memory) and writes the matching outputs, so a decode step reads its weights at about the
machine's full memory bandwidth. `benchmarks/serve.py` measures it (`roofline_fraction`, and the
matrix-vector loop beside XLA's).

The source ships with the package and is compiled on first use with the host's C++ compiler (`$CXX`, else
`c++` / `g++`; `-O3 -march=native`, against the XLA FFI headers jaxlib ships) into a cache folder
(`$INSTIT_JAX_CACHE`, else `$XDG_CACHE_HOME/instit_jax`, else `~/.cache/instit_jax`), one library per
source, jaxlib version, compiler and CPU. Without a compiler, when the build fails, or with
`INSTIT_JAX_CPU_KERNELS=0`, `matmul_wt` is XLA's product (one warning says why): the same numbers up to f32
summation order, slower. Off CPU (TPU, GPU) it is always XLA's product.

Forward only (no VJP): the inference view uses it, training never does.
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

TARGET = "instit_matvec_f32"
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
                ok = True
            except (RuntimeError, OSError, AttributeError) as err:
                why = f"building {SOURCE.name} failed: {err}"
        if not ok and not os.environ.get(ENV_SWITCH):
            warnings.warn(f"instit_jax: the CPU decode kernel is off ({why}); decoding uses XLA's product "
                          f"(slower on CPU, same results)", RuntimeWarning, stacklevel=3)
        _state.update(ok=ok, why=why)
        return ok


def _xla(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _native(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[0],), x.dtype))(x, w)


def matmul_wt(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w[out, in].T -> [..., out], in x's dtype (w cast to it). On CPU, with f32 operands and at
    most MAX_ROWS rows, the native kernel; otherwise XLA's product."""
    w = w.astype(x.dtype)
    rows = x.size // max(x.shape[-1], 1)
    if x.dtype != jnp.float32 or rows > MAX_ROWS or not available():
        return _xla(x, w)
    return jax.lax.platform_dependent(x, w, cpu=_native, default=_xla)
