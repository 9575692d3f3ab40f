"""One call from an in-memory model to a scored report (what `instit-demo` and notebooks use)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.bench import Bench, load_bench
from eval.judge import RuleJudge
from eval.predictions import Judge, score_predictions
from eval.prompts import DEFAULT_PROMPTS, PromptSet
from eval.report import write_report
from eval.runner import PREDICTIONS_FILE, run_bench


def evaluate_model(model: Any, tokenizer: Any, bench: Bench | str | Path, out_dir: str | Path, *,
                   template: str = "vicuna_v1", prompts: PromptSet = DEFAULT_PROMPTS, batch_size: int = 8,
                   max_new_tokens: int = 128, max_frames: int | None = None, mode: str = "official",
                   parser: str = "official", judge: Judge | str = "rule", label: str | None = None,
                   model_info: dict[str, Any] | None = None, chart: bool = True,
                   progress: Callable[[int, int], None] | None = None, data_parallel: bool = True
                   ) -> dict[str, Any]:
    """Run the bench (resumable predictions in out_dir), score it and write the reports; returns results.

    `judge`: "rule" (the synthetic bench's rule-based scorer) or any judge object (e.g. `LLMJudge`).
    """
    out = Path(out_dir)
    if not isinstance(bench, Bench):
        bench = load_bench(bench)
    preds = run_bench(model, tokenizer, bench, template=template, prompts=prompts, batch_size=batch_size,
                      out_path=out / PREDICTIONS_FILE, max_new_tokens=max_new_tokens, max_frames=max_frames,
                      progress=progress, data_parallel=data_parallel)
    the_judge = RuleJudge() if judge == "rule" else judge
    ev = score_predictions(preds, bench=bench, mode=mode, parser=parser, judge=the_judge)  # type: ignore[arg-type]
    run = {"template": template, "prompts": prompts.source, "batch_size": batch_size,
           "max_new_tokens": max_new_tokens, "max_frames": max_frames}
    return write_report(out, ev, model=model_info or {"checkpoint": label}, bench={"path": bench.root,
                        "questions": len(bench)}, run=run, label=label, chart=chart)
