"""The demo base: a small LLaVA-NeXT for the synthetic shape world, built from random init in stages.

`get_config(stage)` gives one stage of `instit-demo build-base` (big_vision style variants):

  tower     "CLIP" stage: the vision tower alone, dense per-patch attribute and digit labels (own loop)
  tower_digits  the same, continued with mostly digit canvases, digits anywhere (text reading)
  text      "LLM" stage: the decoder on text-only reading of scene descriptions (QA, MC with letters)
  align     LLaVA projector alignment on captions of unmarked media (projector only)
  instruct  generic visual instruction tuning on unmarked media (everything but the first vision block)
  tower_labels  the tower again (own loop): reading printed labels centred in a patch cell, attributes kept
  reinstruct    generic visual instruction tuning again on the new tower (incl. reading label canvases and
            text-only option-lookup turns: find the option that holds a stated answer, reply its letter)
  bind      finding a printed label by its digit (where it is, its box, is it there) on label canvases
  drill     generic visual instruction tuning on packed rows (the Inst-IT stage's recipe), ~22k conversations:
            where the base learns to pick the letter of the answer it knows
  ground    the drill's data and recipe again, with a patch-to-word loss beside it (demo/build_base.py
            `run_ground`): each labelled patch's visual token is pulled toward the decoder's embeddings of
            the words naming its colour, shape, texture, size or digit, so colour is no longer a faint
            direction of the visual tokens that the decoder never learns to read
  instit    the demo's Inst-IT continuous SFT of the finished base (first two vision blocks frozen)

The build fills `data.sources` and `init.tokenizer` / `model.text.vocab_size` / `model.image_token_id`
from the base's own tokenizer. Model: 84 px tiles of 14 px patches (6x6 tokens), one anyres tile plus
the base view for an 84 px image (78 image tokens with row newlines), 6 frames x 3x3 pooled tokens.
"""
import ml_collections

from configs.base import get_base_config, text_section, vision_section

STAGES = ("tower", "tower_digits", "text", "align", "instruct", "tower_labels", "reinstruct", "bind", "drill",
          "ground", "instit")
VOCAB_SIZE = 1024


def get_config(stage: str = "instruct") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"demo_base stage must be one of {STAGES}, got {stage!r}")
    c = get_base_config()
    c.name = f"demo_base_{stage}"
    c.seed = 0
    c.model.vision = vision_section(
        image_size=84, patch_size=14, hidden_size=128, intermediate_size=384, num_hidden_layers=5,
        num_attention_heads=4,
    )
    c.model.text = text_section(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.088,  # ~1/sqrt(128): a narrow from-scratch decoder learns attention faster
    )
    c.model.image_token_id = VOCAB_SIZE - 1
    c.model.image_grid_pinpoints = ((84, 84),)  # an 84 px image: base view + one full-resolution tile
    c.model.dtype = "float32"
    c.init.tokenizer = ""
    c.data.template = "vicuna_v1"
    c.data.max_tokens = 512
    c.data.length_buckets = (128, 192, 256, 320, 384, 512)
    c.data.max_tiles = 2
    c.data.max_frames = 6
    c.data.cache_samples = False
    c.optim.warmup_ratio = 0.03
    c.optim.end_lr_ratio = 0.05
    c.optim.weight_decay = 0.0
    c.train.global_batch_size = 32
    c.train.remat = "none"
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 1
    c.mesh.fsdp = 1
    c.mesh.data = 1
    c.freeze.frozen_vision_layers = 0
    if stage == "tower":
        c.train.global_batch_size = 64
        c.train.total_steps = 3000
        c.optim.lr = 2e-3
        c.optim.vision_lr = 2e-3
        c.optim.weight_decay = 0.01
    elif stage == "tower_digits":
        c.train.global_batch_size = 64
        c.train.total_steps = 1000
        c.optim.lr = 1e-3
        c.optim.vision_lr = 1e-3
        c.optim.weight_decay = 0.01
        c.optim.end_lr_ratio = 0.2
    elif stage == "tower_labels":
        c.train.global_batch_size = 64
        c.train.total_steps = 500
        c.optim.lr = 1e-3
        c.optim.vision_lr = 1e-3
        c.optim.weight_decay = 0.01
        c.optim.end_lr_ratio = 0.1
    elif stage == "reinstruct":
        c.train.total_steps = 200
        c.optim.lr = 5e-4
        c.optim.vision_lr = 1e-4
        c.freeze.frozen_vision_layers = 1
    elif stage == "bind":
        c.train.total_steps = 80
        c.optim.lr = 5e-4
        c.optim.vision_lr = 1e-4
        c.freeze.frozen_vision_layers = 1
    elif stage == "text":
        c.train.total_steps = 320
        c.optim.lr = 1e-3
        c.freeze.train_vision = False
        c.freeze.train_projector = False
    elif stage == "align":
        c.train.total_steps = 150
        c.optim.lr = 2e-3
        c.freeze.train_vision = False
        c.freeze.train_llm = False
    elif stage == "instruct":
        c.train.total_steps = 400
        c.optim.lr = 1e-3
        c.optim.vision_lr = 2e-4
        c.freeze.frozen_vision_layers = 1
    elif stage == "drill":
        c.train.total_steps = 800
        _packed_sft(c)
    elif stage == "ground":
        c.train.total_steps = 600
        _packed_sft(c)
    else:  # instit: the demo scales total_steps to its time budget
        c.train.total_steps = 60
        _packed_sft(c)
    return c


def _packed_sft(c: ml_collections.ConfigDict) -> None:
    """The packed SFT recipe of the demo's Inst-IT stage and the base's drill stage."""
    c.optim.lr = 1e-3
    c.optim.vision_lr = 1e-4  # the tower trains 10x slower than the rest, as in the paper's recipes
    c.optim.warmup_ratio = 0.05
    c.optim.end_lr_ratio = 0.1
    c.freeze.frozen_vision_layers = 2
    # packed rows: ~3.5 conversations (median ~250 tokens, ~3 views each) per 1,024-token row; blockwise
    # attention in 128-token blocks skips the key blocks of other conversations (benchmarks/packing.py)
    c.data.packing = True
    c.data.max_tokens = 1024
    c.data.max_views = 16
    c.data.length_buckets = ()
    c.train.global_batch_size = 8  # rows (~28 conversations)
    c.model.attention_impl = "blockwise"
    c.model.attention_block_size = 128
