"""A gs:// filesystem on local disk for tests: fsspec's LocalFileSystem under the `gs`/`gcs` protocol,
with gs://BUCKET/PATH stored at ROOT/BUCKET/PATH. etils.epath (without TensorFlow) reaches gs:// through
fsspec, so every epath operation on a gs:// path runs for real, on these local files. Orbax's array
storage (tensorstore) talks to GCS by itself and is not covered."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import fsspec
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry

PROTOCOLS = ("gs", "gcs")


class LocalGCS(LocalFileSystem):
    protocol = PROTOCOLS
    root = ""  # set by `local_gcs`

    def __init__(self, **kwargs):
        kwargs.pop("finalize_on_close", None)  # a GCS option
        super().__init__(auto_mkdir=True, **kwargs)  # object stores need no folders before a write

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in PROTOCOLS:
            if path.startswith(f"{p}://"):
                return f"{cls.root}/{path[len(p) + 3:]}".rstrip("/")
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"gs://{name[len(self.root) + 1:]}" if name.startswith(self.root + "/") else name


@contextlib.contextmanager
def local_gcs(root: Path) -> Iterator[Path]:
    """gs:// paths live under `root` while the context is open."""
    if gpath._is_tf_installed():  # epath would send gs:// to TensorFlow's gfile instead of fsspec
        raise RuntimeError("tests/local_gcs.py needs an environment without TensorFlow")
    root.mkdir(parents=True, exist_ok=True)
    saved = {p: fsspec.registry.get(p) for p in PROTOCOLS}
    LocalGCS.root = str(root.resolve())
    for p in PROTOCOLS:
        fsspec.register_implementation(p, LocalGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield root
    finally:
        for p, cls in saved.items():
            if cls is None:
                fsspec_registry.pop(p, None)
            else:
                fsspec.register_implementation(p, cls, clobber=True)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
