"""`instit-demo --from-scratch`: the demo's random-init path, kept for whoever studies it.

A tiny LLaVA-NeXT from random init (configs/tiny_synthetic.py): stage 1 on plain captions of UNMARKED
scenes, stage 2 Inst-IT continuous SFT (marked), then the held-out bench: (a) stage 1, (b) stage 2, (c)
stage 2 on unmarked frames. Within minutes on a CPU it does not learn to bind marks (README's demo
status; `python -m demo.binding_probe` measures why); the default demo starts from the shipped base.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from data_gen.synthetic_scene import Difficulty
from demo.conversations import bench_style_conversations, stage1_conversations, train_tokenizer
from demo.report import COLS, accuracy, results_table, write_report
from demo.stages import Stages, annotate, marked_world, run_heldout_bench
from demo.world import FRAMES, GROUP_BY

LR = 1e-3  # peak lr of both stages (3e-3 learnt instance binding far worse in probes)
STAGE1_VISION_LR = 1e-3  # stage 1 trains the from-scratch tower at the LM's rate (its "pre-training")
VISION_LR = 1e-4  # stage 2: the tower trains 10x slower than the rest, as in the paper's recipes
PRETRAIN_DIFFICULTY = Difficulty(1, 3, small=0.0, occlusion=0.0)  # stage 1's unmarked caption scenes


def _scale(minutes: float) -> dict[str, int]:
    """World size and step counts for a time budget (10 minutes = the default full demo)."""
    f = max(0.1, minutes / 10.0)
    return {"images": max(24, int(400 * f)), "videos": max(12, int(160 * f)),
            "qa_images": max(24, int(300 * f)), "qa_videos": max(12, int(120 * f)),
            "bench_images": 40 if f >= 0.5 else 16, "bench_videos": 20 if f >= 0.5 else 8,
            "stage1_steps": max(20, int(400 * f)), "stage2_steps": max(40, int(400 * f))}


def make_config(name: str, wd: Path, tok, sources: dict[str, tuple[str, float]], steps: int, *,
                frozen: int, lr: float, init_tokenizer: str, seed: int, vision_lr: float | None = None):
    """The demo recipe (configs/tiny_synthetic.py) with this run's data, tokenizer and step count.

    vision_lr defaults to VISION_LR (10x below lr, the paper's ratio).
    """
    from configs.tiny_synthetic import get_config
    from instit_jax.chat_template import IMAGE_TOKEN

    c = get_config()
    c.name = name
    c.seed = seed
    c.model.text.vocab_size = tok.get_vocab_size()
    c.model.image_token_id = tok.token_to_id(IMAGE_TOKEN)
    c.init.tokenizer = init_tokenizer
    with c.data.sources.unlocked():
        c.data.sources = {}
        for k, (path, w) in sources.items():
            c.data.sources[k] = {"path": path, "weight": w}
    c.train.total_steps = steps
    c.train.checkpoint_every = steps
    c.optim.lr = lr
    c.optim.vision_lr = VISION_LR if vision_lr is None else vision_lr
    c.freeze.frozen_vision_layers = frozen
    c.mesh.fsdp = 1
    c.mesh.data = 1
    return c


def run_from_scratch(workdir: str | Path, *, minutes: float = 10.0, annotator: str = "groundtruth",
             base_url: str | None = None, model_name: str | None = None, seed: int = 0,
             eval_batch_size: int = 16) -> dict[str, Any]:
    """Run every stage in `workdir`; returns the per-row bench summaries and timings."""
    import jax

    from data_gen.synthetic import generate_world
    from instit_jax.data.build import build
    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    # One device: the demo is a single-process CPU run (also where tests fake 8 host devices).
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    wd = Path(workdir).resolve()  # Orbax wants absolute paths
    wd.mkdir(parents=True, exist_ok=True)
    size = _scale(minutes)
    st = Stages()

    def make_world():
        # Stage 1's "pre-training" scenes are simpler (1-3 shapes, no occlusion): a from-scratch tower
        # learns to ground caption words in pixels there within the budget (with 2-4 shapes it did not).
        pre = generate_world(wd / "pretrain_world", num_images=size["images"], num_videos=size["videos"] // 2,
                             frames_per_video=FRAMES, seed=seed + 250, difficulty=PRETRAIN_DIFFICULTY)
        world, qa, bench = marked_world(wd, size, seed)
        return pre, world, qa, bench

    pre, world, qa, bench = st.run("1/6 synthetic world + held-out bench", make_world)
    bench_dir = Path(bench["root"])

    ann = st.run("2/6 Set-of-Marks + annotation pipeline", annotate, world["root"], wd, annotator, base_url,
                 model_name)

    def records():
        s1 = wd / "stage1.json"
        s1.write_text(json.dumps(stage1_conversations(pre)))
        qa_json = wd / "train_qa.json"
        qa_json.write_text(json.dumps(bench_style_conversations(Path(qa["root"]), "qa")))
        tok = train_tokenizer(wd, [s1, qa_json, Path(ann["image_json"]), Path(ann["video_json"])])
        rec = wd / "records"
        build([str(s1)], str(pre["root"]), str(rec / "stage1"), 2)
        build([ann["image_json"], ann["video_json"]], ann["media_root"], str(rec / "instit"), 2, group_by=GROUP_BY)
        build([str(qa_json)], qa["root"], str(rec / "general"), 2)
        return tok, rec

    tok, rec = st.run("3/6 tokenizer + TFRecords", records)
    results: dict[str, dict] = {}
    tok_path = str(wd / "tokenizer.json")

    c1 = make_config("demo_stage1", wd, tok, {"captions": (str(rec / "stage1"), 1.0)}, size["stage1_steps"],
                     frozen=0, lr=LR, init_tokenizer=tok_path, seed=seed, vision_lr=STAGE1_VISION_LR)
    r1 = st.run("4/6 stage 1: captions of unmarked scenes", train, c1, str(wd / "stage1"), mesh=mesh)
    stage1_model = r1.model()

    c2 = make_config("demo_stage2", wd, tok, {"instit": (str(rec / "instit"), 1.0),
                                              "general": (str(rec / "general"), 2.0)},
                     size["stage2_steps"], frozen=2, lr=LR, init_tokenizer=tok_path, seed=seed + 1)
    r2 = st.run("5/6 stage 2: Inst-IT continuous SFT (frozen early vision blocks)", train, c2,
                str(wd / "stage2"), model=stage1_model, mesh=mesh)
    stage2_model = r2.model()

    def run_evals():
        for row, m, root in (("stage1", stage1_model, None), ("stage2", stage2_model, None),
                             ("stage2_unmarked", stage2_model, Path(bench["raw_root"]))):
            results[row] = run_heldout_bench(m, tok, bench_dir, wd / "eval" / row, media_root=root,
                                             batch_size=eval_batch_size, label=row)

    st.run("6/6 held-out bench", run_evals)
    report = write_report(wd, results, bench_dir, st.timings)
    total = time.time() - st.t0
    print()
    print(results_table(results))
    print(f"\nreport: {report}   total wall time: {total:.0f}s")
    summary = {k: {c: accuracy(v["summaries"].get(c)) for c in COLS} for k, v in results.items()}
    (wd / "summary.json").write_text(json.dumps({"results": summary, "timings": st.timings,
                                                  "total_s": total}, indent=2))
    return {"results": summary, "timings": st.timings, "total_s": total, "report": str(report)}
