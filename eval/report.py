"""Reports of a scored run: results JSON, a markdown table beside the paper's rows, a bar chart, a CSV."""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from etils import epath

from eval.predictions import BenchScores

RESULTS_SCHEMA = "instit-eval-results/1"
COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_open_ended", "Image OE"),
    ("image_multi_choice", "Image MC"),
    ("video_open_ended", "Video OE"),
    ("video_multi_choice", "Video MC"),
)
# Published Inst-It Bench numbers (arXiv 2412.03565), columns as in COLUMNS; None = not reported.
PAPER_ROWS: dict[str, tuple[float | None, ...]] = {
    "LLaVA-Next-Inst-IT (Vicuna-7B)": (68.6, 63.0, 49.3, 42.1),
    "LLaVA-Next-Inst-IT (Qwen2-7B)": (67.9, 75.3, 45.7, 53.3),
    "GPT-4o": (74.1, 84.8, 65.5, 81.0),
    "LLaVA-Next": (46.0, 42.4, None, None),
}
RESULTS_FILE, TABLE_FILE, CHART_FILE, CSV_FILE = "results.json", "results.md", "results.png", "per_question.csv"


def file_sha256(path: str | epath.PathLike) -> str | None:
    """SHA-256 of a file (local or gs://), or None if it does not exist."""
    p = epath.Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def model_identity(ckpt: str | epath.PathLike | None) -> dict[str, Any]:
    """Checkpoint path (local or gs://) plus a hash of its config file, so results name what produced them."""
    if ckpt is None:
        return {"checkpoint": None}
    ckpt = epath.Path(ckpt)
    for name in ("instit_config.json", "config.json"):
        digest = file_sha256(ckpt / name)
        if digest:
            return {"checkpoint": str(ckpt), "config_file": name, "config_sha256": digest}
    return {"checkpoint": str(ckpt), "config_file": None, "config_sha256": None}


def build_results(ev: BenchScores, *, model: dict[str, Any] | None = None, bench: dict[str, Any] | None = None,
                  run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results JSON: identity of model / bench / judge and one summary per config."""
    return {
        "schema": RESULTS_SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "mode": ev.mode,
        "mc_parser": ev.mc_parser,
        "judge": ev.judge,
        "model": model or {},
        "bench": bench or {},
        "run": run or {},
        "results": ev.summaries,
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown_table(results: dict[str, Any], label: str | None = None) -> str:
    """Our row beside the paper's rows, then the counts behind our numbers."""
    label = label or Path(str(results.get("model", {}).get("checkpoint") or "this run")).name
    ours = [results["results"].get(cfg, {}).get("accuracy") for cfg, _ in COLUMNS]
    head = "| Model | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|",
             f"| **{label}** ({results['mode']}) | " + " | ".join(_fmt(v) for v in ours) + " |"]
    for name, row in PAPER_ROWS.items():
        lines.append(f"| {name} (paper) | " + " | ".join(_fmt(v) for v in row) + " |")
    lines += ["", "| Config | Accuracy | Total | Parsed / judged | Parse failures | Judge failures | Missing |",
              "|---|---|---|---|---|---|---|"]
    for cfg, _ in COLUMNS:
        s = results["results"].get(cfg)
        if s is None:
            continue
        done = s.get("parsed", s.get("judged"))
        lines.append(f"| {cfg} | {_fmt(s.get('accuracy'))} | {s['total']} | {done} | "
                     f"{s.get('parse_failures', '-')} | {s.get('judge_failures', '-')} | {s.get('missing', 0)} |")
    lines += ["", f"Scoring mode `{results['mode']}`, MC parser `{results['mc_parser']}`, "
              f"judge `{results.get('judge') or '-'}`."]
    if results["mode"] == "official":
        lines.append("Official mode divides by parseable answers and successful judge calls only "
                     "(as the released toolkit); see `strict` for failures counted as wrong.")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: str | Path, label: str | None = None) -> Path:
    """Grouped bars: one group per config column, one bar per model (ours first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    label = label or "this run"
    rows = {label: tuple(results["results"].get(cfg, {}).get("accuracy") for cfg, _ in COLUMNS),
            **{f"{name} (paper)": vals for name, vals in PAPER_ROWS.items()}}
    x = np.arange(len(COLUMNS))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for k, (name, vals) in enumerate(rows.items()):
        heights = [np.nan if v is None else v for v in vals]
        ax.bar(x + (k - (len(rows) - 1) / 2) * width, heights, width, label=name,
               edgecolor="black" if k == 0 else None)
    ax.set_xticks(x, [title for _, title in COLUMNS])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Inst-It Bench ({results['mode']} scoring)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One line per scored question."""
    fields = ["config", "question_id", "question", "model_prediction", "ground_truth", "extracted", "correct",
              "score", "error"]
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def write_report(out_dir: str | Path, ev: BenchScores, *, model: dict[str, Any] | None = None,
                 bench: dict[str, Any] | None = None, run: dict[str, Any] | None = None,
                 label: str | None = None, chart: bool = True) -> dict[str, Any]:
    """Write results.json, results.md, results.png and per_question.csv into `out_dir`; return the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = build_results(ev, model=model, bench=bench, run=run)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    write_csv(ev.rows, out / CSV_FILE)
    render_report(out, label=label, chart=chart)
    return results


def render_report(out_dir: str | Path, *, label: str | None = None, chart: bool = True) -> str:
    """(Re)draw the table and chart from an existing results.json; returns the markdown."""
    out = Path(out_dir)
    path = out / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results yet (run `instit-eval score` first)")
    results = json.loads(path.read_text())
    md = markdown_table(results, label)
    (out / TABLE_FILE).write_text(md)
    if chart:
        bar_chart(results, out / CHART_FILE, label or Path(str(results.get("model", {}).get("checkpoint")
                                                                  or "this run")).name)
    return md
