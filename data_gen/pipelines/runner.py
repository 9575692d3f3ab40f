"""Run a pipeline over manifest items: bounded parallelism, resumable journal, atomic outputs, summary.

Files under OUT:
- `progress.jsonl`: one line per finished item (appended with a single write each), so a killed run,
  restarted, skips finished items; a last line torn by a crash is cut off when the journal is loaded.
- the dataset JSON (`inst_it_dataset_video.json`, `inst_it_dataset_image.json` or `svit_dataset.json`),
  rewritten atomically (temp file + rename) every `snapshot_s` and at the end, in manifest order.
- `errors.jsonl`: one `{"item_id", "where", "reason"}` per failed item of this run.
- `summary.json`: ok / failed counts, requests, cache hits, tokens, cost, wall time, effective RPM
  (all of this run; `total_cost_usd` adds what earlier runs into OUT spent when the client's ledger
  keeps a file, as `instit-annotate`'s OUT/ledger.json).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_gen.client.chat import AnnotationError, ChatClient
from data_gen.client.ledger import BudgetExceeded
from data_gen.manifest import ManifestItem
from data_gen.pipelines.instit import annotate_image, annotate_video
from data_gen.pipelines.svit import annotate_svit
from data_gen.pipelines.svit_scene import InputError

OUTPUT_NAMES = {"video": "inst_it_dataset_video.json", "image": "inst_it_dataset_image.json",
                "svit": "svit_dataset.json"}
PROCESSORS: dict[str, Callable[[ManifestItem, Any], Awaitable[dict]]] = {
    "video": annotate_video, "image": annotate_image, "svit": annotate_svit}


@dataclass
class RunSummary:
    items: int = 0
    ok: int = 0
    failed: int = 0
    resumed: int = 0
    stopped_by_budget: bool = False
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    reasks: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    total_cost_usd: float = 0.0
    wall_s: float = 0.0
    effective_rpm: float = 0.0
    output: str = ""
    errors: str = ""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Journal:
    """Append-only JSONL of finished items (`{"item_id", "record"}`), one os.write per line."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def load(self) -> dict[str, dict]:
        """Finished items; a torn last line is cut off so the next append starts a line of its own."""
        data = self.path.read_bytes()
        *lines, tail = data.split(b"\n")  # tail: what follows the last newline (b"" normally)
        done: dict[str, dict] = {}
        for line in lines:
            _parse_entry(line, done)  # an unreadable line is skipped
        if tail:
            if _parse_entry(tail, done):  # a whole entry that only lacks its newline
                os.write(self.fd, b"\n")
            else:  # written partly when the process died
                os.truncate(self.path, len(data) - len(tail))
        return done

    def append(self, item_id: str, record: dict) -> None:
        os.write(self.fd, (json.dumps({"item_id": item_id, "record": record}, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def _parse_entry(line: bytes, done: dict[str, dict]) -> bool:
    """Add one journal line to `done`; False when it does not parse."""
    try:
        entry = json.loads(line)
        done[entry["item_id"]] = entry["record"]
    except (ValueError, KeyError, TypeError):
        return False
    return True


def assemble(kind: str, items: list[ManifestItem], done: dict[str, dict]) -> list[dict]:
    """Records of finished items in manifest order (SVIT: flattened to its item list)."""
    records = [done[it.item_id] for it in items if it.item_id in done]
    if kind == "svit":
        return [x for r in records for x in r["items"]]
    return records


async def run_pipeline(kind: str, items: list[ManifestItem], annotator: Any, out_dir: str | Path, *,
                       client: ChatClient | None = None, items_in_flight: int = 64, progress: bool = True,
                       snapshot_s: float = 60.0) -> RunSummary:
    """Annotate every item not already finished in OUT; returns the summary (also written to OUT)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / "progress.jsonl")
    done = journal.load()
    ids = {it.item_id for it in items}
    done = {k: v for k, v in done.items() if k in ids}
    summary = RunSummary(items=len(items), resumed=len(done))
    todo = [it for it in items if it.item_id not in done]
    errors: dict[str, dict] = {}
    slots = asyncio.Semaphore(max(1, items_in_flight))
    output_path = out / OUTPUT_NAMES[kind]
    start = time.monotonic()
    bar = _progress_bar(len(items), len(done), kind, progress)
    dirty = asyncio.Event()

    async def one(item: ManifestItem) -> None:
        async with slots:
            if summary.stopped_by_budget:
                errors[item.item_id] = _error(item, "not started: --max-cost budget reached")
                return
            try:
                record = await PROCESSORS[kind](item, annotator)
            except BudgetExceeded as err:
                summary.stopped_by_budget = True
                errors[item.item_id] = _error(item, f"budget: {err}")
            except (InputError, AnnotationError, ValueError, OSError) as err:
                errors[item.item_id] = _error(item, str(err))
            except Exception as err:  # noqa: BLE001 - one bad item must not stop the run
                errors[item.item_id] = _error(item, f"unexpected {type(err).__name__}: {err}")
            else:
                journal.append(item.item_id, record)
                done[item.item_id] = record
                dirty.set()
            bar.update(1)

    async def snapshots() -> None:
        while True:
            await asyncio.sleep(snapshot_s)
            if dirty.is_set():
                dirty.clear()
                await asyncio.to_thread(write_json_atomic, output_path, assemble(kind, items, dict(done)))

    snapper = asyncio.create_task(snapshots())
    try:
        await asyncio.gather(*(one(it) for it in todo))
    finally:
        snapper.cancel()
        bar.close()
        journal.close()
    write_json_atomic(output_path, assemble(kind, items, done))
    errors_path = out / "errors.jsonl"
    tmp = errors_path.with_name(".errors.jsonl.tmp")
    tmp.write_text("".join(json.dumps(errors[it.item_id], ensure_ascii=False) + "\n"
                           for it in items if it.item_id in errors))
    os.replace(tmp, errors_path)
    summary.wall_s = round(time.monotonic() - start, 3)
    summary.ok = sum(1 for it in items if it.item_id in done)
    summary.failed = len(errors)
    if client is not None:
        for key in ("requests", "cache_hits", "retries", "reasks"):
            setattr(summary, key, client.stats[key])
        for usage in client.ledger.per_model.values():
            summary.input_tokens += usage.input_tokens
            summary.output_tokens += usage.output_tokens
        summary.cost_usd = round(client.ledger.run_cost, 6)
        summary.total_cost_usd = round(client.ledger.total_cost, 6)
        summary.effective_rpm = round(summary.requests / max(summary.wall_s, 1e-9) * 60.0, 1)
    summary.output, summary.errors = str(output_path), str(errors_path)
    write_json_atomic(out / "summary.json", asdict(summary))
    return summary


def _error(item: ManifestItem, reason: str) -> dict:
    return {"item_id": item.item_id, "where": item.where, "reason": reason}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, kind: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"annotate {kind}", unit="item", file=sys.stderr)
