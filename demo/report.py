"""The demo's results table and `report.md` (chart, marked example frames with the model's answers)."""
from __future__ import annotations

import json
from pathlib import Path

COLS = ("image_multi_choice", "image_open_ended", "video_multi_choice", "video_open_ended")
COL_NAMES = ("image MC", "image OE", "video MC", "video OE")
CHANCE = {"image_multi_choice": 25.0, "video_multi_choice": 25.0, "image_open_ended": None,
          "video_open_ended": None}
# Row keys of summary.json["results"] -> labels, in table order (a run has the rows of its path).
ROWS = (("base", "(a) the shipped base, before Inst-IT"),
        ("instit", "(b) Inst-IT continuous SFT"),
        ("instit_unmarked", "(c) Inst-IT model on unmarked frames"),
        ("generic_only", "(d) same SFT budget on generic unmarked data only"),
        ("stage1", "(a) stage 1 only (captions of unmarked scenes)"),
        ("stage2", "(b) stage 2: Inst-IT continuous SFT"),
        ("stage2_unmarked", "(c) stage 2 evaluated on unmarked frames"))
MAIN_ROW = ("instit", "stage2")  # the rows whose answers the report's examples show

def accuracy(summary: dict | None) -> float | None:
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
        cells = [f"{a:.1f}" if (a := accuracy(s.get(c))) is not None else "-" for c in COLS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join("25.0" if CHANCE[c] else "~0" for c in COLS) + " |")
    return "\n".join(lines)


def write_report(wd: Path, results: dict[str, dict], bench_dir: Path, timings: dict[str, float]) -> Path:
    """DIR/report.md + report_chart.png + examples/ (marked bench frames with the main row's answers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(results))
    for i, (key, label) in enumerate(r for r in ROWS if r[0] in results):
        vals = [(accuracy(results[key]["summaries"].get(c)) or 0.0) for c in COLS]
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
    main = next((k for k in MAIN_ROW if k in results), None)
    preds = {(p["config"], p["question_id"]): p for p in results.get(main, {}).get("predictions", [])}
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
          f"## Examples ({dict(ROWS).get(main, main)}, marked frames)", "", *examples]
    path = wd / "report.md"
    path.write_text("\n".join(md))
    return path
