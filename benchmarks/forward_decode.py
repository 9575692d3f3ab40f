"""Prefill latency and greedy decode throughput: our JAX decoder vs transformers (torch, CPU), fp32.

Model: a ~106M-parameter Llama-style decoder (random weights, identical in both stacks):
  vocab 32000, width 768, 8 layers, 12 heads (4 KV heads, GQA), head_dim 64, SwiGLU 2048, untied head.
  Parameters: 2 x 24.6M (embedding + LM head) + 8 x 6.3M (blocks) = ~99.8M  (printed exactly below).
Prefill: a [B, T] prompt through the whole model into a KV cache, last-position logits only (what generation
  needs; transformers gets `logits_to_keep=1` and returns its cache). Ours runs as the batch engine and
  `generate` prefill on CPU: on `llm.inference_view`, with the prefill attention kernel, the last block on the
  last position only (`hidden_states(last_only=True)`). Decode: greedy `generate` with a KV cache, no stop token, on
  `llm.inference_view` of the decoder (as `Assistant.answer` and the batch engine run it on CPU);
  decode tokens/s = B * (N - 1) / (time(N new tokens) - time(1 new token)), so prefill is excluded.
Both stacks use every CPU core they see (torch: its default intra-op threads unless --torch-threads;
XLA: its default). Torch and JAX runs alternate, so both see the same background load; medians reported.
Usage: python benchmarks/forward_decode.py [--batch 1] [--prompt 128] [--new 32] [--repeats 5] [--torch-threads N]
Without --torch-threads, torch runs at its default thread count AND at 1 thread; the headline ratios in
the last line (one JSON object; >1 means ours is faster) are against torch's faster setting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from llm_hf_fixtures import copy_hf_weights, text_config_of  # noqa: E402

from instit_jax.generate import generate  # noqa: E402
from instit_jax.models.llm import Decoder, inference_view, init_cache, positions_from_mask  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
              num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0)


def _timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median wall times of fn_a() and fn_b(), run alternately (so both see the same machine load)."""
    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**CONFIG)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    dec = Decoder(text_config_of(hf), rngs=nnx.Rngs(0))
    copy_hf_weights(hf, dec)

    rs = np.random.RandomState(0)
    ids = rs.randint(1, CONFIG["vocab_size"], (args.batch, args.prompt))
    mask = np.ones_like(ids)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

    view = inference_view(dec)  # what Assistant.answer and the batch engine prefill and decode with on CPU
    graphdef, state = nnx.split(view)

    @jax.jit
    def jax_prefill(state, ids, mask):  # the engine's prefill: fills a KV cache, last block on the last position
        model = nnx.merge(graphdef, state)
        cache = init_cache(model.cfg, ids.shape[0], ids.shape[1], model.dtype)
        hidden, cache = model.hidden_states(model.embed(ids), positions_from_mask(mask), mask, cache,
                                            last_only=True)
        return model.logits(hidden), cache

    ids_j, mask_j = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    with torch.inference_mode():
        ref = hf(input_ids=ids_t, attention_mask=mask_t, logits_to_keep=1).logits.numpy()
    err = float(np.abs(np.asarray(jax_prefill(state, ids_j, mask_j)[0]) - ref).max())

    def torch_prefill():
        with torch.inference_mode():
            hf(input_ids=ids_t, attention_mask=mask_t, logits_to_keep=1)

    def torch_gen(n):
        with torch.inference_mode():
            return hf.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)

    def jax_gen(n):
        return generate(view, ids, mask, max_new_tokens=n, buckets=(args.prompt,))

    same = bool((torch_gen(args.new).numpy()[:, args.prompt:] == jax_gen(args.new).tokens).all())
    default_threads = torch.get_num_threads()
    settings = [args.torch_threads] if args.torch_threads else sorted({default_threads, 1}, reverse=True)
    steps = args.batch * (args.new - 1)
    results = {}
    for threads in settings:  # torch at its default threads and at 1 thread (often faster on a loaded box)
        torch.set_num_threads(threads)
        pre_t, pre_j = _timed_pair(
            torch_prefill, lambda: jax.block_until_ready(jax_prefill(state, ids_j, mask_j)), args.repeats)
        gen_t, gen_j = {}, {}
        for n in (1, args.new):
            gen_t[n], gen_j[n] = _timed_pair(lambda n=n: torch_gen(n), lambda n=n: jax_gen(n),
                                             max(2, args.repeats // 2))
        tps_t = steps / max(gen_t[args.new] - gen_t[1], 1e-9)
        tps_j = steps / max(gen_j[args.new] - gen_j[1], 1e-9)
        results[threads] = dict(prefill_ms_torch=pre_t * 1e3, prefill_ms_jax=pre_j * 1e3, decode_tps_torch=tps_t,
                                decode_tps_jax=tps_j, gen_ms_torch=gen_t[args.new] * 1e3,
                                gen_ms_jax=gen_j[args.new] * 1e3)

    print(f"Llama-style decoder, {n_params / 1e6:.1f}M params, fp32, batch {args.batch}, prompt {args.prompt},"
          f" {args.new} new tokens; jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}"
          f" (default {default_threads} threads); machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'metric':<34}{'transformers':>14}{'instit-jax':>14}{'speedup':>10}")
    for threads, r in results.items():
        rows = [("prefill latency (ms)", r["prefill_ms_torch"], r["prefill_ms_jax"]),
                ("decode tokens/s", r["decode_tps_jax"], r["decode_tps_torch"]),
                (f"generate {args.new} tokens (ms)", r["gen_ms_torch"], r["gen_ms_jax"])]
        for name, a, b in rows:
            ours, theirs = (a, b) if name.startswith("decode") else (b, a)
            print(f"{name + f' [torch {threads}t]':<34}{theirs:>14.2f}{ours:>14.2f}{a / b:>9.2f}x")
    print(f"prefill max |logit diff| {err:.2e}; greedy tokens identical: {same}")
    # Headline ratios are against torch's BEST thread setting (the conservative comparison).
    best_pre = min(r["prefill_ms_torch"] / r["prefill_ms_jax"] for r in results.values())
    best_dec = min(r["decode_tps_jax"] / r["decode_tps_torch"] for r in results.values())
    print(json.dumps({"prefill_speedup": round(best_pre, 3), "decode_speedup": round(best_dec, 3),
                      "per_torch_threads": {str(k): {m: round(v, 2) for m, v in r.items()} for k, r in results.items()},
                      "params_m": round(n_params / 1e6, 1), "batch": args.batch, "prompt": args.prompt,
                      "new_tokens": args.new, "max_logit_diff": err, "greedy_identical": same,
                      "load_avg": round(os.getloadavg()[0], 1)}))

if __name__ == "__main__":
    main()
