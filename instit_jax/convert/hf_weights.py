"""Stream Hugging Face safetensors into a LlavaNextModel, and write one back (llava-hf layout).

Loading builds the model abstractly (`nnx.eval_shape`, no random init), then reads one safetensors
file at a time and one tensor at a time, checks its shape against the table, transforms it and
(optionally) places it straight onto its target sharding, so the host never holds two full copies.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from data_gen.confine import MAX_JSON_BYTES, check_file_size, confine
from instit_jax.convert.hf import (
    LAYOUTS,
    Layout,
    canonical_key,
    hf_shape,
    is_dropped,
    key_table,
    to_hf,
    to_ours,
)
from instit_jax.convert.safetensors_header import CheckpointFileError, check_safetensors
from instit_jax.models import lora
from instit_jax.models.config import LlavaConfig
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.sharding import path_key

INDEX = "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir (index order); refuses pickle `.bin` checkpoints."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        index = directory / INDEX
        check_file_size(index, MAX_JSON_BYTES, str(index))
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointFileError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
        if not all(isinstance(f, str) for f in names):
            raise CheckpointFileError(f"{index}: weight_map values must be file names")
        files = [confine(f, directory, f"{index}: weight_map file") for f in names]
        for f in files:
            if not f.is_file():
                raise CheckpointFileError(f"{index}: weight_map names {f.name!r}, which is not a file in {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise ValueError(f"{directory}: only PyTorch pickle weights (*.bin/*.pt) found; they are not loaded (unsafe "
                         "and slow). Re-save with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{directory}: no *.safetensors weights found")


def _open_safetensors(f: Path):
    """safe_open after our header checks; whatever the reader still refuses becomes CheckpointFileError."""
    from safetensors import SafetensorError, safe_open

    check_safetensors(f)
    try:
        return safe_open(str(f), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFileError(f"{f}: not a readable safetensors file ({str(e)[:200]})") from e


def checkpoint_keys(files: list[Path]) -> list[str]:
    """All tensor names (reads headers only)."""
    keys: list[str] = []
    for f in files:
        with _open_safetensors(f) as sf:
            keys.extend(sf.keys())
    return keys


def detect_layout(keys: list[str]) -> Layout:
    """'original' when the LLaVA training layout's projector keys are present, else 'llava-hf'."""
    return LAYOUTS["original"] if any(k.startswith("model.mm_projector.") for k in keys) else LAYOUTS["llava-hf"]


def count_vision_layers(keys: list[str], layout: Layout) -> int | None:
    """Number of vision blocks present in the weights (None when there are none)."""
    pat = re.compile(re.escape(layout.vision) + r"encoder\.layers\.(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pat.match(canonical_key(k, layout)))]
    return max(found) + 1 if found else None


def _flat_vars(state: nnx.State) -> dict[str, nnx.Variable]:
    """Param key (`sharding.path_key`) -> its Variable."""
    return {path_key(path): var for path, var in nnx.to_flat_state(state)}


def load_hf_weights(directory: Path, cfg: LlavaConfig, layout: Layout,
                    place: Callable[[str, np.ndarray], jax.Array] | None = None) -> LlavaNextModel:
    """Build a LlavaNextModel from a HF checkpoint dir; `place(path, array)` puts a param on devices."""
    abstract = nnx.eval_shape(lambda: LlavaNextModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    targets = {path_key(path): var for path, var in flat}  # the Variables filled in place
    table = key_table(cfg, layout)
    extra = set(targets) - {p for p, _ in table.values()} - ({"image_newline"} if not cfg.use_image_newline else set())
    if extra:
        raise RuntimeError(f"conversion table ({layout.name}) misses model params: {sorted(extra)[:5]}")
    channels = cfg.vision.num_channels
    seen: dict[str, str] = {}
    for f in weight_files(directory):
        with _open_safetensors(f) as sf:
            for key in sf.keys():
                ck = canonical_key(key, layout)
                if ck not in table:
                    if is_dropped(ck) or (cfg.text.tie_word_embeddings and ck == layout.lm_head):
                        continue
                    raise KeyError(f"{f}: tensor {key!r} has no place in the model (layout {layout.name}, "
                                   f"{cfg.vision.model_type}+{cfg.text.model_type}); wrong config or layout?")
                path, transform = table[ck]
                if path in seen:
                    raise KeyError(f"{f}: tensor {key!r} duplicates {seen[path]!r} (both map to {path})")
                var = targets[path]
                spec = var.get_value()
                want = hf_shape(spec.shape, transform, channels)
                arr = sf.get_tensor(key)
                if tuple(arr.shape) != want:
                    raise ValueError(f"{f}: tensor {key!r} has shape {tuple(arr.shape)}, expected {want} "
                                     f"for param {path} (check config.json)")
                value = np.ascontiguousarray(to_ours(arr, transform)).astype(spec.dtype)
                var.set_value(place(path, value) if place else jax.numpy.asarray(value))
                seen[path] = key
    if "image_newline" not in seen and not cfg.use_image_newline:  # LLaVA-1.5 style checkpoints have none
        var = targets["image_newline"]
        zeros = np.zeros(var.get_value().shape, var.get_value().dtype)
        var.set_value(place("image_newline", zeros) if place else jax.numpy.asarray(zeros))
        seen["image_newline"] = "(absent: zeros)"
    missing = [hf for hf, (p, _) in table.items() if p not in seen]
    if missing:
        raise KeyError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_hf_weights(model: LlavaNextModel, out: Path, *, max_shard_bytes: int = 5 * 2**30,
                    dtype: np.dtype | None = None) -> list[str]:
    """Write the llava-hf safetensors (sharded + index when over max_shard_bytes). Returns file names."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = lora.merged_copy(model)  # LoRA layers are exported folded into their base weights
    cfg = model.cfg
    reverse = {p: (hf, t) for hf, (p, t) in key_table(cfg, LAYOUTS["llava-hf"]).items()}
    params = _flat_vars(nnx.state(model, nnx.Param))
    if not cfg.use_image_newline:
        params.pop("image_newline")
    unknown = set(params) - set(reverse)
    if unknown:
        raise RuntimeError(f"no HF name for params {sorted(unknown)[:5]}")
    shards: list[list[str]] = [[]]
    size = 0
    for path in sorted(params, key=lambda p: reverse[p][0]):
        nbytes = params[path].get_value().size * (np.dtype(dtype).itemsize if dtype else
                                                  params[path].get_value().dtype.itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(path)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, paths in zip(names, shards):
        tensors = {}
        for path in paths:
            hf, transform = reverse[path]
            value = np.asarray(jax.device_get(params[path].get_value()))
            if dtype is not None:
                value = value.astype(dtype)
            tensors[hf] = np.ascontiguousarray(to_hf(value, transform, cfg.vision.num_channels))
            weight_map[hf] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    if len(names) > 1:
        total = sum(int(np.prod(v.get_value().shape)) * v.get_value().dtype.itemsize for v in params.values())
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names
