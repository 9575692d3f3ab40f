"""Recipe files load, convert to LlavaConfig, carry the paper's recipe, and reject typos / bad combos."""
import dataclasses

import pytest

from instit_jax.train.config import ConfigError, llava_config, load_config

RECIPES = ["llava_next_vicuna_7b_instit", "llava_next_qwen2_7b_instit", "llava_qwen2_1p5b_ablation", "tiny",
           "tiny_synthetic", "llava_next_vicuna_7b_instit.py:v5e", "llava_next_qwen2_7b_instit.py:v5e"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_converts(name):
    path = f"configs/{name}" if ".py:" in name else f"configs/{name}.py"
    c = load_config(path, ["init.tokenizer=tokenizer.json"] if name == "tiny_synthetic" else [])
    cfg = llava_config(c)
    assert cfg.text.hidden_size == c.model.text.hidden_size
    assert dataclasses.asdict(type(cfg).from_dict(cfg.to_dict())) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("name,lr,hidden", [("llava_next_vicuna_7b_instit", 2e-5, 4096),
                                            ("llava_next_qwen2_7b_instit", 1e-5, 3584),
                                            ("llava_qwen2_1p5b_ablation", 1e-5, 1536)])
def test_paper_recipe(name, lr, hidden):
    c = load_config(f"configs/{name}.py")
    assert (c.optim.lr, c.optim.vision_lr, c.optim.weight_decay, c.optim.warmup_ratio) == (lr, 2e-6, 0.0, 0.03)
    assert c.optim.schedule == "cosine" and c.data.num_epochs == 1
    assert (c.train.global_batch_size, c.data.max_frames, c.data.max_tokens) == (256, 32, 6144)
    assert (c.model.dtype, c.model.param_dtype, c.freeze.frozen_vision_layers) == ("bfloat16", "float32", 12)
    assert c.model.text.hidden_size == hidden
    assert sum(s.weight for s in c.data.sources.values()) > 0


def test_overrides_are_typed():
    c = load_config("configs/tiny.py", ["optim.lr=1e-5", "--config.train.total_steps=7", "freeze.train_llm=False"])
    assert (c.optim.lr, c.train.total_steps, c.freeze.train_llm) == (1e-5, 7, False)


@pytest.mark.parametrize("override,needle", [
    (["optim.lrr=1e-5"], "lrr"),  # typo in a field name
    (["optim.lr=fast"], "optim.lr"),  # wrong type
    (["freeze.frozen_vision_layers=9"], "frozen_vision_layers"),  # more than the tiny tower has
    (["train.remat=sometimes"], "train.remat"),
    (["freeze.train_vision=False", "freeze.train_projector=False", "freeze.train_llm=False"], "nothing trains"),
    (["mesh.data=-1"], "at most one"),
    (["model.image_token_id=999"], "image_token_id"),
    (["optim.warmup_ratio=1.5"], "warmup_ratio"),
    (["model.attention_impl=flash"], "model.attention_impl.*blockwise"),
    (["optim.mu_dtype=int8"], "optim.mu_dtype"),
    (["model.dot_dtype=float16"], "model.dot_dtype"),
    (["model.vision.model_type=siglip"], "vision_feature_select_strategy.*SigLIP"),  # 'default' would drop a patch
])
def test_invalid_config_fails_fast(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("configs/tiny.py", override)


@pytest.mark.parametrize("main,micro_batch", [("llava_next_vicuna_7b_instit", 2), ("llava_next_qwen2_7b_instit", 1)])
def test_v5e_variant_only_changes_memory_settings(main, micro_batch):
    """`recipe.py:v5e` (16 GiB chips) trains the same model on the same data as the paper recipe."""
    small, full = load_config(f"configs/{main}.py:v5e"), load_config(f"configs/{main}.py")
    assert small.model.to_dict() == full.model.to_dict() and small.data.to_dict() == full.data.to_dict()
    assert (small.optim.lr, small.train.global_batch_size) == (full.optim.lr, full.train.global_batch_size)
    assert (small.train.remat, small.optim.mu_dtype, small.model.attention_impl) == ("full", "bfloat16", "blockwise")
    assert (small.name, small.train.micro_batch_size) == (f"{main}_v5e", micro_batch)
    changed = {f"{s}.{k}" for s in ("train", "optim") for k, v in small[s].items() if full[s][k] != v}
    assert changed <= {"train.remat", "optim.mu_dtype", "train.loss_chunk_tokens", "train.vision_chunk_views",
                       "train.vocab_parallel_loss", "train.mlp_sequence_pieces", "train.micro_batch_size"}


def test_unknown_variant_is_named():
    with pytest.raises(ConfigError, match=r"no variant 'v5p'.*instit.py:v5e"):
        load_config("configs/llava_next_vicuna_7b_instit.py:v5p")


def test_recipe_typo_raises(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from configs.base import get_base_config\n\ndef get_config():\n"
                   "    c = get_base_config()\n    c.optim.learning_rate = 1.0\n    return c\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(str(bad))


def test_grain_needs_sources_and_tokenizer():
    with pytest.raises(ConfigError, match="data.sources"):
        load_config("configs/tiny.py", ["data.kind=grain"])
    with pytest.raises(ConfigError, match="tokenizer"):
        load_config("configs/tiny_synthetic.py")
    assert load_config("configs/tiny_synthetic.py", ["init.tokenizer=tok/tokenizer.json"]).data.kind == "grain"


def test_micro_batch_is_a_cap_on_large_pods():
    from instit_jax.train.config import check_batch_geometry

    config = load_config("configs/llava_next_vicuna_7b_instit.py")
    assert check_batch_geometry(config, 4) == (64, 32)  # v5p:2x2x1: 64 sequences per chip in micro-batches of 2
    assert check_batch_geometry(config, 256) == (1, 1)  # one sequence per chip: one micro-step of 1
    with pytest.raises(ValueError, match="train.global_batch_size"):
        check_batch_geometry(config, 3)


def test_recipe_keys_set_how_the_model_computes():
    """model.attention_impl/attention_block_size and train.remat/vision_chunk_views/mlp_sequence_pieces/
    vocab_parallel_loss and model.dot_dtype become the model's ComputeConfig; the model sections follow the dataclasses."""
    from configs.base import text_section, vision_section
    from instit_jax.models.config import ComputeConfig, TextConfig, VisionConfig
    from instit_jax.train.config import compute_config

    c = load_config("configs/llava_next_qwen2_7b_instit.py:v5e")
    assert compute_config(c) == ComputeConfig(attention_impl="blockwise", attention_block_size=512,
                                              remat_policy="full", vision_chunk_views=8, mlp_sequence_pieces=4,
                                              vocab_parallel_head=True)
    assert compute_config(c).vision_attention_impl == "blockwise"
    assert compute_config(load_config("configs/tiny.py")) == ComputeConfig()
    assert compute_config(load_config("configs/tiny.py", ["model.dot_dtype=bfloat16"]), "cpu") == ComputeConfig(
        direct_weight_grads=True, dot_dtype="bfloat16")
    assert set(vision_section()) == {f.name for f in dataclasses.fields(VisionConfig)}
    assert set(text_section()) == {f.name for f in dataclasses.fields(TextConfig)}
    with pytest.raises(ValueError, match="TextConfig has no field.*hidden_szie"):
        text_section(hidden_szie=8)


def test_packing_refuses_anyres_max_plans():
    """Packed rows carry one feature row per token; anyres_max_N plans (processing.max_num_patches) mix 4."""
    base = ["init.tokenizer=tok/tokenizer.json", "data.packing=True"]
    with pytest.raises(ConfigError, match=r"config\.data\.packing: .*'anyres_max_9'"):
        load_config("configs/tiny_synthetic.py", [*base, "model.image_aspect_ratio=anyres_max_9"])
    assert load_config("configs/tiny_synthetic.py", base).data.packing
