"""`instit-demo`: Inst-IT continuous SFT of the shipped base on the synthetic world, with its controls.

Stages (each one the same code the real recipes use):
  1. world     Inst-IT training world (images + short videos, exact masks, track IDs), bench-style training
               QA scenes, generic unmarked replay data, and a held-out bench (marked + unmarked twin)
  2. annotate  Set-of-Marks + annotations through the data_gen pipeline (ground-truth annotator by default;
               `--annotator openai` sends the same requests to GPT-4o or any compatible server)
  3. records   conversations -> TFRecord shards (the base's own tokenizer)
  4. eval (a)  the shipped base on the held-out bench
  5. Inst-IT   continuous SFT from the base: Inst-IT conversations + marked bench-style QA + a replay of
               generic unmarked data, first vision blocks frozen -> eval (b) marked, (c) unmarked frames
  6. ablation  (d): the same steps and samples on the generic unmarked data only -> eval on marked frames
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from demo import world as W
from demo.report import COLS, accuracy, results_table, write_report
from demo.stages import Stages, annotate, marked_world, run_heldout_bench

DEFAULT_BASE = Path(__file__).resolve().parent / "base"
ROW_KEYS = ("base", "instit", "instit_unmarked", "generic_only")


def scale(minutes: float) -> dict[str, int]:
    """World size and SFT steps for a time budget (10 minutes = the default full demo)."""
    f = max(0.1, minutes / 10.0)
    return {"images": max(24, int(300 * f)), "videos": max(12, int(120 * f)),
            "qa_images": max(24, int(300 * f)), "qa_videos": max(12, int(100 * f)),
            "replay_images": max(24, int(400 * f)), "replay_videos": max(8, int(100 * f)),
            "replay_digits": max(8, int(60 * f)),
            "bench_images": 40 if f >= 0.5 else 16, "bench_videos": 20 if f >= 0.5 else 8,
            "sft_steps": max(12, int(60 * f))}


def sft_config(name: str, base: Path, sources: dict[str, tuple[str, float]], steps: int, seed: int):
    """The demo's Inst-IT SFT recipe (configs/demo_base.py, variant "instit") with this run's data."""
    from configs.demo_base import get_config
    from instit_jax.chat_template import IMAGE_TOKEN
    from instit_jax.loading import load_tokenizer

    tok = load_tokenizer(base)
    c = get_config("instit")
    c.name = name
    c.seed = seed
    c.model.text.vocab_size = tok.get_vocab_size()
    c.model.image_token_id = tok.token_to_id(IMAGE_TOKEN)
    c.init.tokenizer = str(base / "tokenizer.json")
    with c.data.sources.unlocked():
        c.data.sources = {}
        for k, (path, w) in sources.items():
            c.data.sources[k] = {"path": path, "weight": w}
    c.train.total_steps = steps
    c.train.checkpoint_every = steps
    c.train.log_every = max(1, steps // 6)
    return c


def write_records(wd: Path, ann: dict, qa: dict, replay: Path) -> Path:
    """The SFT sources as TFRecord shards under wd/records: instit (the annotation pipeline's conversations),
    instit_qa (bench-style marked QA), generic (the unmarked replay)."""
    from demo.conversations import bench_style_conversations
    from instit_jax.data.build import build

    qa_json = wd / "train_qa.json"
    qa_json.write_text(json.dumps(bench_style_conversations(Path(qa["root"]), "qa", turns_per_conversation=6)))
    rec = wd / "records"
    build([ann["image_json"], ann["video_json"]], ann["media_root"], str(rec / "instit"), 2, group_by=W.GROUP_BY)
    build([str(qa_json)], qa["root"], str(rec / "instit_qa"), 2)
    build([str(replay)], str(replay.parent), str(rec / "generic"), 2)
    return rec


def run_demo(workdir: str | Path, *, minutes: float = 10.0, annotator: str = "groundtruth",
             base_url: str | None = None, model_name: str | None = None, seed: int = 0,
             base: str | Path = DEFAULT_BASE, eval_batch_size: int = 16, ablation: bool = True) -> dict[str, Any]:
    """Run every stage in `workdir`; returns the per-row bench summaries and timings."""
    import jax

    from demo import base_data as B
    from instit_jax.loading import load_pretrained, load_tokenizer
    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    base = Path(base).resolve()
    if not (base / "model.safetensors").is_file():
        raise SystemExit(f"{base}: no shipped base (model.safetensors); build one with "
                         "`instit-demo build-base --out DIR --ship DIR/base` and pass --base, or use --from-scratch")
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    wd = Path(workdir).resolve()  # Orbax wants absolute paths
    wd.mkdir(parents=True, exist_ok=True)
    size = scale(minutes)
    st = Stages()

    def make_world():
        world, qa, bench = marked_world(wd, size, seed)
        replay = B.write_generic_set(wd / "replay", seed + 2000, images=size["replay_images"],
                                     videos=size["replay_videos"], digits=size["replay_digits"], turns=5)
        return world, qa, replay, bench

    world, qa, replay, bench = st.run("1/6 synthetic world + held-out bench", make_world)
    bench_dir = Path(bench["root"])

    ann = st.run("2/6 Set-of-Marks + annotation pipeline", annotate, world["root"], wd, annotator, base_url,
                 model_name)

    rec = st.run("3/6 TFRecords", write_records, wd, ann, qa, replay)
    tok = load_tokenizer(base)
    base_model = load_pretrained(base)
    results: dict[str, dict] = {}
    st.run("4/6 held-out bench: (a) the base", lambda: results.__setitem__("base", run_heldout_bench(
        base_model, tok, bench_dir, wd / "eval" / "base", media_root=None, batch_size=eval_batch_size,
        label="base")))

    c_instit = sft_config("demo_instit", base, {"instit": (str(rec / "instit"), 1.0),
                                                "instit_qa": (str(rec / "instit_qa"), 2.0),
                                                "generic": (str(rec / "generic"), 1.0)},
                          size["sft_steps"], seed + 1)
    r = st.run("5/6 Inst-IT continuous SFT (first vision blocks frozen) + eval (b), (c)", _sft_and_eval, train,
               c_instit, wd / "instit", base_model, mesh, [("instit", None), ("instit_unmarked",
                                                                             Path(bench["raw_root"]))],
               tok, bench_dir, wd, eval_batch_size)
    results.update(r)
    if ablation:
        c_generic = sft_config("demo_generic_only", base, {"generic": (str(rec / "generic"), 1.0)},
                               size["sft_steps"], seed + 1)
        r = st.run("6/6 ablation (d): the same SFT budget on generic unmarked data only", _sft_and_eval, train,
                   c_generic, wd / "generic_only", base_model, mesh, [("generic_only", None)], tok, bench_dir,
                   wd, eval_batch_size)
        results.update(r)

    report = write_report(wd, results, bench_dir, st.timings)
    total = time.time() - st.t0
    print()
    print(results_table(results))
    print(f"\nreport: {report}   total wall time: {total:.0f}s")
    summary = {k: {c: accuracy(v["summaries"].get(c)) for c in COLS} for k, v in results.items()}
    (wd / "summary.json").write_text(json.dumps({"results": summary, "timings": st.timings, "total_s": total,
                                                  "base": str(base), "seed": seed, "minutes": minutes},
                                                 indent=2))
    return {"results": summary, "timings": st.timings, "total_s": total, "report": str(report)}


def _sft_and_eval(train, config, workdir: Path, model, mesh, rows, tok, bench_dir: Path, wd: Path,
                  batch_size: int) -> dict[str, dict]:
    trained = train(config, str(workdir), model=model, mesh=mesh).model()
    return {row: run_heldout_bench(trained, tok, bench_dir, wd / "eval" / row, media_root=root,
                                   batch_size=batch_size, label=row) for row, root in rows}
