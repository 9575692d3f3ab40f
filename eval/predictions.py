"""Score a predictions file: MC parsing and OE judging per config, with every failure counted.

Predictions are the toolkit's records (`question_id`, `question`, `model_prediction`, `ground_truth`,
`split`) plus, in our files, `config`. The official per-config JSON lists load too (the config then
comes from `--format` or the file name, e.g. `image_mc_inference.json`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from eval.bench import CONFIGS, Bench, config_name
from eval.judge import JudgeResult
from eval.scoring import Mode, Parser, score_mc, score_oe

PRED_KEYS = ("question_id", "question", "model_prediction", "ground_truth", "split")


class Judge(Protocol):
    model: str

    @property
    def identity(self) -> str: ...

    def judge(self, records: Sequence[dict]) -> list[JudgeResult]: ...


class PredictionError(ValueError):
    """A predictions file or record is malformed."""


def _format_hint(path: Path) -> str | None:
    name = path.name.lower()
    if re.search(r"(^|[_\-.])(mc|multi_choice)([_\-.]|$)", name):
        return "mc"
    if re.search(r"(^|[_\-.])(oe|open_ended)([_\-.]|$)", name):
        return "oe"
    return None


def read_predictions(path: str | Path, fmt: str | None = None) -> list[dict]:
    """Prediction records of a JSONL or JSON-list file, each with a `config`; validated."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"{path}: predictions file does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            recs = json.loads(text)
            if isinstance(recs, dict):  # an official *_evaluate.json log holds them under a key
                recs = recs.get("model_predictons", recs.get("model_predictions"))
    except json.JSONDecodeError as e:
        raise PredictionError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(recs, list):
        raise PredictionError(f"{path}: expected a list of prediction records")
    hint = fmt or _format_hint(path)
    out = []
    for i, rec in enumerate(recs):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise PredictionError(f"{where}: expected an object")
        for key in PRED_KEYS:
            if key not in rec:
                raise PredictionError(f"{where}: missing field {key!r}")
        if not isinstance(rec["model_prediction"], str):
            raise PredictionError(f"{where}: field 'model_prediction' must be a string")
        cfg = rec.get("config")
        if cfg is None:
            if hint is None:
                raise PredictionError(f"{where}: no 'config' field and the file name does not say mc or oe; "
                                      "pass the format (--format mc|oe)")
            cfg = config_name(rec["split"], hint)
        if cfg not in CONFIGS:
            raise PredictionError(f"{where}: unknown config {cfg!r}")
        out.append({**rec, "question_id": str(rec["question_id"]), "config": cfg})
    return out


@dataclasses.dataclass
class BenchScores:
    """Per-config summaries and per-question rows of one scoring pass."""

    mode: str
    mc_parser: str
    judge: str | None
    summaries: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]


def score_predictions(predictions: Iterable[dict], *, bench: Bench | None = None,
                      mode: Mode = "official", parser: Parser = "official",
                      judge: Judge | None = None) -> BenchScores:
    """Score predictions per config. With a bench, ground truth comes from it and missing answers count.

    Official mode ignores missing questions (as the toolkit does, which only sees its file); strict mode
    scores them as unanswered (wrong / judge score 0). OE configs need a judge.
    """
    by_cfg: dict[str, dict[str, dict]] = {}
    for rec in predictions:
        by_cfg.setdefault(rec["config"], {})[rec["question_id"]] = rec
    missing: dict[str, list[dict]] = {}
    if bench is not None:
        known = bench.lookup()
        for cfg, recs in by_cfg.items():
            stray = [qid for qid in recs if (cfg, qid) not in known]
            if stray:
                raise PredictionError(f"{len(stray)} {cfg} prediction(s) are not in the bench {bench.root}, "
                                      f"e.g. question_id {stray[0]!r}: wrong bench or predictions file?")
        for cfg, items in bench.items.items():
            got = by_cfg.setdefault(cfg, {})
            for it in items:
                if it.question_id in got:
                    got[it.question_id] = {**got[it.question_id], "ground_truth": it.answer}
                else:
                    missing.setdefault(cfg, []).append(
                        {"question_id": it.question_id, "question": it.question, "model_prediction": "",
                         "ground_truth": it.answer, "split": it.split, "config": cfg})
    summaries: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for cfg in CONFIGS:
        recs = list(by_cfg.get(cfg, {}).values())
        miss = missing.get(cfg, [])
        if not recs and not miss:
            continue
        scored = recs + (miss if mode == "strict" else [])
        split, fmt = CONFIGS[cfg]
        summary: dict[str, Any] = {"split": split, "format": fmt, "missing": len(miss)}
        if fmt == "mc":
            res = score_mc(scored, mode, parser)
            summary.update(res.summary())
            summary.pop("mode"), summary.pop("parser")
            summary["parse_failures"] -= len(scored) - len(recs)  # missing ones are counted apart
            for rec, item in zip(scored, res.items):
                rows.append({**_row(rec), "extracted": item.extracted, "correct": item.correct,
                             "score": float(item.correct), "error": "" if item.parsed else "unparseable"})
        else:
            if judge is None:
                raise ValueError(f"{cfg}: open-ended predictions need a judge (an endpoint, or 'rule')")
            verdicts = dict(zip((r["question_id"] for r in recs), judge.judge(recs)))
            results = [verdicts.get(r["question_id"], JudgeResult(None, "no prediction")) for r in scored]
            res = score_oe([v.score for v in results], mode)
            summary.update({k: v for k, v in dataclasses.asdict(res).items() if k != "mode"})
            summary["judge_failures"] -= len(scored) - len(recs)
            summary["judge_model"] = judge.identity
            for rec, v in zip(scored, results):
                rows.append({**_row(rec), "extracted": "", "correct": None, "score": v.score,
                             "error": v.error or ""})
        summaries[cfg] = summary
    return BenchScores(mode, parser, judge.identity if judge is not None else None, summaries, rows)


def _row(rec: dict) -> dict[str, Any]:
    return {"config": rec["config"], "question_id": rec["question_id"], "question": rec["question"],
            "model_prediction": rec["model_prediction"], "ground_truth": rec["ground_truth"]}
