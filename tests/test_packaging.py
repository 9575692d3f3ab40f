"""setup.py: what it declares (read with setuptools itself), the pins file, and the annotation-only path."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import instit_jax
from instit_jax.data import crc32c

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("instit_jax", "data_gen", "eval", "configs", "demo")
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections")

# Runs setup.py up to its setup() call in a fresh interpreter and prints what it declares (and whether
# reading it imported jax).
_READ_SETUP = textwrap.dedent("""
    import json, sys
    import setuptools
    from distutils.core import run_setup
    d = run_setup("setup.py", stop_after="init")
    print(json.dumps({"version": d.get_version(), "python_requires": d.python_requires,
                      "install_requires": d.install_requires, "extras": d.extras_require,
                      "entry_points": d.entry_points, "package_data": d.package_data,
                      "imported_jax": "jax" in sys.modules}))
""")


@pytest.fixture(scope="module")
def setup_info() -> dict:
    out = subprocess.run([sys.executable, "-c", _READ_SETUP], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_version_python_and_ruff_target(setup_info):
    assert setup_info["version"] == instit_jax.__version__
    assert not setup_info["imported_jax"]
    assert setup_info["python_requires"] == ">=3.11"
    assert 'target-version = "py311"' in (ROOT / "ruff.toml").read_text()
    assert "instit-demo=demo.cli:main" in setup_info["entry_points"]["console_scripts"]


def test_jax_stack_ranges_in_install_requires_pins_in_constraints(setup_info):
    reqs = {_name(r): r for r in setup_info["install_requires"]}
    pins = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = {_name(p): p for p in pins if p}
    for name in JAX_STACK:
        assert "==" not in reqs[name] and "<" in reqs[name] and ">=" in reqs[name], reqs[name]
        assert re.fullmatch(rf"{name}==[0-9.]+", pins[name]), pins.get(name)
        assert pins[name] in setup_info["extras"]["test"]  # the tests run on the pinned stack
        version = pins[name].split("==")[1]
        assert f">={version}" in reqs[name]  # the pin is inside the range
    assert not [r for r in setup_info["install_requires"] if "==" in r]


def test_floors_and_extras(setup_info):
    reqs = {_name(r): r for r in setup_info["install_requires"]}
    assert reqs["pillow"] == "pillow>=10.1"  # ImageFont.load_default(size=) in data_gen/som.py
    for name in ("google-crc32c", "absl-py", "etils", "httpx"):
        assert name in reqs
    extras = setup_info["extras"]
    assert [_name(r) for r in extras["bench"]] == ["pyarrow"]
    assert [_name(r) for r in extras["video"]] == ["imageio-ffmpeg"]
    assert not {_name(r) for r in extras["annotate"]} & {_name(n) for n in JAX_STACK}


def test_package_data_ships_the_demo_base_and_the_kernel_source(setup_info):
    data = setup_info["package_data"]
    for package, patterns in (("demo", ["base/*"]), ("instit_jax.kernels", ["*.cc"])):
        assert data[package] == patterns
        folder = ROOT.joinpath(*package.split("."))
        assert any(p.is_file() for pattern in patterns for p in folder.glob(pattern)), package


def _third_party_imports(package: str) -> set[str]:
    found = set()
    for f in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in LIBRARY and m != "__future__"}


def test_every_library_import_is_declared(setup_info):
    declared = {_name(r) for r in setup_info["install_requires"]}
    for reqs in setup_info["extras"].values():
        declared |= {_name(r) for r in reqs}
    dists = md.packages_distributions()
    provided_by_openai = {"httpx2"}  # openai >= 3's own HTTP stack, tried before httpx
    missing = {}
    for package in LIBRARY:
        for module in _third_party_imports(package) - provided_by_openai:
            names = {_name(d) for d in dists.get(module, [module])}
            if not names & declared:
                missing[module] = package
    assert not missing, f"imported but not in setup.py: {missing}"
    annotate = {_name(r) for r in setup_info["extras"]["annotate"]}
    for module in _third_party_imports("data_gen") - provided_by_openai:
        assert {_name(d) for d in dists.get(module, [module])} & annotate, module


def test_crc32c_uses_google_crc32c_when_installed():
    import google_crc32c  # declared in install_requires

    assert crc32c.backend() == "google_crc32c"
    data = bytes(range(256)) * 40
    assert crc32c.crc32c(data) == google_crc32c.value(data) == crc32c._crc_numpy(data) ^ 0xFFFFFFFF


def test_annotate_cli_runs_without_jax(tmp_path):
    """instit-annotate (estimate mode: parses, marks frames, counts tokens) with the JAX stack unimportable."""
    from tests.annotate_data import write_videos

    manifest = write_videos(tmp_path, n_ok=2)
    script = textwrap.dedent("""
        import sys
        BLOCKED = {"jax", "jaxlib", "flax", "optax", "orbax", "grain", "ml_collections", "instit_jax",
                   "tokenizers", "safetensors", "tensorboardX", "torch", "transformers"}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        from data_gen.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = subprocess.run([sys.executable, "-c", script, "video", "--manifest", str(manifest), "--out",
                          str(tmp_path / "ann"), "--base-url", "http://127.0.0.1:9/v1", "--estimate"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["items"] == 2 and summary["requests"] > 0 and summary["unusable_items"] == 0
