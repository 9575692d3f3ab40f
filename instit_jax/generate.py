"""Batched KV-cache generation for our decoders and LLaVA-NeXT models (greedy or sampled).

Prefill and the whole decode loop run inside one `jax.jit` (a `lax.while_loop` over a static-length
cache), compiled once per (batch, prompt bucket, max_new_tokens, greedy/top-k/top-p switches); temperature,
top-p value, stop ids (up to 8 without a recompile) and the pad id are traced values. Prompts of
different lengths are moved to LEFT padding on the host (any padding layout is accepted) and the prompt
length is padded up to a bucket, so RoPE positions are cumsum(mask) - 1 exactly as transformers'
`generate` computes them. Stop token ids end a row (the stop token is kept, later slots hold
`pad_token_id`); stop strings are applied on the host after decoding by truncating the text.

The prompt (prefill) and every decode step run through `Decoder.hidden_states` with the model's
`KVCache` (keys/values [B, K, S, hd], a write index per row, which continuous batching in
`instit_jax.assistant.BatchEngine` relies on); `decode_step` is one token per row through it.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instit_jax.models.llava_next import jitted_forward
from instit_jax.models.llm import Decoder, KVCache, init_cache, positions_from_mask

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# Finer buckets (cache lengths of the batch engine): 16, 32, 64, then steps of 64 up to 512, then 4 per octave.
FINE_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048,
                2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192)
# Prompt buckets of the batch engine's prefill (compute-bound: a padding token costs as much as a real one):
# steps of 16 up to 256, of 32 up to 512, of 64 up to 1024, then FINE_BUCKETS.
PREFILL_BUCKETS = (tuple(range(16, 256, 16)) + tuple(range(256, 512, 32)) + tuple(range(512, 1024, 64))
                   + FINE_BUCKETS[FINE_BUCKETS.index(1024):])


class TextDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature <= 0 means greedy; otherwise temperature, then top-k (0 = off), then top-p (1 = off)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclasses.dataclass
class GenerationOutput:
    """tokens [B, N] (pad after a row finished), lengths [B] (incl. the stop token), finished [B]."""

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    texts: list[str] | None = None

    def token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= length (beyond the last bucket: the next multiple of 1024)."""
    for b in buckets:
        if b >= length:
            return b
    return -(-length // 1024) * 1024


def sample_logits(
    logits: jax.Array, key: jax.Array, sampling: SamplingConfig,
    temperature: jax.Array | float | None = None, top_p: jax.Array | float | None = None,
) -> jax.Array:
    """Pick one token per row from logits [B, V] (f32) -> [B] int32.

    `sampling` fixes the static choices (greedy, top_k, whether top-p applies); `temperature`/`top_p`
    may be passed as traced values (defaults: the config's) so changing them does not recompile.
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = sampling.temperature if temperature is None else temperature
    top_p = sampling.top_p if top_p is None else top_p
    logits = logits / temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep a token while the mass above it < top_p
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _static_part(sampling: SamplingConfig) -> SamplingConfig:
    """The compile key of a sampling config: greedy, top_k and whether top-p applies (values traced)."""
    if sampling.greedy:
        return SamplingConfig()
    return SamplingConfig(temperature=1.0, top_k=sampling.top_k, top_p=0.5 if sampling.top_p < 1.0 else 1.0)


def decode_step(decoder: Decoder, cache: KVCache, tok: jax.Array, pos: jax.Array, live: jax.Array
                ) -> tuple[jax.Array, KVCache]:
    """One token per row through the decoder's cache: tok/pos [B] (RoPE position), live [B] (0: the row's
    key is written but masked) -> (logits [B, V] f32, the cache one slot further in every row)."""
    hidden, cache = decoder.hidden_states(decoder.embed(tok[:, None]), pos[:, None], live[:, None], cache)
    return decoder.logits(hidden)[:, 0].astype(jnp.float32), cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling")
)
def _generate_core(graphdef, state, input_ids, inputs_embeds, attention_mask, key, temperature, top_p,
                   stops, pad_id, *, max_new_tokens: int, sampling: SamplingConfig):
    decoder: Decoder = nnx.merge(graphdef, state)
    embeds = decoder.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(decoder.dtype)
    b, t = attention_mask.shape
    positions = positions_from_mask(attention_mask)
    cache = init_cache(decoder.cfg, b, t + max_new_tokens, decoder.dtype)
    hidden, cache = decoder.hidden_states(embeds, positions, attention_mask, cache, last_only=True)  # left-aligned
    logits = decoder.logits(hidden)[:, 0].astype(jnp.float32)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stops[None, :], axis=-1)

    tok = sample_logits(logits, jax.random.fold_in(key, 0), sampling, temperature, top_p)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    lengths = jnp.ones((b,), jnp.int32)
    finished = is_stop(tok)
    pos = jnp.max(positions, axis=1) + 1

    def cond(carry):
        step, _, _, _, _, _, finished = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        step, tok, pos, cache, out, lengths, finished = carry
        logits, cache = decode_step(decoder, cache, tok, pos, jnp.ones((b,), jnp.int32))
        new = sample_logits(logits, jax.random.fold_in(key, step), sampling, temperature, top_p)
        new = jnp.where(finished, pad_id, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | is_stop(new)
        return step + 1, new, pos + 1, cache, out, lengths, finished

    carry = (jnp.int32(1), tok, pos, cache, out, lengths, finished)
    _, _, _, _, out, lengths, finished = jax.lax.while_loop(cond, body, carry)
    return out, lengths, finished


def _stop_table(stop_token_ids: Sequence[int]) -> jax.Array:
    """Stop ids padded with -1 to a multiple of 8 (a traced array, so new stop ids do not recompile)."""
    ids = [int(i) for i in stop_token_ids]
    size = max(8, -(-len(ids) // 8) * 8)
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def _left_align(input_ids: np.ndarray, attention_mask: np.ndarray, bucket: int, pad_id: int):
    """Move pads to the left and left-pad to `bucket`; returns ids, mask, and the gather order used."""
    order = np.argsort(attention_mask > 0, axis=1, kind="stable")  # pads (False) first, order kept
    ids = np.take_along_axis(input_ids, order, axis=1)
    mask = np.take_along_axis(attention_mask, order, axis=1)
    extra = bucket - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (extra, 0)))
    return ids.astype(np.int32), mask.astype(np.int32), order, extra


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string (the stop string itself removed)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if s and i >= 0:
            cut = min(cut, i)
    return text[:cut]


def generate(
    model_or_decoder: Any,
    input_ids: Any,
    attention_mask: Any,
    *,
    inputs_embeds: Any = None,
    max_new_tokens: int = 128,
    sampling: SamplingConfig = SamplingConfig(),
    rng: jax.Array | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    stop_strings: Sequence[str] = (),
    tokenizer: TextDecoder | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> GenerationOutput:
    """Generate up to max_new_tokens for input_ids/attention_mask [B, T] (inputs_embeds [B, T, D] optional).

    `model_or_decoder` is a `Decoder` or anything with a `language_model` Decoder (LlavaNextModel);
    with `inputs_embeds` (e.g. from `model.embed_inputs`) the prompt embeddings are used as given and
    `input_ids` only needs the right shape. Sampling needs an explicit `rng` key. With a tokenizer,
    `texts` holds the decoded answers (special tokens skipped), truncated at stop strings.
    """
    decoder = getattr(model_or_decoder, "language_model", model_or_decoder)
    if not isinstance(decoder, Decoder):
        raise TypeError(f"generate: expected a Decoder or a model with .language_model, got {type(decoder)}")
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"generate: input_ids {ids.shape} and attention_mask {mask.shape} must both be [B, T]")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"generate: rows {empty.tolist()} have an all-zero attention_mask (empty prompt)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not sampling.greedy and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs an explicit `rng` key")
    bucket = bucket_length(ids.shape[1], buckets)
    ids, mask, order, extra = _left_align(ids, mask, bucket, pad_token_id)
    embeds = None
    if inputs_embeds is not None:
        embeds = jnp.asarray(inputs_embeds)
        if embeds.shape[:2] != np.asarray(input_ids).shape:
            raise ValueError(f"generate: inputs_embeds {embeds.shape} does not match input_ids {input_ids.shape}")
        embeds = jnp.take_along_axis(embeds, jnp.asarray(order)[..., None], axis=1)
        embeds = jnp.pad(embeds, ((0, 0), (extra, 0), (0, 0)))
    key = rng if rng is not None else jax.random.key(0)
    graphdef, state = nnx.split(decoder)
    out, lengths, finished = _generate_core(
        graphdef, state, None if embeds is not None else jnp.asarray(ids), embeds, jnp.asarray(mask), key,
        jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p),
        _stop_table(stop_token_ids), jnp.int32(pad_token_id),
        max_new_tokens=max_new_tokens, sampling=_static_part(sampling),
    )
    result = GenerationOutput(np.asarray(out), np.asarray(lengths), np.asarray(finished))
    if tokenizer is not None:
        result.texts = [
            truncate_at_stop_strings(tokenizer.decode(toks, skip_special_tokens=True), stop_strings)
            for toks in result.token_lists()
        ]
    elif stop_strings:
        raise ValueError("generate: stop_strings need a tokenizer to decode the answers")
    return result


def generate_llava(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    *,
    visual_index: Any,
    pixel_values: Any = None,
    pixel_values_videos: Any = None,
    visual_weights: Any = None,
    decoder: Any = None,
    **kwargs: Any,
) -> GenerationOutput:
    """Generate with a LlavaNextModel: NHWC pixels [B, N, H, W, C] / videos [B, F, H, W, C] + visual_index [B, T].

    visual_index may be 4-tap [B, T, 4] with visual_weights [B, T, 4] (anyres_max_N downsampling, see
    `processing.build_visual_taps`). The prompt embeddings come from `llava_next.jitted_forward`; the rest
    is `generate`, with `decoder` (default: the model's; e.g. its `llm.inference_view`).
    """
    graphdef, state = nnx.split(model)
    to_jnp = lambda x: None if x is None else jnp.asarray(x)
    embeds = jitted_forward(graphdef, state, jnp.asarray(input_ids, jnp.int32), to_jnp(pixel_values),
                          to_jnp(pixel_values_videos), jnp.asarray(visual_index, jnp.int32), to_jnp(visual_weights))
    return generate(decoder if decoder is not None else model.language_model, input_ids, attention_mask,
                    inputs_embeds=embeds, **kwargs)


def generate_llava_hf(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    pixel_values: Any = None,
    image_sizes: Any = None,
    pixel_values_videos: Any = None,
    **kwargs: Any,
) -> GenerationOutput:
    """Generate from the arrays transformers' LLaVA-NeXT/OneVision processors give (NCHW, any padding).

    pixel_values [I, N, C, H, W] (or [I, C, H, W] single view), image_sizes [I, 2], pixel_values_videos
    [B, F, C, H, W]; image i belongs to the i-th sample holding image tokens, as in the model's eager call.
    """
    ids = np.asarray(input_ids)
    pixels, videos, visual_index, weights = model.prepare_hf_inputs(ids, pixel_values, image_sizes,
                                                                    pixel_values_videos)
    return generate_llava(model, ids, attention_mask, visual_index=visual_index, pixel_values=pixels,
                          pixel_values_videos=videos, visual_weights=weights, **kwargs)
