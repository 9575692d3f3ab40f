"""Model configuration dataclasses shared by the towers, the decoders, the glue and the converters.

`VisionConfig`, `TextConfig` and `LlavaConfig` describe the network (what a checkpoint's config holds);
field names follow Hugging Face's config.json where one exists, so conversion is a rename.
`ComputeConfig` says how the model computes (attention kernels, rematerialisation, chunking, the LM head's
layout): `LlavaNextModel(cfg, compute=...)` applies it in its modules. It never changes the function the
model computes (up to float rounding) and is never saved with a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

VICUNA_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP or SigLIP vision transformer."""

    model_type: Literal["clip", "siglip"] = "clip"  # "clip" or "siglip"
    image_size: int = 336  # input side in pixels (one tile / one frame)
    patch_size: int = 14  # ViT patch side in pixels
    num_channels: int = 3  # RGB
    hidden_size: int = 1024  # tower width
    intermediate_size: int = 4096  # MLP width
    num_hidden_layers: int = 24  # blocks present in the checkpoint
    num_attention_heads: int = 16  # attention heads
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    hidden_act: str = "quick_gelu"  # CLIP: quick_gelu; SigLIP: gelu_pytorch_tanh

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Llama/Vicuna or Qwen2 decoder."""

    model_type: Literal["llama", "qwen2"] = "llama"  # "llama" (Vicuna) or "qwen2"
    vocab_size: int = 32064  # embedding rows (llava-hf pads Vicuna's 32000 to 32064)
    hidden_size: int = 4096  # decoder width
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32  # decoder blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 32  # key/value heads (GQA when smaller)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (10_000 Llama-2/Vicuna, 1_000_000 Qwen2)
    max_position_embeddings: int = 4096  # longest position the checkpoint was trained for
    attention_bias: bool = False  # Qwen2: True (q/k/v biases)
    tie_word_embeddings: bool = False  # share embed_tokens with lm_head
    hidden_act: str = "silu"  # MLP activation
    # std of the normal init of every decoder matrix and the embedding (HF's `initializer_range`). 0.02
    # suits 4K-wide models; a small from-scratch decoder learns attention far faster near 1/sqrt(width).
    initializer_range: float = 0.02

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA-NeXT (anyres) / LLaVA-OneVision / LLaVA-1.5 (single view) glue."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 32000
    video_token_id: int | None = None  # OneVision uses a separate <video> token; None -> image_token_id
    projector_hidden_act: str = "gelu"
    # Which hidden state of the vision tower feeds the projector (-2 = penultimate, CLIP's default;
    # -1 = last, used for SigLIP after the reference removes the final layer).
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"  # default drops CLS
    # "anyres" (LLaVA-NeXT tiles + base view), "anyres_max_9" (OneVision), "single" (LLaVA-1.5 pad).
    image_aspect_ratio: str = "anyres"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = VICUNA_GRID_PINPOINTS
    use_image_newline: bool = True
    video_pooling: Literal["bilinear", "average", "max"] = "bilinear"
    video_pool_stride: int = 2
    # Newline placement for video tokens: per row of every frame, one per frame, one per video, none.
    video_newline: Literal["grid", "frame", "one_token", "no_token"] = "no_token"
    # Compute dtype of activations ("float32" for parity, "bfloat16" on TPU/GPU); params stay f32.
    dtype: str = "float32"
    param_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        if "image_grid_pinpoints" in d:
            d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"LlavaConfig: unknown fields {sorted(unknown)}")
        return cls(vision=vision, text=text, **d)


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How `LlavaNextModel` computes; every choice gives the same numbers (within float rounding).

    Set from a training config by `instit_jax.train.config.compute_config`; a loaded model computes with the
    defaults."""

    # Decoder attention of cache-free calls: "xla" (explicit [T, T] masks), "cudnn" (GPU flash, right
    # padding), "blockwise" (pure-JAX flash attention, O(T) memory), "splash" (Pallas TPU kernel),
    # "splash_interpret" (that kernel interpreted, CPU). The vision tower follows: blockwise for
    # blockwise/splash decoders, xla otherwise (`vision_attention_impl`).
    attention_impl: str = "xla"
    attention_block_size: int = 512  # decoder query/key block of blockwise/splash attention (multiple of 8)
    vision_attention_block_size: int = 256  # vision query/key block (729 SigLIP tokens pad to 768, not 1,024)
    # Rematerialisation of every vision and decoder block in the backward pass (a `models.remat.REMAT_POLICIES`
    # name): "none", "full" (save nothing), "dots_saveable", "dots_with_no_batch_dims_saveable".
    remat_policy: str = "none"
    vision_chunk_views: int = 0  # views (tiles/frames) per vision-tower pass per sample; 0 = all at once
    mlp_sequence_pieces: int = 0  # decoder MLPs over the sequence in this many slices; 0/1 = whole sequence
    # LM head and logits split along the vocabulary over the mesh's batch axes (traced under a mesh).
    vocab_parallel_head: bool = False
    # Every Linear builds its weight gradient in the kernel's [in, out] layout (`models/weight_grads.py`): no
    # transposed copy of the cotangent on XLA:CPU (-8 to -15% step CPU time). Same maths; the trainer turns
    # it on for CPU meshes.
    direct_weight_grads: bool = False
    # "bfloat16": every Linear's products (forward and backward) take bf16 operands and accumulate in the
    # activation dtype; "" = the operands' own dtype. With f32 activations this is the TPU's default matmul
    # precision, and ~1.9x faster products on CPUs with AVX512-BF16 (`models/weight_grads.py`).
    dot_dtype: str = ""

    @property
    def vision_attention_impl(self) -> str:
        """The vision tower's attention: memory-saving decoders get the blockwise tower."""
        return "xla" if self.attention_impl in ("xla", "cudnn") else "blockwise"
