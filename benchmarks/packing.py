"""Padded-to-bucket vs packed SFT batches: trained tokens/s, conversations/s and padding, side by side.

(i)  the demo's Inst-IT SFT mix (`instit-demo`'s world, annotation pipeline and TFRecords at the default
     scale; the shipped base in demo/base; the demo's SFT recipe, configs/demo_base.py variant "instit"):
     padded = the recipe as shipped before packing (32 conversations per step, length buckets 256/384/640,
     every sample holding 2 tile slots and 6 frame slots); packed = rows of `--row-tokens` tokens holding
     several conversations, the tower on a budget of real views per row.
(ii) an Inst-IT-like mix at the 7B recipes' geometry (6,144-token context, 336 px tiles / patch 14, anyres
     up to 2x2 tiles + base, 32-frame videos pooled to 12x12 tokens): the synthetic world at 336 px with
     32-frame videos through the ground-truth annotation pipeline, with the model shrunk to fit this CPU
     (narrow tower and decoder, blockwise attention). Padded = one conversation per 6,144-token row.

Each mode is built by the trainer itself (`instit_jax.train.trainer.setup_training`: the model, state,
data pipeline and jitted step `instit-train` runs, on a one-device mesh as the demo trains): every batch
shape compiled first, then `--steps` steps timed end to end (data pipeline + step).
Last line: one JSON object with `speedup` (packed / padded trained tokens per second on (i)) and the
padding fractions.
Usage: python benchmarks/packing.py [--steps 6] [--workdir DIR (reuses the built data)] [--skip-7b]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def demo_records(wd: Path) -> Path:
    """The demo's SFT sources (world -> Set-of-Marks + annotation -> TFRecords), built once in wd."""
    from demo import base_data as B
    from demo.run import scale, write_records
    from demo.stages import annotate, marked_world

    rec = wd / "records"
    if (rec / "generic").is_dir():
        return rec
    size = scale(10.0)
    world, qa, _ = marked_world(wd, size, 0)
    replay = B.write_generic_set(wd / "replay", 2000, images=size["replay_images"], videos=size["replay_videos"],
                                 digits=size["replay_digits"], turns=5)
    ann = annotate(world["root"], wd, "groundtruth", None, None)
    return write_records(wd, ann, qa, replay)


def instit_like_records(wd: Path) -> tuple[Path, Path]:
    """(records, tokenizer.json) of the synthetic world at the 7B geometry (336 px images, 32-frame videos)."""
    from data_gen.groundtruth import annotate_world
    from data_gen.synthetic import generate_world
    from instit_jax.data.build import build
    from instit_jax.tokenizer import train_tiny_tokenizer

    rec, tok_path = wd / "records", wd / "tokenizer.json"
    if (rec / "instit").is_dir():
        return rec, tok_path
    world = generate_world(wd / "world", num_images=24, num_videos=12, frames_per_video=32, image_size=336,
                           seed=0, frame_ext="jpg")
    ann = annotate_world(world["root"], wd / "annotations")
    texts = [Path(ann["image_json"]).read_text(), Path(ann["video_json"]).read_text()]
    tok = train_tiny_tokenizer(texts * 3 + ["USER: ASSISTANT: A chat between"], vocab_size=2000)
    tok.save(str(tok_path))
    build([ann["image_json"], ann["video_json"]], ann["media_root"], str(rec / "instit"), 2)
    return rec, tok_path


def measure(config, steps: int, model=None) -> dict:
    """Build the run as `instit-train` does (`setup_training`: the trainer's model, state, data pipeline
    and compiled step), compile every row length the pipeline can give, then time `steps` steps end to end
    (a `loss_index` width first met in the loop compiles there, outside the timed wall)."""
    from instit_jax import sharding as shd
    from instit_jax.train.trainer import setup_training

    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])  # as the demo trains
    setup = setup_training(config, model=model, mesh=mesh)
    state = setup.init_state(model)
    first = setup.next_batch()
    d = config.data
    lengths = sorted({int(b) for b in d.length_buckets if int(b) <= d.max_tokens} | {d.max_tokens}
                     ) if not d.packing else [d.max_tokens]
    tokens = ("input_ids", "attention_mask", "targets", "loss_mask", "visual_index", "segment_ids", "positions")
    t0 = time.perf_counter()
    for t in lengths:
        setup.compiled_step({k: jax.ShapeDtypeStruct((v.shape[0], t) if k in tokens else v.shape, v.dtype)
                             for k, v in first.items()})
    compile_s = time.perf_counter() - t0
    state, m = setup.step(state, first)  # warm
    jax.block_until_ready(m)
    trained = convs = real = slots = 0
    step_s = 0.0
    t0 = time.perf_counter()
    late_compile = 0.0  # shapes first met in the loop (a new loss_index width): compile time, not step time
    for _ in range(steps):
        batch = setup.next_batch()
        c0 = time.perf_counter()
        setup.compiled_step(batch)
        late_compile += time.perf_counter() - c0
        s0 = time.perf_counter()
        state, m = setup.step(state, batch)
        trained += float(m["tokens"])  # (blocks until the step is done)
        step_s += time.perf_counter() - s0
        real += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].size
        seg = batch.get("segment_ids")
        convs += len(batch["input_ids"]) if seg is None else int(sum(len(np.unique(r[r > 0])) for r in seg))
    wall = time.perf_counter() - t0 - late_compile
    return {"trained_tok_s": trained / wall, "conv_s": convs / wall, "padding": 1 - real / slots,
            "step_s": step_s / steps, "wall_s": wall, "conversations": convs, "compile_s": compile_s + late_compile,
            "rows": int(first["input_ids"].shape[0]), "tokens": lengths}


def demo_configs(rec: Path, row_tokens: int, rows: int, views: int):
    from demo.run import sft_config

    base = ROOT / "demo" / "base"
    sources = {"instit": (str(rec / "instit"), 1.0), "instit_qa": (str(rec / "instit_qa"), 2.0),
               "generic": (str(rec / "generic"), 1.0)}
    padded = []
    for impl, block in (("xla", 512), ("blockwise", 128)):
        c = sft_config("bench_padded", base, sources, 1000, 1)
        c.data.packing = False
        c.data.max_tokens = 640
        c.data.length_buckets = (256, 384, 640)
        c.train.global_batch_size = 32
        c.model.attention_impl, c.model.attention_block_size = impl, block
        padded.append(c)
    packed = sft_config("bench_packed", base, sources, 1000, 1)
    packed.data.packing = True
    packed.data.max_tokens = row_tokens
    packed.data.max_views = views
    packed.train.global_batch_size = rows
    return padded[0], padded[1], packed


def instit_like_configs(rec: Path, tok_path: Path):
    """The Vicuna-7B Inst-IT recipe's data geometry (configs/llava_next_vicuna_7b_instit.py) with the model shrunk
    to fit this CPU and the synthetic records as its only source: (padded, packed)."""
    from configs.llava_next_vicuna_7b_instit import get_config
    from instit_jax.chat_template import IMAGE_TOKEN
    from instit_jax.loading import load_tokenizer
    from instit_jax.train.config import validate

    tok = load_tokenizer(tok_path)
    out = []
    for packing in (False, True):
        c = get_config()
        c.model.vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        c.model.text.update(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        c.model.image_token_id = tok.token_to_id(IMAGE_TOKEN)
        c.model.dtype = "float32"
        c.init.checkpoint, c.init.tokenizer = "", str(tok_path)
        with c.data.sources.unlocked():
            c.data.sources = {"instit": {"path": str(rec / "instit"), "weight": 1.0}}
        c.freeze.frozen_vision_layers = 1
        c.train.update(global_batch_size=2, micro_batch_size=0, total_steps=1000)
        c.mesh.update(data=1, fsdp=1)
        c.data.packing = packing
        if packing:
            c.data.max_views = 40
        validate(c)
        out.append(c)
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--row-tokens", type=int, default=1024, help="(i) packed row length")
    ap.add_argument("--rows", type=int, default=8, help="(i) packed rows per step")
    ap.add_argument("--views", type=int, default=16, help="(i) packed views per row")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-7b", action="store_true", help="only (i)")
    args = ap.parse_args()
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="bench_packing_"))
    from instit_jax.loading import load_pretrained

    rec = demo_records(wd / "demo")
    pad_xla, pad_blk, packed = demo_configs(rec, args.row_tokens, args.rows, args.views)
    base = load_pretrained(ROOT / "demo" / "base")  # the demo's SFT starts from the shipped base
    res = {"demo": {"padded_xla": measure(pad_xla, args.steps, base),
                    "padded_blockwise": measure(pad_blk, args.steps, base),
                    "packed": measure(packed, args.steps, base)}}
    if not args.skip_7b:
        rec7, tok7 = instit_like_records(wd / "instit_like")
        p7, k7 = instit_like_configs(rec7, tok7)  # random init (config.seed); both blockwise, 512
        res["instit_6k"] = {"padded": measure(p7, max(2, args.steps // 2)),
                            "packed": measure(k7, max(2, args.steps // 2))}
    print(f"{'mix':10s} {'mode':7s} {'trained tok/s':>14s} {'conv/s':>8s} {'padding':>8s} {'step s':>7s} rows x T")
    for mix, modes in res.items():
        for mode, r in modes.items():
            print(f"{mix:10s} {mode:7s} {r['trained_tok_s']:14.1f} {r['conv_s']:8.2f} {r['padding']:8.1%} "
                  f"{r['step_s']:7.2f} {r['rows']} x {r['tokens']}")
        best = max((r for k, r in modes.items() if k.startswith("padded")), key=lambda r: r["trained_tok_s"])
        print(f"{mix:10s} speedup (packed / the faster padded, trained tokens/s): "
              f"{modes['packed']['trained_tok_s'] / best['trained_tok_s']:.2f}x")
    d = res["demo"]
    best = max((d["padded_xla"], d["padded_blockwise"]), key=lambda r: r["trained_tok_s"])
    out = {"speedup": d["packed"]["trained_tok_s"] / best["trained_tok_s"],
           "speedup_vs_xla_padded": d["packed"]["trained_tok_s"] / d["padded_xla"]["trained_tok_s"],
           "padding_packed": d["packed"]["padding"], "padding_padded": best["padding"],
           "conv_speedup": d["packed"]["conv_s"] / best["conv_s"]}
    if "instit_6k" in res:
        r7 = res["instit_6k"]
        out["speedup_6k"] = r7["packed"]["trained_tok_s"] / r7["padded"]["trained_tok_s"]
        out["padding_6k_packed"], out["padding_6k_padded"] = r7["packed"]["padding"], r7["padded"]["padding"]
    out["goal_met"] = out["speedup"] >= 3 and out["padding_packed"] <= 0.10
    print(json.dumps(out))


if __name__ == "__main__":
    main()
