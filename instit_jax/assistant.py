"""One inference API over a checkpoint: chat template, preprocessing, token plan and KV-cache generation.

    from instit_jax import Assistant
    bot = Assistant.from_pretrained("ckpt/")
    bot.answer("What is [1] doing?", image=Image.open("cat.jpg")).text
    bot.answer("What changes at <3>?", frames=[f0, f1, f2], max_new_tokens=64).text

`instit-generate` is a thin command line over `Assistant.answer`. `BatchEngine(assistant, max_batch=N)`
answers concurrent questions by continuous batching (what `instit-serve` and the bench runner
`eval.runner.run_bench` run).
"""
from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from instit_jax import processing
from instit_jax.chat_template import IMAGE_TOKEN, get_template, stop_token_ids, tokenize_conversation
from instit_jax.generate import (
    FINE_BUCKETS,
    PREFILL_BUCKETS,
    SamplingConfig,
    _stop_table,
    bucket_length,
    decode_step,
    generate,
    generate_llava,
    sample_logits,
    truncate_at_stop_strings,
)
from instit_jax.models import llm
from instit_jax.models.llava_next import jitted_forward, merge, static_graph
from instit_jax.models.llm import KVCache, init_cache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer: text (stop strings cut, stripped), generated token ids, prompt length."""

    text: str
    tokens: list[int]
    num_prompt_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "num_prompt_tokens": self.num_prompt_tokens}


def _as_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image: expected a PIL image or uint8 array [H, W, 3], got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def visual_inputs(model: Any, image: Any = None, frames: Sequence[Any] | None = None):
    """-> (plan or None, pixels [1, N, S, S, 3] or None, videos [1, F, S, S, 3] or None)."""
    cfg = model.cfg
    proc = processing.image_processor_config(cfg)
    planner = processing.token_planner(cfg)
    if image is not None:
        img = _as_rgb(image)
        pixels, _ = processing.preprocess_images([img], proc)
        plan = planner.image((img.height, img.width))
        return plan, pixels[:, :plan.num_views].transpose(0, 1, 3, 4, 2), None
    if frames is not None:
        if not len(frames):
            raise ValueError("frames: a video needs at least one frame")
        arrays = [np.asarray(_as_rgb(f)) for f in frames]
        clip = processing.preprocess_video(arrays, proc).transpose(0, 2, 3, 1)[None]
        return planner.video(len(arrays)), None, clip
    return None, None, None


class Assistant:
    """A loaded LLaVA-NeXT model + tokenizer + chat template that answers questions about images or videos.

    `inference_view` (default: on CPU) makes `answer` decode with `llm.inference_view` of the decoder (the
    same numbers in the layout of the CPU decode kernels; a second copy of the block weights, built on first
    use, rebuilt after the model's weights change, and shared with every `BatchEngine` over this assistant)."""

    def __init__(self, model: Any, tokenizer: Any, template: str | None = None, *,
                 inference_view: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if inference_view is None:  # as BatchEngine decides: the view where decode is bound by CPU products
            inference_view = jax.default_backend() == "cpu"
        self.inference_view = inference_view
        self._view: Any = None
        self._view_source: list = []
        self._view_lock = threading.Lock()
        cfg = model.cfg
        self.template = get_template(template or ("qwen_1_5" if cfg.text.model_type == "qwen2" else "vicuna_v1"))
        self.pad_id = tokenizer.token_to_id("<pad>") or 0
        self.stop_ids = stop_token_ids(tokenizer, self.template)

    @classmethod
    def from_pretrained(cls, ckpt: str, *, tokenizer: str | None = None, template: str | None = None,
                        dtype: str | None = None) -> Assistant:
        """Load anything `load_pretrained` reads; the tokenizer comes from `tokenizer` or the checkpoint."""
        from instit_jax.loading import load_pretrained, load_tokenizer

        return cls(load_pretrained(ckpt, dtype=dtype), load_tokenizer(tokenizer or ckpt), template)

    def view(self) -> Any:
        """`llm.inference_view` of the model's decoder, built on first use and shared (by `answer` when
        `inference_view`, and by every `BatchEngine` over this assistant that uses a view). Rebuilt when the
        decoder's parameters are no longer the arrays it was built from (the model was trained or updated
        since); an engine keeps the view it started with."""
        arrays = jax.tree.leaves(nnx.state(self.model.language_model, nnx.Param))
        with self._view_lock:
            if (self._view is None or len(arrays) != len(self._view_source)
                    or any(a is not b for a, b in zip(arrays, self._view_source))):
                self._view = llm.inference_view(self.model.language_model)
                self._view_source = arrays
            return self._view

    def prompt_ids(self, question: str, plan: Any, is_video: bool) -> np.ndarray:
        """Token ids [1, T] of the rendered chat prompt, `<image>` expanded by the plan."""
        cfg = self.model.cfg
        content = question if plan is None else f"{IMAGE_TOKEN}\n{question}"
        if plan is not None and self.tokenizer.token_to_id(IMAGE_TOKEN) != cfg.image_token_id:
            raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {self.tokenizer.token_to_id(IMAGE_TOKEN)} but the "
                             f"checkpoint expects image_token_id={cfg.image_token_id}; pass the checkpoint's tokenizer")
        tok = tokenize_conversation(self.tokenizer, self.template, [{"role": "user", "content": content}],
                                    [plan.count] if plan is not None else [], add_generation_prompt=True)
        ids = tok.input_ids[None]
        if is_video and cfg.video_token_id is not None:
            ids = np.where(ids == cfg.image_token_id, cfg.video_token_id, ids)
        return ids.astype(np.int32)

    def prepare(self, question: str, *, image: Any = None, frames: Sequence[Any] | None = None,
                frame_multiple: int = 1) -> dict[str, Any]:
        """Host-side inputs of one question: ids [1, T], and for an image / video its pixels and visual index.

        `frame_multiple` > 1 pads a video with all-zero frames to a multiple of it (the tower then compiles
        for few frame counts; no token refers to the padding frames, so answers are unchanged).
        """
        if image is not None and frames is not None:
            raise ValueError("answer: pass an image or frames, not both")
        model, cfg = self.model, self.model.cfg
        plan, pixels, videos = visual_inputs(model, image, frames)
        if videos is not None and frame_multiple > 1 and videos.shape[1] % frame_multiple:
            extra = frame_multiple - videos.shape[1] % frame_multiple
            videos = np.pad(videos, ((0, 0), (0, extra), (0, 0), (0, 0), (0, 0)))
        ids = self.prompt_ids(question, plan, videos is not None)
        visual_index = weights = None
        if plan is not None:
            sizes = dict(tokens_per_tile=model.tokens_per_tile, num_tiles=0 if pixels is None else pixels.shape[1],
                         tokens_per_frame=model.tokens_per_frame, num_frames=0 if videos is None else videos.shape[1],
                         video_token_id=cfg.video_token_id)
            if plan.weights is not None:  # anyres_max_N downsampling mixes 4 feature rows per token
                visual_index, weights = processing.build_visual_taps(ids, [[plan]], cfg.image_token_id, **sizes)
            else:
                visual_index = processing.build_visual_index(ids, [[plan]], cfg.image_token_id, **sizes)
        return {"ids": ids, "plan": plan, "pixels": pixels, "videos": videos, "visual_index": visual_index,
                "visual_weights": weights}

    def answer(self, question: str, *, image: Any = None, frames: Sequence[Any] | None = None,
               max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, stop: Sequence[str] = ()) -> Answer:
        """Answer one question about an image (PIL / uint8 [H, W, 3]), ordered video frames, or nothing.

        Greedy when temperature is 0; `stop` strings are cut from the text in addition to the template's.
        """
        inp = self.prepare(question, image=image, frames=frames)
        ids = inp["ids"]
        mask = np.ones_like(ids)
        kwargs = dict(max_new_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
                      stop_strings=tuple(self.template.stop_strings) + tuple(stop), tokenizer=self.tokenizer,
                      pad_token_id=self.pad_id, sampling=SamplingConfig(temperature, top_k, top_p),
                      rng=jax.random.key(seed))
        decoder = self.view() if self.inference_view else self.model.language_model
        if inp["plan"] is None:
            out = generate(decoder, ids, mask, **kwargs)
        else:
            out = generate_llava(self.model, ids, mask, decoder=decoder, visual_index=inp["visual_index"],
                                 visual_weights=inp["visual_weights"], pixel_values=inp["pixels"],
                                 pixel_values_videos=inp["videos"], **kwargs)
        return Answer(out.texts[0].strip(), out.token_lists()[0], int(ids.shape[1]))


# ----------------------------------------------------------------------------- continuous batching
def _pick_tokens(logits, key_data, steps, greedy, temperature, top_p):
    """One token per row of logits [B, V]: argmax for greedy rows, else temperature / top-p sampling from
    the row's own key folded with its token count (as `generate` folds its key with the step)."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        def row(lg, kd, step, temp, tp):
            key = jax.random.fold_in(jax.random.wrap_key_data(kd), step)
            return sample_logits(lg[None], key, SamplingConfig(1.0, 0, 0.5), temp, tp)[0]
        return jax.vmap(row)(logits, key_data, steps, jnp.maximum(temperature, 1e-6), top_p)

    sampled = jax.lax.cond(jnp.all(greedy), lambda _: best, sample, None)
    return jnp.where(greedy, best, sampled)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, ids, embeds, mask, key_data, greedy, temperature, top_p, *, cache_len: int):
    """One left-padded prompt [1, Tb] -> (first token [1], its position + 1 [1], its cache row [1, cache_len])."""
    decoder = merge(graphdef, state)
    x = decoder.embed(ids) if embeds is None else embeds.astype(decoder.dtype)
    positions = positions_from_mask(mask)
    cache = init_cache(decoder.cfg, 1, cache_len, decoder.dtype)
    hidden, cache = decoder.hidden_states(x, positions, mask, cache, last_only=True)  # left-padded: last is real
    logits = decoder.logits(hidden)[:, 0].astype(jnp.float32)
    tok = _pick_tokens(logits, key_data, jnp.zeros((1,), jnp.int32), greedy, temperature, top_p)
    return tok, jnp.max(positions, axis=1) + 1, cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache: KVCache, row: KVCache, slot, pad):
    """Write a prefilled cache row (batch 1, left padded by `pad`) into slot `slot` of the engine's cache,
    moved left so its valid positions are [0, T): the bucket's padding costs no context."""
    s, tb = cache.max_len, row.max_len
    n = min(s, tb)  # the prompt itself (T <= s) always fits; only bucket padding is cut

    def put(big, one):  # one [1, K, tb, hd] -> slot `slot` of big [B, K, s, hd]
        one = jnp.roll(one, -pad, axis=2)[:, :, :n].astype(big.dtype)
        return jax.lax.dynamic_update_slice(big, one, (slot, 0, 0, 0))

    mask = jnp.pad(jnp.roll(row.slot_mask[0], -pad)[:n], (0, s - n))
    return KVCache([put(b, o) for b, o in zip(cache.keys, row.keys)],
                   [put(b, o) for b, o in zip(cache.values, row.values)],
                   jax.lax.dynamic_update_index_in_dim(cache.slot_mask, mask, slot, 0),
                   cache.index.at[slot].set(row.index[0] - pad))


@functools.partial(jax.jit, static_argnames=("width", "length"))
def _relayout(cache: KVCache, rows, *, width: int, length: int) -> KVCache:
    """The cache with rows `rows` (slot order) first, resized to `width` slots (new rows empty) and
    `length` positions (cut positions must be free in every kept row)."""
    def fit(x, axis, size):
        if x.shape[axis] < size:
            x = jnp.pad(x, [(0, size - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)

    def slots(x):
        return fit(jnp.take(x, rows, axis=0), 0, width)

    return KVCache([fit(slots(k), 2, length) for k in cache.keys], [fit(slots(v), 2, length) for v in cache.values],
                   fit(slots(cache.slot_mask), 1, length), slots(cache.index))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("cache",))
def _decode_chunk(graphdef, state, cache: KVCache, tok, pos, count, limit, active, key_data, greedy, temperature,
                  top_p, stops, pad_id, *, chunk: int):
    """Up to `chunk` decode steps for every active slot; stops early as soon as a slot finishes (so it can
    be refilled). Every slot writes at its own cache index (`generate.decode_step`); an idle slot's key is
    written masked (past the cache's end: dropped) and the slot is rewritten whole when it is refilled.

    -> (cache, last tokens [B], positions [B], counts [B], active [B], tokens [B, chunk], steps taken).
    """
    decoder = merge(graphdef, state)
    b = tok.shape[0]

    def cond(carry):
        step, active, finished_any = carry[0], carry[5], carry[7]
        return (step < chunk) & jnp.any(active) & ~finished_any

    def body(carry):
        step, tok, pos, count, cache, active, out, _ = carry
        logits, cache = decode_step(decoder, cache, tok, pos, active)
        new = _pick_tokens(logits, key_data, count, greedy, temperature, top_p)
        new = jnp.where(active, new, pad_id)
        out = jax.lax.dynamic_update_index_in_dim(out, new, step, 1)
        count = count + active.astype(jnp.int32)
        done = active & (jnp.any(new[:, None] == stops[None, :], axis=-1) | (count >= limit))
        return step + 1, jnp.where(active, new, tok), pos + active.astype(jnp.int32), count, cache, \
            active & ~done, out, jnp.any(done)

    out = jnp.full((b, chunk), pad_id, jnp.int32)
    carry = (jnp.int32(0), tok, pos, count, cache, active, out, jnp.bool_(False))
    steps, tok, pos, count, cache, active, out, _ = jax.lax.while_loop(cond, body, carry)
    return cache, tok, pos, count, active, out, steps


@dataclasses.dataclass(eq=False)
class _Job:
    """One queued question: host inputs, sampling, and where its answer goes."""

    inputs: dict[str, Any]
    max_new: int
    greedy: bool
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Answer | None = None
    error: BaseException | None = None
    on_token: Callable[[list[int]], None] | None = None
    on_done: Callable[[_Job], None] | None = None

    @property
    def need(self) -> int:
        """Cache positions the question takes: its prompt plus every token it may generate."""
        return int(self.inputs["ids"].shape[1]) + self.max_new


class BatchEngine:
    """Continuous batching over an `Assistant`: concurrent questions share the jitted decode.

    A scheduler thread owns `max_batch` slots, each a row of one KV cache with its own write index. A
    question waiting in the queue is prefilled alone (its prompt padded to a `PREFILL_BUCKETS` length) and
    written into a free slot, left aligned; all busy slots then decode together, up to `chunk` steps per
    call, and a call returns as soon as one slot finishes, so its answer is handed back and the slot
    refilled from the queue at once: no question waits for the longest one in the batch. The decode runs
    over the first `w` slots (a power of four or max_batch: grown while questions wait, shrunk when 3/4 of the
    slots idle; few widths, so few shapes compile, and on CPU a batch of 2 costs as much as one of 4) and
    the cache holds as many positions as the busy questions need (prompt + max_new_tokens, rounded up to a
    `FINE_BUCKETS` length, at most `max_context`), so neither idle slots nor unused context cost decode time.
    Greedy answers are those of `Assistant.answer` (same prefill, the same `decode_step` per row).

        engine = BatchEngine(Assistant.from_pretrained("ckpt/"), max_batch=8)
        engine.answer("What is [1]?", image=img).text      # thread-safe; blocks until answered

    `device` pins the engine (weights, cache, every call) to one device; `close()` stops the scheduler.
    With `inference_view` the engine's prefill and decode run `llm.inference_view(decoder)` (fused q/k/v and
    gate/up, down_proj stored [out, in]: the same numbers in fewer, faster matrix-vector kernels per decode
    step), which holds its own copy of six of the seven matrices of every block; False runs the assistant's
    decoder itself (no extra weight memory). None (default): the view on CPU, where decode is bound by
    matrix-vector kernels and memory is plentiful, and not on accelerators, where the copy would take
    device memory from the cache.
    """

    def __init__(self, assistant: Assistant, *, max_batch: int = 8, max_context: int | None = None,
                 chunk: int = 8, device: Any = None, inference_view: bool | None = None):
        self.assistant = assistant
        self.max_batch = max(1, int(max_batch))
        decoder = assistant.model.language_model
        self.max_context = int(max_context or min(decoder.cfg.max_position_embeddings, 4096))
        self.chunk = max(1, int(chunk))
        self.device = device
        self.graphdef, self.state = nnx.split(assistant.model)
        if inference_view is None:
            platform = device.platform if device is not None else jax.default_backend()
            inference_view = platform == "cpu"
        self.dec_graphdef, self.dec_state = nnx.split(assistant.view() if inference_view else decoder)
        self.graphdef, self.dec_graphdef = static_graph(self.graphdef), static_graph(self.dec_graphdef)
        if device is not None:
            self.state = jax.device_put(self.state, device)
            self.dec_state = jax.device_put(self.dec_state, device)
        self.stops = _stop_table(assistant.stop_ids)
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.stats = {"prefills": 0, "decode_calls": 0, "decode_steps": 0, "busy_slot_steps": 0}

    # ----------------------------------------------------------------- public
    def submit(self, question: str, *, image: Any = None, frames: Sequence[Any] | None = None,
               max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               stop: Sequence[str] = (), on_token: Callable[[list[int]], None] | None = None,
               on_done: Callable[[_Job], None] | None = None) -> _Job:
        """Queue a question (inputs are prepared in the caller's thread); `job.done` is set when answered.

        Raises ValueError at once for inputs that cannot fit a slot (prompt + max_new_tokens over
        max_context). `on_token(new_tokens)` is called from the scheduler thread as tokens arrive, and
        `on_done(job)` once the job has its result or error.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return self.submit_prepared(self.assistant.prepare(question, image=image, frames=frames),
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                    stop=stop, on_token=on_token, on_done=on_done)

    def submit_prepared(self, inputs: dict[str, Any], *, max_new_tokens: int = 128, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                        on_token: Callable[[list[int]], None] | None = None,
                        on_done: Callable[[_Job], None] | None = None) -> _Job:
        """`submit` for inputs already made by `Assistant.prepare` (e.g. on a pool of host threads).

        `on_done(job)` is called from the scheduler thread once `job.result` or `job.error` is set.
        """
        if self._closed:
            raise RuntimeError("this BatchEngine is closed")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        job = _Job(inputs, int(max_new_tokens), temperature <= 0.0, float(temperature), float(top_p), int(seed),
                   tuple(self.assistant.template.stop_strings) + tuple(stop), on_token=on_token, on_done=on_done)
        if job.need > self.max_context:
            raise ValueError(f"the prompt ({inputs['ids'].shape[1]} tokens) plus max_tokens {max_new_tokens} needs "
                             f"{job.need} positions; this server's context is {self.max_context}")
        self._ensure_thread()
        self.queue.put(job)
        return job

    def answer(self, question: str, **kwargs: Any) -> Answer:
        """`submit` and wait; the same keywords as `Assistant.answer` (but top_k)."""
        job = self.submit(question, **kwargs)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Stop the scheduler; questions still queued or decoding fail with RuntimeError."""
        with self._start_lock:
            self._closed = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self.queue.put(None)
            thread.join()
        self._fail_queued(RuntimeError("the BatchEngine was closed"))

    # ----------------------------------------------------------------- scheduler
    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._closed:
                raise RuntimeError("this BatchEngine is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="instit-batch-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        if self.device is None:
            self._loop()
        else:
            with jax.default_device(self.device):
                self._loop()

    def _width(self, n: int) -> int:
        """Decode width for n questions: the smallest power of four >= n, at most max_batch."""
        w = 1
        while w < n:
            w *= 4
        return min(w, self.max_batch)

    def _length(self, need: int) -> int:
        """Cache positions for a largest need of `need`: its FINE_BUCKETS length, at most max_context."""
        return min(bucket_length(need, FINE_BUCKETS), self.max_context)

    def _prefill(self, job: _Job):
        a, inp = self.assistant, job.inputs
        ids = inp["ids"]
        t = ids.shape[1]
        tb = bucket_length(t, PREFILL_BUCKETS)
        pad = tb - t
        embeds = None
        if inp["plan"] is not None:
            embeds = jitted_forward(self.graphdef, self.state, jnp.asarray(ids, jnp.int32),
                                  None if inp["pixels"] is None else jnp.asarray(inp["pixels"]),
                                  None if inp["videos"] is None else jnp.asarray(inp["videos"]),
                                  jnp.asarray(inp["visual_index"], jnp.int32),
                                  None if inp["visual_weights"] is None else jnp.asarray(inp["visual_weights"]))
            embeds = jnp.pad(embeds, ((0, 0), (pad, 0), (0, 0)))
        ids_p = np.pad(ids, ((0, 0), (pad, 0)), constant_values=a.pad_id).astype(np.int32)
        mask = np.pad(np.ones_like(ids), ((0, 0), (pad, 0))).astype(np.int32)
        key_data = jax.random.key_data(jax.random.key(job.seed))[None]
        tok, pos, row = _prefill(self.dec_graphdef, self.dec_state, None if embeds is not None else jnp.asarray(ids_p),
                                 embeds, jnp.asarray(mask), key_data, jnp.asarray([job.greedy]),
                                 jnp.asarray([job.temperature], jnp.float32), jnp.asarray([job.top_p], jnp.float32),
                                 cache_len=tb)
        self.stats["prefills"] += 1
        return int(np.asarray(tok)[0]), int(np.asarray(pos)[0]), row, pad, np.asarray(key_data[0])

    def _done(self, job: _Job) -> None:
        job.done.set()
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:  # a caller's callback must not stop the engine
                pass

    def _fail(self, job: _Job, err: BaseException) -> None:
        job.error = err
        self._done(job)

    def _fail_queued(self, err: BaseException) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._fail(job, err)

    def _finish(self, job: _Job) -> None:
        a = self.assistant
        text = truncate_at_stop_strings(a.tokenizer.decode(job.tokens, skip_special_tokens=True), job.stop)
        job.result = Answer(text.strip(), list(job.tokens), int(job.inputs["ids"].shape[1]))
        self._done(job)

    def _emit(self, job: _Job, new: list[int]) -> None:
        job.tokens.extend(new)
        if job.on_token is not None and new:
            try:
                job.on_token(new)
            except Exception:  # a client that went away must not stop the engine
                job.on_token = None

    def _loop(self) -> None:
        b, a = self.max_batch, self.assistant
        cfg = a.model.language_model.cfg
        dtype = a.model.language_model.dtype

        def empty(width: int, length: int) -> KVCache:
            return init_cache(cfg, width, length, dtype)

        # The decode runs over the first `w` slots only (`_width`: a power of four or max_batch): it grows when
        # more questions wait than fit and shrinks (busy slots moved to the front) when 3/4 are idle,
        # so a lone request does not pay for max_batch rows. The cache length follows the busy questions' needs.
        w, length = 1, self._length(1)
        cache = empty(w, length)
        jobs: list[_Job | None] = [None] * b
        tok = np.zeros(b, np.int32)
        pos = np.zeros(b, np.int32)
        count = np.zeros(b, np.int32)
        limit = np.ones(b, np.int32)
        active = np.zeros(b, bool)
        key_data = np.zeros((b, 2), np.uint32)
        greedy = np.ones(b, bool)
        temperature = np.zeros(b, np.float32)
        top_p = np.ones(b, np.float32)
        host = [tok, pos, count, limit, active, key_data, greedy, temperature, top_p]
        stop_ids = set(a.stop_ids)

        def busy_need() -> int:
            return max((j.need for j in jobs if j is not None), default=1)

        def relayout(width: int, new_length: int) -> None:
            nonlocal cache, w, jobs, length
            busy = [i for i in range(w) if jobs[i] is not None]
            order = busy + [i for i in range(w) if jobs[i] is None]
            if busy:
                cache = _relayout(cache, jnp.asarray(np.asarray(order, np.int32)), width=width, length=new_length)
            else:  # nothing to keep: a fresh cache, no copy
                del cache
                cache = empty(width, new_length)
            for arr in host:
                arr[:len(order)] = arr[order].copy()
                arr[len(order):] = 0 if arr.dtype != bool else False
            jobs = [jobs[i] for i in order] + [None] * (b - len(order))
            w, length = width, new_length

        def take(block: bool) -> _Job | None:
            """The next queued question (None when there is none); raises _Closing after `close()`."""
            try:
                job = self.queue.get(block=block)
            except queue.Empty:
                return None
            if job is None:
                raise _Closing
            return job

        try:
            while True:
                if self._closed:
                    raise _Closing
                busy = sum(j is not None for j in jobs)
                if busy == 0 and self.queue.empty() and w > 1:
                    relayout(1, self._length(1))
                want = busy + self.queue.qsize()
                if want > w and w < b:
                    relayout(self._width(want), length)
                # admit waiting questions into free slots (block for one when nothing is running)
                while any(j is None for j in jobs[:w]):
                    job = take(block=not active.any())
                    if job is None:
                        break
                    try:
                        if job.need > length:  # the cache grows to hold this question's prompt and answer
                            relayout(w, self._length(max(job.need, busy_need())))
                        slot = next(i for i in range(w) if jobs[i] is None)  # (relayout moves slots)
                        first, p, row, pad, kd = self._prefill(job)
                        self._emit(job, [first])
                        if first in stop_ids or job.max_new <= 1:
                            self._finish(job)
                            continue
                        cache = _insert(cache, row, slot, pad)
                    except Exception as err:  # this question fails; the engine keeps serving the others
                        self._fail(job, err)
                        continue
                    jobs[slot] = job
                    tok[slot], pos[slot], count[slot], limit[slot] = first, p, 1, job.max_new
                    active[slot], key_data[slot], greedy[slot] = True, kd, job.greedy
                    temperature[slot], top_p[slot] = job.temperature, job.top_p
                if not active.any():
                    continue
                try:
                    before = count.copy()
                    cache, tok_d, pos_d, count_d, active_d, out, steps = _decode_chunk(
                        self.dec_graphdef, self.dec_state, cache, *(jnp.asarray(x[:w]) for x in (
                            tok, pos, count, limit, active, key_data, greedy, temperature, top_p)),
                        self.stops, jnp.int32(a.pad_id), chunk=self.chunk)
                    tok[:w], pos[:w], count[:w] = np.asarray(tok_d), np.asarray(pos_d), np.asarray(count_d)
                    still, out = np.asarray(active_d), np.asarray(out)
                except Exception as err:  # a failed decode fails the questions in flight, not the server
                    for slot, job in enumerate(jobs):
                        if job is not None:
                            self._fail(job, err)
                            jobs[slot] = None
                    active[:] = False
                    w, length = 1, self._length(1)
                    cache = empty(w, length)
                    continue
                self.stats["decode_calls"] += 1
                self.stats["decode_steps"] += int(steps)
                self.stats["busy_slot_steps"] += int((count - before).sum())
                for slot in range(w):
                    job = jobs[slot]
                    if job is None:
                        continue
                    self._emit(job, out[slot, :count[slot] - before[slot]].tolist())
                    if not still[slot]:
                        self._finish(job)
                        jobs[slot] = None
                active[:w] = still
                busy = sum(j is not None for j in jobs)
                fit = self._width(self.queue.qsize() + busy)
                if busy and fit < w:  # shrink to what the busy and waiting questions need, in one relayout
                    relayout(fit, self._length(busy_need()))
        except _Closing:
            err = RuntimeError("the BatchEngine was closed")
            for job in jobs:
                if job is not None:
                    self._fail(job, err)


class _Closing(Exception):
    """Raised inside the scheduler when `close()` was called."""
