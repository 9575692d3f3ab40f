"""Public loading API: `load_pretrained`, `save_pretrained`, `load_tokenizer`.

`load_pretrained(path)` accepts a llava-hf directory (LlavaNext / LlavaOnevision), an original
LLaVA-NeXT training directory, or our Orbax layout (`instit_config.json` + `params/`). With `mesh`
(and `rules`: a table of logical axis name -> mesh axes, or its name in `sharding.RULES`; default "fsdp",
the trainer's default) every param goes straight to the sharding the trainer would give it.
Our checkpoints, training workdirs and tokenizers may be remote (gs://...; etils.epath paths); Hugging
Face directories are read with safetensors, from local disk.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from data_gen.confine import MAX_LINE_BYTES, check_file_size
from instit_jax import sharding as shd
from instit_jax.convert import hf_config, hf_weights, orbax_io
from instit_jax.models import lora
from instit_jax.models.config import LlavaConfig
from instit_jax.models.llava_next import LlavaNextModel


def read_hf_config(directory: Path) -> tuple[LlavaConfig, str]:
    """config.json (llava-hf or original) -> (LlavaConfig, layout name); HFConfigError naming the file."""
    path = directory / "config.json"
    check_file_size(path, MAX_LINE_BYTES, str(path))
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise hf_config.HFConfigError(f"{path}: not valid UTF-8 JSON ({type(e).__name__}: {str(e)[:200]})") from e
    files = hf_weights.weight_files(directory)
    keys = hf_weights.checkpoint_keys(files)
    layout = hf_weights.detect_layout(keys)
    if layout.name == "original":
        return (hf_config.from_original(d, hf_weights.count_vision_layers(keys, layout), where=str(path)),
                layout.name)
    return hf_config.from_llava_hf(d, where=str(path)), layout.name


def load_pretrained(path: str | epath.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
                    rules: str | Mapping[str, Any] | None = None) -> LlavaNextModel:
    """Load a LlavaNextModel from a HF (llava-hf or original) dir, an instit-jax checkpoint dir or a
    training workdir (its latest checkpoint).

    dtype overrides the compute dtype ("bfloat16"); params keep the config's param_dtype.
    """
    from instit_jax.train import checkpoint as train_ckpt  # training workdirs: latest checkpoint

    if train_ckpt.is_workdir(str(path)):
        model = train_ckpt.model_from_workdir(str(path), dtype=dtype)
        if mesh is not None:
            params = nnx.state(model, nnx.Param)
            placed = jax.device_put(nnx.to_pure_dict(params), shd.param_shardings(params, mesh, rules or "fsdp"))
            nnx.replace_by_pure_dict(params, placed)
            nnx.update(model, params)
        return model
    path = epath.Path(path)
    if (path / orbax_io.CONFIG_NAME).exists():
        cfg = orbax_io.read_config(path)
        layout = None
    elif (path / "config.json").exists():
        path = Path(str(path))  # safetensors reads local files
        cfg, layout = read_hf_config(path)
    else:
        raise FileNotFoundError(f"{path}: no {orbax_io.CONFIG_NAME} (instit-jax checkpoint) or config.json "
                                "(Hugging Face checkpoint)")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    shardings = None
    if mesh is not None:  # the trainer's resolver, keyed by param path
        abstract = nnx.eval_shape(lambda: LlavaNextModel(cfg, rngs=nnx.Rngs(0)))
        tree = shd.param_shardings(nnx.state(abstract, nnx.Param), mesh, rules or "fsdp")
        shardings = {shd.path_key(p): s for p, s in jax.tree_util.tree_leaves_with_path(tree)}
    if layout is None:
        return orbax_io.load_checkpoint(path, cfg, shardings.__getitem__ if shardings else None)
    place = (lambda p, a: jax.device_put(a, shardings[p])) if shardings else None
    return hf_weights.load_hf_weights(path, cfg, hf_weights.LAYOUTS[layout], place)


def save_pretrained(model: LlavaNextModel, directory: str | epath.PathLike, tokenizer=None) -> epath.Path:
    """Save in our layout: instit_config.json + params/ (Orbax) + optional tokenizer.

    A model with LoRA layers is saved merged (W + scale * A @ B), as a plain LlavaNextModel."""
    return orbax_io.save_checkpoint(lora.merged_copy(model), directory, tokenizer)


def load_tokenizer(path: str | epath.PathLike):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a directory holding one (local or gs://)."""
    from tokenizers import Tokenizer

    path = epath.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no tokenizer.json (only fast tokenizers are supported)")
    return Tokenizer.from_str(file.read_text())
