"""Shared helpers for tests that run `instit-serve` as a subprocess on a loopback port."""
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from test_generate_cli import ckpt  # noqa: F401  (the tiny llava-hf checkpoint fixture, re-exported)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(ckpt_dir: Path, *args: str, startup_s: float = 300.0) -> Iterator[str]:
    """Run `python -m instit_jax.serve --ckpt ckpt_dir ARGS` on a free port; yields the /v1 base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "instit_jax.serve", "--ckpt", str(ckpt_dir), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stdout.read()) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"instit-serve did not listen on port {port} in {startup_s}s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
