"""Async OpenAI-compatible client for annotation and judging (no JAX; runs on any CPU box).

Public interface (the eval judge reuses it)::

    from data_gen.client import ChatClient, AnnotationError, CostLedger, BudgetExceeded

    client = ChatClient(base_url="https://api.openai.com/v1", model="gpt-4o-2024-08-06",
                        cache_path="cache/responses.sqlite", rpm=5000, tpm=800_000, concurrency=64,
                        max_reasks=2, temperature=0.0, max_tokens=2048)
    parsed, usage = await client.complete_json(messages, MyPydanticModel, prompt_version="judge-v1",
                                               validate=None)   # validate(parsed) may raise ValueError
    await client.aclose()

* `messages` are OpenAI chat messages; images go in as data URLs (`messages.image_part(bytes)`).
* The answer is requested with `response_format={"type": "json_schema", "strict": true}` built from
  the pydantic model, parsed and validated; an invalid answer (bad JSON, schema violation, or
  `validate` raising ValueError) is re-asked up to `max_reasks` times with the reason appended.
* Returns `(parsed_model, Usage)`; raises `AnnotationError(reason)` when the request fails for good
  (retries exhausted, 4xx, refusal, `finish_reason == "length"`, invalid after all re-asks) and
  `BudgetExceeded` when `CostLedger.max_cost` would be crossed (`UnknownPrice` when a budget is set
  for a model without a price).
* Retries: 408/409/429/5xx and dropped connections, exponential backoff with jitter, `Retry-After`
  honoured (`max_retries`, `backoff_base`, `backoff_cap`, `timeout`).
* Rate limits: `concurrency` in-flight requests, token buckets for `rpm` and `tpm` (input estimated
  with images at 85 + 170 per 512-px tile, plus `max_tokens`); `x-ratelimit-*` headers lower the
  limits or pause the buckets when the server says so.
* Cache: SQLite (WAL) keyed by SHA-256 of (model, messages with image bytes hashed, schema, sampling,
  prompt version); only validated successes are stored; a hit costs nothing and sends nothing.
  Identical requests in flight at the same time are sent once and share the answer.
* API key: argument or `OPENAI_API_KEY`; never logged, cached or written. Non-OpenAI base URLs work
  without one.
* Batch API: pass `transport=BatchTransport(client.oa, db_path)` (or use `make_client(..., batch=True)`)
  and the same `complete_json` goes through /v1/batches at half price, resumable across restarts.
* `client.ledger` (`CostLedger`) holds tokens and dollars per model (`CostLedger(path=...)` keeps them
  in a JSON file across runs, so a budget holds after a restart); `client.stats` counts requests,
  retries, re-asks and cache hits.
"""
from data_gen.client.batch import BatchTransport, split_requests
from data_gen.client.cache import ResponseCache, cache_key
from data_gen.client.chat import AnnotationError, ChatClient, Usage, strict_schema
from data_gen.client.ledger import DEFAULT_PRICES, BudgetExceeded, CostLedger, UnknownPrice, load_prices
from data_gen.client.messages import encode_image, image_part, text_part
from data_gen.client.ratelimit import RateLimiter, TokenBucket, estimate_input_tokens, image_tokens

__all__ = ["AnnotationError", "BatchTransport", "BudgetExceeded", "ChatClient", "CostLedger", "DEFAULT_PRICES",
           "RateLimiter", "ResponseCache", "TokenBucket", "UnknownPrice", "Usage", "cache_key", "encode_image",
           "estimate_input_tokens", "image_part", "image_tokens", "load_prices", "make_client",
           "split_requests", "strict_schema", "text_part"]


def make_client(base_url: str | None, model: str, *, cache_dir: str, batch: bool = False,
                batch_gather_s: float = 5.0, batch_poll_s: float = 30.0, **kwargs) -> ChatClient:
    """A ChatClient with its cache (and, for `batch=True`, batch state) under `cache_dir`."""
    client = ChatClient(base_url, model, cache_path=f"{cache_dir}/responses.sqlite", **kwargs)
    if batch:
        client.transport = BatchTransport(client.oa, f"{cache_dir}/batches.sqlite", gather_s=batch_gather_s,
                                          poll_s=batch_poll_s)
    return client
