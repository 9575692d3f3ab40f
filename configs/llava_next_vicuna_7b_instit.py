"""LLaVA-NeXT-Inst-IT-Vicuna-7B: CLIP-L/336 + Vicuna-7B, anyres, LLM lr 2e-5 (the paper's main recipe).

`configs/llava_next_vicuna_7b_instit.py:v5e` is the same recipe for 16 GiB chips (`fit_16gib_chips`):
on v5e:4x4 (16 chips, pure FSDP) micro-batch 2 fits (XLA peak 13.84 of 15.75 usable GiB; micro-batch 4
needs 18.02 GiB of temporaries), docs/tpu_pods.md. Without the view/vocabulary/MLP settings only
micro-batch 1 fits (peak 14.19 GiB).
"""
import ml_collections

from configs.base import (
    CLIP_L_336,
    add_source,
    fit_16gib_chips,
    get_base_config,
    recipe_variant,
    text_section,
    vision_section,
)

NAME = "llava_next_vicuna_7b_instit"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Continuous SFT from llava-v1.6-vicuna-7b on Inst-IT + general instruction data; `arg`: "" or "v5e"."""
    variant = recipe_variant(arg, NAME, ("v5e",))
    c = get_base_config()
    c.name = NAME
    c.model.vision = vision_section(**CLIP_L_336)
    c.model.text = text_section()  # Vicuna-7B (the base defaults)
    c.model.image_token_id = 32000
    c.init.checkpoint = "checkpoints/llava-v1.6-vicuna-7b-hf"  # llava-hf or original LLaVA-NeXT dir
    c.data.template = "vicuna_v1"
    # Weights ~ example counts: Inst-IT videos (21k), Inst-IT images (51k), LLaVA-NeXT SFT data (~779k).
    add_source(c, "instit_video", "data/records/instit_video", 21_000)
    add_source(c, "instit_image", "data/records/instit_image", 51_000)
    add_source(c, "llava_next_sft", "data/records/llava_next_sft", 779_000)
    c.model.attention_impl = "blockwise"  # flash-style attention: no [T, T] scores at 6K tokens (docs/tpu_pods.md)
    # per-device micro-batch: 2 is the largest that fits v5p:2x2x1 (64 sequences per chip, peak ~89 of 95 GiB;
    # 4 needs ~130 GiB of temporaries); see docs/tpu_pods.md
    c.train.micro_batch_size = 2
    c.optim.lr = 2e-5
    if variant == "v5e":
        c.name = f"{NAME}_v5e"
        fit_16gib_chips(c, micro_batch_size=2)  # 8 micro-steps per step on v5e:4x4
    return c
