"""The batched runner answers exactly like the reference loop (transformers generate, batch 1, greedy)."""
import numpy as np
import pytest
import torch
import transformers as T

from data_gen.synthetic import generate_bench
from eval.bench import load_bench, load_image
from eval.prompts import DEFAULT_PROMPTS, DEFAULT_TEMPLATES
from eval.runner import Preparer, run_bench
from instit_jax import processing
from instit_jax.loading import load_pretrained
from instit_jax.tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    generate_bench(tmp / "bench", num_images=2, num_videos=1, frames_per_video=2, questions_per_item=1,
                   image_size=72)
    bench = load_bench(tmp / "bench", configs=["image_multi_choice", "image_open_ended"])
    corpus = [it.question + " " + it.answer for it in bench.all_items()]
    corpus += [p for t in DEFAULT_TEMPLATES.values() for p in t.values()]
    tok = train_tiny_tokenizer(corpus * 2, vocab_size=320)
    torch.manual_seed(0)
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = T.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg = T.LlavaNextConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), vision_feature_layer=-2,
                            image_token_index=tok.token_to_id("<image>"),
                            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    hf = T.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp / "hf")
    return bench, tok, hf, load_pretrained(tmp / "hf")


def test_runner_matches_transformers_generate(pair):
    bench, tok, hf, ours = pair
    items = bench.all_items()
    preds = run_bench(ours, tok, items, batch_size=8, max_new_tokens=10)
    assert len({p["model_prediction"] for p in preds}) == len(preds)  # distinct answers: a real comparison
    prep = Preparer(ours, tok, "vicuna_v1", DEFAULT_PROMPTS, None)
    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    for item, pred in zip(items, preds):
        ids = torch.from_numpy(prep(item).input_ids[None].astype(np.int64))
        pixels, sizes = processing.preprocess_images([load_image(item)], prep.proc)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              pixel_values=torch.from_numpy(pixels), image_sizes=torch.from_numpy(sizes),
                              max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        ref = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
        assert pred["model_prediction"] == ref, item.question_id
