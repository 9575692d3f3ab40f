"""The real trainer teaches a tiny random-init LLaVA to read the image: colour of one square from pixels.

A guard for the visual pathway as a whole (training batches in the pipeline.py layout -> the train step with the model and
optimizer groups of configs/tiny_synthetic.py -> forward): the answer is only in the pixels, so accuracy
far above chance (1/8) with real pixels, and near chance with the pixels zeroed, show that gradients reach
the tower and projector and that the decoder learnt to use what they give. The batches are
demo.binding_probe's calibration case: one square, no mark (`cue="cell"`), so nothing has to be bound.
"""
from functools import partial

import numpy as np
import pytest

from demo.binding_probe import Batches, accuracy, make_batch, probe_config

one_square = partial(make_batch, objects=1, cue="cell", layout="mark-first")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import jax

    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    c = probe_config(steps=160, batch=16, lr=1e-3, vision_lr=1e-4)  # the demo recipe's two learning rates
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    result = train(c, str(tmp_path_factory.mktemp("learns_pixels")), train_iter=Batches(16, one_square),
                   mesh=mesh)
    return result.model()


def test_reads_the_colour_from_pixels(trained):
    arrays, colour = one_square(np.random.default_rng(12345), 64)
    acc = accuracy(trained, arrays, colour)
    assert acc >= 0.8, f"held-out accuracy {acc:.2f} (chance 0.125): the model does not read the image"
    blind = dict(arrays, pixel_values=np.zeros_like(arrays["pixel_values"]))
    assert accuracy(trained, blind, colour) <= 0.4, "answers survive zeroed pixels: not read from the image"
