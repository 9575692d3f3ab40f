"""LLaVA-NeXT-Inst-IT-Qwen2-7B for 16 GiB chips (v5e): the main recipe with the memory settings that fit.

instit-compile on v5e:4x4 (16 chips, pure FSDP, micro-batch 1): XLA peak 13.12 of 15.75 usable GiB
(docs/tpu_pods.md). Beyond the Vicuna v5e settings: the 37 SigLIP views of a sample (5 tiles + 32 frames)
go through the vision tower 8 at a time with blockwise tower attention, the LM head and its logits are
split along the 152k vocabulary, and the 18,944-wide MLPs run over the sequence in 4 slices.
"""
import ml_collections

from configs.llava_next_qwen2_7b_instit import get_config as get_main_config


def get_config() -> ml_collections.ConfigDict:
    """The Qwen2-7B recipe with full remat, a bf16 Adam first moment, small loss chunks and chunked views."""
    c = get_main_config()
    c.name = "llava_next_qwen2_7b_instit_v5e"
    c.train.remat = "full"  # recompute every block: only the block inputs are kept
    c.optim.mu_dtype = "bfloat16"  # -2 bytes per trained parameter (second moment stays f32)
    c.train.loss_chunk_tokens = 256  # smaller LM-head / cross-entropy chunks (152k vocabulary)
    # tiles/frames per vision-tower pass (0 = all 37 at once); the tower attention is blockwise because
    # model.attention_impl is (models.config.ComputeConfig.vision_attention_impl)
    c.train.vision_chunk_views = 8
    # LM-head logits split along the 152k vocabulary over the devices: the [3584, 152064] head is never
    # all-gathered (1 GiB in bf16 per copy), the small hidden-state chunks are
    c.train.vocab_parallel_loss = True
    # decoder MLPs over the 6,144 positions in this many slices (the [T, 18944] buffers); 0 = whole
    c.train.mlp_sequence_pieces = 4
    c.train.micro_batch_size = 1  # per-device micro-batch (16 micro-steps per step)
    return c
