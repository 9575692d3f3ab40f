"""Load a recipe file with `--config.a.b=value` overrides, validate it, and derive the model's
LlavaConfig (what the network is) and ComputeConfig (how it computes)."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from instit_jax import processing
from instit_jax.chat_template import MASK_POLICIES
from instit_jax.models.config import ComputeConfig, LlavaConfig, TextConfig, VisionConfig
from instit_jax.models.llm import ATTENTION_IMPLS
from instit_jax.models.lora import LORA_TARGETS
from instit_jax.models.remat import REMAT_POLICIES
from instit_jax.models.weight_grads import DOT_DTYPES

RULE_TABLES = ("fsdp", "fsdp_tp", "replicated")
DTYPES = ("float32", "bfloat16", "float16")
MU_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """An invalid training configuration (the message names the field and the fix)."""


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Read `path` (a file with get_config()) and apply overrides like "optim.lr=1e-5"; validate.

    Overrides use ml_collections' flag syntax, so types are parsed like `--config.optim.lr=1e-5` and an
    unknown field raises at once.
    """
    argv = ["instit", f"--config={path}"]
    for o in overrides:
        o = o[len("--config."):] if o.startswith("--config.") else o
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form field.path=value")
        argv.append(f"--config.{o}")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        if "Error whilst parsing config file" in str(e):  # get_config raised: its own message, no traceback
            raise ConfigError(f"{path}: {str(e).strip().splitlines()[-1]}") from e
        msg = " ".join(re.sub(r"[\\'\"]+", " ", re.sub(r"\\+n|\n", " ", str(e))).split())
        raise ConfigError(f"{path}: bad override in {argv[2:]}: {msg}") from e
    config = fv.config
    validate(config)
    return config


def llava_config(config: ml_collections.ConfigDict) -> LlavaConfig:
    """The `model` section as a LlavaConfig: each field from the key of the same name (video_token_id -1 ->
    None, head_dim 0 -> None); the section's other keys are compute choices (`compute_config`)."""
    m = config.model
    text = m.text.to_dict()
    text["head_dim"] = text["head_dim"] or None
    glue = {f.name: m[f.name] for f in dataclasses.fields(LlavaConfig) if f.name not in ("vision", "text")}
    glue["video_token_id"] = None if glue["video_token_id"] < 0 else glue["video_token_id"]
    glue["image_grid_pinpoints"] = tuple(tuple(p) for p in glue["image_grid_pinpoints"])
    return LlavaConfig(vision=VisionConfig(**m.vision.to_dict()), text=TextConfig(**text), **glue)


def compute_config(config: ml_collections.ConfigDict, platform: str | None = None) -> ComputeConfig:
    """How the model computes, from the keys recipes write: model.attention_impl,
    model.attention_block_size, train.remat, train.vision_chunk_views, train.mlp_sequence_pieces,
    train.vocab_parallel_loss, model.dot_dtype; `platform` (the mesh's devices): "cpu" turns on
    direct_weight_grads."""
    m, t = config.model, config.train
    return ComputeConfig(
        attention_impl=m.attention_impl,
        attention_block_size=m.get("attention_block_size", 512),
        remat_policy=t.remat,
        vision_chunk_views=t.vision_chunk_views,
        mlp_sequence_pieces=t.mlp_sequence_pieces,
        vocab_parallel_head=t.vocab_parallel_loss,
        direct_weight_grads=platform == "cpu",
        dot_dtype=m.get("dot_dtype", ""),
    )


def _check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {msg}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject invalid combinations with a message naming the field; returns None when fine."""
    m, o, f, t, d, mesh = config.model, config.optim, config.freeze, config.train, config.data, config.mesh
    _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} not in {DTYPES}")
    _check(m.get("dot_dtype", "") in DOT_DTYPES, "model.dot_dtype",
           f"{m.get('dot_dtype', '')!r} not in {DOT_DTYPES} ('' = model.dtype)")
    _check(m.param_dtype == "float32", "model.param_dtype",
           "master weights must be float32 (bf16 compute is model.dtype)")
    _check(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
           f"{m.attention_impl!r} not in {ATTENTION_IMPLS} (blockwise: memory-saving flash attention)")
    block = m.get("attention_block_size", 512)
    _check(block >= 8 and block % 8 == 0, "model.attention_block_size", f"{block} must be a positive multiple of 8")
    _check(config.optim.mu_dtype in MU_DTYPES, "optim.mu_dtype",
           f"{config.optim.mu_dtype!r} not in {MU_DTYPES} (Adam first-moment dtype)")
    _check(config.train.vision_chunk_views >= 0, "train.vision_chunk_views",
           "must be >= 0 (0 = all tiles/frames through the vision tower at once)")
    _check(config.train.mlp_sequence_pieces >= 0, "train.mlp_sequence_pieces",
           "must be >= 0 (0 = decoder MLPs over the whole sequence at once)")
    v, tx = m.vision, m.text
    _check(v.image_size >= v.patch_size, "model.vision.image_size",
           f"{v.image_size} is smaller than patch_size {v.patch_size}")
    _check(v.hidden_size % v.num_attention_heads == 0, "model.vision.hidden_size",
           "must divide by num_attention_heads")
    _check(tx.num_attention_heads % tx.num_key_value_heads == 0, "model.text.num_key_value_heads",
           "must divide num_attention_heads")
    _check(0 <= m.image_token_id < tx.vocab_size, "model.image_token_id",
           f"{m.image_token_id} outside the vocabulary [0, {tx.vocab_size})")
    _check(v.model_type != "siglip" or m.vision_feature_select_strategy == "full",
           "model.vision_feature_select_strategy",
           "a SigLIP tower has no class token: use 'full' ('default' drops the first patch of every tile)")
    _check(-v.num_hidden_layers <= m.vision_feature_layer < v.num_hidden_layers, "model.vision_feature_layer",
           f"{m.vision_feature_layer} does not name one of {v.num_hidden_layers} blocks")
    _check(0 <= f.frozen_vision_layers <= v.num_hidden_layers, "freeze.frozen_vision_layers",
           f"{f.frozen_vision_layers} not in [0, {v.num_hidden_layers}]")
    _check(f.train_vision or f.train_projector or f.train_llm, "freeze",
           "nothing trains: set one of train_vision / train_projector / train_llm")
    for name in ("lr", "vision_lr", "weight_decay", "grad_clip", "z_loss", "eps"):
        _check(o[name] >= 0, f"optim.{name}", "must be >= 0")
    _check(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    _check(o.schedule in ("cosine", "constant"), "optim.schedule", f"{o.schedule!r} unknown")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", "Adam betas must be in [0, 1)")
    _check(t.remat in REMAT_POLICIES, "train.remat", f"{t.remat!r} not in {tuple(REMAT_POLICIES)}")
    _check(t.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    _check(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
    _check(t.log_every > 0 and t.checkpoint_every > 0, "train.log_every/checkpoint_every", "must be > 0")
    _check(t.keep_checkpoints > 0, "train.keep_checkpoints", "must be > 0")
    _check(t.keep_best_checkpoints >= 0, "train.keep_best_checkpoints", "must be >= 0")
    _check(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be > 0")
    _check(mesh.rules in RULE_TABLES, "mesh.rules", f"{mesh.rules!r} not in {RULE_TABLES}")
    _check(mesh.distributed in ("auto", "on", "off"), "mesh.distributed", "must be auto, on or off")
    for ax in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor"):
        _check(mesh[ax] == -1 or mesh[ax] >= 1, f"mesh.{ax}", "must be >= 1 or -1 (fill)")
    _check([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1, "mesh",
           "at most one of data/fsdp/tensor may be -1")
    _check(tx.num_key_value_heads % mesh.tensor == 0 if mesh.tensor > 0 else True, "mesh.tensor",
           f"{mesh.tensor} does not divide model.text.num_key_value_heads={tx.num_key_value_heads}")
    _check(d.kind in ("grain", "random"), "data.kind", f"{d.kind!r} not in ('grain', 'random')")
    _check(d.max_tokens > 1, "data.max_tokens", "must be > 1")
    _check(d.mask_policy in MASK_POLICIES, "data.mask_policy", f"must be one of {MASK_POLICIES}")
    _check(d.max_tiles >= 1 or not d.images_per_batch, "data.max_tiles", "must be >= 1 with images")
    _check(d.max_frames >= 1 or not d.videos_per_batch, "data.max_frames", "must be >= 1 with videos")
    _check(d.max_tokens <= tx.max_position_embeddings or tx.model_type == "llama", "data.max_tokens",
           f"{d.max_tokens} > model.text.max_position_embeddings={tx.max_position_embeddings}")
    if d.kind == "grain":
        _check(len(d.sources) > 0, "data.sources", "no data source (add one with configs.base.add_source)")
        _check(bool(config.init.tokenizer or config.init.checkpoint), "init.tokenizer",
               "the Grain pipeline needs a tokenizer: set init.tokenizer (tokenizer.json) or init.checkpoint")
        for name, src in d.sources.items():
            _check(bool(re.match(r"^[A-Za-z0-9_.-]+$", name)), f"data.sources.{name}", "bad source name")
            _check(src.weight > 0, f"data.sources.{name}.weight", "must be > 0")
            _check(bool(src.path), f"data.sources.{name}.path", "empty path")
    _check(m.video_pool_stride >= 1, "model.video_pool_stride", "must be >= 1")
    if d.get("packing", False):
        _check(d.kind == "grain", "data.packing", "packs Grain TFRecord sources (data.kind='grain')")
        _check(d.max_views >= 0, "data.max_views", "must be >= 0 (0 = max_tiles + max_frames)")
        _check(d.packing_bins >= 0, "data.packing_bins", "must be >= 0 (0 = 4 x the per-host batch)")
        _check(processing.max_num_patches(str(m.image_aspect_ratio)) is None, "data.packing",
               f"model.image_aspect_ratio={m.image_aspect_ratio!r}: anyres_max_N token plans mix 4 feature rows "
               "per token, which packed rows do not carry")
    if "lora" in config:
        validate_lora(config)


def lora_rank(config: ml_collections.ConfigDict) -> int:
    """config.lora.rank, 0 (LoRA off) when the config has no lora section."""
    return int(config.lora.rank) if "lora" in config else 0


def validate_lora(config: ml_collections.ConfigDict) -> None:
    """Check the `lora` section (rank 0 = off: full tuning of the language model)."""
    lo = config.lora
    _check(isinstance(lo.rank, int) and lo.rank >= 0, "lora.rank", f"{lo.rank!r} must be an integer >= 0 (0 = off)")
    if lo.rank == 0:
        return
    _check(lo.alpha > 0, "lora.alpha", f"{lo.alpha} must be > 0 (the update is scaled by alpha / rank)")
    _check(0 <= lo.dropout < 1, "lora.dropout", f"{lo.dropout} must be in [0, 1)")
    targets = (lo.targets,) if isinstance(lo.targets, str) else tuple(lo.targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    _check(bool(targets) and not unknown, "lora.targets",
           f"unknown {unknown or 'empty list'}; choose from {list(LORA_TARGETS)}")
    _check(config.freeze.train_llm, "freeze.train_llm",
           "LoRA trains the language model through its low-rank factors: set freeze.train_llm=True "
           "(or lora.rank=0 to keep the language model frozen)")


def check_batch_geometry(config: ml_collections.ConfigDict, num_batch_shards: int) -> tuple[int, int]:
    """(per_shard_batch, num_microbatches) for a mesh whose batch axes have `num_batch_shards` shards."""
    t = config.train
    g = t.global_batch_size
    _check(g % num_batch_shards == 0, "train.global_batch_size",
           f"{g} does not divide over {num_batch_shards} batch shards (mesh data x fsdp)")
    per_shard = g // num_batch_shards
    mb = min(t.micro_batch_size, per_shard) if t.micro_batch_size else per_shard  # a cap: big pods hold fewer
    _check(per_shard % mb == 0, "train.micro_batch_size",
           f"{mb} does not divide the per-device batch {per_shard}")
    return per_shard, per_shard // mb
