"""Serving throughput: `BatchEngine` (what instit-serve runs) vs transformers `generate` once per request.

Model: a tiny-ish LLaVA-NeXT in the llava-hf layout (small CLIP tower, Llama decoder of width 512, 6 layers,
8 heads / 4 KV heads, SwiGLU 1408, a BPE vocabulary of ~2k: ~20M parameters), random weights, the same
file loaded by both stacks. Requests are text questions in the vicuna template (the vision tower is
not timed), greedy, `--new` tokens at most, with the template's stop token.

For 1, 4 and 16 concurrent clients (threads; each sends `--rounds` requests back to back):
  ours:   `BatchEngine.answer` (continuous batching, --max-batch 16), in this process;
  theirs: a server that answers one request at a time with `LlavaNextForConditionalGeneration.generate`
          (a lock in front of it, as a naive server would), torch at its default thread count.
Reported per stack and level: generated tokens/s over the level's wall time, p50 / p95 request latency,
p50 time to the first token (ours: the engine's token callback; theirs: a generate streamer).
Also, measured in the same run, the goals' figures on a second, "roofline" model: the same LLaVA-NeXT layout
with a Llama decoder of width 2048 (16 heads / 8 KV heads, SwiGLU 5632) and as many layers as make its weights
at least 4x the CPU's last-level cache and at least 1 GiB (11 layers, 2.1 GB, on a 480 MiB cache), random
weights, served by a `BatchEngine` alone:
  `roofline_fraction`: single-stream decode weight bytes/s / this machine's memory read bandwidth (the best of
      three all-core full reads of an array as large as those weights: XLA's sum, the same split per core,
      torch's sum);
  `prefill_peak_fraction`: FLOP/s of a 128-token prefill (the engine's jitted prefill, counting the FLOPs it
      runs: its last block runs attention, o_proj and the MLP for the last position only) / the f32 matmul
      peak (jitted 2048^3 matmul); `prefill_full_flops_peak_fraction` counts a full prefill's FLOPs instead,
      every block on every position, as transformers runs it.
The serve model's decode reads weights that may sit in the last-level cache (its fraction can pass 1); its
figures are reported under `serve_model`, with a bare jitted loop of one matrix-vector product per decoder
weight matrix as the checkpoint stores them (`gemv_loop_*`) for context. Decode and prefill run on the
engine's `llm.inference_view` of the weights (fewer, wider matrices stored [out, in]; on CPU the decode
products and attention run the kernels of `instit_jax/kernels/cpu.py`).
Compilations inside each timed level are counted (`compiles`). The HTTP layer is not in the loop: these
numbers are the engine's (instit-serve adds JSON and base64 on top).
The last line is one JSON object; `speedup_16` = ours / transformers tokens/s at 16 clients.
Usage: python benchmarks/serve.py [--new 32] [--rounds 2] [--max-batch 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

WORDS = ("red blue green small large cube ball cone left right above below moves stops frame object marked "
         "table floor near far first last turns slides appears leaves the a of on in at what which where when "
         "how many is does between colour shape size").split()


def build(tmp: Path):
    import torch
    import transformers as T

    from instit_jax.chat_template import VICUNA_V1
    from instit_jax.tokenizer import train_tiny_tokenizer

    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 12)) for _ in range(2000)] + [VICUNA_V1.system] * 20
    tok = train_tiny_tokenizer(corpus, vocab_size=2048)
    tok.save(str(tmp / "tokenizer.json"))
    torch.manual_seed(0)
    vc = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = T.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=512, intermediate_size=1408,
                       num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = T.LlavaNextConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                            image_token_index=tok.token_to_id("<image>"), vision_feature_layer=-2,
                            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    hf = T.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp / "hf")
    tok.save(str(tmp / "hf" / "tokenizer.json"))
    return hf, tok


def questions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"question {i}: " + " ".join(rng.choice(WORDS, int(rng.integers(6, 20)))) + "?" for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_level(ask, qs: list[str], clients: int) -> dict:
    """`clients` threads, each asking its share of qs back to back; -> tokens/s, latencies, TTFT."""
    lat, ttft, ntok = [], [], []
    lock = threading.Lock()

    def worker(share: list[str]) -> None:
        for q in share:
            t0 = time.perf_counter()
            n, first = ask(q, t0)
            with lock:
                lat.append(time.perf_counter() - t0)
                ttft.append(first)
                ntok.append(n)

    shares = [qs[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, shares))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(qs), "tokens": int(sum(ntok)), "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(ntok) / wall, 2), "p50_s": round(pct(lat, 50), 4),
            "p95_s": round(pct(lat, 95), 4), "ttft_p50_s": round(pct(ttft, 50), 4)}


def memory_bandwidth(nbytes: int, repeats: int = 5) -> tuple[float, dict]:
    """This machine's memory read bandwidth in bytes/s: the best of three full reads of an `nbytes` f32 array
    with all cores (XLA's jitted sum; the same split into one row per core; torch's sum at all threads), each
    its best of `repeats` -> (bytes/s, {reader: GB/s})."""
    import torch

    n = nbytes // 4 // os.cpu_count() * os.cpu_count()
    x = jnp.ones((n,), jnp.float32)
    rows = x.reshape(os.cpu_count(), -1)
    flat, per_core = jax.jit(jnp.sum), jax.jit(lambda a: jnp.sum(a, axis=1))
    readers = {"xla_sum": lambda: flat(x).block_until_ready(),
               "xla_sum_per_core_rows": lambda: per_core(rows).block_until_ready()}
    t = torch.ones(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    readers["torch_sum"] = lambda: t.sum()
    out = {}
    for name, read in readers.items():
        read()
        out[name] = round(n * 4 / min(_time(read) for _ in range(repeats)) / 1e9, 2)
    torch.set_num_threads(threads)
    return max(out.values()) * 1e9, out


def gemv_loop_steps_per_s(mats: list, steps: int = 32, repeats: int = 3) -> float:
    """Steps/s of a jitted loop whose step is one matrix-vector product with each of `mats` (the decoder's
    weight matrices): what XLA reaches on these weights at batch 1 with nothing else in the step."""
    @jax.jit
    def loop(mats, x, n):
        def body(_, x):
            s = 0.0
            for m in mats:
                s = s + jnp.sum(x[:, :m.shape[0]] @ m, axis=1, keepdims=True)  # x is as wide as the widest input
            return x + s * 1e-9
        return jax.lax.fori_loop(0, n, body, x)

    x = jnp.ones((1, max(max(m.shape) for m in mats)), jnp.float32)
    loop(mats, x, 1).block_until_ready()
    loop(mats, x, steps + 1).block_until_ready()
    t1 = min(_time(lambda: loop(mats, x, 1).block_until_ready()) for _ in range(repeats))
    tn = min(_time(lambda: loop(mats, x, steps + 1).block_until_ready()) for _ in range(repeats))
    return steps / max(tn - t1, 1e-9)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache's size (Linux sysfs), or None."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes) if sizes else None


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=32, help="max new tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()

    import torch
    from transformers.generation.streamers import BaseStreamer

    from instit_jax.assistant import Assistant, BatchEngine

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    hf, tok = build(tmp)
    assistant = Assistant.from_pretrained(str(tmp / "hf"))
    engine = BatchEngine(assistant, max_batch=args.max_batch, max_context=256)
    dec = assistant.model.language_model
    tc = dec.cfg
    n_dec = param_count(dec)
    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")

    def ours(q: str, t0: float) -> tuple[int, float]:
        first: list[float] = []
        ans = engine.answer(q, max_new_tokens=args.new,
                            on_token=lambda _: first or first.append(time.perf_counter() - t0))
        return len(ans.tokens), first[0]

    class FirstToken(BaseStreamer):
        def __init__(self, t0: float):
            self.t0, self.calls, self.first = t0, 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # the first call carries the prompt
                self.first = time.perf_counter() - self.t0

        def end(self):
            pass

    hf_lock = threading.Lock()

    def theirs(q: str, t0: float) -> tuple[int, float]:
        ids = assistant.prompt_ids(q, None, False).astype(np.int64)
        with hf_lock, torch.inference_mode():
            s = FirstToken(t0)
            x = torch.from_numpy(ids)
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.new,
                              do_sample=False, eos_token_id=eos, pad_token_id=pad, streamer=s)
        gen = out[0, ids.shape[1]:].tolist()
        n = gen.index(eos) + 1 if eos in gen else len(gen)
        return n, s.first if s.first is not None else time.perf_counter() - t0

    # warm up (steady state: a running server has compiled the shapes its traffic needs): the levels in the
    # timed order, twice, so the prompt buckets, the decode at every slot width and the cache resizes between
    # widths are compiled; compilations still left inside the timed levels are counted and reported
    for rep in range(2):
        for n in args.levels:
            warm = questions(args.rounds * n, seed=99 + n + 1000 * rep)
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda q: engine.answer(q, max_new_tokens=args.new), warm))
    theirs(warm[0], time.perf_counter())

    # same answers? (greedy; the engine vs transformers on a few questions)
    check = questions(6, seed=7)
    same = sum(engine.answer(q, max_new_tokens=args.new).tokens == theirs_tokens(hf, assistant, q, args.new, eos, pad)
               for q in check) / len(check)

    compiles = [0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: event == "/jax/core/compile/backend_compile_duration" and compiles.__setitem__(0, compiles[0] + 1))
    results = {"ours": [], "transformers": []}
    for level in args.levels:
        qs = questions(level * args.rounds, seed=level)
        for name, fn in (("transformers", theirs), ("ours", ours)):
            before = compiles[0]
            r = run_level(fn, qs, level)
            if name == "ours":
                r["compiles"] = compiles[0] - before
            results[name].append(r)
            print(f"{name:12s} clients={level:2d} {r['tokens_per_s']:8.1f} tok/s  p50 {r['p50_s']:.3f}s  "
                  f"p95 {r['p95_s']:.3f}s  ttft p50 {r['ttft_p50_s']:.3f}s  ({r['requests']} requests, "
                  f"{r['tokens']} tokens)", flush=True)

    # single-stream decode bytes/s vs memory bandwidth; prefill FLOP/s vs matmul peak. The serve model's weights
    # may fit in the last-level cache (then its decode reads them from cache); the roofline model's do not
    llc = last_level_cache_bytes()
    big = roofline_assistant(tok, llc)
    big_engine = BatchEngine(big, max_batch=1, max_context=256)
    big_dec = big.model.language_model
    n_big = param_count(big_dec)
    big_weight_bytes = decode_weight_bytes(big_dec.cfg, n_big)
    bw, readers = memory_bandwidth(max(big_weight_bytes, 512 << 20))
    peak = matmul_peak()
    q1 = questions(1, seed=5)[0]
    decode_tok_s = single_stream_tok_s(engine, q1, 66)
    weight_bytes = decode_weight_bytes(tc, n_dec)
    big_tok_s = single_stream_tok_s(big_engine, q1, 34)
    mats = [x for path, x in jax.tree.leaves_with_path(nnx_state(dec))
            if x.ndim == 2 and "embed_tokens" not in jax.tree_util.keystr(path)]
    gemv_steps_s = gemv_loop_steps_per_s(mats)
    t_prefill, flops, executed = prefill(engine, tc, n_dec, 128)
    t_big_prefill, big_flops, big_executed = prefill(big_engine, big_dec.cfg, n_big, 128)
    big_engine.close()

    def at(name: str, level: int) -> float:
        return next(r["tokens_per_s"] for r in results[name] if r["clients"] == level)

    summary = {
        "benchmark": "serve", "model_params_decoder": n_dec, "max_new_tokens": args.new,
        "max_batch": args.max_batch, "greedy_same_as_transformers": round(same, 3),
        "levels": results,
        **{f"speedup_{lv}": round(at("ours", lv) / at("transformers", lv), 2) for lv in args.levels},
        "memory_read_gb_s": round(bw / 1e9, 2), "memory_readers_gb_s": readers,
        "matmul_peak_gflop_s": round(peak / 1e9, 1), "last_level_cache_bytes": llc,
        # the roofline model (decoder weights larger than the last-level cache): the goals' figures
        "roofline_model": {"params_decoder": n_big, "layers": big_dec.cfg.num_hidden_layers,
                           "hidden": big_dec.cfg.hidden_size, "decode_weight_bytes": big_weight_bytes},
        "roofline_single_stream_tok_s": round(big_tok_s, 2),
        "roofline_fraction": round(big_tok_s * big_weight_bytes / bw, 3),
        "prefill_128_s": round(t_big_prefill, 4),
        "prefill_peak_fraction": round(big_executed / t_big_prefill / peak, 3),
        "prefill_full_flops_peak_fraction": round(big_flops / t_big_prefill / peak, 3),
        # the serve model (the one timed against transformers above)
        "serve_model": {
            "single_stream_decode_tok_s": round(decode_tok_s, 1), "decode_weight_bytes": weight_bytes,
            "decode_weights_fit_in_cache": bool(llc and weight_bytes < llc),
            "roofline_fraction": round(decode_tok_s * weight_bytes / bw, 3),
            "gemv_loop_steps_s": round(gemv_steps_s, 1),
            "gemv_loop_roofline_fraction": round(gemv_steps_s * sum(m.size * 4 for m in mats) / bw, 3),
            "decode_vs_gemv_loop": round(decode_tok_s / gemv_steps_s, 3),
            "prefill_128_s": round(t_prefill, 4),
            "prefill_peak_fraction": round(executed / t_prefill / peak, 3),
            "prefill_full_flops_peak_fraction": round(flops / t_prefill / peak, 3)},
        "engine_stats": engine.stats,
        "goals": {"speedup_16": 5, "roofline_fraction": 0.85, "prefill_peak_fraction": 0.7},
    }
    summary["goals_met"] = {k: bool(summary[k] >= v) for k, v in summary["goals"].items()}
    print("goals (>=): " + ", ".join(f"{k} {summary[k]} / {v} {'met' if summary['goals_met'][k] else 'MISSED'}"
                                      for k, v in summary["goals"].items()), flush=True)
    print(json.dumps(summary))


def decode_weight_bytes(tc, n_dec: int) -> int:
    """Bytes a decode step reads for one token: every decoder weight but the embedding table (one row of it)."""
    return (n_dec - tc.vocab_size * tc.hidden_size) * 4 + tc.hidden_size * 4


def single_stream_tok_s(engine, q: str, new: int, repeats: int = 5) -> float:
    """Decode tokens/s of one request alone: (answer of `new` tokens - answer of 2 tokens) / extra tokens, each
    the best of `repeats` (this machine's memory bandwidth swings by 2x from second to second: the bandwidth
    readers also take their best)."""
    engine.answer(q, max_new_tokens=2)
    engine.answer(q, max_new_tokens=new)
    t_short = min(_time(lambda: engine.answer(q, max_new_tokens=2)) for _ in range(repeats))
    t_long = min(_time(lambda: engine.answer(q, max_new_tokens=new)) for _ in range(repeats))
    steps = len(engine.answer(q, max_new_tokens=new).tokens) - len(engine.answer(q, max_new_tokens=2).tokens)
    if steps < new // 2:
        raise RuntimeError(f"the model stopped after {steps + 2} tokens; pick another question")
    return steps / max(t_long - t_short, 1e-9)


def prefill(engine, tc, n_dec: int, t: int) -> tuple[float, int, int]:
    """Best of 5 timings of the engine's prefill of a `t`-token prompt (its jitted `_prefill`, on the weights it
    decodes with) -> (seconds, FLOPs of a full prefill, FLOPs the engine runs). A full prefill runs every block on
    every position (as transformers does) and the head at the last; the engine's last block runs attention,
    o_proj and the MLP for the last position only (`hidden_states(last_only=True)`). Attention is counted as
    full t x t products in both (the CPU kernel skips the masked half; at t=128 a small share)."""
    from instit_jax.assistant import _prefill

    ids = np.random.default_rng(0).integers(4, tc.vocab_size, (1, t)).astype(np.int32)
    mask = np.ones_like(ids)
    kd = jax.random.key_data(jax.random.key(0))[None]
    call = lambda: jax.block_until_ready(_prefill(
        engine.dec_graphdef, engine.dec_state, jnp.asarray(ids), None, jnp.asarray(mask), kd, jnp.asarray([True]),
        jnp.zeros((1,), jnp.float32), jnp.ones((1,), jnp.float32), cache_len=t))
    call()
    seconds = min(_time(call) for _ in range(5))
    d, L, n_embed = tc.hidden_size, tc.num_hidden_layers, tc.vocab_size * tc.hidden_size
    n_head = 0 if tc.tie_word_embeddings else n_embed
    q_width = tc.num_attention_heads * (tc.head_dim or d // tc.num_attention_heads)
    attn = 4 * t * t * q_width * L  # QK^T and AV
    full = 2 * (n_dec - n_embed - n_head) * t + attn + 2 * n_embed
    skipped = 2 * (t - 1) * (q_width * d + 3 * d * tc.intermediate_size) + attn // L * (t - 1) // t
    return seconds, full, full - skipped


def roofline_assistant(tok, llc: int | None):
    """An Assistant over a randomly initialised LLaVA-NeXT (the serve model's tokenizer and tiny vision tower)
    whose decoder is Llama-shaped at width 2048 (16 heads, 8 KV heads, SwiGLU 5632) with as many layers as
    make its weights at least 4x the last-level cache and at least 1 GiB: single-stream decode must stream
    them from memory, as a 7B model's decode does on any CPU."""
    from flax import nnx

    from instit_jax.assistant import Assistant
    from instit_jax.models.config import LlavaConfig, TextConfig, VisionConfig
    from instit_jax.models.llava_next import LlavaNextModel

    d, inter, heads, kv = 2048, 5632, 16, 8
    per_layer = 4 * (2 * d * d + 2 * d * (kv * d // heads) + 3 * d * inter)
    layers = -(-max(4 * (llc or 0), 1 << 30) // per_layer)
    text = TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=d, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=2048)
    vision = VisionConfig(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2)
    cfg = LlavaConfig(vision=vision, text=text, image_token_id=tok.token_to_id("<image>"),
                      image_grid_pinpoints=((28, 56), (56, 28), (56, 56)))
    return Assistant(LlavaNextModel(cfg, rngs=nnx.Rngs(0)), tok)


def theirs_tokens(hf, assistant, q: str, new: int, eos: int, pad: int) -> list[int]:
    import torch

    ids = assistant.prompt_ids(q, None, False).astype(np.int64)
    x = torch.from_numpy(ids)
    with torch.inference_mode():
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                          eos_token_id=eos, pad_token_id=pad)
    gen = out[0, ids.shape[1]:].tolist()
    return gen[:gen.index(eos) + 1] if eos in gen else gen


def nnx_state(module):
    from flax import nnx
    return nnx.state(module, nnx.Param)


def param_count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx_state(module)))


if __name__ == "__main__":
    sys.exit(main())
