"""HF <-> instit-jax conversion: round trips, original LLaVA-NeXT layout, errors, sharded loading."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models

from instit_jax import processing as P
from instit_jax.convert import cli
from instit_jax.loading import load_pretrained, load_tokenizer, save_pretrained

PINS = [[28, 56], [56, 28], [56, 56]]
IMG = 60


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(2)
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    cfg = T.LlavaNextConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=IMG,
                            image_grid_pinpoints=PINS)
    hf = T.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    cfg = P.ImageProcessorConfig(tile_size=28, grid_pinpoints=tuple(map(tuple, PINS)))
    px, sizes = P.preprocess_images([img], cfg)
    n = P.anyres_token_plan((40, 70), PINS, 28, 2).count
    ids = np.array([[1, 2, 3] + [IMG] * n + [4, 5]])
    return ids, px, sizes


@pytest.fixture(scope="module")
def ref_logits(hf_dir, sample):
    ids, px, sizes = sample
    return np.asarray(load_pretrained(hf_dir)(ids, np.ones_like(ids), px, sizes))


def _hf_tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_round_trip_hf_jax_hf_identical_and_loads_in_transformers(hf_dir, tmp_path, sample, ref_logits):
    cli.main(["hf-to-jax", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "jax")])
    assert (tmp_path / "jax" / "instit_config.json").exists() and (tmp_path / "jax" / "tokenizer.json").exists()
    cli.main(["jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "hf2"), "--max-shard-gb", "0.00003"])
    assert (tmp_path / "hf2" / "model.safetensors.index.json").exists()  # forced several shards
    a, b = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "hf2")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    back = T.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf2").eval()
    orig = T.LlavaNextForConditionalGeneration.from_pretrained(hf_dir).eval()
    sd_back, sd_orig = back.state_dict(), orig.state_dict()
    assert set(sd_back) == set(sd_orig)
    assert all(torch.equal(sd_back[k], sd_orig[k]) for k in sd_orig)
    T.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf2")
    ids, px, sizes = sample
    ours = load_pretrained(tmp_path / "jax")
    np.testing.assert_array_equal(np.asarray(ours(ids, np.ones_like(ids), px, sizes)), ref_logits)
    assert load_tokenizer(tmp_path / "jax").token_to_id("hi") == 1


def test_original_layout_loads_to_same_logits(hf_dir, tmp_path, sample, ref_logits):
    ren = [("vision_tower.", "model.vision_tower.vision_tower.vision_model."), ("language_model.model.", "model."),
           ("language_model.lm_head.", "lm_head."), ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
           ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline")]
    tensors = {}
    for k, v in _hf_tensors(hf_dir).items():
        new = next(n + k[len(o):] for o, n in ren if k.startswith(o))
        tensors[new] = v
    half = sorted(tensors)
    save_file({k: tensors[k] for k in half[:20]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in half[20:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    hfc = json.loads((hf_dir / "config.json").read_text())
    t = hfc["text_config"]
    cfg = {**{k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "rms_norm_eps")},
           "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
           "mm_vision_tower": "tiny-clip", "vision_config": hfc["vision_config"], "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "anyres",
           "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": [[w, h] for h, w in PINS]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_pretrained(tmp_path)
    assert model.cfg.image_token_id == -200
    ids, px, sizes = sample
    ids = np.where(ids == IMG, -200, ids)
    np.testing.assert_allclose(np.asarray(model(ids, np.ones_like(ids), px, sizes)), ref_logits, atol=1e-6)


def test_config_defaults_follow_llava_next_and_siglip_needs_full_features():
    from instit_jax.convert import hf_config

    vision = {"model_type": "clip_vision_model", "image_size": 28, "patch_size": 14, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    original = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": 64,
                "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "mm_vision_tower": "tiny-clip", "vision_config": vision}
    assert hf_config.from_original(original).video_newline == "one_token"  # LLaVA-NeXT's getattr default
    assert hf_config.from_original({**original, "mm_newline_position": "grid"}).video_newline == "grid"
    siglip = {**vision, "model_type": "siglip_vision_model"}
    hf = {"model_type": "llava_next", "vision_config": siglip, "text_config": {"model_type": "llama"}}
    for strategy in ({}, {"vision_feature_select_strategy": "default"}):  # absent: transformers' "default"
        with pytest.raises(ValueError, match="SigLIP vision tower has no CLS token.*Set it to 'full'"):
            hf_config.from_llava_hf({**hf, **strategy})
    cfg = hf_config.from_llava_hf({**hf, "vision_feature_select_strategy": "full"})
    assert (cfg.vision.model_type, cfg.vision_feature_select_strategy) == ("siglip", "full")
    assert hf_config.from_llava_hf({**hf, "vision_config": vision}).vision_feature_select_strategy == "default"


def test_clear_errors(hf_dir, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        load_pretrained(tmp_path / "bin")
    tensors = _hf_tensors(hf_dir)
    for name, edit, err, match in [
        ("extra", lambda t: t.update({"vision_tower.encoder.layers.9.mlp.fc1.bias": np.zeros(3, np.float32)}),
         KeyError, "layers.9.mlp.fc1.bias"),
        ("missing", lambda t: t.pop("image_newline"), KeyError, "image_newline"),
        ("shape", lambda t: t.update({"image_newline": np.zeros(5, np.float32)}), ValueError, "image_newline"),
    ]:
        d = tmp_path / name
        d.mkdir()
        t = dict(tensors)
        edit(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text((hf_dir / "config.json").read_text())
        with pytest.raises(err, match=match):
            load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "bin" / "nothing")


def test_sharded_load_and_forward_equal_unsharded(hf_dir, tmp_path, sample, ref_logits):
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = {"embed": "fsdp", "vision_embed": "fsdp", "mlp": "tensor", "vision_mlp": "tensor", "q_heads": "tensor",
             "kv_heads": "tensor", "vision_heads": "tensor", "vocab": "tensor"}
    model = load_pretrained(hf_dir, mesh=mesh, rules=rules)
    k = model.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert len(k.sharding.device_set) == 8 and k.addressable_shards[0].data.shape == (32 // 4, 48 // 2)
    ids, px, sizes = sample
    np.testing.assert_allclose(np.asarray(model(ids, np.ones_like(ids), px, sizes)), ref_logits, atol=1e-5)
    save_pretrained(model, tmp_path / "ck")  # Orbax restore straight into shardings
    again = load_pretrained(tmp_path / "ck", mesh=mesh, rules=rules)
    k2 = again.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert k2.sharding.spec == k.sharding.spec
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k))
