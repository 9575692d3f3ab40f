"""instit-jax: Flax NNX LLaVA-NeXT, Inst-IT data path, sharded continuous SFT, conversion to/from HF.

Heavy submodules load lazily so `import instit_jax` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Assistant": "instit_jax.assistant",
    "load_pretrained": "instit_jax.loading",
    "load_tokenizer": "instit_jax.loading",
    "save_pretrained": "instit_jax.loading",
    "LlavaNextModel": "instit_jax.models.llava_next",
    "LlavaConfig": "instit_jax.models.config",
    "VisionConfig": "instit_jax.models.config",
    "TextConfig": "instit_jax.models.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'instit_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
