"""A short seeded fuzz run of every target, the seeds accepted, and the corpus replayed (docs/reliability.md)."""
from __future__ import annotations

import pytest

from .harness import TARGETS, check, replay_corpus, run_examples, setup
from .targets import seed_files

# examples per target in the suite: seconds each on a 2-core machine (the long runs: python -m tests.fuzz)
EXAMPLES = {"instit_json": 60, "llava_json": 60, "manifest": 50, "bench": 50, "records": 80, "hf_config": 60,
            "safetensors": 60, "client_reply": 80, "serve_request": 80}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seed_inputs_are_accepted(name, tmp_path):
    target = TARGETS[name]
    ctx = setup(target, tmp_path)
    assert check(target, ctx, seed_files(ctx.seeds)) == "accepted"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays(name, tmp_path):
    target = TARGETS[name]
    replay_corpus(target, setup(target, tmp_path))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_short_fuzz_run(name, tmp_path):
    target = TARGETS[name]
    stats = run_examples(target, setup(target, tmp_path), EXAMPLES[name])
    assert stats.inputs >= EXAMPLES[name] // 2
