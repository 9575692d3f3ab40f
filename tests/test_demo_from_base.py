"""A shortened `instit-demo` from the shipped base: Inst-IT continuous SFT lifts the held-out bench.

world -> Set-of-Marks + annotation pipeline -> TFRecords -> (a) the base -> Inst-IT SFT -> (b) marked,
(c) unmarked frames; the generic-only control (d) is left to the full demo (it doubles the SFT time).
"""
import json

import pytest

from demo.cli import main
from demo.report import COLS
from demo.run import DEFAULT_BASE

MINUTES = "4"  # the smaller world and SFT budget of a short run

pytestmark = pytest.mark.skipif(not (DEFAULT_BASE / "model.safetensors").is_file(),
                                reason="demo/base/ holds no model.safetensors")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo_base")
    assert main(["--workdir", str(wd), "--minutes", MINUTES, "--no-ablation"]) == 0
    return wd


def test_instit_sft_lifts_image_mc_far_above_the_base_and_chance(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    res = summary["results"]
    assert set(res) == {"base", "instit", "instit_unmarked"}
    for row in res.values():
        assert set(row) == set(COLS) and all(0.0 <= v <= 100.0 for v in row.values())
    a, b = res["base"]["image_multi_choice"], res["instit"]["image_multi_choice"]
    assert b >= a + 20.0, res
    assert b >= 25.0 + 25.0, res
    assert (demo_run / "report.md").read_text().count("(b) Inst-IT continuous SFT") >= 1
    assert list((demo_run / "examples").glob("*.png"))
