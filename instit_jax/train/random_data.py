"""A deterministic, checkpointable source of learnable random batches in the training-batch format.

Used by `data.kind = "random"` (smoke tests, benchmarks, AOT-sized dry runs). Each sample is an
arithmetic progression of token ids modulo the vocabulary (so a model can learn it and the loss falls),
with one block of visual positions pointing into the sample's visual feature table. The iterator state
is just the next example index, so resume is exact.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np


class RandomBatches:
    """Iterator of per-host batch dicts [B_host, ...] (the layout of `instit_jax/data/pipeline.py`); `get_state()/set_state()` for resume."""

    def __init__(self, config: ml_collections.ConfigDict, *, tokens_per_tile: int, tokens_per_frame: int,
                 process_index: int = 0, process_count: int = 1, num_distinct: int = 0):
        self.config = config
        self.tokens_per_tile = tokens_per_tile
        self.tokens_per_frame = tokens_per_frame
        g = config.train.global_batch_size
        if g % process_count:
            raise ValueError(f"global batch {g} does not split over {process_count} processes")
        self.host_batch = g // process_count
        self.process_index = process_index
        self.num_distinct = num_distinct or config.data.num_examples or 64
        self.next_index = 0  # global index of the next batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": int(self.next_index)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.next_index = int(state["next_index"])

    def __iter__(self):
        return self

    def example(self, i: int) -> dict[str, np.ndarray]:
        """Global example `i` (deterministic in the seed and i mod num_distinct)."""
        c, d = self.config, self.config.data
        rng = np.random.default_rng([c.seed, i % self.num_distinct])
        t = d.max_tokens
        vocab = c.model.text.vocab_size
        image_id = c.model.image_token_id
        n_tiles = d.max_tiles if d.images_per_batch else 0
        n_frames = d.max_frames if d.videos_per_batch else 0
        side = c.model.vision.image_size
        n_vis = min(n_tiles * self.tokens_per_tile + n_frames * self.tokens_per_frame + 1, t // 2)
        start, step = rng.integers(0, vocab), rng.integers(1, 7)
        ids = ((start + step * np.arange(t + 1)) % (image_id if image_id > 0 else vocab)).astype(np.int32)
        length = int(rng.integers(t * 3 // 4, t + 1))
        visual_index = np.full((t,), -1, np.int32)
        visual_index[1:1 + n_vis] = np.arange(n_vis, dtype=np.int32)
        ids[1:1 + n_vis] = image_id
        attention = (np.arange(t) < length).astype(np.int32)
        loss_mask = np.zeros((t,), np.float32)
        loss_mask[1 + n_vis:length - 1] = 1.0
        out = {
            "input_ids": ids[:t] * attention,
            "attention_mask": attention,
            "targets": ids[1:t + 1] * attention,
            "loss_mask": loss_mask,
            "visual_index": visual_index,
        }
        if n_tiles:
            out["pixel_values"] = rng.standard_normal((n_tiles, side, side, 3), dtype=np.float32)
        if n_frames:
            out["pixel_values_videos"] = rng.standard_normal((n_frames, side, side, 3), dtype=np.float32)
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        g = self.config.train.global_batch_size
        base = self.next_index * g + self.process_index * self.host_batch
        rows = [self.example(base + r) for r in range(self.host_batch)]
        self.next_index += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
