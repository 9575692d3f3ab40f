"""LLaVA-NeXT-Inst-IT-Qwen2-7B: SigLIP-SO400M-384 + Qwen2-7B, anyres, LLM lr 1e-5.

`configs/llava_next_qwen2_7b_instit.py:v5e` is the same recipe for 16 GiB chips (`fit_16gib_chips`):
on v5e:4x4 (16 chips, pure FSDP, micro-batch 1) the XLA peak is 13.12 of 15.75 usable GiB
(docs/tpu_pods.md): the 37 SigLIP views of a sample (5 tiles + 32 frames) go through the tower 8 at a
time, the LM head and its logits are split along the 152k vocabulary (the [3584, 152064] head, 1 GiB in
bf16, is never all-gathered), and the 18,944-wide MLPs run over the 6,144 positions in 4 slices.
"""
import ml_collections

from configs.base import (
    SIGLIP_SO400M_384,
    add_source,
    fit_16gib_chips,
    get_base_config,
    recipe_variant,
    text_section,
    vision_section,
)

NAME = "llava_next_qwen2_7b_instit"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Continuous SFT from a LLaVA-NeXT Qwen2-7B checkpoint on Inst-IT + general data; `arg`: "" or "v5e"."""
    variant = recipe_variant(arg, NAME, ("v5e",))
    c = get_base_config()
    c.name = NAME
    c.model.vision = vision_section(**SIGLIP_SO400M_384)
    c.model.text = text_section(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, max_position_embeddings=32768, attention_bias=True,
    )
    c.model.image_token_id = 151646
    c.model.vision_feature_layer = -1  # last kept block (the reference drops SigLIP's final block)
    c.model.vision_feature_select_strategy = "full"  # SigLIP has no CLS token
    # 384-pixel tiles: 1x2, 2x1, 2x2, 3x1, 1x3 grids (<= 5 views with the base), like the Vicuna list.
    c.model.image_grid_pinpoints = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))
    c.init.checkpoint = "checkpoints/llava-next-qwen2-7b"
    c.data.template = "qwen_1_5"
    # SigLIP frames pool 27x27 -> 14x14 = 196 tokens: 32 frames = 6,272 > 6,144 (the paper's 6K context),
    # so the pipeline samples the most frames that fit with the whole conversation, uniformly over the video
    # (30 with a <= 264-token chat; data.pipeline.fit_frames); F stays 32 for static shapes.
    add_source(c, "instit_video", "data/records/instit_video", 21_000)
    add_source(c, "instit_image", "data/records/instit_image", 51_000)
    add_source(c, "llava_next_sft", "data/records/llava_next_sft", 779_000)
    c.model.attention_impl = "blockwise"  # flash-style attention: no [T, T] scores at 6K tokens (docs/tpu_pods.md)
    # per-device micro-batch: 2 is the largest that fits v5p:2x2x1 (64 sequences per chip, peak ~89 of 95 GiB;
    # 4 needs ~130 GiB of temporaries); see docs/tpu_pods.md
    c.train.micro_batch_size = 2
    c.optim.lr = 1e-5
    if variant == "v5e":
        c.name = f"{NAME}_v5e"
        fit_16gib_chips(c, micro_batch_size=1)  # 16 micro-steps per step on v5e:4x4
    return c
