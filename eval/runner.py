"""Inst-It Bench inference through the one inference engine (`instit_jax.assistant.BatchEngine`) -> JSONL.

Every question is rendered with the chat template (one `<image>` for an image or a whole video, expanded to
its visual token count; `Assistant.prepare`), prepared on host threads ahead of the engine, and answered
greedily by continuous batching: `batch_size` slots decode together and a finished question's slot is
refilled at once. With several local devices (`data_parallel`), each device runs its own engine and the
questions are spread over them; each host takes every `process_count`-th question. Predictions are appended
(flushed and fsynced) as questions finish, so a killed run resumes where it stopped: finished
(config, question_id) pairs are skipped, a torn last line is dropped. Returned records follow the bench's
question order.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from eval.bench import Bench, BenchItem, load_image, load_video
from eval.prompts import DEFAULT_PROMPTS, PromptSet
from instit_jax import processing
from instit_jax.assistant import Assistant, BatchEngine
from instit_jax.chat_template import IMAGE_TOKEN

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.jsonl"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Inference settings (the defaults reproduce the bench protocol)."""

    template: str = "vicuna_v1"
    batch_size: int = 8  # decode slots, split over the local devices
    max_new_tokens: int = 128
    max_frames: int | None = None  # None: every frame of a video folder (the bench protocol)
    frame_bucket: int = 4  # a video's frames are padded to a multiple of this (few tower compilations)
    prefetch: int = 2  # host threads preparing questions ahead of the engine
    data_parallel: bool = True  # one engine per local device
    decode_chunk: int = 16  # decode steps per engine call (a call ends early when a question finishes)


@dataclasses.dataclass
class Prepared:
    """One tokenised question: ids [T], its token plan, pixels (NHWC: image tiles [N, S, S, 3] or frames
    [F, S, S, 3]) and the engine's inputs (`Assistant.prepare`)."""

    item: BenchItem
    input_ids: np.ndarray
    plan: processing.TokenPlan
    pixels: np.ndarray
    inputs: dict[str, Any]


class Preparer:
    """Turns bench items into the engine's inputs for one model/tokenizer/template (`Assistant.prepare`)."""

    def __init__(self, model: Any, tokenizer: Any, template: str, prompts: PromptSet, max_frames: int | None,
                 frame_multiple: int = 1):
        self.assistant = Assistant(model, tokenizer, template)
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.template = self.assistant.template
        self.prompts = prompts
        self.max_frames = max_frames
        self.frame_multiple = frame_multiple
        self.proc = processing.image_processor_config(self.cfg)
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if image_id != self.cfg.image_token_id:
            raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {image_id} but the model expects image_token_id="
                             f"{self.cfg.image_token_id}; use the checkpoint's own tokenizer")

    def user_text(self, item: BenchItem) -> str:
        """The user turn: one placeholder for the image or the whole video, then the bench prompt."""
        return f"{IMAGE_TOKEN}\n{self.prompts.build(item)}"

    def __call__(self, item: BenchItem) -> Prepared:
        question = self.prompts.build(item)
        if item.split == "image":
            inputs = self.assistant.prepare(question, image=load_image(item))
            pixels = inputs["pixels"][0]
        else:
            inputs = self.assistant.prepare(question, frames=load_video(item, self.max_frames),
                                            frame_multiple=self.frame_multiple)
            pixels = inputs["videos"][0]
        return Prepared(item, inputs["ids"][0], inputs["plan"], pixels, inputs)


class PredictionWriter:
    """Append-only JSONL of prediction records, safe to resume after a crash."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[tuple[str, str]] = set()
        self.records: list[dict] = []
        if self.path.exists():
            raw = self.path.read_bytes()
            keep = raw.rfind(b"\n") + 1  # a line without its newline was being written when killed
            for n, line in enumerate(raw[:keep].splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}:{n}: corrupt prediction line ({e.msg})") from e
                    self.records.append(rec)
                    self.done.add((rec["config"], rec["question_id"]))
            if keep < len(raw):
                log.warning("%s: dropping a torn last line (%d bytes)", self.path, len(raw) - keep)
                with self.path.open("r+b") as f:
                    f.truncate(keep)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, records: Sequence[dict]) -> None:
        for rec in records:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done.add((rec["config"], rec["question_id"]))
        self.records.extend(records)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _record(item: BenchItem, text: str) -> dict:
    return {"question_id": item.question_id, "question": item.question, "model_prediction": text.strip(),
            "ground_truth": item.answer, "split": item.split, "config": item.config}


def run_bench(model: Any, tokenizer: Any, bench: Bench | Sequence[BenchItem], *, template: str = "vicuna_v1",
              prompts: PromptSet = DEFAULT_PROMPTS, batch_size: int = 8, out_path: str | Path | None = None,
              max_new_tokens: int = 128, max_frames: int | None = None, data_parallel: bool = True,
              progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Answer every bench question with `model` (a LlavaNextModel) and return the prediction records.

    With `out_path`, records are appended there as JSONL as questions finish and questions already in the
    file are skipped (resume); the return value then holds this bench's records from the file (old and
    new). Records (in the bench's question order): question_id, question, model_prediction, ground_truth,
    split, config. `progress(done, total)` is called after each write.
    """
    run = RunConfig(template=template, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    max_frames=max_frames, data_parallel=data_parallel)
    items = bench.all_items() if isinstance(bench, Bench) else list(bench)
    if jax.process_count() > 1:
        items = items[jax.process_index()::jax.process_count()]
        if out_path is not None:
            out_path = Path(out_path).with_suffix(f".p{jax.process_index()}.jsonl")
    writer = PredictionWriter(out_path) if out_path is not None else None
    todo = [it for it in items if writer is None or (it.config, it.question_id) not in writer.done]
    devices = jax.local_devices() if run.data_parallel else [None]
    slots = -(-max(1, run.batch_size) // len(devices))
    prep = Preparer(model, tokenizer, run.template, prompts, run.max_frames, frame_multiple=run.frame_bucket)
    # no refusal at the trained context: RoPE runs past it (as transformers does); the cache is sized to the
    # live questions' need, this only caps it
    context = max(model.language_model.cfg.max_position_embeddings, 1 << 15)
    engines = [BatchEngine(prep.assistant, max_batch=slots, max_context=context, chunk=run.decode_chunk,
                           device=None if len(devices) == 1 else d) for d in devices]
    finished: queue.Queue = queue.Queue()
    new: list[dict] = []
    total = len(todo)
    window = slots * len(devices) * 3 // 2 + 1  # questions held in the engines' slots and queues
    ahead = max(run.prefetch, slots)  # questions prepared on host threads before the engines need them
    in_flight = 0

    def collect(block: bool) -> None:
        """Write the answers that came back (wait for one when `block`)."""
        nonlocal in_flight
        done = [finished.get()] if block else []
        while True:
            try:
                done.append(finished.get_nowait())
            except queue.Empty:
                break
        in_flight -= len(done)
        for _, job in done:
            if job.error is not None:
                raise job.error
        records = [_record(item, job.result.text) for item, job in done]
        if records:
            if writer is not None:
                writer.write(records)
            new.extend(records)
            if progress is not None:
                progress(len(new), total)

    t0 = time.perf_counter()
    pool = cf.ThreadPoolExecutor(max_workers=max(1, run.prefetch))
    try:
        futures = {k: pool.submit(prep, it) for k, it in enumerate(todo[:ahead])}
        cf.wait(list(futures.values())[:slots * len(devices)])  # start with full slots (one decode width)
        for k in range(total):
            p = futures.pop(k).result()
            if k + ahead < total:
                futures[k + ahead] = pool.submit(prep, todo[k + ahead])
            while in_flight >= window:
                collect(block=True)
            engines[k % len(engines)].submit_prepared(
                p.inputs, max_new_tokens=run.max_new_tokens,
                on_done=lambda job, item=p.item: finished.put((item, job)))
            in_flight += 1
            collect(block=False)
        while in_flight:
            collect(block=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for engine in engines:
            engine.close()
        if writer is not None:
            writer.close()
    log.info("answered %d questions in %.1fs", len(new), time.perf_counter() - t0)
    records = new if writer is None else writer.records
    by_key = {(r["config"], r["question_id"]): r for r in records}  # the file may hold other questions too
    keys = [(it.config, it.question_id) for it in items]
    return [by_key[k] for k in keys if k in by_key]
