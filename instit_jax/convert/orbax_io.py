"""Our checkpoint layout: `instit_config.json` + `params/` (Orbax StandardCheckpointer of the param
nnx.State) + optional tokenizer files (the checkpoint folder of docs/architecture.md). Directories may be local or remote
(gs://...): paths are etils.epath paths, which keep the URL scheme."""
from __future__ import annotations

import json
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from instit_jax.models.config import LlavaConfig
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.sharding import path_key

CONFIG_NAME = "instit_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "processor_config.json", "preprocessor_config.json")


def directory_path(directory: str | epath.PathLike) -> epath.Path:
    """An epath.Path for a checkpoint directory: URLs (gs://...) as given, local paths made absolute."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else path.absolute()


def copy_tokenizer_files(src: str | epath.PathLike, dst: str | epath.PathLike) -> list[str]:
    """Copy the tokenizer/processor files that exist in src to dst. Returns their names."""
    src, dst = epath.Path(src), epath.Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            (src / name).copy(dst / name, overwrite=True)
            copied.append(name)
    return copied


def save_checkpoint(model: LlavaNextModel, directory: str | epath.PathLike, tokenizer=None) -> epath.Path:
    """Write config + Orbax params (+ tokenizer: a tokenizers.Tokenizer, a tokenizer.json path or a dir)."""
    directory = directory_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(model.cfg.to_json())
    params_dir = directory / PARAMS_DIR
    if params_dir.exists():
        params_dir.rmtree()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, nnx.state(model, nnx.Param))
        ckptr.wait_until_finished()
    if tokenizer is not None:
        if hasattr(tokenizer, "to_str"):
            (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))
        elif epath.Path(tokenizer).is_dir():
            copy_tokenizer_files(tokenizer, directory)
        else:
            epath.Path(tokenizer).copy(directory / "tokenizer.json", overwrite=True)
    return directory


def read_config(directory: str | epath.PathLike) -> LlavaConfig:
    """instit_config.json -> LlavaConfig (clear error when absent)."""
    path = epath.Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not an instit-jax checkpoint directory")
    return LlavaConfig.from_dict(json.loads(path.read_text()))


def load_checkpoint(directory: str | epath.PathLike, cfg: LlavaConfig | None = None,
                    sharding_of: Callable[[str], jax.sharding.Sharding] | None = None) -> LlavaNextModel:
    """Restore a model saved by `save_checkpoint`; `sharding_of(path)` gives each param's target sharding."""
    directory = directory_path(directory)
    cfg = cfg or read_config(directory)
    abstract = nnx.eval_shape(lambda: LlavaNextModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if sharding_of is not None:
        flat = nnx.to_flat_state(params)
        for path, var in flat:
            v = var.get_value()
            var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_of(path_key(path))))
        params = nnx.from_flat_state(flat)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / PARAMS_DIR, params)
    return nnx.merge(graphdef, restored, rest)
