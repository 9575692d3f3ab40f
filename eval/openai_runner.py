"""Inst-It Bench answered by any OpenAI-compatible chat model (GPT-4o, vLLM, `instit-serve`, ...).

The same prompts as the checkpoint path (`eval.prompts`), the same frames (`list_frames`, every frame of a
video folder unless `max_frames` caps it, uniformly), sent as `data:` URLs: an image as one image part, a
video as its frames in order, then the prompt text. Requests go through the project's async client
(`data_gen.client.ChatClient`: rate limits, retries with backoff, the SQLite response cache, the cost
ledger), and the predictions are written in the runner's format (`predictions.jsonl`, appended per answer),
so a killed run resumes where it stopped and `instit-eval score` / the report read it unchanged.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_gen.client.cache import cache_key
from data_gen.client.chat import AnnotationError, ChatClient, Usage
from data_gen.client.ratelimit import estimate_input_tokens
from eval.bench import Bench, BenchItem, list_frames
from eval.prompts import DEFAULT_PROMPTS, PromptSet
from eval.runner import PredictionWriter

log = logging.getLogger(__name__)
PROMPT_VERSION = "instit-eval-bench-v1"
ERRORS_FILE = "errors.jsonl"
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def image_url(source: str | Path | bytes) -> str:
    """A `data:` URL of an image file or encoded bytes: the bytes as they are for PNG / JPEG / WebP / GIF
    (no re-compression), anything else re-encoded as PNG (lossless)."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        mime = _MIME.get(im.format or "")
        if mime is None:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            raw, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def bench_messages(item: BenchItem, prompts: PromptSet = DEFAULT_PROMPTS, max_frames: int | None = None,
                   detail: str | None = None) -> list[dict[str, Any]]:
    """One user message: the image (or the video's frames, in order) as image parts, then the prompt."""
    if item.split == "image":
        if item.image is None:
            raise ValueError(f"{item.config} {item.question_id}: no image")
        sources: Sequence[str | Path | bytes] = [item.image]
    else:
        if item.video_dir is None:
            raise ValueError(f"{item.config} {item.question_id}: no video_path")
        sources = list_frames(item.video_dir, max_frames)
    parts: list[dict[str, Any]] = []
    for src in sources:
        url: dict[str, Any] = {"url": image_url(src)}
        if detail:
            url["detail"] = detail
        parts.append({"type": "image_url", "image_url": url})
    parts.append({"type": "text", "text": prompts.build(item)})
    return [{"role": "user", "content": parts}]


class TextChatClient(ChatClient):
    """`ChatClient` with a free-text completion (no response schema): the bench's answers are plain text.

    Shares the parent's limiter, retries, SQLite cache (keyed with schema None) and cost ledger. A
    truncated answer (`finish_reason == "length"`) is kept, as the checkpoint path keeps an answer cut at
    max_new_tokens.
    """

    async def complete_text(self, messages: list[dict[str, Any]], *, prompt_version: str,
                            max_tokens: int | None = None) -> tuple[str, Usage]:
        max_tokens = max_tokens or self.max_tokens
        sampling = dict(self.sampling, max_tokens=max_tokens)
        key = cache_key(self.model, messages, None, sampling, prompt_version)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats["cache_hits"] += 1
                self.ledger.record(self.model, 0, 0, cached=True)
                return hit[0]["text"], Usage(cached=True)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": self.sampling["temperature"]}
        if self.sampling["seed"] is not None:
            body["seed"] = self.sampling["seed"]
        est = estimate_input_tokens(messages)
        reserved = self.ledger.reserve(self.model, est, max_tokens)
        try:
            data = await self._with_retries(body, est, max_tokens)
        finally:
            self.ledger.unreserve(reserved)
        counts = data.get("usage") or {}
        usage = Usage(int(counts.get("prompt_tokens", est)), int(counts.get("completion_tokens", 0)), 1)
        self.stats["requests"] += 1
        self.ledger.record(self.model, usage.input_tokens, usage.output_tokens)
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError) as err:
            raise AnnotationError(f"response without choices[0].message: {str(data)[:200]}") from err
        if message.get("refusal"):
            raise AnnotationError(f"model refused: {str(message['refusal'])[:200]}")
        if choice.get("finish_reason") == "content_filter":
            raise AnnotationError("answer blocked (finish_reason=content_filter)")
        text = message.get("content")
        if not isinstance(text, str):
            raise AnnotationError("response message has no text content")
        if self.cache is not None:
            self.cache.put(key, self.model, {"text": text, "finish_reason": choice.get("finish_reason")},
                           {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens})
        return text, usage


async def arun_bench_openai(client: TextChatClient, bench: Bench | Sequence[BenchItem], *,
                            prompts: PromptSet = DEFAULT_PROMPTS, out_path: str | Path | None = None,
                            max_new_tokens: int = 128, max_frames: int | None = None, detail: str | None = None,
                            concurrency: int = 16, progress: Callable[[int, int], None] | None = None
                            ) -> tuple[list[dict], list[dict]]:
    """Answer the bench with `client`; -> (prediction records of this bench, failures).

    With `out_path` the records are appended as they arrive and questions already there are skipped.
    A question whose request fails for good is not written (a rerun asks it again); it is returned
    in the failures (config, question_id, error) instead. `concurrency` bounds how many questions have
    their images encoded in memory at once (the client's own limiter bounds requests in flight).
    """
    items = bench.all_items() if isinstance(bench, Bench) else list(bench)
    writer = PredictionWriter(out_path) if out_path is not None else None
    todo = [it for it in items if writer is None or (it.config, it.question_id) not in writer.done]
    gate = asyncio.Semaphore(max(1, concurrency))
    new: list[dict] = []
    failures: list[dict] = []
    done = 0

    async def one(item: BenchItem) -> None:
        nonlocal done
        async with gate:
            try:
                messages = await asyncio.to_thread(bench_messages, item, prompts, max_frames, detail)
                text, _ = await client.complete_text(messages, prompt_version=PROMPT_VERSION,
                                                     max_tokens=max_new_tokens)
            except (AnnotationError, OSError, ValueError) as err:
                failures.append({"config": item.config, "question_id": item.question_id,
                                 "error": f"{type(err).__name__}: {err}"})
            else:
                rec = {"question_id": item.question_id, "question": item.question,
                       "model_prediction": text.strip(), "ground_truth": item.answer, "split": item.split,
                       "config": item.config}
                if writer is not None:
                    writer.write([rec])
                new.append(rec)
        done += 1
        if progress is not None:
            progress(done, len(todo))

    try:
        await asyncio.gather(*(one(it) for it in todo))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        records = new
    else:
        wanted = {(it.config, it.question_id) for it in items}
        records = [r for r in writer.records if (r["config"], r["question_id"]) in wanted]
    order = {(it.config, it.question_id): k for k, it in enumerate(items)}
    records.sort(key=lambda r: order.get((r["config"], r["question_id"]), len(order)))
    return records, failures


def run_bench_openai(bench: Bench | Sequence[BenchItem], *, base_url: str | None, model: str,
                     api_key: str | None = None, prompts: PromptSet = DEFAULT_PROMPTS,
                     out_dir: str | Path | None = None, max_new_tokens: int = 128, max_frames: int | None = None,
                     cache_path: str | Path | None = None, ledger: Any = None, rpm: float | None = None,
                     tpm: float | None = None, concurrency: int = 16, max_retries: int = 6, timeout: float = 300.0,
                     detail: str | None = None, progress: Callable[[int, int], None] | None = None
                     ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Synchronous `arun_bench_openai` with its own client; -> (records, failures, client stats + cost).

    Greedy (temperature 0). With `out_dir`: predictions.jsonl and errors.jsonl there, and the response
    cache at `cache_path` (default OUT/responses.sqlite).
    """
    from eval.runner import PREDICTIONS_FILE

    out = Path(out_dir) if out_dir is not None else None
    if cache_path is None and out is not None:
        cache_path = out / "responses.sqlite"

    async def main() -> tuple[list[dict], list[dict], dict[str, Any]]:
        client = TextChatClient(base_url, model, api_key=api_key, cache_path=cache_path, rpm=rpm, tpm=tpm,
                                concurrency=concurrency, max_retries=max_retries, timeout=timeout,
                                temperature=0.0, max_tokens=max_new_tokens, ledger=ledger)
        try:
            records, failures = await arun_bench_openai(
                client, bench, prompts=prompts, out_path=None if out is None else out / PREDICTIONS_FILE,
                max_new_tokens=max_new_tokens, max_frames=max_frames, detail=detail, concurrency=concurrency,
                progress=progress)
        finally:
            await client.aclose()
        return records, failures, {"client": dict(client.stats), "cost": client.ledger.summary()}

    records, failures, stats = asyncio.run(main())
    if out is not None:
        errors = out / ERRORS_FILE
        if failures:
            errors.write_text("".join(json.dumps(f) + "\n" for f in failures))
        elif errors.exists():
            errors.unlink()
    return records, failures, stats
