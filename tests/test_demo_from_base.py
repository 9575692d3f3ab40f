"""A shortened `instit-demo` from the shipped base: every stage runs from the shipped folder and is scored.

world -> Set-of-Marks + annotation pipeline -> TFRecords -> (a) the base -> Inst-IT SFT -> (b) marked,
(c) unmarked frames; the generic-only control (d) is left to the full demo (it doubles the SFT time).
"""
import json

import pytest

from demo.cli import main
from demo.report import COLS
from demo.run import DEFAULT_BASE

MINUTES = "1"  # the smallest world and SFT budget

pytestmark = pytest.mark.skipif(not (DEFAULT_BASE / "model.safetensors").is_file(),
                                reason="demo/base/ holds no model.safetensors")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo_base")
    assert main(["--workdir", str(wd), "--minutes", MINUTES, "--no-ablation"]) == 0
    return wd


def test_demo_from_the_base_writes_every_row_and_the_sft_learns(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    res = summary["results"]
    assert set(res) == {"base", "instit", "instit_unmarked"}
    for row in res.values():
        assert set(row) == set(COLS) and all(0.0 <= v <= 100.0 for v in row.values())
    assert summary["base"].endswith("demo/base")
    losses = [json.loads(x)["loss"] for x in (demo_run / "instit" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert "(b) Inst-IT continuous SFT" in (demo_run / "report.md").read_text()
    assert list((demo_run / "examples").glob("*.png"))
