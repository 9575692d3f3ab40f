"""`instit-demo`: the Inst-IT method in miniature, end to end, on a laptop CPU, with no key or download.

Stages (each one the same code the real recipes use):
  1. world     synthetic scenes (images + short videos, exact masks, track IDs) and a held-out bench
  2. annotate  Set-of-Marks + annotations through the data_gen pipeline (ground-truth annotator by
               default; `--annotator openai` sends the same requests to GPT-4o or any compatible server)
  3. records   tokenizer trained on the synthetic corpus; conversations -> TFRecord shards
  4. stage 1   a tiny LLaVA-NeXT from random init, trained on plain captions of UNMARKED scenes
  5. stage 2   continuous SFT on the Inst-IT data (marked), early vision blocks frozen
  6. eval      held-out bench (image/video x MC/OE; OE by the world's rule-based judge):
               (a) stage 1, (b) stage 2, (c) stage 2 on unmarked frames; table + DIR/report.md
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from data_gen.synthetic_scene import Difficulty

CHANCE = {"image_multi_choice": 25.0, "video_multi_choice": 25.0, "image_open_ended": None,
          "video_open_ended": None}
ROWS = (("stage1", "(a) stage 1 only (captions of unmarked scenes)"),
        ("stage2", "(b) stage 2: Inst-IT continuous SFT"),
        ("stage2_unmarked", "(c) stage 2 evaluated on unmarked frames"))
LR = 1e-3  # peak lr of both stages (3e-3 learnt instance binding far worse in probes)
STAGE1_VISION_LR = 1e-3  # stage 1 trains the from-scratch tower at the LM's rate (its "pre-training")
VISION_LR = 1e-4  # stage 2: the tower trains 10x slower than the rest, as in the paper's recipes
PRETRAIN_DIFFICULTY = Difficulty(1, 3, small=0.0, occlusion=0.0)  # stage 1's unmarked caption scenes
WORLD_DIFFICULTY = "medium"  # the Inst-IT world, the bench-style QA scenes and the held-out bench
# Set-of-Marks label boxes: "plain" (the reference look) or "id" (filled with each ID's colour). "id" was
# tried so a from-scratch tower could read the ID as a colour rather than a 3x5-pixel digit: no bench gain
# at 3.2k or 12.8k stage-2 samples (binding itself is what the tiny model has not learnt by then).
MARK_LABEL_BOX = "plain"
GROUP_BY = "level"  # one Inst-IT conversation per annotation level: every sample fits the 512-token context
QA_PER_ITEM = 12  # bench-style training questions per training image / video (the bench asks 3)
COLS = ("image_multi_choice", "image_open_ended", "video_multi_choice", "video_open_ended")
COL_NAMES = ("image MC", "image OE", "video MC", "video OE")


def _scale(minutes: float) -> dict[str, int]:
    """World size and step counts for a time budget (10 minutes = the default full demo)."""
    f = max(0.1, minutes / 10.0)
    return {"images": max(24, int(400 * f)), "videos": max(12, int(160 * f)),
            "qa_images": max(24, int(300 * f)), "qa_videos": max(12, int(120 * f)),
            "bench_images": 40 if f >= 0.5 else 16, "bench_videos": 20 if f >= 0.5 else 8,
            "stage1_steps": max(20, int(400 * f)), "stage2_steps": max(40, int(400 * f))}


def stage1_conversations(world: dict[str, str]) -> list[dict]:
    """LLaVA-format caption data on the raw (unmarked) media: the 'pre-Inst-IT' model's diet.

    The captions are the world's plain captions (instances in reading order with their places, no
    IDs): what a caption of an unmarked image can say, every word predictable from the pixels.
    """
    plain = json.loads(Path(world["plain_captions"]).read_text())
    out: list[dict] = []
    for rec in json.loads(Path(world["image_json"]).read_text()):
        raw = rec["image_path"].replace("/marked/", "/raw/")
        out.append({"id": f"cap-img-{rec['image_id']}", "image": raw,
                    "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                      {"from": "gpt", "value": plain[raw]}]})
    for rec in json.loads(Path(world["video_json"]).read_text()):
        raw = rec["video_path"].replace("/marked/", "/raw/")
        out.append({"id": f"cap-vid-{rec['video_id']}", "video": raw,
                    "conversations": [{"from": "human", "value": "<image>\nDescribe the video briefly."},
                                      {"from": "gpt", "value": plain[raw]}]})
    return out


def _short_prompt(item) -> str:
    """A follow-up turn's text: the question (and options), without the bench's long preamble.

    The options alone say "answer with a letter" once the first turn has: no repeated instruction line
    (it was ~17 of a turn's ~37 tokens, and a 12-turn conversation did not fit 512 tokens).
    """
    if item.fmt == "mc":
        options = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", item.choices))
        return f"{item.question}\n{options}"
    return item.question


def bench_style_conversations(bench_dir: Path, prefix: str, turns_per_conversation: int = 12) -> list[dict]:
    """General instruction data in the bench's question style, from scenes disjoint from the bench.

    Every question about a medium is asked twice, once as MC and once as OE, in two different
    conversations (so no conversation holds the answer to one of its own questions): conversation
    "a" takes MC for the even questions and OE for the odd ones, "b" the opposite. Each conversation's
    first turn is exactly the bench's prompt (what evaluation asks); later turns are the bare question,
    so answers are a large share of the trained tokens. Long question lists are cut into conversations
    of at most `turns_per_conversation` turns.
    """
    from eval.bench import load_bench
    from eval.prompts import DEFAULT_PROMPTS

    bench = load_bench(bench_dir)
    groups: dict[tuple[str, str], dict[str, list]] = {}
    for item in bench.all_items():
        media = item.image if item.split == "image" else item.video_dir
        groups.setdefault((item.split, str(media)), {}).setdefault(item.question_id, []).append(item)
    out = []
    for (split, media), by_question in groups.items():
        rel = str(Path(media).relative_to(bench_dir))
        questions = [sorted(v, key=lambda it: it.fmt) for _, v in sorted(by_question.items())]  # (mc, oe)
        for variant in range(2):
            items = [pair[(i + variant) % len(pair)] for i, pair in enumerate(questions)]
            for c, lo in enumerate(range(0, len(items), turns_per_conversation)):
                turns = []
                for i, item in enumerate(items[lo:lo + turns_per_conversation]):
                    text = "<image>\n" + DEFAULT_PROMPTS.build(item) if i == 0 else _short_prompt(item)
                    turns += [{"from": "human", "value": text}, {"from": "gpt", "value": item.answer}]
                out.append({"id": f"{prefix}-{split}-{Path(rel).stem}-{'ab'[variant]}{c}",
                            **({"image": rel} if split == "image" else {"video": rel}), "conversations": turns})
    return out


def corpus_texts(docs: list[Any]) -> list[str]:
    """Every string (and dict key) in the given parsed JSON documents (for training the tiny tokenizer)."""
    texts: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            texts.append(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                texts.append(str(k))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for doc in docs:
        walk(doc)
    return texts


def train_tokenizer(wd: Path, json_paths: list[Path]):
    from eval.prompts import DEFAULT_TEMPLATES
    from instit_jax.conversation import get_template, render_prompt, train_tiny_tokenizer

    docs = [json.loads(p.read_text()) for p in json_paths]
    corpus = corpus_texts(docs)
    for tpl in DEFAULT_TEMPLATES.values():
        corpus.extend(tpl.values())
    tmpl = get_template("vicuna_v1")
    # The chat template (system prompt, USER:/ASSISTANT: per turn) is in every sample, but not in the JSON:
    # weigh it as often as it occurs, or BPE leaves it in single characters (86 tokens for the system
    # prompt, 10 per ASSISTANT:) and a 12-turn QA sample spends ~290 of its 512 tokens on the template.
    turns = sum(len(c.get("conversations", ())) // 2 for doc in docs for c in doc if isinstance(c, dict))
    chat = render_prompt(tmpl, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 2,
                         add_generation_prompt=False)
    corpus.extend([chat] * max(1, turns // 2))
    corpus.extend(["A", "B", "C", "D", "Describe the image briefly.", "Describe the video briefly."])
    tok = train_tiny_tokenizer(corpus * 2, vocab_size=768)
    tok.save(str(wd / "tokenizer.json"))
    return tok


def make_config(name: str, wd: Path, tok, sources: dict[str, tuple[str, float]], steps: int, *,
                frozen: int, lr: float, init_tokenizer: str, seed: int, vision_lr: float | None = None):
    """The demo recipe (configs/tiny_synthetic.py) with this run's data, tokenizer and step count.

    vision_lr defaults to VISION_LR (10x below lr, the paper's ratio).
    """
    from configs.tiny_synthetic import get_config
    from instit_jax.conversation import IMAGE_TOKEN

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


def evaluate(model, tok, bench_dir: Path, out_dir: Path, *, media_root: Path | None, batch_size: int) -> dict:
    from eval.bench import load_bench
    from eval.evaluate import evaluate_predictions
    from eval.judge import RuleJudge
    from eval.runner import run_bench

    bench = load_bench(bench_dir, media_root=media_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = run_bench(model, tok, bench, batch_size=batch_size, out_path=out_dir / "predictions.jsonl",
                      max_new_tokens=16, data_parallel=False)
    ev = evaluate_predictions(preds, bench=bench, mode="strict", judge=RuleJudge())
    (out_dir / "scores.json").write_text(json.dumps(ev.summaries, indent=2))
    return {"summaries": ev.summaries, "predictions": preds}


def _acc(summary: dict | None) -> float | None:
    if not summary:
        return None
    return summary.get("accuracy")


def results_table(results: dict[str, dict]) -> str:
    head = "| model | " + " | ".join(COL_NAMES) + " |"
    sep = "|---" * (len(COL_NAMES) + 1) + "|"
    lines = [head, sep]
    for key, label in ROWS:
        if key not in results:
            continue
        s = results[key]["summaries"]
        cells = [f"{a:.1f}" if (a := _acc(s.get(c))) is not None else "-" for c in COLS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join("25.0" if CHANCE[c] else "~0" for c in COLS) + " |")
    return "\n".join(lines)


def write_report(wd: Path, results: dict[str, dict], bench_dir: Path, timings: dict[str, float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(results))
    for i, (key, label) in enumerate(r for r in ROWS if r[0] in results):
        vals = [(_acc(results[key]["summaries"].get(c)) or 0.0) for c in COLS]
        ax.bar(np.arange(len(COLS)) + i * width, vals, width, label=label.split(":")[0])
    ax.axhline(25, color="gray", ls="--", lw=1, label="MC chance")
    ax.set_xticks(np.arange(len(COLS)) + width * (len(results) - 1) / 2, COL_NAMES)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(wd / "report_chart.png", dpi=110)
    plt.close(fig)

    examples = []
    preds = {(p["config"], p["question_id"]): p for p in results.get("stage2", {}).get("predictions", [])}
    mc = json.loads((bench_dir / "image_multi_choice.json").read_text())[:4]
    (wd / "examples").mkdir(exist_ok=True)
    for rec in mc:
        img = Image.open(bench_dir / rec["image"]).convert("RGB")
        name = f"examples/{Path(rec['image']).stem}_{rec['question_id']}.png"
        img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(wd / name)
        p = preds.get(("image_multi_choice", rec["question_id"]), {})
        choices = ", ".join(f"{k[-1].upper()}. {rec[k]}" for k in ("choice_a", "choice_b", "choice_c", "choice_d"))
        examples.append(f"![{rec['question_id']}]({name})\n\n**Q:** {rec['question']} ({choices})  "
                        f"**truth:** {rec['answer']}  **model:** {p.get('model_prediction', '-')!r}\n")
    md = ["# instit-demo report", "", "Held-out synthetic Inst-It-style bench (accuracy %, strict scoring; OE by "
          "the synthetic world's rule-based judge).", "", results_table(results), "",
          "![chart](report_chart.png)", "", "## Wall time per stage (s)", "",
          "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in timings.items()], "",
          "## Examples (stage 2, marked frames)", "", *examples]
    path = wd / "report.md"
    path.write_text("\n".join(md))
    return path


class _Stages:
    """Prints one line per stage with its wall time."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *a, **kw):
        print(f"[instit-demo] {name} ...", flush=True)
        t = time.time()
        out = fn(*a, **kw)
        self.timings[name] = time.time() - t
        print(f"[instit-demo] {name} done in {self.timings[name]:.1f}s (total {time.time() - self.t0:.0f}s)",
              flush=True)
        return out


def run_demo(workdir: str | Path, *, minutes: float = 10.0, annotator: str = "groundtruth",
             base_url: str | None = None, model_name: str | None = None, seed: int = 0,
             eval_batch_size: int = 16) -> dict[str, Any]:
    """Run every stage in `workdir`; returns the per-row bench summaries and timings."""
    import jax

    from data_gen.groundtruth import annotate_world
    from data_gen.synthetic import generate_bench, generate_world
    from instit_jax.data.build import build
    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    # One device: the demo is a single-process CPU run (also where tests fake 8 host devices).
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    wd = Path(workdir).resolve()  # Orbax wants absolute paths
    wd.mkdir(parents=True, exist_ok=True)
    size = _scale(minutes)
    st = _Stages()

    def make_world():
        # Stage 1's "pre-training" scenes are simpler (1-3 shapes, no occlusion): a from-scratch tower
        # learns to ground caption words in pixels there within the budget (with 2-4 shapes it did not).
        pre = generate_world(wd / "pretrain_world", num_images=size["images"], num_videos=size["videos"] // 2,
                             frames_per_video=6, seed=seed + 250, difficulty=PRETRAIN_DIFFICULTY)
        world = generate_world(wd / "world", num_images=size["images"], num_videos=size["videos"],
                               frames_per_video=6, seed=seed, difficulty=WORLD_DIFFICULTY,
                               label_box=MARK_LABEL_BOX)
        qa = generate_bench(wd / "train_qa", num_images=size["qa_images"], num_videos=size["qa_videos"],
                            frames_per_video=6, seed=seed + 500, questions_per_item=QA_PER_ITEM,
                            difficulty=WORLD_DIFFICULTY, label_box=MARK_LABEL_BOX)
        bench = generate_bench(wd / "bench", num_images=size["bench_images"], num_videos=size["bench_videos"],
                               frames_per_video=6, seed=seed + 1000, difficulty=WORLD_DIFFICULTY,
                               label_box=MARK_LABEL_BOX)
        return pre, world, qa, bench

    pre, world, qa, bench = st.run("1/6 synthetic world + held-out bench", make_world)
    bench_dir = Path(bench["root"])

    def annotate():
        ann, client = None, None
        if annotator == "openai":
            from data_gen.client.chat import ChatClient
            from data_gen.pipelines.annotator import OpenAIAnnotator

            if not (base_url and model_name):
                raise SystemExit("--annotator openai needs --base-url and --model")
            client = ChatClient(base_url=base_url, model=model_name,
                                cache_path=str(wd / "annotations" / "cache.sqlite"))
            ann = OpenAIAnnotator(client)
        return annotate_world(world["root"], wd / "annotations", annotator=ann, client=client)

    ann = st.run("2/6 Set-of-Marks + annotation pipeline", annotate)

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
        results["stage1"] = evaluate(stage1_model, tok, bench_dir, wd / "eval" / "stage1", media_root=None,
                                     batch_size=eval_batch_size)
        results["stage2"] = evaluate(stage2_model, tok, bench_dir, wd / "eval" / "stage2", media_root=None,
                                     batch_size=eval_batch_size)
        results["stage2_unmarked"] = evaluate(stage2_model, tok, bench_dir, wd / "eval" / "stage2_unmarked",
                                              media_root=Path(bench["raw_root"]), batch_size=eval_batch_size)

    st.run("6/6 held-out bench", run_evals)
    report = write_report(wd, results, bench_dir, st.timings)
    total = time.time() - st.t0
    print()
    print(results_table(results))
    print(f"\nreport: {report}   total wall time: {total:.0f}s")
    summary = {k: {c: _acc(v["summaries"].get(c)) for c in COLS} for k, v in results.items()}
    (wd / "summary.json").write_text(json.dumps({"results": summary, "timings": st.timings,
                                                  "total_s": total}, indent=2))
    return {"results": summary, "timings": st.timings, "total_s": total, "report": str(report)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="instit-demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="instit_demo_run", help="where every artefact of the run goes")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget; scales data size and steps")
    p.add_argument("--annotator", choices=("groundtruth", "openai"), default="groundtruth")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint for --annotator openai")
    p.add_argument("--model", help="model name for --annotator openai (e.g. gpt-4o-2024-08-06)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_demo(a.workdir, minutes=a.minutes, annotator=a.annotator, base_url=a.base_url, model_name=a.model,
             seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
