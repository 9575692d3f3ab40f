"""`python -m demo.binding_probe`: how many samples the demo recipe needs to learn instance binding.

The held-out bench asks about one marked instance among several ("What colour is [2]?"): the model has to
find the instance by its mark, then read it. This probe isolates that step in a one-minute loop with the
real trainer and the demo recipe (configs/tiny_synthetic.py, one 56-px view): images with N coloured
squares, each carrying a label box in its ID's Set-of-Marks colour (`--cue id`) or sitting in a numbered
cell of a 3x3 grid (`--cue cell`); the question names the ID (or cell); the answer is the square's colour.
It prints held-out accuracy after each sample budget beside the "a present colour at random" baseline
(1/N), so a recipe change can be judged in minutes instead of one 6-minute demo per try.

`--task shape` asks the other question the bench leans on, with nothing to bind: the shape of the ONE
instance of a synthetic-world scene (data_gen.synthetic_scene, 7 shapes, sizes as in the demo world), in
one `--side`-px view (84: the world's own pixels, 36 tokens; 56: the demo's tile, 16 tokens).

`--layout mark-first` asks "[k] colour ? ASSISTANT:" (the mark 4 tokens before the answer, like the bench's
"What colour is [k]?"); `mark-last` asks "colour ? ASSISTANT: [k]" (the mark is the token that predicts it).

Measured with this script on the 2-core CI-like box (batch 16, `--cue id`): one square is read perfectly by
4.8k samples, but picking one of two needs far more. mark-first: 4.8k samples 0.50, 9.6k 0.63,
19.2k 0.82 (baseline 0.50); batch 64 x 300 steps (19.2k) gives 0.89, so the sample count, not the step
count, is what matters. mark-last learns faster: 9.6k samples 0.82 (two squares); three squares at 19.2k:
0.70 vs 0.34 mark-first (baseline 0.33). The full demo's stage 2 sees 3.2k samples by default: far short,
with 2-4 instances and the mark several tokens before each attribute.

`--task shape`, same box (batch 16, baseline 1/7 = 0.14): 56-px view, 9.6k samples 0.21 (30 s);
84-px view, 38.4k samples 0.45 (139 s). The demo's tower needs tens of thousands of images to tell shapes
apart even one at a time; the demo's two stages see ~6k images in all.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from data_gen.som import PALETTE

COLOURS = np.array([[220, 40, 40], [40, 180, 60], [50, 80, 220], [230, 210, 40], [160, 60, 200],
                    [240, 140, 30], [240, 120, 180], [60, 200, 200]], np.float32)
SIDE, PATCH, VOCAB, IMAGE_ID = 56, 14, 64, 63
NVIS = (SIDE // PATCH) ** 2
TASKS = ("bind", "shape")
# made-up vocabulary: 3 "[", 4.. marks/cells, 30 "]", 31 "colour", 32 "?", 33 "ASSISTANT:", 40.. colours
# (or shapes, for --task shape)
OPEN, CLOSE, WORD, QMARK, ASSISTANT, FIRST_MARK, FIRST_COLOUR = 3, 30, 31, 32, 33, 4, 40
QUESTION_LEN = 6


LAYOUTS = ("mark-first", "mark-last")


def make_batch(rng: np.random.Generator, batch: int, objects: int, cue: str,
               layout: str = "mark-first") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Training-batch arrays [BOS, image x16, "[", mark, "]", "colour", "?", "ASSISTANT:", answer] + answers
    (mark-last: [BOS, image x16, "colour", "?", "ASSISTANT:", "]", "[", mark, answer])."""
    px = np.full((batch, 1, SIDE, SIDE, 3), 170, np.float32)
    cell_side = SIDE // 3
    ids, answers = [], []
    for b in range(batch):
        colours = rng.choice(len(COLOURS), objects, replace=False)
        marks = rng.permutation(4)[:objects]
        cells = rng.choice(9, objects, replace=False)
        for colour, mark, cell in zip(colours, marks, cells):
            cy, cx = divmod(int(cell), 3)
            y, x = cy * cell_side + rng.integers(0, 3), cx * cell_side + rng.integers(0, 3)
            side = cell_side - 4
            px[b, 0, y:y + side, x:x + side] = COLOURS[colour]
            if cue == "id":  # a 6x6 label box in the mark's SoM colour at the square's centre
                ly, lx = y + side // 2 - 3, x + side // 2 - 3
                px[b, 0, ly:ly + 6, lx:lx + 6] = PALETTE[int(mark)]
        q = int(rng.integers(objects))
        token = FIRST_MARK + (int(marks[q]) if cue == "id" else int(cells[q]))
        question = ([OPEN, token, CLOSE, WORD, QMARK, ASSISTANT] if layout == "mark-first"
                    else [WORD, QMARK, ASSISTANT, CLOSE, OPEN, token])
        ids.append([1] + [IMAGE_ID] * NVIS + question + [FIRST_COLOUR + int(colours[q])])
        answers.append(int(colours[q]))
    return _arrays(np.asarray(ids, np.int32), px, NVIS), np.asarray(answers)


def _arrays(ids: np.ndarray, pixels: np.ndarray, nvis: int) -> dict[str, np.ndarray]:
    """Training-batch arrays (the layout in instit_jax/data/pipeline.py's docstring) for
    [BOS, image x nvis, question..., answer] rows (uint8-range pixels)."""
    batch, t = ids.shape
    loss_mask = np.zeros((batch, t), np.float32)
    loss_mask[:, t - 2] = 1.0  # the last question token predicts the answer
    visual_index = np.full((batch, t), -1, np.int32)
    visual_index[:, 1:1 + nvis] = np.arange(nvis)
    return {"input_ids": ids, "attention_mask": np.ones((batch, t), np.int32),
            "targets": np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1),
            "loss_mask": loss_mask, "visual_index": visual_index, "pixel_values": (pixels / 255.0 - 0.48) / 0.27}


def make_shape_batch(rng: np.random.Generator, batch: int, side: int = 84) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """[BOS, image x (side/14)^2, WORD, "?", "ASSISTANT:", answer]: one synthetic-world instance per image
    (rendered at the world's 84 px, resized to `side`); answers are indices into SHAPES."""
    from PIL import Image

    from data_gen.synthetic_scene import SHAPES, Difficulty, make_scene, render_frame

    one = Difficulty(1, 1, small=0.2, occlusion=0.0)
    px = np.zeros((batch, 1, side, side, 3), np.float32)
    answers = []
    for b in range(batch):
        scene = make_scene(rng, side=84, num_frames=1, difficulty=one, dynamic=False)
        img = render_frame(scene, 0)[0]
        px[b, 0] = img if side == 84 else np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
        answers.append(SHAPES.index(scene.tracks[0].shape))
    nvis = (side // PATCH) ** 2
    ids = np.asarray([[1] + [IMAGE_ID] * nvis + [WORD, QMARK, ASSISTANT, FIRST_COLOUR + a] for a in answers], np.int32)
    return _arrays(ids, px, nvis), np.asarray(answers)


class Batches:
    """Endless seeded batches from `make(rng, batch) -> (arrays, answers)` (e.g. `functools.partial(make_batch,
    objects=2, cue="id", layout="mark-first")` or `partial(make_shape_batch, side=84)`), with the
    get/set_state the trainer checkpoints."""

    def __init__(self, batch: int, make: Callable[[np.random.Generator, int], tuple[dict, np.ndarray]]):
        self.batch, self.make, self.i = batch, make, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.i += 1
        return self.make(np.random.default_rng([7, self.i]), self.batch)[0]

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])


def probe_config(steps: int, batch: int, lr: float, vision_lr: float | None = None, side: int = SIDE):
    """configs/tiny_synthetic.py for the probe's batches at `side` px (vision_lr defaults to lr)."""
    from configs.tiny_synthetic import get_config

    c = get_config()
    c.model.text.vocab_size = VOCAB
    c.model.image_token_id = IMAGE_ID
    c.model.image_aspect_ratio = "single"
    c.data.kind = "random"  # batches come from train_iter
    c.model.vision.image_size = side
    c.data.max_tokens = 1 + (side // PATCH) ** 2 + QUESTION_LEN + 1
    c.data.max_tiles = 1
    c.data.videos_per_batch = False
    c.train.global_batch_size = batch
    c.train.total_steps = steps
    c.train.checkpoint_every = steps
    c.train.log_every = max(1, steps // 4)
    c.optim.lr = lr
    c.optim.vision_lr = lr if vision_lr is None else vision_lr
    c.freeze.frozen_vision_layers = 0
    return c


def accuracy(model, arrays: dict[str, np.ndarray], answers: np.ndarray, choices: int = len(COLOURS)) -> float:
    """Share of questions whose most likely answer token (of the first `choices`) is the answer."""
    import jax.numpy as jnp

    from instit_jax.models.llm import positions_from_mask

    e = model.embed_inputs(jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["pixel_values"]), None,
                           jnp.asarray(arrays["visual_index"]))
    mask = jnp.asarray(arrays["attention_mask"])
    logits, _ = model.language_model(e, positions_from_mask(mask), mask)
    pred = np.asarray(logits[:, -2, FIRST_COLOUR:FIRST_COLOUR + choices].argmax(-1))
    return float((pred == answers).mean())


def run(objects: int, steps: int, batch: int, cue: str, lr: float, layout: str = "mark-first", task: str = "bind",
        side: int = 84) -> dict:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    import jax

    from data_gen.synthetic_scene import SHAPES
    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    t = time.time()
    shape = task == "shape"
    make = (partial(make_shape_batch, side=side) if shape
            else partial(make_batch, objects=objects, cue=cue, layout=layout))
    config = probe_config(steps, batch, lr, side=side if shape else SIDE)
    with tempfile.TemporaryDirectory() as wd:
        result = train(config, wd, train_iter=Batches(batch, make), mesh=mesh)
        acc = accuracy(result.model(), *make(np.random.default_rng(12345), 256),
                       choices=len(SHAPES) if shape else len(COLOURS))
    what = {"task": "shape", "side": side} if shape else {"objects": objects, "cue": cue, "layout": layout}
    return {**what, "steps": steps, "batch": batch, "samples": steps * batch, "accuracy": round(acc, 3),
            "baseline": round(1 / (len(SHAPES) if shape else objects), 3), "seconds": round(time.time() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.binding_probe", description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=2, help="squares per image (1-4)")
    p.add_argument("--steps", default="300,600,1200", help="comma-separated step counts, one run each")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cue", choices=("id", "cell"), default="id")
    p.add_argument("--layout", choices=LAYOUTS, default="mark-first")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--task", choices=TASKS, default="bind", help="bind: colour of the marked square; shape: shape "
                   "of a lone synthetic-world instance")
    p.add_argument("--side", type=int, choices=(56, 84), default=84, help="--task shape: view size in px")
    a = p.parse_args(argv)
    if not 1 <= a.objects <= 4:
        p.error("--objects must be in 1..4")
    for steps in (int(s) for s in a.steps.split(",")):
        print(json.dumps(run(a.objects, steps, a.batch, a.cue, a.lr, a.layout, a.task, a.side)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
