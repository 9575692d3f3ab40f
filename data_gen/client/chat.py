"""ChatClient: structured-output chat completions with rate limits, retries, re-asks, cache and ledger."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
from pydantic import BaseModel, ValidationError

from data_gen.client.cache import ResponseCache, cache_key
from data_gen.client.ledger import CostLedger
from data_gen.client.ratelimit import RateLimiter, estimate_input_tokens

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class AnnotationError(RuntimeError):
    """One request (and so one item) failed for good; the message is the reason written to errors.jsonl."""


class TransientError(RuntimeError):
    """A failure worth retrying (connection dropped, 5xx, 429); `retry_after` in seconds when known."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Usage:
    """Tokens billed for one `complete_json` call (all attempts and re-asks); zero when served from cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    cached: bool = False


try:  # openai >= 3 ships its HTTP stack as httpx2; earlier versions use httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx


@functools.lru_cache(maxsize=256)
def _strict_schema_json(model: type[BaseModel]) -> str:
    return json.dumps(_strict_schema(model))


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Pydantic JSON schema made OpenAI-strict: every property required, no additional properties."""
    return json.loads(_strict_schema_json(model))


def _strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: fix(v) for k, v in node.items() if k not in ("title", "default")}
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            return node
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node
    return fix(model.model_json_schema())


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) * scale
            except ValueError:
                continue
    return None


def _token_count(usage: Any, key: str) -> int | None:
    """A non-negative token count from a reply's `usage` object, or None when absent or not a number."""
    value = usage.get(key) if isinstance(usage, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e15:
        return None  # also refuses NaN and infinities
    return int(value)


def resolve_api_key(api_key: str | None, base_url: str | None) -> str:
    """Key from the argument or OPENAI_API_KEY; a placeholder for non-OpenAI servers without auth."""
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url and "api.openai.com" not in base_url:
        return "EMPTY"
    raise AnnotationError("no API key: set OPENAI_API_KEY (it is never logged, cached or written)")


class ChatClient:
    """Async structured-output client for any OpenAI-compatible server; see data_gen.client docs."""

    def __init__(self, base_url: str | None, model: str, *, api_key: str | None = None,
                 cache_path: str | os.PathLike | None = None, rpm: float | None = None,
                 tpm: float | None = None, concurrency: int = 32, max_retries: int = 8,
                 max_reasks: int = 2, timeout: float = 120.0, temperature: float = 0.0,
                 max_tokens: int = 2048, seed: int | None = None, ledger: CostLedger | None = None,
                 backoff_base: float = 0.5, backoff_cap: float = 60.0, transport: Any = None):
        self.model = model
        self.base_url = base_url
        self.max_retries, self.max_reasks = max_retries, max_reasks
        self.timeout, self.max_tokens = timeout, max_tokens
        self.sampling = {"temperature": temperature, "seed": seed}
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.ledger = ledger or CostLedger()
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.limiter = RateLimiter(rpm, tpm, concurrency)
        # A pool sized to the concurrency keeps httpcore's per-request connection scan short.
        pool = _httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.oa = openai.AsyncOpenAI(api_key=resolve_api_key(api_key, base_url), base_url=base_url,
                                     max_retries=0, timeout=timeout,
                                     http_client=openai.DefaultAsyncHttpxClient(limits=pool, timeout=timeout))
        self.transport = transport  # None: synchronous API; else a BatchTransport (half price)
        self._rng = random.Random(0)
        self._inflight: dict[str, asyncio.Future] = {}
        self.stats = {"requests": 0, "retries": 0, "reasks": 0, "cache_hits": 0}

    # ------------------------------------------------------------------ public
    async def complete_json(self, messages: list[dict[str, Any]], schema_model: type[M], *,
                            prompt_version: str, validate: Callable[[M], None] | None = None,
                            max_tokens: int | None = None) -> tuple[M, Usage]:
        """Ask for a JSON answer matching `schema_model`; re-ask on invalid answers; cache successes.

        `validate(parsed)` may raise ValueError to reject a schema-valid answer (e.g. an unknown [ID]);
        its message is sent back to the model in the re-ask. Raises AnnotationError when all fail.
        """
        schema = strict_schema(schema_model)
        schema_tokens = len(_strict_schema_json(schema_model)) // 4
        max_tokens = max_tokens or self.max_tokens
        sampling = dict(self.sampling, max_tokens=max_tokens)
        key = cache_key(self.model, messages, schema, sampling, prompt_version)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats["cache_hits"] += 1
                self.ledger.record(self.model, 0, 0, cached=True)
                return schema_model.model_validate(hit[0]), Usage(cached=True)
        if key in self._inflight:  # the same request is already on its way: share its answer
            self.stats["cache_hits"] += 1
            parsed_json = await asyncio.shield(self._inflight[key])
            return schema_model.model_validate(parsed_json), Usage(cached=True)
        future = self._inflight[key] = asyncio.get_running_loop().create_future()
        try:
            parsed, usage = await self._complete(messages, schema_model, schema, schema_tokens, max_tokens, key,
                                                 validate)
        except BaseException as err:
            future.set_exception(err if isinstance(err, Exception) else AnnotationError("cancelled"))
            future.exception()  # mark retrieved: waiters get it via shield
            raise
        else:
            future.set_result(parsed.model_dump(mode="json"))
            return parsed, usage
        finally:
            del self._inflight[key]

    async def _complete(self, messages: list[dict[str, Any]], schema_model: type[M], schema: dict,
                        schema_tokens: int, max_tokens: int, key: str,
                        validate: Callable[[M], None] | None) -> tuple[M, Usage]:
        usage = Usage()
        convo = list(messages)
        problem = ""
        for reask in range(self.max_reasks + 1):
            if reask:
                self.stats["reasks"] += 1
            text = await self._request(convo, schema_model.__name__, schema, schema_tokens, max_tokens, usage)
            try:
                parsed = schema_model.model_validate_json(text)
                if validate is not None:
                    validate(parsed)
            except (ValidationError, ValueError) as err:
                problem = _short(err)
                convo = list(messages) + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"That answer was rejected: {problem} "
                                                "Answer the original request again, fixing this."}]
                continue
            if self.cache is not None:
                self.cache.put(key, self.model, parsed.model_dump(mode="json"),
                               {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens})
            return parsed, usage
        raise AnnotationError(f"invalid answer after {self.max_reasks + 1} attempts: {problem}")

    def estimate_tokens(self, messages: list[dict[str, Any]], schema_model: type[BaseModel]) -> int:
        """Estimated input tokens of one request (images by GPT-4o tile counting)."""
        return estimate_input_tokens(messages, json.dumps(strict_schema(schema_model)))

    async def aclose(self) -> None:
        await self.oa.close()
        if self.transport is not None:
            await self.transport.aclose()
        if self.cache is not None:
            self.cache.close()

    # ------------------------------------------------------------------ internals
    def _body(self, convo: list[dict[str, Any]], name: str, schema: dict, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "messages": convo, "max_tokens": max_tokens,
            "temperature": self.sampling["temperature"],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": name, "strict": True, "schema": schema}}}
        if self.sampling["seed"] is not None:
            body["seed"] = self.sampling["seed"]
        return body

    async def _request(self, convo: list[dict[str, Any]], name: str, schema: dict, schema_tokens: int,
                       max_tokens: int, usage: Usage) -> str:
        """One logical request (with retries); returns the message content; books usage and cost."""
        body = self._body(convo, name, schema, max_tokens)
        est = estimate_input_tokens(convo) + schema_tokens
        batch = self.transport is not None
        reserved = self.ledger.reserve(self.model, est, max_tokens, batch)
        try:
            if batch:
                custom_id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
                data = await self.transport.call(custom_id, body)
            else:
                data = await self._with_retries(body, est, max_tokens)
        finally:
            self.ledger.unreserve(reserved)
        return self._read_choice(data, est, usage, batch)

    def _read_choice(self, data: dict[str, Any], est: int, usage: Usage, batch: bool) -> str:
        counts = data.get("usage") if isinstance(data, dict) else None
        tin = _token_count(counts, "prompt_tokens")
        tin = est if tin is None else tin
        tout = _token_count(counts, "completion_tokens") or 0
        usage.input_tokens += tin
        usage.output_tokens += tout
        usage.requests += 1
        self.stats["requests"] += 1
        self.ledger.record(self.model, tin, tout, batch=batch)
        try:
            choice = data["choices"][0]
            message = choice["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (KeyError, IndexError, TypeError) as err:
            raise AnnotationError(f"response without choices[0].message: {str(data)[:200]}") from err
        if message.get("refusal"):
            raise AnnotationError(f"model refused: {str(message['refusal'])[:200]}")
        if choice.get("finish_reason") == "length":
            raise AnnotationError("answer truncated (finish_reason=length); raise max_tokens")
        if choice.get("finish_reason") == "content_filter":
            raise AnnotationError("answer blocked (finish_reason=content_filter)")
        content = message.get("content")
        if not isinstance(content, str):
            raise AnnotationError("response message has no text content")
        return content

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after + self._rng.uniform(0, 0.1 * max(retry_after, 0.05))
        return min(self.backoff_cap, self.backoff_base * 2 ** attempt) * self._rng.uniform(0.5, 1.0)

    async def _with_retries(self, body: dict[str, Any], est: int, max_tokens: int) -> dict[str, Any]:
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            await self.limiter.acquire(est + max_tokens)
            used = None
            try:
                data, used = await self._send(body)
                return data
            except TransientError as err:
                last = str(err)
                if err.retry_after is not None:
                    self.limiter.backoff(err.retry_after)
                delay = self._backoff(attempt, err.retry_after)
            finally:
                self.limiter.release(est + max_tokens, used)
            if attempt < self.max_retries:
                self.stats["retries"] += 1
                log.info("retrying in %.2fs after: %s", delay, last)
                await asyncio.sleep(delay)
        raise AnnotationError(f"gave up after {self.max_retries + 1} attempts: {last}")

    async def _send(self, body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        try:
            # client.post with cast_to=Response (the documented escape hatch) skips the SDK's per-call
            # parameter transformation, which costs more CPU than everything else here together.
            raw = await self.oa.post("/chat/completions", body=body, cast_to=_httpx.Response)
        except openai.APIStatusError as err:
            status = err.status_code
            if status in RETRYABLE_STATUS or status >= 500:
                raise TransientError(f"HTTP {status}", _retry_after(err.response.headers)) from err
            raise AnnotationError(f"HTTP {status}: {_short(err)}") from err
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise TransientError(f"{type(err).__name__}: {err}") from err
        self.limiter.observe_headers(raw.headers)
        try:
            data = json.loads(raw.content)
        except (ValueError, RecursionError) as err:
            raise TransientError("response body is not JSON") from err
        if not isinstance(data, dict):
            raise TransientError(f"response body is a JSON {type(data).__name__}, not an object")
        return data, _token_count(data.get("usage"), "total_tokens")


def _short(err: Exception, limit: int = 300) -> str:
    if isinstance(err, ValidationError):
        parts = [f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in err.errors()[:3]]
        return "; ".join(parts)[:limit]
    return str(err)[:limit]
