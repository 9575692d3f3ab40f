"""Batch API transport: gathers requests, submits JSONL batches, polls, re-keys, resubmits, resumes.

`BatchTransport.call(custom_id, body)` has the same result as one synchronous request (the parsed
chat.completion dict) but goes through /v1/batches at half price. Calls arriving while the pipeline
runs are gathered until no new one came for `gather_s`, then split at the API limits (50,000 requests,
200 MB per file), uploaded and submitted. Every batch ID with its custom_ids is written to SQLite
before polling starts, and every downloaded answer is stored there, so a restarted run re-attaches to
in-flight batches and reuses finished answers instead of submitting them again. Failed and expired
requests are resubmitted up to `max_resubmits` times. Polling and downloading retry 429, 5xx and
dropped connections with exponential backoff (`Retry-After` honoured) up to `max_poll_retries` times in
a row; any other failure (401, 403, 404, ...) or retries running out fails every request waiting on
that batch with an AnnotationError naming the batch, and its record is kept, so a restart re-attaches.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai

from data_gen.client.chat import RETRYABLE_STATUS, AnnotationError, _retry_after

log = logging.getLogger(__name__)
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
TERMINAL = {"completed", "failed", "expired", "cancelled"}
MAX_POLL_BACKOFF_S = 600.0


def _retryable(err: Exception) -> bool:
    if isinstance(err, openai.APIStatusError):
        return err.status_code in RETRYABLE_STATUS or err.status_code >= 500
    return isinstance(err, openai.APIConnectionError)  # includes timeouts


def split_requests(lines: list[bytes], max_requests: int = MAX_REQUESTS,
                   max_bytes: int = MAX_BYTES) -> list[list[bytes]]:
    """Split JSONL lines into chunks within both limits (a line over max_bytes raises ValueError)."""
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        n = len(line) + 1
        if n > max_bytes:
            raise ValueError(f"one batch request is {n} bytes, over the {max_bytes}-byte file limit")
        if current and (len(current) >= max_requests or size + n > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        chunks.append(current)
    return chunks


class BatchTransport:
    """Submit chat requests through the Batch API; see the module docstring."""

    def __init__(self, oa: openai.AsyncOpenAI, db_path: str | Path, *, gather_s: float = 5.0,
                 poll_s: float = 30.0, max_resubmits: int = 3, max_requests: int = MAX_REQUESTS,
                 max_bytes: int = MAX_BYTES, completion_window: str = "24h", max_poll_retries: int = 8):
        self.oa = oa
        self.gather_s, self.poll_s, self.max_resubmits = gather_s, poll_s, max_resubmits
        self.max_poll_retries = max_poll_retries
        self.max_requests, self.max_bytes, self.window = max_requests, max_bytes, completion_window
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.execute("CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, status TEXT, "
                        "custom_ids TEXT, created REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS results (custom_id TEXT PRIMARY KEY, response TEXT)")
        self.futures: dict[str, asyncio.Future] = {}
        self.bodies: dict[str, dict[str, Any]] = {}
        self.pending: list[str] = []
        self.resubmits: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None
        self._last_arrival = 0.0
        self._resumed = False
        self.stats = {"batches": 0, "resubmitted": 0, "resumed_batches": 0}

    # ------------------------------------------------------------------ public
    async def call(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Resolve one chat request through a batch; returns the chat.completion body."""
        self._resume()
        row = self.db.execute("SELECT response FROM results WHERE custom_id=?", (custom_id,)).fetchone()
        if row is not None:
            return json.loads(row[0])
        self.bodies[custom_id] = body
        future = self.futures.get(custom_id)
        if future is None:  # not in an in-flight batch: queue it
            future = self.futures[custom_id] = asyncio.get_running_loop().create_future()
            self.pending.append(custom_id)
            self._last_arrival = time.monotonic()
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_loop())
        return await asyncio.shield(future)

    async def aclose(self) -> None:
        for task in list(self.tasks) + ([self._flusher] if self._flusher else []):
            task.cancel()
        self.db.close()

    # ------------------------------------------------------------------ internals
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _resume(self) -> None:
        """Re-attach to batches a previous run left in flight (once per process)."""
        if self._resumed:
            return
        self._resumed = True
        loop = asyncio.get_running_loop()
        rows = self.db.execute("SELECT id, custom_ids FROM batches WHERE status NOT IN "
                               "('completed','failed','expired','cancelled','done')").fetchall()
        for batch_id, ids in rows:
            custom_ids = json.loads(ids)
            for cid in custom_ids:
                self.futures.setdefault(cid, loop.create_future())
            self.stats["resumed_batches"] += 1
            log.info("resuming batch %s (%d requests)", batch_id, len(custom_ids))
            if batch_id.startswith("file:"):
                self._spawn(self._reconcile(batch_id, custom_ids))
            else:
                self._spawn(self._poll(batch_id, custom_ids))

    async def _flush_loop(self) -> None:
        while self.pending:
            quiet = time.monotonic() - self._last_arrival
            if quiet < self.gather_s and len(self.pending) < self.max_requests:
                await asyncio.sleep(self.gather_s - quiet)
                continue
            ids, self.pending = self.pending, []
            lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                 "body": self.bodies[cid]}).encode() for cid in ids]
            chunks = split_requests(lines, self.max_requests, self.max_bytes)
            start = 0
            for chunk in chunks:
                chunk_ids = ids[start:start + len(chunk)]
                start += len(chunk)
                try:
                    batch_id = await self._submit(chunk)
                except openai.OpenAIError as err:
                    for cid in chunk_ids:
                        self._fail(cid, f"batch submission failed: {err}")
                    continue
                self._spawn(self._poll(batch_id, chunk_ids))

    async def _submit(self, chunk: list[bytes]) -> str:
        data = b"\n".join(chunk) + b"\n"
        ids = [json.loads(line)["custom_id"] for line in chunk]
        upload = await self.oa.files.create(file=("requests.jsonl", data, "application/jsonl"), purpose="batch")
        # Persist the uploaded file before creating the batch: a crash in between is reconciled on restart.
        pending_key = "file:" + upload.id
        self.db.execute("INSERT OR REPLACE INTO batches VALUES (?,?,?,?)",
                        (pending_key, "submitting", json.dumps(ids), time.time()))
        return await self._create(upload.id, pending_key, len(ids))

    async def _create(self, file_id: str, pending_key: str, count: int) -> str:
        batch = await self.oa.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                             completion_window=self.window)
        self.db.execute("UPDATE batches SET id=?, status=? WHERE id=?", (batch.id, batch.status, pending_key))
        self.stats["batches"] += 1
        log.info("submitted batch %s with %d requests", batch.id, count)
        return batch.id

    async def _reconcile(self, pending_key: str, custom_ids: list[str]) -> None:
        """A previous run uploaded a file but may have died before recording its batch: find or create it."""
        file_id = pending_key[len("file:"):]
        found = None
        try:
            async for batch in self.oa.batches.list(limit=100):
                if batch.input_file_id == file_id:
                    found = batch.id
                    break
            if found is not None:
                self.db.execute("UPDATE batches SET id=?, status=? WHERE id=?", (found, "in_progress", pending_key))
            else:
                found = await self._create(file_id, pending_key, len(custom_ids))
        except Exception as err:  # noqa: BLE001 - an escaping error would leave every waiting request hanging
            self._fail_all(f"batch for uploaded file {file_id}", custom_ids, err)
            return
        await self._poll(found, custom_ids)

    async def _api(self, what: str, call: Any) -> Any:
        """Await `call()`, retrying retryable errors with exponential backoff from `poll_s`."""
        attempt = 0
        while True:
            try:
                return await call()
            except openai.OpenAIError as err:
                if not _retryable(err) or attempt >= self.max_poll_retries:
                    raise
                headers = err.response.headers if isinstance(err, openai.APIStatusError) else None
                delay = _retry_after(headers) or min(MAX_POLL_BACKOFF_S, self.poll_s * 2 ** attempt)
                attempt += 1
                log.warning("%s failed (%s); retry %d in %.1fs", what, err, attempt, delay)
                await asyncio.sleep(delay)

    async def _download(self, batch_id: str, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = await self._api(f"batch {batch_id}: downloading {file_id}",
                                  lambda: self.oa.files.content(file_id))
        return [json.loads(line) for line in content.text.splitlines() if line.strip()]

    async def _poll(self, batch_id: str, custom_ids: list[str]) -> None:
        try:
            while True:
                batch = await self._api(f"batch {batch_id}: status", lambda: self.oa.batches.retrieve(batch_id))
                if batch.status in TERMINAL:
                    break
                await asyncio.sleep(self.poll_s)
            lines = (await self._download(batch_id, batch.output_file_id)
                     + await self._download(batch_id, batch.error_file_id))
        except Exception as err:  # noqa: BLE001 - an escaping error would leave every waiting request hanging
            self._fail_all(f"batch {batch_id}", custom_ids, err)
            return
        by_id = {line.get("custom_id"): line for line in lines}
        for cid in custom_ids:
            line = by_id.get(cid)
            response = (line or {}).get("response") or {}
            if response.get("status_code") == 200:
                self.db.execute("INSERT OR REPLACE INTO results VALUES (?,?)", (cid, json.dumps(response["body"])))
                future = self.futures.pop(cid, None)
                if future is not None and not future.done():
                    future.set_result(response["body"])
                continue
            if line is None:
                reason = f"batch {batch.status} without an answer"
            elif line.get("error"):
                reason = f"{line['error'].get('code')}: {line['error'].get('message')}"
            else:
                reason = f"HTTP {response.get('status_code')}: {json.dumps(response.get('body'))[:200]}"
            self._retry_or_fail(cid, reason)
        self.db.execute("UPDATE batches SET status='done' WHERE id=?", (batch_id,))

    def _retry_or_fail(self, cid: str, reason: str) -> None:
        future = self.futures.get(cid)
        if future is None or future.done():
            return
        count = self.resubmits.get(cid, 0)
        if cid not in self.bodies or count >= self.max_resubmits:
            self._fail(cid, f"batch request failed {count + 1} times; last: {reason}")
            return
        self.resubmits[cid] = count + 1
        self.stats["resubmitted"] += 1
        self.pending.append(cid)
        self._last_arrival = time.monotonic()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())

    def _fail_all(self, what: str, custom_ids: list[str], err: Exception) -> None:
        """End every request waiting on `what` with an error naming it (the batch record is kept)."""
        retries = f" (after {self.max_poll_retries} retries)" if _retryable(err) else ""
        reason = f"{what}: {type(err).__name__}{retries}: {str(err)[:300]}"
        log.error("%s; failing its %d waiting requests", reason, len(custom_ids))
        for cid in custom_ids:
            self._fail(cid, reason)

    def _fail(self, cid: str, reason: str) -> None:
        future = self.futures.pop(cid, None)
        if future is not None and not future.done():
            future.set_exception(AnnotationError(reason))
