"""instit-jax: Inst-IT (instance-level visual prompt instruction tuning) in JAX."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "numpy>=2.0",
    "pillow>=10",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "openai>=1.40",
    "pydantic>=2.6",
    "imageio>=2.30",
    "tqdm>=4.60",
    "tensorboardX>=2.6",
    "scipy>=1.10",
    "matplotlib>=3.7",
]

setup(
    name="instit-jax",
    version="0.1.0",
    description="JAX/TPU-native Inst-IT: Set-of-Marks data generation, LLaVA-NeXT SFT, Inst-It Bench.",
    python_requires=">=3.10",
    packages=find_packages(include=["instit_jax*", "data_gen*", "eval*", "configs*", "demo*"]),
    package_data={"demo": ["base/*"]},  # the shipped demo base (llava-hf folder)
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "torch==2.13.0", "transformers==5.23.0", "ruff>=0.5", "pyarrow>=14",
                 "tensorflow-datasets==4.9.10"],
        "tpu": ["jax[tpu]==0.10.2"],
        "tfds": ["tensorflow-datasets==4.9.10"],  # TFDS builders (instit_jax/data/tfds), no TensorFlow needed
    },
    entry_points={
        "console_scripts": [
            "instit-demo=demo.cli:main",
            "instit-convert=instit_jax.convert.cli:main",
            "instit-generate=instit_jax.generate_cli:main",
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
