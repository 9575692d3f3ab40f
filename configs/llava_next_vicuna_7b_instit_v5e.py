"""LLaVA-NeXT-Inst-IT-Vicuna-7B for 16 GiB chips (v5e): the main recipe with the memory settings that fit.

instit-compile on v5e:4x4 (16 chips, pure FSDP, micro-batch 1): XLA peak 14.19 of 15.75 usable GiB
(docs/tpu_pods.md). The recipe defaults (per-layer dots remat, f32 Adam moments) overflow by 23 MB.
"""
import ml_collections

from configs.llava_next_vicuna_7b_instit import get_config as get_main_config


def get_config() -> ml_collections.ConfigDict:
    """The Vicuna-7B recipe with full remat, a bf16 Adam first moment and 256-position loss chunks."""
    c = get_main_config()
    c.name = "llava_next_vicuna_7b_instit_v5e"
    c.train.remat = "full"  # recompute every block: only the block inputs are kept
    c.optim.mu_dtype = "bfloat16"  # -2 bytes per trained parameter (second moment stays f32)
    c.train.loss_chunk_tokens = 256  # smaller LM-head / cross-entropy chunks
    c.train.micro_batch_size = 1  # the largest per-device micro-batch that fits (16 micro-steps per step)
    return c
