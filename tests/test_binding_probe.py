"""demo.binding_probe: batches are well formed (its calibration case, one square learnt through the real
trainer, is tests/test_train_learns_pixels.py)."""
import json
from functools import partial

import numpy as np
import pytest

from demo.binding_probe import (
    FIRST_COLOUR,
    FIRST_MARK,
    IMAGE_ID,
    NVIS,
    PALETTE,
    Batches,
    main,
    make_batch,
    make_shape_batch,
    run,
)


def test_batches_ask_about_one_marked_square():
    arrays, answers = make_batch(np.random.default_rng(0), 8, 3, "id")
    ids = arrays["input_ids"]
    assert ids.shape == (8, 1 + NVIS + 7) and (ids[:, 1:1 + NVIS] == IMAGE_ID).all()
    assert (ids[:, -1] == FIRST_COLOUR + answers).all()
    assert (arrays["loss_mask"].sum(1) == 1).all() and (arrays["targets"][:, -2] == ids[:, -1]).all()
    px = arrays["pixel_values"] * 0.27 + 0.48  # back to [0, 1]
    for b in range(8):  # the asked mark's label colour is in the image
        mark = int(ids[b, 1 + NVIS + 1]) - FIRST_MARK
        hit = np.abs(px[b, 0] * 255 - np.asarray(PALETTE[mark], np.float32)).max(-1) < 1
        assert hit.sum() == 36


def test_mark_last_layout_puts_the_mark_before_the_answer():
    arrays, answers = make_batch(np.random.default_rng(0), 4, 2, "id", "mark-last")
    ids = arrays["input_ids"]
    assert (ids[:, -1] == FIRST_COLOUR + answers).all()
    assert ((ids[:, -2] >= FIRST_MARK) & (ids[:, -2] < FIRST_MARK + 4)).all()
    assert (arrays["targets"][:, -2] == ids[:, -1]).all() and (arrays["loss_mask"][:, -2] == 1).all()


@pytest.mark.parametrize("side", [56, 84])
def test_shape_batches_ask_about_one_instance(side):
    from data_gen.synthetic_scene import SHAPES

    arrays, answers = make_shape_batch(np.random.default_rng(0), 6, side)
    nvis = (side // 14) ** 2
    ids = arrays["input_ids"]
    assert ids.shape == (6, 1 + nvis + 4) and (ids[:, 1:1 + nvis] == IMAGE_ID).all()
    assert arrays["pixel_values"].shape == (6, 1, side, side, 3)
    assert ((answers >= 0) & (answers < len(SHAPES))).all() and (ids[:, -1] == FIRST_COLOUR + answers).all()
    assert (arrays["targets"][:, -2] == ids[:, -1]).all() and (arrays["loss_mask"].sum(1) == 1).all()
    px = arrays["pixel_values"][:, 0] * 0.27 + 0.48
    assert (px.std(axis=(1, 2)).max(-1) > 0.05).all()  # an instance on the plain background
    streamed = next(Batches(6, partial(make_shape_batch, side=side)))  # what the trainer iterates
    assert streamed["input_ids"].shape == ids.shape and streamed["pixel_values"].shape == arrays["pixel_values"].shape


def test_cli_prints_one_json_line_per_budget(capsys):
    assert main(["--objects", "2", "--steps", "2,3", "--batch", "4", "--layout", "mark-last"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["steps"], r["samples"], r["layout"]) for r in rows] == [(2, 8, "mark-last"), (3, 12, "mark-last")]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["baseline"] == 0.5 for r in rows)


def test_cli_shape_task(capsys):
    assert main(["--task", "shape", "--side", "56", "--steps", "2", "--batch", "4"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert (row["task"], row["side"], row["samples"], row["baseline"]) == ("shape", 56, 8, 0.143)


def test_run_rejects_an_unknown_task():
    with pytest.raises(ValueError, match="task must be one of"):
        run(2, 1, 4, "id", 1e-3, task="colour")
