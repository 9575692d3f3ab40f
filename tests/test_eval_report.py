"""Scoring a predictions file against a bench, and the report files (JSON, markdown, PNG, CSV)."""
import csv
import json

import pytest
from PIL import Image
from test_eval_bench import make_tiny_bench

from eval.bench import load_bench
from eval.judge import RuleJudge
from eval.predictions import PredictionError, read_predictions, score_predictions
from eval.report import PAPER_ROWS, render_report, write_report


def exact_scorer(question, prediction):
    return 1.0 if prediction.strip() == question["answer"] else 0.0


def _pred(cfg, qid, pred, gt="?", split="image"):
    return {"question_id": qid, "question": "q", "model_prediction": pred, "ground_truth": gt, "split": split,
            "config": cfg}


@pytest.fixture()
def bench(tmp_path):
    return load_bench(make_tiny_bench(tmp_path / "bench", parquet=False))


def _predictions():
    return [
        _pred("image_multi_choice", "001-01", "B"),  # correct (bench answer B)
        _pred("image_multi_choice", "001-02", "Based on [1], D"),  # official: "B" -> wrong; clean: D
        _pred("video_multi_choice", "001-01", "no idea", split="video"),  # unparseable; 001-02 missing
        _pred("image_open_ended", "001-01", "[1] is a red square."),
        _pred("image_open_ended", "001-02", "somewhere"),
        _pred("video_open_ended", "001-01", "[1] moves right during <1>-<2>.", split="video"),
    ]


def test_official_vs_strict_counts(bench):
    judge = RuleJudge(exact_scorer)
    off = score_predictions(_predictions(), bench=bench, mode="official", judge=judge)
    s = off.summaries
    assert s["image_multi_choice"]["accuracy"] == pytest.approx(50.0)
    assert (s["video_multi_choice"]["accuracy"], s["video_multi_choice"]["parse_failures"],
            s["video_multi_choice"]["missing"]) == (None, 1, 1)
    assert s["image_open_ended"]["accuracy"] == pytest.approx(50.0)
    assert (s["video_open_ended"]["accuracy"], s["video_open_ended"]["missing"]) == (100.0, 1)
    strict = score_predictions(_predictions(), bench=bench, mode="strict", judge=judge).summaries
    assert strict["video_multi_choice"]["accuracy"] == 0.0
    assert (strict["video_multi_choice"]["total"], strict["video_multi_choice"]["parse_failures"]) == (2, 1)
    assert strict["video_open_ended"]["accuracy"] == pytest.approx(50.0)
    assert strict["video_open_ended"]["judge_failures"] == 0
    clean = score_predictions(_predictions(), bench=bench, parser="clean", judge=judge).summaries
    assert clean["image_multi_choice"]["accuracy"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="need a judge"):
        score_predictions(_predictions(), bench=bench)


def test_report_files(bench, tmp_path):
    ev = score_predictions(_predictions(), bench=bench, mode="strict", judge=RuleJudge(exact_scorer))
    out = tmp_path / "out"
    results = write_report(out, ev, model={"checkpoint": "/ckpt/tiny"}, bench={"name": "tiny"})
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and saved["mode"] == "strict"
    assert saved["results"]["image_open_ended"]["judge_model"].startswith("rule-based")
    md = (out / "results.md").read_text()
    assert "| **tiny** (strict) | 50.0 | 50.0 | 50.0 | 0.0 |" in md
    for name in PAPER_ROWS:
        assert name in md
    assert "| LLaVA-Next (paper) | 46.0 | 42.4 | - | - |" in md
    with Image.open(out / "results.png") as im:
        assert im.size[0] > 300
    rows = list(csv.DictReader((out / "per_question.csv").open()))
    assert len(rows) == 8
    assert {r["error"] for r in rows if r["config"] == "video_multi_choice"} == {"unparseable"}
    (out / "results.md").unlink()
    assert render_report(out, chart=False).startswith("| Model |")


def test_read_official_prediction_files(tmp_path):
    recs = [{k: v for k, v in _pred("x", "001-01", "A", "A", "video").items() if k != "config"}]
    p = tmp_path / "video_mc_inference.json"
    p.write_text(json.dumps(recs))
    assert read_predictions(p)[0]["config"] == "video_multi_choice"
    q = tmp_path / "preds.json"
    q.write_text(json.dumps(recs))
    with pytest.raises(PredictionError, match="--format"):
        read_predictions(q)
    assert read_predictions(q, fmt="oe")[0]["config"] == "video_open_ended"
    q.write_text(json.dumps([{"question_id": "1"}]))
    with pytest.raises(PredictionError, match="record 0: missing field 'question'"):
        read_predictions(q, fmt="oe")


def test_predictions_not_in_the_bench_are_an_error(bench):
    with pytest.raises(PredictionError, match=r"1 image_multi_choice prediction\(s\) are not in the bench.*'9-9'"):
        score_predictions([_pred("image_multi_choice", "9-9", "A")], bench=bench)
