"""eval.binding_probe: batches are well formed, and the probe's calibration case (one square) is learnt."""
import numpy as np

from eval.binding_probe import FIRST_COLOUR, IMAGE_ID, NVIS, PALETTE, make_batch, run


def test_batches_ask_about_one_marked_square():
    arrays, answers = make_batch(np.random.default_rng(0), 8, 3, "id")
    ids = arrays["input_ids"]
    assert ids.shape == (8, 1 + NVIS + 7) and (ids[:, 1:1 + NVIS] == IMAGE_ID).all()
    assert (ids[:, -1] == FIRST_COLOUR + answers).all()
    assert (arrays["loss_mask"].sum(1) == 1).all() and (arrays["targets"][:, -2] == ids[:, -1]).all()
    px = arrays["pixel_values"] * 0.27 + 0.48  # back to [0, 1]
    for b in range(8):  # the asked mark's label colour is in the image
        mark = int(ids[b, 1 + NVIS + 1]) - 4
        hit = np.abs(px[b, 0] * 255 - np.asarray(PALETTE[mark], np.float32)).max(-1) < 1
        assert hit.sum() == 36


def test_mark_last_layout_puts_the_mark_before_the_answer():
    arrays, answers = make_batch(np.random.default_rng(0), 4, 2, "id", "mark-last")
    ids = arrays["input_ids"]
    assert (ids[:, -1] == FIRST_COLOUR + answers).all() and ((ids[:, -2] >= 4) & (ids[:, -2] < 8)).all()
    assert (arrays["targets"][:, -2] == ids[:, -1]).all() and (arrays["loss_mask"][:, -2] == 1).all()


def test_one_square_is_read_within_the_probe_budget():
    r = run(objects=1, steps=150, batch=16, cue="id", lr=1e-3)
    assert r["accuracy"] >= 0.8, r
