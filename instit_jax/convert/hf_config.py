"""Hugging Face config.json (llava-hf or original LLaVA-NeXT) <-> LlavaConfig.

Hub configs omit fields equal to transformers' defaults, so each family's defaults are filled in here.
Original LLaVA-NeXT configs name the vision tower only by hub id; its shape comes from a known preset
(CLIP-L/14-336, SigLIP-SO400M-14-384) or from an explicit `vision_config` dict in config.json, and the
layer count present in the weights. Original checkpoints mark images with IMAGE_TOKEN_INDEX = -200.
"""
from __future__ import annotations

import math
import re
from typing import Any

from data_gen.confine import InputRejected
from instit_jax.models.config import LlavaConfig, TextConfig, VisionConfig


class HFConfigError(InputRejected):
    """A config.json cannot describe a model we build: a wrong type, an unknown family, a field out of range."""


# (lowest, highest) accepted value per field: far beyond any released model, small enough that a config
# cannot ask for an unbounded allocation.
VISION_RANGES = {"image_size": (1, 8192), "patch_size": (1, 1024), "num_channels": (1, 16),
                 "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18), "num_hidden_layers": (1, 512),
                 "num_attention_heads": (1, 1024)}
TEXT_RANGES = {"vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 20),
               "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
               "max_position_embeddings": (1, 1 << 24)}
MAX_PINPOINTS, MAX_PINPOINT_SIDE = 1024, 1 << 15


def _check_int(value: Any, name: str, lo: int, hi: int, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HFConfigError(f"{where}: {name} must be an integer, got {value!r:.40}")
    if not lo <= value <= hi:
        raise HFConfigError(f"{where}: {name} = {value} is out of range [{lo}, {hi}]")


def _check_positive(value: Any, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise HFConfigError(f"{where}: {name} must be a finite positive number, got {value!r:.40}")


def check_config_ranges(cfg: LlavaConfig, where: str = "config.json") -> LlavaConfig:
    """``cfg`` unchanged, or HFConfigError naming the first field of a size we refuse to build."""
    v, t = cfg.vision, cfg.text
    for name, (lo, hi) in VISION_RANGES.items():
        _check_int(getattr(v, name), f"vision_config.{name}", lo, hi, where)
    for name, (lo, hi) in TEXT_RANGES.items():
        _check_int(getattr(t, name), f"text_config.{name}", lo, hi, where)
    if v.patch_size > v.image_size:
        raise HFConfigError(f"{where}: vision_config.patch_size {v.patch_size} exceeds image_size {v.image_size}")
    if v.hidden_size % v.num_attention_heads:
        raise HFConfigError(f"{where}: vision_config.hidden_size {v.hidden_size} is not a multiple of "
                            f"num_attention_heads {v.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
        raise HFConfigError(f"{where}: text_config.num_attention_heads {t.num_attention_heads} is not a multiple "
                            f"of num_key_value_heads {t.num_key_value_heads}")
    if t.head_dim is None:
        if t.hidden_size % t.num_attention_heads:
            raise HFConfigError(f"{where}: text_config.hidden_size {t.hidden_size} is not a multiple of "
                                f"num_attention_heads {t.num_attention_heads} (give head_dim)")
    else:
        _check_int(t.head_dim, "text_config.head_dim", 1, 4096, where)
    _check_positive(t.rope_theta, "text_config.rope_theta", where)
    _check_positive(t.rms_norm_eps, "text_config.rms_norm_eps", where)
    _check_positive(v.layer_norm_eps, "vision_config.layer_norm_eps", where)
    _check_int(cfg.vision_feature_layer, "vision_feature_layer", -v.num_hidden_layers - 1, v.num_hidden_layers,
               where)
    _check_int(cfg.video_pool_stride, "video_pool_stride", 1, 64, where)
    for name in ("image_token_id", "video_token_id"):
        val = getattr(cfg, name)
        if val is not None and val != ORIGINAL_IMAGE_TOKEN_INDEX:
            _check_int(val, name, 0, 1 << 24, where)
    pins = cfg.image_grid_pinpoints
    if len(pins) > MAX_PINPOINTS:
        raise HFConfigError(f"{where}: {len(pins)} image_grid_pinpoints exceed {MAX_PINPOINTS}")
    for p in pins:
        for side in p:
            _check_int(side, "image_grid_pinpoints entry", 1, MAX_PINPOINT_SIDE, where)
    return cfg


def _checked(build, d: Any, where: str, *args) -> LlavaConfig:
    if not isinstance(d, dict):
        raise HFConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    try:
        cfg = build(d, *args)
    except HFConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:
        raise HFConfigError(f"{where}: {e}") from e
    return check_config_ranges(cfg, where)

ORIGINAL_IMAGE_TOKEN_INDEX = -200

_VISION_DEFAULTS = {
    "clip": dict(image_size=224, patch_size=32, num_channels=3, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip": dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768, intermediate_size=3072,
                   num_hidden_layers=12, num_attention_heads=12, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                  attention_bias=False, hidden_act="silu"),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                  attention_bias=True, hidden_act="silu"),
}
VISION_PRESETS = {
    "clip-vit-large-patch14-336": dict(model_type="clip", image_size=336, patch_size=14, hidden_size=1024,
                                       intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "siglip-so400m-patch14-384": dict(model_type="siglip", image_size=384, patch_size=14, hidden_size=1152,
                                      intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}


def _vision_from_dict(vc: dict[str, Any], num_layers: int | None = None) -> VisionConfig:
    mt = str(vc.get("model_type", "clip"))
    kind = "siglip" if "siglip" in mt else "clip" if "clip" in mt else None
    if kind is None:
        raise ValueError(f"vision_config.model_type {mt!r} is not CLIP or SigLIP")
    fields = {k: vc.get(k, v) for k, v in _VISION_DEFAULTS[kind].items()}
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    return VisionConfig(model_type=kind, **fields)


def _text_from_dict(tc: dict[str, Any], top: dict[str, Any]) -> TextConfig:
    mt = str(tc.get("model_type", "llama"))
    if mt not in _TEXT_DEFAULTS:
        raise ValueError(f"text model_type {mt!r} unsupported (llama or qwen2)")
    fields = {k: tc.get(k, v) for k, v in _TEXT_DEFAULTS[mt].items()}
    if mt == "qwen2":
        fields["attention_bias"] = True  # Qwen2 always has q/k/v biases
    rope = tc.get("rope_parameters") or {}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"rope_type {rope.get('rope_type')!r} unsupported (only default RoPE)")
    tie = tc.get("tie_word_embeddings", top.get("tie_word_embeddings", False))
    return TextConfig(
        model_type=mt, num_key_value_heads=tc.get("num_key_value_heads") or fields["num_attention_heads"],
        head_dim=tc.get("head_dim"), tie_word_embeddings=bool(tie), **fields)


def from_llava_hf(d: dict[str, Any], where: str = "config.json") -> LlavaConfig:
    """llava-hf config.json (llava, llava_next or llava_onevision) -> LlavaConfig; HFConfigError naming ``where``."""
    return _checked(_from_llava_hf, d, where)


def _from_llava_hf(d: dict[str, Any]) -> LlavaConfig:
    mt = d.get("model_type")
    if mt not in ("llava", "llava_next", "llava_onevision"):
        raise ValueError(f"config.json model_type {mt!r}: expected llava, llava_next or llava_onevision")
    single = mt == "llava"  # LLaVA-1.5: one padded view, no image_newline
    layer = d.get("vision_feature_layer", -1 if mt == "llava_onevision" else -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    onevision = mt == "llava_onevision"
    pins = d.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    vision = _vision_from_dict(d.get("vision_config") or {})
    strategy = d.get("vision_feature_select_strategy", "full" if onevision else "default")
    if vision.model_type == "siglip" and strategy == "default":
        raise ValueError("config.json: a SigLIP vision tower has no CLS token, so vision_feature_select_strategy "
                         "'default' (drop the first token) would drop a patch of every tile; transformers "
                         "rejects this config too. Set it to 'full'.")
    return LlavaConfig(
        vision=vision,
        text=_text_from_dict(d.get("text_config") or {}, d),
        image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
        video_token_id=d.get("video_token_id", d.get("video_token_index")) if onevision else None,
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_aspect_ratio="single" if single else d.get("vision_aspect_ratio", "anyres_max_9") if onevision
        else "anyres",
        image_grid_pinpoints=tuple(tuple(int(v) for v in p) for p in pins),
        use_image_newline=not single,
        video_pooling="bilinear", video_pool_stride=2,
        video_newline="one_token" if onevision else "no_token",
    )


def to_llava_hf(cfg: LlavaConfig) -> dict[str, Any]:
    """LlavaConfig -> llava-hf config.json dict (llava_onevision when it has a video token or anyres_max)."""
    onevision = cfg.video_token_id is not None or cfg.image_aspect_ratio.startswith("anyres_max_")
    single = cfg.image_aspect_ratio == "single" and not onevision
    v, t = cfg.vision, cfg.text
    vision = dict(model_type="clip_vision_model" if v.model_type == "clip" else "siglip_vision_model",
                  image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                  hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
    if v.model_type == "siglip":
        vision["vision_use_head"] = False
    text = dict(model_type=t.model_type, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
                rope_parameters={"rope_theta": t.rope_theta, "rope_type": "default"},
                tie_word_embeddings=t.tie_word_embeddings, hidden_act=t.hidden_act)
    if t.head_dim is not None:
        text["head_dim"] = t.head_dim
    if t.model_type == "llama":
        text["attention_bias"] = t.attention_bias
    out = dict(
        architectures=["LlavaOnevisionForConditionalGeneration" if onevision else "LlavaNextForConditionalGeneration"],
        model_type="llava_onevision" if onevision else "llava_next",
        vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
        projector_hidden_act=cfg.projector_hidden_act, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
        tie_word_embeddings=t.tie_word_embeddings, multimodal_projector_bias=True,
    )
    if single:
        out.update(architectures=["LlavaForConditionalGeneration"], model_type="llava")
        del out["image_grid_pinpoints"]
    if onevision:
        out["video_token_index"] = cfg.video_token_id
        out["vision_aspect_ratio"] = cfg.image_aspect_ratio
    return out


def _parse_pinpoints(pins, tile: int) -> tuple[tuple[int, int], ...]:
    """Original pinpoints are (width, height) pairs or a '(1x1),...,(3x3)' range string; -> (h, w) pairs."""
    if isinstance(pins, str):
        found = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", pins)]
        if len(found) < 2:
            raise ValueError(f"cannot parse image_grid_pinpoints {pins!r}")
        (a0, b0), (a1, b1) = found[0], found[-1]
        return tuple((j * tile, i * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1))
    return tuple((int(p[1]), int(p[0])) for p in pins)


def from_original(d: dict[str, Any], vision_layers: int | None = None, where: str = "config.json") -> LlavaConfig:
    """Original LLaVA-NeXT config.json (LlavaLlama / LlavaQwen) -> LlavaConfig; HFConfigError naming ``where``."""
    return _checked(_from_original, d, where, vision_layers)


def _from_original(d: dict[str, Any], vision_layers: int | None = None) -> LlavaConfig:
    tower = str(d.get("mm_vision_tower") or d.get("vision_tower") or "")
    if isinstance(d.get("vision_config"), dict):
        vision = _vision_from_dict(d["vision_config"], vision_layers)
    else:
        preset = next((p for name, p in VISION_PRESETS.items() if name in tower), None)
        if preset is None:
            raise ValueError(f"unknown vision tower {tower!r}: add a 'vision_config' dict to config.json")
        vision = _vision_from_dict({**preset, "model_type": preset["model_type"]}, vision_layers)
    if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {d.get('mm_projector_type')!r} unsupported (only mlp2x_gelu)")
    arch = " ".join(d.get("architectures") or []) + " " + str(d.get("model_type", ""))
    text_type = "qwen2" if "qwen" in arch.lower() else "llama"
    text = _text_from_dict({**d, "model_type": text_type}, d)
    siglip = vision.model_type == "siglip"
    aspect = str(d.get("image_aspect_ratio", "anyres"))
    if aspect == "pad":
        aspect = "single"
    pins = d.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    return LlavaConfig(
        vision=vision, text=text, image_token_id=ORIGINAL_IMAGE_TOKEN_INDEX, video_token_id=None,
        projector_hidden_act="gelu",
        # the reference's SigLIP tower drops its last block and ignores mm_vision_select_layer
        vision_feature_layer=-1 if siglip else int(d.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="full" if siglip or d.get("mm_vision_select_feature") == "cls_patch"
        else "default",
        image_aspect_ratio=aspect,
        image_grid_pinpoints=_parse_pinpoints(pins, vision.image_size),
        use_image_newline="unpad" in str(d.get("mm_patch_merge_type", "spatial_unpad")),
        video_pooling=d.get("mm_spatial_pool_mode", "bilinear"),
        video_pool_stride=int(d.get("mm_spatial_pool_stride", 2)),
        video_newline=d.get("mm_newline_position", "one_token"),  # LLaVA-NeXT's default when absent
    )
