"""Batch API transport end to end over HTTP: splitting, failed + expired resubmission, resume by batch ID."""
from __future__ import annotations

import asyncio
import json

import pytest
from openai_server import OpenAIServer
from pydantic import BaseModel

from data_gen.client import AnnotationError, BatchTransport, ChatClient, make_client, split_requests


class Answer(BaseModel):
    text: str


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}]


def batch_client(srv: OpenAIServer, cache_dir, **kw) -> ChatClient:
    client = make_client(srv.base_url, "gpt-4o-2024-08-06", cache_dir=str(cache_dir), api_key="k")
    client.transport = BatchTransport(client.oa, f"{cache_dir}/batches.sqlite", gather_s=0.02, poll_s=0.02, **kw)
    return client


def test_split_requests_respects_count_and_bytes():
    lines = [b"x" * 10] * 25
    assert [len(c) for c in split_requests(lines, max_requests=10)] == [10, 10, 5]
    assert [len(c) for c in split_requests(lines, max_bytes=55)] == [5, 5, 5, 5, 5]
    with pytest.raises(ValueError, match="over the"):
        split_requests([b"x" * 100], max_bytes=50)


def test_batch_end_to_end_with_failed_and_expired_requests(tmp_path):
    def plan(custom_id: str, submission: int) -> str:
        if submission == 1 and custom_id[0] in "0123":
            return "fail"
        if submission == 1 and custom_id[0] in "cd":
            return "expire"  # the batch expires here: the rest of the file comes back as batch_expired
        return "ok"

    async def go():
        with OpenAIServer(batch_plan=plan) as srv:
            client = batch_client(srv, tmp_path, max_requests=7)
            out = await asyncio.gather(*(client.complete_json(ask(i), Answer, prompt_version="b")
                                         for i in range(30)))
            stats = dict(client.transport.stats)
            await client.aclose()
            return out, srv, stats, client
    out, srv, stats, client = run(go())
    assert len(out) == 30
    assert stats["resubmitted"] > 0 and stats["batches"] >= 5  # 30 requests at 7 per file, plus resubmits
    assert all(c == 1 for c in srv.completed.values())  # every answer paid once
    assert client.ledger.total_cost == pytest.approx(sum(
        client.ledger.price("gpt-4o-2024-08-06", u.input_tokens, u.output_tokens, batch=True)
        for _, u in out))
    assert client.ledger.total_cost < sum(client.ledger.price("gpt-4o-2024-08-06", u.input_tokens,
                                                              u.output_tokens) for _, u in out)


def test_batch_request_failing_every_time_is_an_item_error(tmp_path):
    async def go():
        with OpenAIServer(batch_plan=lambda cid, n: "fail" if cid[0] in "01234567" else "ok") as srv:
            client = batch_client(srv, tmp_path, max_resubmits=2)
            res = await asyncio.gather(*(client.complete_json(ask(i), Answer, prompt_version="f")
                                         for i in range(12)), return_exceptions=True)
            await client.aclose()
            return res
    res = run(go())
    errors = [r for r in res if isinstance(r, Exception)]
    assert errors and all(isinstance(e, AnnotationError) and "failed 3 times" in str(e) for e in errors)
    assert len(errors) < 12


def test_restart_resumes_in_flight_batch_instead_of_resubmitting(tmp_path):
    async def first_run(srv):
        client = batch_client(srv, tmp_path)
        tasks = [asyncio.create_task(client.complete_json(ask(i), Answer, prompt_version="r")) for i in range(5)]
        db = client.transport.db
        while not db.execute("SELECT 1 FROM batches WHERE id LIKE 'batch%'").fetchone():
            await asyncio.sleep(0.01)  # the batch ID is on disk: now "crash"
        for t in tasks:
            t.cancel()
        await client.aclose()

    with OpenAIServer(batch_delay=0.3) as srv:
        run(first_run(srv))
        assert len(srv.batches) == 1
        out, stats = run(_second_run(srv, tmp_path, 5))
        assert len(out) == 5 and stats["resumed_batches"] == 1 and stats["batches"] == 0
        assert len(srv.batches) == 1 and sum(srv.completed.values()) == 5


def _gather_batch(srv: OpenAIServer, tmp_path, n: int, **kw) -> tuple[list, int]:
    """Send n requests through one batch; returns the results (or exceptions), never waiting past 20 s."""
    async def go():
        client = batch_client(srv, tmp_path, **kw)
        try:
            return await asyncio.wait_for(asyncio.gather(
                *(client.complete_json(ask(i), Answer, prompt_version="p") for i in range(n)),
                return_exceptions=True), timeout=20)
        finally:
            await client.aclose()
    return run(go()), len(srv.batches)


def test_poll_retries_rate_limits_and_server_errors(tmp_path):
    def faults(route: str, rid: str, attempt: int) -> int | None:
        if route == "batches.retrieve":
            return {0: 429, 1: 503}.get(attempt)
        return {0: 500, 1: 429}.get(attempt)  # files.content: the output file download

    with OpenAIServer(api_faults=faults) as srv:
        res, n_batches = _gather_batch(srv, tmp_path, 4)
        assert n_batches == 1 and not [r for r in res if isinstance(r, Exception)]
        assert srv.faults_sent == {"batches.retrieve:429": 1, "batches.retrieve:503": 1,
                                   "files.content:500": 1, "files.content:429": 1}
        assert sum(srv.completed.values()) == 4


@pytest.mark.parametrize("route,status", [("batches.retrieve", 401), ("batches.retrieve", 403),
                                          ("files.content", 404)])
def test_poll_non_retryable_error_fails_every_waiting_item(tmp_path, route, status):
    with OpenAIServer(api_faults=lambda r, rid, attempt: status if r == route else None) as srv:
        res, n_batches = _gather_batch(srv, tmp_path, 4)
        (batch_id,) = srv.batches
        assert n_batches == 1 and len(res) == 4
        for r in res:
            assert isinstance(r, AnnotationError), r
            assert f"batch {batch_id}" in str(r) and str(status) in str(r)
        assert sum(n for (r, _), n in srv.api_requests.items() if r == route) == 1  # not retried


def test_poll_gives_up_after_max_poll_retries(tmp_path):
    with OpenAIServer(api_faults=lambda r, rid, attempt: 500 if r == "batches.retrieve" else None) as srv:
        res, _ = _gather_batch(srv, tmp_path, 3, max_poll_retries=2)
        (batch_id,) = srv.batches
        assert all(isinstance(r, AnnotationError) and f"batch {batch_id}" in str(r) and "after 2 retries" in str(r)
                   for r in res)
        assert srv.api_requests["batches.retrieve", batch_id] == 3


@pytest.mark.parametrize("created", [True, False])
def test_restart_reconciles_upload_without_recorded_batch(tmp_path, created):
    """Crash between file upload and recording the batch ID: find the batch by its file, or create it."""
    async def crashed_run(srv):
        client = batch_client(srv, tmp_path)
        body = client._body(ask(0), "Answer", __import__("data_gen.client", fromlist=["x"]).strict_schema(Answer),
                            client.max_tokens)
        import hashlib
        cid = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        line = json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
        upload = await client.oa.files.create(file=("r.jsonl", line.encode(), "application/jsonl"), purpose="batch")
        client.transport.db.execute("INSERT INTO batches VALUES (?,?,?,?)",
                                    ("file:" + upload.id, "submitting", json.dumps([cid]), 0.0))
        if created:
            await client.oa.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        await client.aclose()

    with OpenAIServer(batch_delay=0.05) as srv:
        run(crashed_run(srv))
        out, stats = run(_second_run(srv, tmp_path, 1))
        assert len(out) == 1 and stats["resumed_batches"] == 1
        assert len(srv.batches) == 1 and sum(srv.completed.values()) == 1
        assert stats["batches"] == (0 if created else 1)


async def _second_run(srv, tmp_path, n):
    client = batch_client(srv, tmp_path)
    out = await asyncio.gather(*(client.complete_json(ask(i), Answer, prompt_version="r" if n > 1 else "x")
                                 for i in range(n)))
    stats = dict(client.transport.stats)
    await client.aclose()
    return out, stats


def run(coro):
    return asyncio.run(coro)
