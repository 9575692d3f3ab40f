"""Uniform frame sampling, the one rule every reader of videos uses (annotation, records, training, bench,
generation): the reference's (LLaVA-NeXT's uniform sampling and the Inst-It Bench toolkit) truncation of
``linspace(0, total - 1, num)``, so training and evaluation see the same frames of a video."""
from __future__ import annotations

import numpy as np


def uniform_frame_indices(total: int, num: int) -> np.ndarray:
    """`num` frame indices spread evenly over [0, total-1], first and last kept, truncated to integers
    (20 -> 8: [0, 2, 5, 8, 10, 13, 16, 19]); all `total` frames when there are not more than `num`."""
    if total <= 0:
        raise ValueError(f"video has {total} frames")
    if num <= 0:
        raise ValueError(f"cannot sample {num} frames")
    if total <= num:
        return np.arange(total)
    return np.linspace(0, total - 1, num).astype(np.int64)
