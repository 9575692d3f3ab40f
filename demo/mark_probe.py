"""`python -m demo.mark_probe`: what a base's visual tokens say about Set-of-Marks frames, before any SFT.

Inst-IT SFT can only bind "[2]" to an instance if the tokens the decoder sees carry the label's digit and
the instance's attributes. This probe renders held-out scenes of the demo world (2-4 instances), marked
in the chosen look, runs the base's tower + projector on one 84 px view, and fits linear probes
(softmax regression on 70% of the patches, accuracy on the other 30%) for:

- the digit of each label, read at the patch that holds the label;
- the colour of the labelled instance, read at that same patch (one attention hop for the decoder);
- the colour of an instance at every patch it covers, on the marked frame and on the same frame unmarked.

`--look full` draws marks as the reference does (mask tint + ID-coloured contour + numeric label);
`--look labels` draws the numeric labels only (`demo.world.MASK_MARKS = False`, the demo world's look).

Measured on the shipped base (`--scenes 600`, ~10 seconds): full marks: digit 0.68, colour at the label
patch 0.54, colour at instance patches 0.59 marked vs 0.98 unmarked; labels only: digit 0.69, colour at
the label patch 0.85, colour at instance patches 0.96 vs 0.98. The tint and contours recolour small
objects past what the base learned to read; labels alone leave the instances readable.

`--label-questions N` asks the base instead about N held-out printed-label canvases (no instance, no mark):
the number at a place, the place of a number, the box of a number, whether a number is there. The shipped
base, N=60: read 0.48, where 0.12 (9 places), box 0.00 (dark / light), present 0.50 (72-221 questions each): it
has not learnt to find a label by its digit, the step that binding an `[ID]` to its instance starts with.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LOOKS = ("full", "labels")


def marked_scenes(count: int, look: str, seed: int = 99) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """`count` held-out demo-world scenes: (marked image, unmarked image, {"labels": [(digit, patch,
    colour index)], "owner": [(patch, colour index)]})."""
    from data_gen.som import render_marks
    from data_gen.synthetic import mark_look
    from data_gen.synthetic_scene import COLOURS, Difficulty
    from demo import base_data as B
    from demo import world as W

    if look not in LOOKS:
        raise ValueError(f"look must be one of {LOOKS}, got {look!r}")
    colours = list(COLOURS)
    out = []
    for k in range(count):
        rng = np.random.default_rng([seed, k])
        scene, frames = B.sample_scene(rng, Difficulty(2, 4))
        img, masks = frames[0]
        style = mark_look("image", int(rng.integers(1 << 30)), W.MARK_LABEL_BOX, W.LABEL_GRID, look == "full")
        marked, infos = render_marks(img, list(masks.items()), "image", mark_style=style, return_info=True)
        colour_of = {t.iid: colours.index(t.colours[0]) for t in scene.tracks}
        labels = [(int(i.id), (i.label_xy[1] // W.PATCH) * W.GRID + i.label_xy[0] // W.PATCH, colour_of[int(i.id)])
                  for i in infos if i.skipped is None and i.label_xy is not None]
        owner = [(p, colour_of[int(o)]) for p, o in enumerate(B.patch_owner(masks)) if o]
        out.append((marked, img, {"labels": labels, "owner": owner}))
    return out


def visual_tokens(model, images: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """[N, P, D] projected tile features of 84 px images (one view each, as the base's base tile)."""
    import jax
    import jax.numpy as jnp

    from instit_jax.processing import CLIP_MEAN, CLIP_STD  # the base's preprocessor_config.json

    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    fn = jax.jit(model.image_features)
    outs = []
    for i in range(0, len(images), batch):
        x = (np.stack(images[i:i + batch]).astype(np.float32) / 255.0 - mean) / std
        outs.append(np.asarray(fn(jnp.asarray(x))))
    return np.concatenate(outs)


def linear_probe(x: np.ndarray, y: np.ndarray, steps: int = 500, lr: float = 0.5) -> tuple[float, float]:
    """(held-out accuracy, majority-class accuracy): softmax regression fitted on the first 70% of rows."""
    import jax
    import jax.numpy as jnp

    x = np.asarray(x, np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = np.asarray(y, np.int32)
    train = np.arange(len(y)) < int(0.7 * len(y))
    classes = int(y.max()) + 1

    def loss(p, x, y):
        logits = x @ p[0] + p[1]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]) + 1e-3 * jnp.sum(p[0] ** 2)

    grad = jax.jit(jax.grad(loss))
    p = (jnp.zeros((x.shape[1], classes)), jnp.zeros(classes))
    xt, yt = jnp.asarray(x[train]), jnp.asarray(y[train])
    for _ in range(steps):
        g = grad(p, xt, yt)
        p = (p[0] - lr * g[0], p[1] - lr * g[1])
    pred = np.asarray(x[~train] @ np.asarray(p[0]) + np.asarray(p[1])).argmax(1)
    held = y[~train]
    return float((pred == held).mean()), float(np.bincount(held).max() / len(held))


def run(base: str | Path, scenes: int, look: str) -> dict[str, dict[str, float]]:
    from instit_jax.loading import load_pretrained

    model = load_pretrained(base)
    data = marked_scenes(scenes, look)
    marked = visual_tokens(model, [d[0] for d in data])
    plain = visual_tokens(model, [d[1] for d in data])
    rows: dict[str, tuple[list, list]] = {k: ([], []) for k in (
        "digit_at_label", "colour_at_label", "colour_marked", "colour_unmarked")}
    for k, (_, _, meta) in enumerate(data):
        for digit, p, colour in meta["labels"]:
            rows["digit_at_label"][0].append(marked[k, p])
            rows["digit_at_label"][1].append(digit)
            rows["colour_at_label"][0].append(marked[k, p])
            rows["colour_at_label"][1].append(colour)
        for p, colour in meta["owner"]:
            rows["colour_marked"][0].append(marked[k, p])
            rows["colour_marked"][1].append(colour)
            rows["colour_unmarked"][0].append(plain[k, p])
            rows["colour_unmarked"][1].append(colour)
    result = {}
    for name, (x, y) in rows.items():
        acc, majority = linear_probe(np.stack(x), np.array(y))
        result[name] = {"accuracy": round(acc, 3), "majority": round(majority, 3), "n": len(y)}
    return result


def label_questions(base: str | Path, canvases: int, seed: int = 4242) -> dict[str, dict[str, float]]:
    """Greedy answers of `base` to held-out printed-label questions (`base_data.label_lookup_questions` on
    label canvases; those with 2-3 labels are asked, in the bench's open-ended layout), exact match per kind: `read` (the number
    at a place), `where` (the place of a number), `box` (the box look of a number), `present` (is there a d):
    the find-a-label-by-its-digit step that binding an `[ID]` needs, asked without any instance."""
    from demo import base_data as B
    from instit_jax.assistant import Assistant

    assistant = Assistant.from_pretrained(str(base))
    hits: dict[str, list[bool]] = {"read": [], "where": [], "box": [], "present": []}
    for k in range(canvases):
        rng = np.random.default_rng([seed, k])
        img, placed = B.label_canvas(rng, looks=True)
        if len(placed) < 2:
            continue
        for q in B.label_lookup_questions(placed):
            text = q["question"]
            kind = ("box" if "box" in text else "where" if text.startswith("Where") else
                    "present" if text.startswith("Is there") else "read")
            prompt, gold = B.oe_turn(q, "image", True)
            got = assistant.answer(prompt, image=img, max_new_tokens=8).text
            hits[kind].append(got.strip().lower() == gold.lower())
    return {kind: {"accuracy": round(float(np.mean(v)), 3), "n": len(v)} for kind, v in hits.items() if v}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(Path(__file__).resolve().parent / "base"))
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--look", choices=LOOKS, default="labels")
    ap.add_argument("--label-questions", type=int, default=0, metavar="N",
                    help="instead: ask the base about N held-out printed-label canvases (no instance, no mark)")
    args = ap.parse_args(argv)
    if args.label_questions:
        result = label_questions(args.base, args.label_questions)
        for kind, r in result.items():
            print(f"{kind:8s} {r['accuracy']:.3f}  ({r['n']} questions)")
        print(json.dumps({"probe": "label_questions", "base": args.base, **result}))
        return
    result = run(args.base, args.scenes, args.look)
    for name, r in result.items():
        print(f"{name:18s} held-out {r['accuracy']:.3f}  (majority {r['majority']:.3f}, {r['n']} patches)")
    print(json.dumps({"probe": "mark_probe", "look": args.look, "base": args.base, **result}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
