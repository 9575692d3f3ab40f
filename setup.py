"""instit-jax: Inst-IT (instance-level visual prompt instruction tuning) in JAX."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "instit_jax" / "__init__.py").read_text(), re.M).group(1)
# Exact versions of the JAX stack the tests run with (install_requires below gives compatible ranges).
PINS = [line.split("#")[0].strip() for line in (HERE / "constraints.txt").read_text().splitlines()
        if line.split("#")[0].strip()]

# What `data_gen` (SoM rendering, `instit-annotate`, `instit-som`, `instit-coreset`) imports; none of it is JAX.
ANNOTATE = [
    "numpy>=2.0",
    "pillow>=10.1",  # ImageFont.load_default(size=)
    "openai>=1.40",
    "httpx>=0.23",  # openai < 3 (newer openai ships httpx2, imported first)
    "pydantic>=2.6",
    "imageio>=2.30",
    "tqdm>=4.60",
    "scipy>=1.10",
]

CORE = ANNOTATE + [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1.0,<2",
    "absl-py>=1.0",
    "etils[epath]>=1.5",
    "google-crc32c>=1.5",  # TFRecord CRC32C in C (instit_jax/data/crc32c.py falls back to numpy without it)
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "tensorboardX>=2.6",
    "matplotlib>=3.7",
]

setup(
    name="instit-jax",
    version=VERSION,
    description="JAX/TPU-native Inst-IT: Set-of-Marks data generation, LLaVA-NeXT SFT, Inst-It Bench.",
    python_requires=">=3.11",
    packages=find_packages(include=["instit_jax*", "data_gen*", "eval*", "configs*", "demo*"]),
    # the shipped demo base (llava-hf folder); the CPU decode kernel's source, compiled on first use
    package_data={"demo": ["base/*"], "instit_jax.kernels": ["*.cc"]},
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "torch==2.13.0", "transformers==5.23.0", "ruff>=0.5", "pyarrow>=14",
                 "tensorflow-datasets==4.9.10", "hypothesis>=6.100", *PINS],
        "annotate": ANNOTATE,  # data_gen alone: pip install --no-deps instit-jax, then these
        "bench": ["pyarrow>=14"],  # the Hugging Face Inst-It Bench download (parquet)
        "video": ["imageio-ffmpeg>=0.4.9"],  # mp4 (and other ffmpeg formats) in annotation manifests
        "tpu": ["jax[tpu]==0.10.2"],
        "tfds": ["tensorflow-datasets==4.9.10"],  # TFDS builders (instit_jax/data/tfds), no TensorFlow needed
    },
    entry_points={
        "console_scripts": [
            "instit-demo=demo.cli:main",
            "instit-convert=instit_jax.convert.cli:main",
            "instit-generate=instit_jax.generate_cli:main",
            "instit-serve=instit_jax.serve:main",
            "instit-som=data_gen.som_cli:main",
            "instit-build-data=instit_jax.data.build:main",
            "instit-annotate=data_gen.cli:main",
            "instit-coreset=data_gen.coreset:main",
            "instit-train=instit_jax.train.cli:main",
            "instit-compile=instit_jax.aot:main",
            "instit-eval=eval.cli:main",
        ]
    },
)
