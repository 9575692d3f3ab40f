"""LLaVA-NeXT-Inst-IT-Vicuna-7B for 16 GiB chips (v5e): the main recipe with the memory settings that fit.

instit-compile on v5e:4x4 (16 chips, pure FSDP): micro-batch 2 fits with the settings below (XLA peak
13.84 of 15.75 usable GiB; micro-batch 4 needs 18.02 GiB of temporaries), docs/tpu_pods.md. Without the
three view/vocabulary/MLP settings only micro-batch 1 fits (peak 14.19 GiB); the recipe defaults
(per-layer dots remat, f32 Adam moments) overflow even at 1, by 23 MB.
"""
import ml_collections

from configs.llava_next_vicuna_7b_instit import get_config as get_main_config


def get_config() -> ml_collections.ConfigDict:
    """The Vicuna-7B recipe with full remat, a bf16 Adam first moment, chunked views, MLP slices."""
    c = get_main_config()
    c.name = "llava_next_vicuna_7b_instit_v5e"
    c.train.remat = "full"  # recompute every block: only the block inputs are kept
    c.optim.mu_dtype = "bfloat16"  # -2 bytes per trained parameter (second moment stays f32)
    c.train.loss_chunk_tokens = 256  # smaller LM-head / cross-entropy chunks
    c.train.vision_chunk_views = 8  # CLIP tower over a sample's tiles/frames 8 at a time (blockwise attention)
    c.train.vocab_parallel_loss = True  # LM-head logits split along the vocabulary over the devices
    c.train.mlp_sequence_pieces = 4  # decoder MLPs over the sequence in 4 slices
    c.train.micro_batch_size = 2  # the largest per-device micro-batch that fits (8 micro-steps per step)
    return c
