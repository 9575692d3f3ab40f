"""The demo recipe: a small LLaVA-NeXT trained on the synthetic Inst-IT world (TFRecords via Grain).

The demo fills `data.sources` with the shard directories it built, sets `init.tokenizer` (its
tokenizer.json) and `model.text.vocab_size` / `model.image_token_id` from that tokenizer, e.g.
`load_config("configs/tiny_synthetic.py", ["init.tokenizer=...", "data.sources.synthetic_image.path=..."])`,
then calls `instit_jax.train.train(config, workdir)`.
"""
import ml_collections

from configs.base import add_source, get_base_config, text_section, vision_section


def get_config() -> ml_collections.ConfigDict:
    """Small CLIP-style tower + small Llama on the synthetic world; trains in minutes on CPU."""
    c = get_base_config()
    c.name = "tiny_synthetic"
    c.model.vision = vision_section(
        image_size=56, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4,
    )
    c.model.text = text_section(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=0.088,  # ~1/sqrt(128): at HF's 0.02 this narrow decoder's attention learns ~2x slower
    )
    c.model.image_token_id = 1023
    c.model.image_grid_pinpoints = ((56, 112), (112, 56), (112, 112))  # 56-px tiles
    c.init.tokenizer = ""  # the demo's tokenizer.json (required)
    c.model.dtype = "float32"
    c.data.template = "vicuna_v1"
    c.data.max_tokens = 512  # base 16 + grid 8x9 = 88 image tokens; 8 frames x 4 = 32 video tokens
    c.data.length_buckets = (256, 384, 512)  # short batches are not padded to 512 (one compile per bucket)
    c.data.max_tiles = 5
    c.data.cache_samples = True  # the demo world is small and seen for many epochs: process each record once
    c.data.max_frames = 8
    add_source(c, "synthetic_video", "synthetic/records/video", 1.0)  # instit-build-data output dirs
    add_source(c, "synthetic_image", "synthetic/records/image", 1.0)
    c.optim.lr = 1e-3
    c.optim.vision_lr = 1e-4
    c.optim.warmup_ratio = 0.05
    c.optim.end_lr_ratio = 0.1  # short runs: keep learning at the end of the cosine
    c.freeze.frozen_vision_layers = 2
    c.train.global_batch_size = 8
    c.train.total_steps = 200
    c.train.remat = "none"
    c.train.log_every = 5
    c.train.checkpoint_every = 50
    return c
