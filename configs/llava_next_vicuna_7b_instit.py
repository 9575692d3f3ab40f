"""LLaVA-NeXT-Inst-IT-Vicuna-7B: CLIP-L/336 + Vicuna-7B, anyres, LLM lr 2e-5 (the paper's main recipe)."""
import ml_collections

from configs.base import CLIP_L_336, add_source, get_base_config, text_section, vision_section


def get_config() -> ml_collections.ConfigDict:
    """Continuous SFT from llava-v1.6-vicuna-7b on Inst-IT + general instruction data."""
    c = get_base_config()
    c.name = "llava_next_vicuna_7b_instit"
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
    return c
