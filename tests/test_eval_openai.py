"""`instit-eval run --base-url` against `instit-serve` (subprocess, loopback) scores as `instit-eval run --ckpt`."""
import json

import pytest
from serve_fixtures import ckpt, serve  # noqa: F401  (ckpt: the tiny llava-hf checkpoint fixture)

from data_gen.synthetic import generate_bench
from eval.bench import load_bench
from eval.cli import main as eval_main
from eval.openai_runner import bench_messages
from eval.prompts import DEFAULT_PROMPTS

MAX_NEW = "8"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_openai")
    generate_bench(root, num_images=2, num_videos=1, frames_per_video=3, questions_per_item=1, image_size=48)
    return root


def _scores(out):
    results = json.loads((out / "results.json").read_text())["results"]
    return {cfg: (s["total"], s["accuracy"]) for cfg, s in results.items()}


def _preds(out):
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return {(r["config"], r["question_id"]): r["model_prediction"] for r in rows}


def test_messages_carry_the_prompt_and_frames_in_order(bench):
    items = load_bench(bench).all_items()
    video = next(it for it in items if it.split == "video")
    parts = bench_messages(video)[0]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]
    assert parts[-1]["text"] == DEFAULT_PROMPTS.build(video)
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts[:-1])
    assert len(bench_messages(video, max_frames=2)[0]["content"]) == 3


def test_base_url_run_scores_as_the_checkpoint_run(ckpt, bench, tmp_path):  # noqa: F811
    d = ckpt[0]
    ours, remote = tmp_path / "ckpt", tmp_path / "remote"
    assert eval_main(["run", "--ckpt", str(d), "--bench", str(bench), "--out", str(ours), "--batch-size", "4",
                      "--max-new-tokens", MAX_NEW]) == 0
    with serve(d, "--model-name", "tiny", "--api-key", "sk-eval") as base:
        argv = ["run", "--base-url", base, "--model", "tiny", "--api-key", "sk-eval", "--bench", str(bench),
                "--out", str(remote), "--max-new-tokens", MAX_NEW, "--concurrency", "4"]
        assert eval_main(argv) == 0, (remote / "errors.jsonl").read_text()
        assert eval_main(argv) == 0  # resumed: nothing left to ask
    assert len(_preds(ours)) == 6
    assert _preds(remote) == _preds(ours)
    run = json.loads((remote / "run.json").read_text())
    assert run["model"]["endpoint_model"] == "tiny" and run["failures"] == 0
    assert (remote / "ledger.json").is_file() and (remote / "official" / "image_mc_inference.json").is_file()
    for out in (ours, remote):
        assert eval_main(["score", "--bench", str(bench), "--predictions", str(out / "predictions.jsonl"),
                          "--mode", "strict", "--judge", "rule"]) == 0
    assert _scores(remote) == _scores(ours)
    assert "| **tiny** (strict) |" in (remote / "results.md").read_text()
