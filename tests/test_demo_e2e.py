"""A shortened `instit-demo --from-scratch` end to end: world -> annotation -> TFRecords -> stage 1 -> stage 2 -> bench."""
import json

import pytest

from demo.cli import main
from demo.report import COLS, results_table


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo")
    assert main(["--from-scratch", "--workdir", str(wd), "--minutes", "1"]) == 0
    return wd


def test_demo_writes_report_and_summary(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert set(summary["results"]) == {"stage1", "stage2", "stage2_unmarked"}
    for row in summary["results"].values():
        assert set(row) == set(COLS)
        assert all(v is not None and 0.0 <= v <= 100.0 for v in row.values())
    report = (demo_run / "report.md").read_text()
    assert "(b) stage 2: Inst-IT continuous SFT" in report
    assert (demo_run / "report_chart.png").stat().st_size > 0
    assert list((demo_run / "examples").glob("*.png"))
    for row in ("stage1", "stage2", "stage2_unmarked"):
        preds = (demo_run / "eval" / row / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == sum(1 for _ in preds) > 0
    assert "stage 1" in results_table({k: {"summaries": {}} for k in summary["results"]})


def test_demo_stage2_training_loss_fell(demo_run):
    losses = [json.loads(line)["loss"] for line in (demo_run / "stage2" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 4
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, losses


def test_demo_tokenizer_spends_few_tokens_on_the_chat_template(demo_run):
    """The template is in every sample: its words must be merged, not left in characters (86 tokens before)."""
    from tokenizers import Tokenizer

    from instit_jax.chat_template import get_template, render_prompt

    tok = Tokenizer.from_file(str(demo_run / "tokenizer.json"))
    two_turns = render_prompt(get_template("vicuna_v1"), [{"role": "user", "content": "What colour is [1]?"},
                                                           {"role": "assistant", "content": "red"}] * 2)
    n = len(tok.encode(two_turns, add_special_tokens=False).ids)
    assert n <= 60, (n, tok.encode(two_turns, add_special_tokens=False).tokens)
