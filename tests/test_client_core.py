"""ChatClient against the local OpenAI-compatible server over real HTTP: faults, cache, limits, ledger."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
from openai_server import OpenAIServer, schema_responder
from pydantic import BaseModel

from data_gen.client import (
    AnnotationError,
    BudgetExceeded,
    ChatClient,
    CostLedger,
    UnknownPrice,
    cache_key,
    encode_image,
    estimate_input_tokens,
    image_part,
    image_tokens,
    strict_schema,
)
from data_gen.client.ratelimit import RateLimiter, parse_reset

FAULTS = ["429", "500", "drop", "malformed", "schema", "slow", "length", "refusal"]


class Caption(BaseModel):
    caption: str
    tags: list[str]


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"describe item {i}"}]


def run(coro):
    return asyncio.run(coro)


def make(srv: OpenAIServer, tmp_path, **kw) -> ChatClient:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("concurrency", 8)
    return ChatClient(srv.base_url, "gpt-4o-2024-08-06", api_key="sk-test-SECRET-KEY",
                      cache_path=tmp_path / "cache.sqlite", **kw)


def test_fault_storm_all_transient_faults_recovered(tmp_path):
    transient = ["429", "500", "drop", "malformed", "schema", "slow"]

    def storm(body, key, attempt):  # the first ask of every distinct request hits a fault
        is_reask = any(m["role"] == "assistant" for m in body["messages"])
        return None if attempt or is_reask else transient[int(key, 16) % len(transient)]

    async def go():
        with OpenAIServer(faults=storm, slow_s=0.4) as srv:
            client = make(srv, tmp_path, timeout=0.2)
            out = await asyncio.gather(*(client.complete_json(ask(i), Caption, prompt_version="t1")
                                         for i in range(36)))
            await client.aclose()
            return out, srv, client
    out, srv, client = run(go())
    assert len(out) == 36 and all(isinstance(p, Caption) for p, _ in out)
    assert set(srv.faults_sent) == set(transient)
    assert client.stats["reasks"] == srv.faults_sent["malformed"] + srv.faults_sent["schema"]
    assert client.stats["retries"] >= srv.faults_sent["429"] + srv.faults_sent["500"] + srv.faults_sent["drop"]


@pytest.mark.parametrize("fault,reason", [("length", "finish_reason=length"), ("refusal", "refused")])
def test_length_and_refusal_fail_the_item(tmp_path, fault, reason):
    async def go():
        with OpenAIServer(faults=lambda b, k, a: fault) as srv:
            client = make(srv, tmp_path)
            with pytest.raises(AnnotationError, match=reason):
                await client.complete_json(ask(0), Caption, prompt_version="t1")
            assert len(client.cache) == 0  # failures are never cached
            await client.aclose()
            return srv
    srv = run(go())
    assert sum(srv.received.values()) == 1  # not retried: deterministic failures are final


def test_retries_exhausted_and_4xx_not_retried(tmp_path):
    async def go():
        with OpenAIServer(faults=lambda b, k, a: "500") as srv:
            client = make(srv, tmp_path, max_retries=2)
            with pytest.raises(AnnotationError, match="gave up after 3 attempts"):
                await client.complete_json(ask(0), Caption, prompt_version="t1")
            await client.aclose()
            assert sum(srv.received.values()) == 3
        with OpenAIServer() as srv:
            client = ChatClient(srv.base_url + "/nope", "m", api_key="k", backoff_base=0.01)
            with pytest.raises(AnnotationError, match="HTTP 404"):
                await client.complete_json(ask(0), Caption, prompt_version="t1")
            await client.aclose()
    run(go())


def test_validator_reask_then_error(tmp_path):
    seen = []

    def validate(parsed: Caption) -> None:
        seen.append(parsed.caption)
        if len(seen) < 2:
            raise ValueError("mentions unknown instance [99]")

    async def go():
        with OpenAIServer() as srv:
            client = make(srv, tmp_path, max_reasks=2)
            parsed, usage = await client.complete_json(ask(1), Caption, prompt_version="t1", validate=validate)
            assert usage.requests == 2 and client.stats["reasks"] == 1
            reask_msgs = [b for b in srv.received]
            assert len(reask_msgs) == 2
            with pytest.raises(AnnotationError, match=r"invalid answer after 3 attempts: .*\[99\]"):
                await client.complete_json(ask(2), Caption, prompt_version="t1",
                                           validate=lambda p: (_ for _ in ()).throw(ValueError("bad [99]")))
            await client.aclose()
    run(go())


def test_cache_hits_cost_nothing_and_key_covers_inputs(tmp_path):
    async def go():
        with OpenAIServer() as srv:
            c1 = make(srv, tmp_path)
            first = [await c1.complete_json(ask(i), Caption, prompt_version="v1") for i in range(3)]
            await c1.aclose()
            c2 = make(srv, tmp_path)
            second = [await c2.complete_json(ask(i), Caption, prompt_version="v1") for i in range(3)]
            assert [p for p, _ in first] == [p for p, _ in second]
            assert all(u.cached for _, u in second) and c2.ledger.total_cost == 0
            assert sum(srv.received.values()) == 3
            await c2.complete_json(ask(0), Caption, prompt_version="v2")  # new prompt version: new call
            assert sum(srv.received.values()) == 4
            await c2.aclose()
    run(go())
    db = (tmp_path / "cache.sqlite").read_bytes() + (tmp_path / "cache.sqlite-wal").read_bytes() \
        if (tmp_path / "cache.sqlite-wal").exists() else (tmp_path / "cache.sqlite").read_bytes()
    assert b"SECRET" not in db
    import numpy as np
    img_a = image_part(encode_image(np.zeros((8, 8, 3), np.uint8)))
    img_b = image_part(encode_image(np.full((8, 8, 3), 255, np.uint8)))
    msgs = lambda img: [{"role": "user", "content": [{"type": "text", "text": "x"}, img]}]
    key = lambda m, **kw: cache_key("gpt-4o", m, strict_schema(Caption), {"temperature": 0, **kw}, "v1")
    assert key(msgs(img_a)) == key(msgs(img_a))
    assert key(msgs(img_a)) != key(msgs(img_b))
    assert key(msgs(img_a)) != key(msgs(img_a), max_tokens=5)
    raw_hash = hashlib.sha256(encode_image(np.zeros((8, 8, 3), np.uint8))).hexdigest()
    assert raw_hash in str(__import__("data_gen.client.cache", fromlist=["x"])._hash_part(msgs(img_a)))


def test_image_token_estimates():
    assert image_tokens(1024, 1024, "high") == 85 + 170 * 4
    assert image_tokens(2048, 4096, "high") == 85 + 170 * 6
    assert image_tokens(300, 200, "high") == 85 + 170
    assert image_tokens(4000, 4000, "low") == 85
    import numpy as np
    part = image_part(encode_image(np.zeros((600, 1000, 3), np.uint8)))
    est = estimate_input_tokens([{"role": "user", "content": [{"type": "text", "text": "a" * 400}, part]}])
    assert est >= 100 + image_tokens(1000, 600)


def test_ratelimit_headers_lower_limits_and_429_retry_after(tmp_path):
    assert parse_reset("6m0s") == 360 and parse_reset("20ms") == pytest.approx(0.02) and parse_reset("1.5") == 1.5

    async def go():
        limiter = RateLimiter(rpm=None, tpm=1000, concurrency=4)
        limiter.observe_headers({"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "5",
                                 "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "500"})
        assert limiter.rpm == 120 and limiter.requests is not None and limiter.tpm == 500
        with OpenAIServer(rpm=1200) as srv:  # 20 req/s with a 20-request burst
            client = make(srv, tmp_path, concurrency=16)
            out = await asyncio.gather(*(client.complete_json(ask(i), Caption, prompt_version="r")
                                         for i in range(40)))
            await client.aclose()
            assert len(out) == 40
            assert client.limiter.rpm == 1200  # adopted from x-ratelimit-limit-requests
            return srv
    run(go())


def test_ledger_budget_needs_a_price_and_survives_a_restart(tmp_path):
    with pytest.raises(UnknownPrice, match="no price for model 'gpt-4o-2099-01-01'"):
        CostLedger(max_cost=1.0).reserve("gpt-4o-2099-01-01", 100, 100)
    CostLedger().reserve("gpt-4o-2099-01-01", 100, 100)  # no budget: nothing to keep
    path = tmp_path / "ledger.json"
    first = CostLedger(max_cost=0.01, path=path)
    first.record("gpt-4o-2024-08-06", 2000, 300)  # $0.008; written at once, no close needed
    again = CostLedger(max_cost=0.01, path=path)  # the process was killed: a new one starts
    assert again.total_cost == pytest.approx(0.008) and again.run_cost == 0
    with pytest.raises(BudgetExceeded):
        again.reserve("gpt-4o-2024-08-06", 1000, 0)  # $0.0025 more would pass $0.01
    again.record("gpt-4o-2024-08-06", 0, 100, batch=True)
    third = CostLedger(path=path)
    assert third.total_cost == pytest.approx(0.0085)
    assert third.totals()["gpt-4o-2024-08-06"].requests == 2


def test_ledger_prices_budget_and_default_server_answers(tmp_path):
    ledger = CostLedger(max_cost=0.001)
    assert ledger.price("gpt-4o-2024-08-06", 1_000_000, 0) == pytest.approx(2.5)
    assert ledger.price("gpt-4o-2024-08-06", 0, 1_000_000, batch=True) == pytest.approx(5.0)
    with pytest.raises(BudgetExceeded):
        ledger.reserve("gpt-4o-2024-08-06", 100, 1000)  # worst case 0.01025 > 0.001

    async def go():
        with OpenAIServer() as srv:
            client = make(srv, tmp_path, ledger=CostLedger(max_cost=0.0003), max_tokens=10)
            done = 0
            with pytest.raises(BudgetExceeded):
                for i in range(100):
                    await client.complete_json(ask(i), Caption, prompt_version="b")
                    done += 1
            assert 0 < done < 100 and client.ledger.total_cost <= 0.0003
            await client.aclose()
    run(go())
    body = {"model": "m", "messages": [], "response_format": {"type": "json_schema", "json_schema": {
        "name": "Caption", "schema": strict_schema(Caption)}}}
    assert Caption.model_validate_json(schema_responder(body))


def test_token_bucket_accounting_and_tpm_limited_run(tmp_path):
    from data_gen.client import TokenBucket

    async def go():
        bucket = TokenBucket(rate_per_s=1e-6, capacity=100)
        await bucket.take(60)
        assert bucket.level == pytest.approx(40, abs=1e-3)
        bucket.give_back(30)  # an over-estimate is refunded
        assert bucket.level == pytest.approx(70, abs=1e-3)
        bucket.give_back(1000)
        assert bucket.level == pytest.approx(100)  # never above capacity
        with OpenAIServer() as srv:  # a tight TPM still completes everything (requests wait their turn)
            client = make(srv, tmp_path, tpm=600_000, max_tokens=50)
            out = await asyncio.gather(*(client.complete_json(ask(i), Caption, prompt_version="tpm")
                                         for i in range(20)))
            assert len(out) == 20 and client.limiter.tokens.capacity == pytest.approx(10_000)
            await client.aclose()
    run(go())
