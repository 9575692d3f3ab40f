"""Bench inference throughput: `eval.runner.run_bench` (on the `BatchEngine`) vs the reference style, CPU.

Reference style = the official toolkit's loop: one question at a time, transformers
`LlavaNextForConditionalGeneration.generate` (batch 1, greedy, KV cache, stop at </s>). Both sides get
identical token ids and pixels (our processor matches transformers'), and the same weights (a random
transformers model saved to disk and loaded with `instit_jax.load_pretrained`). Image split only
(transformers' LLaVA-NeXT has no pooled-video path). Ours: `run_bench`, i.e. continuous batching with
`--batch-size` decode slots (`instit_jax.assistant.BatchEngine`). Compilation is timed apart from steady
state (a first full run compiles every shape; the timed run is the second).

    PYTHONPATH=. python benchmarks/eval_throughput.py [--questions-per-image 2] [--images 8] [--max-new-tokens 128]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def build(tmp: Path, args):
    import torch
    import transformers as T

    from data_gen.synthetic import generate_bench
    from eval.bench import load_bench
    from eval.prompts import DEFAULT_TEMPLATES
    from instit_jax.loading import load_pretrained
    from instit_jax.tokenizer import train_tiny_tokenizer

    generate_bench(tmp / "bench", num_images=args.images, num_videos=1, frames_per_video=2,
                   questions_per_item=args.questions_per_image, image_size=96)
    bench = load_bench(tmp / "bench", configs=["image_multi_choice", "image_open_ended"])
    corpus = [it.question + " " + it.answer for it in bench.all_items()]
    corpus += [p for t in DEFAULT_TEMPLATES.values() for p in t.values()]
    tok = train_tiny_tokenizer(corpus * 2, vocab_size=512)
    torch.manual_seed(0)
    vc = T.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            image_size=56, patch_size=14)
    tc = T.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=688,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = T.LlavaNextConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                            image_token_index=tok.token_to_id("<image>"), vision_feature_layer=-2,
                            image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    hf = T.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # large enough that answers depend on the question
    hf.save_pretrained(tmp / "hf")
    return bench, tok, hf, load_pretrained(tmp / "hf")


def reference_loop(hf, tok, prepared, max_new_tokens):
    """One question at a time with transformers generate (the toolkit's inference loop)."""
    import torch

    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    answers = []
    for p in prepared:
        ids = torch.from_numpy(p["ids"][None].astype(np.int64))
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              pixel_values=torch.from_numpy(p["nchw"][None]),
                              image_sizes=torch.tensor([p["hw"]]), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True)
        answers.append(tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip())
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--questions-per-image", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args()

    import jax
    import torch

    from eval.bench import load_image
    from eval.prompts import DEFAULT_PROMPTS
    from eval.runner import Preparer, run_bench
    from instit_jax import processing

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as d:
        bench, tok, hf, ours = build(Path(d), args)
        items = bench.all_items()
        prep = Preparer(ours, tok, "vicuna_v1", DEFAULT_PROMPTS, None)
        proc = prep.proc
        prepared = []
        for it in items:
            img = load_image(it)
            nchw, sizes = processing.preprocess_images([img], proc)
            prepared.append({"ids": prep(it).input_ids, "nchw": nchw[0], "hw": [int(v) for v in sizes[0]]})

        # warm-up (compiles every shape our runner will see; transformers warms its kernels)
        t = time.perf_counter()
        run_bench(ours, tok, items, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        compile_s = time.perf_counter() - t
        reference_loop(hf, tok, prepared[:1], args.max_new_tokens)

        t = time.perf_counter()
        preds = run_bench(ours, tok, items, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        ref = reference_loop(hf, tok, prepared, args.max_new_tokens)
        ref_s = time.perf_counter() - t

    n = len(items)
    agree = sum(p["model_prediction"] == r for p, r in zip(preds, ref)) / n
    distinct = len({p["model_prediction"] for p in preds})
    ours_qps, ref_qps = n / ours_s, n / ref_s
    print(f"{n} image questions, max_new_tokens={args.max_new_tokens}, device={jax.devices()[0].platform}"
          f" x{len(jax.local_devices())}, batch={args.batch_size}")
    print(f"{'':34}{'questions/s':>12}{'seconds':>10}")
    print(f"{'reference (HF generate, batch 1)':34}{ref_qps:12.2f}{ref_s:10.2f}")
    print(f"{'instit-jax run_bench (engine)':34}{ours_qps:12.2f}{ours_s:10.2f}")
    print(f"speedup x{ours_qps / ref_qps:.2f}; identical greedy answers: {agree:.0%} ({distinct} distinct); "
          f"our first run incl. compilation: {compile_s:.1f}s")
    print(json.dumps({"benchmark": "eval_throughput", "questions": n, "max_new_tokens": args.max_new_tokens,
                      "batch_size": args.batch_size, "ours_qps": round(ours_qps, 3),
                      "reference_qps": round(ref_qps, 3), "speedup": round(ours_qps / ref_qps, 2),
                      "answer_agreement": round(agree, 3), "distinct_answers": distinct, "ours_compile_s": round(compile_s, 1),
                      "goal": "speedup >= 5 with identical answers",
                      "goal_met": bool(ours_qps / ref_qps >= 5 and agree == 1.0)}))


if __name__ == "__main__":
    main()
