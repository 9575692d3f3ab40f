"""kill -9 an instit-annotate process midway, restart it, and compare with an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import annotate_data as D
import pytest
from openai_server import OpenAIServer, instit_responder

from data_gen.cli import EXIT_BUDGET, EXIT_OK, main

REPO = Path(__file__).resolve().parents[1]


def start(manifest: Path, out: Path, url: str) -> subprocess.Popen:
    env = dict(os.environ, OPENAI_API_KEY="sk-dummy-for-local-server")
    cmd = [sys.executable, "-m", "data_gen.cli", "video", "--manifest", str(manifest), "--out", str(out),
           "--base-url", url, "--concurrency", "4", "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_kill9_and_restart_equals_uninterrupted_run(tmp_path):
    manifest = D.write_videos(tmp_path / "data", n_ok=10, frames=3)
    n_requests = 10 * (3 + 2)

    with OpenAIServer(instit_responder) as ref_srv:  # the uninterrupted reference run
        assert main(["video", "--manifest", str(manifest), "--out", str(tmp_path / "ref"),
                     "--base-url", ref_srv.base_url, "--no-progress"]) == EXIT_OK
        assert sum(ref_srv.completed.values()) == n_requests

    with OpenAIServer(instit_responder, latency=0.03) as srv:
        out = tmp_path / "run"
        proc = start(manifest, out, srv.base_url)
        deadline = time.monotonic() + 60
        while sum(srv.completed.values()) < n_requests // 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.1)  # let requests already in the server's socket buffers start
        while srv.active:  # requests in flight at the kill still finish (and are paid) server-side
            time.sleep(0.01)
        paid_before = sum(srv.completed.values())
        assert 0 < paid_before < n_requests, "the run was not killed midway"
        with sqlite3.connect(out / "cache" / "responses.sqlite") as db:
            cached_at_kill = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        journal_at_kill = len((out / "progress.jsonl").read_text().splitlines())
        assert journal_at_kill < 10

        proc = start(manifest, out, srv.base_url)
        assert proc.wait(timeout=60) == EXIT_OK, proc.stderr.read().decode()
        paid_restart = sum(srv.completed.values()) - paid_before
        summary = json.loads((out / "summary.json").read_text())

    # Every answer cached before the kill was reused; only the uncached remainder was requested again.
    assert paid_restart == n_requests - cached_at_kill
    assert summary["resumed"] == journal_at_kill and summary["ok"] == 10
    duplicates = sum(c - 1 for c in srv.completed.values() if c > 1)
    assert duplicates == paid_before - cached_at_kill <= 4  # at most the requests in flight at the kill
    ref = json.loads((tmp_path / "ref/inst_it_dataset_video.json").read_text())
    got = json.loads((out / "inst_it_dataset_video.json").read_text())
    assert got == ref
    assert [r["video_id"] for r in got] == [f"v{i}" for i in range(10)]  # nothing lost or duplicated
    for path in out.rglob("*"):  # the API key is never written anywhere
        if path.is_file():
            assert b"sk-dummy-for-local-server" not in path.read_bytes(), path


def test_kill9_in_batch_mode_reattaches_to_the_submitted_batch(tmp_path):
    manifest = D.write_images(tmp_path / "data", n=3)
    with OpenAIServer(instit_responder) as ref_srv:
        assert main(["image", "--manifest", str(manifest), "--out", str(tmp_path / "ref"),
                     "--base-url", ref_srv.base_url, "--no-progress"]) == EXIT_OK
    env = dict(os.environ, OPENAI_API_KEY="sk-dummy")
    cmd = [sys.executable, "-m", "data_gen.cli", "image", "--manifest", str(manifest), "--out", str(tmp_path / "b"),
           "--batch", "--batch-gather-s", "0.05", "--batch-poll-s", "0.05", "--no-progress"]
    with OpenAIServer(instit_responder, batch_delay=1.5) as srv:
        cmd += ["--base-url", srv.base_url]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not srv.batches and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert next(iter(srv.batches.values()))["status"] == "in_progress"
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.wait(timeout=60) == EXIT_OK, proc.stderr.read().decode()
        assert len(srv.batches) == 1  # the restart re-attached instead of submitting again
        assert sum(srv.completed.values()) == 3
    ref = json.loads((tmp_path / "ref/inst_it_dataset_image.json").read_text())
    assert json.loads((tmp_path / "b/inst_it_dataset_image.json").read_text()) == ref


def test_kill9_keeps_the_spend_so_max_cost_bounds_both_runs(tmp_path):
    manifest = D.write_videos(tmp_path / "data", n_ok=10, frames=3)  # ~$0.12 in all at --max-tokens 300
    budget = "0.06"
    out = tmp_path / "run"
    args = ["--max-cost", budget, "--max-tokens", "300"]
    with OpenAIServer(instit_responder, latency=0.03) as srv:
        env = dict(os.environ, OPENAI_API_KEY="sk-dummy")
        proc = subprocess.Popen([sys.executable, "-m", "data_gen.cli", "video", "--manifest", str(manifest),
                                 "--out", str(out), "--base-url", srv.base_url, "--concurrency", "2",
                                 "--no-progress", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while sum(srv.completed.values()) < 10 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        spent_at_kill = json.loads((out / "ledger.json").read_text())["total_cost_usd"]
        assert spent_at_kill > 0.015  # ten or so requests at ~$0.0024

        code = main(["video", "--manifest", str(manifest), "--out", str(out), "--base-url", srv.base_url,
                     "--no-progress", *args])
    summary = json.loads((out / "summary.json").read_text())
    assert code == EXIT_BUDGET and summary["stopped_by_budget"]
    assert summary["total_cost_usd"] == pytest.approx(spent_at_kill + summary["cost_usd"], abs=1e-5)
    assert summary["total_cost_usd"] <= float(budget)
    assert summary["cost_usd"] <= float(budget) - spent_at_kill + 1e-9
    assert json.loads((out / "ledger.json").read_text())["total_cost_usd"] == pytest.approx(
        summary["total_cost_usd"], abs=1e-5)
