"""The base's data: what a "LLaVA-NeXT base" of the shape world learns before any Inst-IT data.

Nothing here draws Set-of-Marks or refers to an instance by an ID: instances are named by what they look
like ("the star", "the red object", "the largest object"), as generic VQA data names them. Digits appear
only on plain canvases with no instance (generic text reading, as real CLIP and LLaVA bases read text).

- `tower_batch(seed, index, size)`: one batch of the tower stage, dense per-patch labels (colour, shape,
  texture, size of the instance under each patch; the digit on each patch of a digit canvas) and the
  instance count; random access by `index`, so a resumed build reads the very batches it would have.
- `generic_image_questions` / `generic_video_questions` / `digit_questions`: unmarked-scene QA records
  ({question, answer, distractors}), the same shape as `data_gen.synthetic_text`'s mark-grounded ones.
- `write_generic_set` / `write_caption_set` / `text_reading_conversations`: LLaVA-format JSON (and the PNG
  media it names) for the trainer's record builder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_gen.som import _bitmap_text
from data_gen.synthetic_scene import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Difficulty,
    Scene,
    Track,
    finalize_visibility,
    make_scene,
)
from data_gen.synthetic_text import plain_caption, plain_video_caption, position_words, reading_order
from demo import world as W

COLOUR_ID = {c: i for i, c in enumerate(W.COLOUR_CLASSES)}
SHAPE_ID = {c: i for i, c in enumerate(W.SHAPE_CLASSES)}
TEXTURE_ID = {c: i for i, c in enumerate(W.TEXTURE_CLASSES)}
SIZE_ID = {c: i for i, c in enumerate(W.SIZE_CLASSES)}
HEADS = {"colour": len(W.COLOUR_CLASSES), "shape": len(W.SHAPE_CLASSES), "texture": len(W.TEXTURE_CLASSES),
         "size": len(W.SIZE_CLASSES), "digit": len(W.DIGIT_CLASSES)}
MIN_PATCH_PIXELS = 30  # a patch is labelled with the instance covering most of it, if it covers >= this


# ------------------------------------------------------------------------------------------ scenes


def sample_scene(rng: np.random.Generator, difficulty: Difficulty, *, num_frames: int = 1
                 ) -> tuple[Scene, list[tuple[np.ndarray, dict[int, np.ndarray]]]]:
    """A scene with every frame rendered; resampled while some frame shows nothing."""
    dynamic = num_frames > 1
    for _ in range(20):
        scene = make_scene(rng, side=W.SIDE, num_frames=num_frames, difficulty=difficulty, dynamic=dynamic)
        frames = finalize_visibility(scene)
        if all(scene.visible):
            break
    return scene, frames


def patch_owner(masks: dict[int, np.ndarray]) -> np.ndarray:
    """[GRID*GRID] int: per patch (row-major, as `vit.patchify`), the ID covering most of it, or 0."""
    g, p = W.GRID, W.PATCH
    owner = np.zeros(g * g, np.int64)
    best = np.full(g * g, MIN_PATCH_PIXELS - 1, np.int64)
    for iid, m in masks.items():
        cover = m[: g * p, : g * p].reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
        win = cover > best
        owner[win], best[win] = iid, cover[win]
    return owner


def _erase(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random erasing: 0-3 flat rectangles (3-9 px, any colour incl. near black / white) pasted anywhere."""
    out = img.copy()
    for _ in range(int(rng.integers(0, 4))):
        h, w = (int(v) for v in rng.integers(3, 10, size=2))
        y, x = int(rng.integers(0, W.SIDE - h)), int(rng.integers(0, W.SIDE - w))
        tone = rng.integers(0, 256, size=3) if rng.random() < 0.5 else np.full(3, 255 * int(rng.integers(2)))
        out[y:y + h, x:x + w] = tone
    return out


def _tint(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global colour jitter: blend with one random colour at alpha <= 0.1."""
    a = rng.uniform(0, 0.1)
    return np.clip(img * (1 - a) + rng.integers(0, 256, size=3) * a + 0.5, 0, 255).astype(np.uint8)


def scene_example(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """(image uint8 [S,S,3], per-patch labels {head: [G*G]}, count) of one unmarked scene (or video frame)."""
    video = rng.random() < 0.3
    scene, frames = sample_scene(rng, W.BASE_VIDEO_DIFFICULTY if video else W.BASE_DIFFICULTY,
                                 num_frames=W.FRAMES if video else 1)
    t = int(rng.integers(len(frames)))
    img, masks = frames[t]
    owner = patch_owner(masks)
    tracks = {tr.iid: tr for tr in scene.tracks}
    labels = {k: np.zeros(W.GRID * W.GRID, np.int32) for k in HEADS}
    for i, iid in enumerate(owner):
        if iid:
            tr = tracks[int(iid)]
            labels["colour"][i] = COLOUR_ID[tr.colours[t]]
            labels["shape"][i] = SHAPE_ID[tr.shape]
            labels["texture"][i] = TEXTURE_ID[tr.texture]
            labels["size"][i] = SIZE_ID[tr.size]
    img = _tint(img, rng)
    if rng.random() < 0.7:
        img = _erase(img, rng)
    return img, labels, len(masks)


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def digit_canvas(rng: np.random.Generator, free: bool = False) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """A plain canvas with 1-3 single digits on distinct patches: (image, [(digit, cx, cy)] left to right).

    `free`: a digit may sit anywhere, across patch borders too (its centre's patch is its label)."""
    bg = rng.integers(0, 256, size=3)
    img = np.empty((W.SIDE, W.SIDE, 3), np.int16)
    img[:] = bg
    img += rng.integers(-6, 7, size=(W.SIDE, W.SIDE, 1), dtype=np.int16)
    img = np.clip(img, 0, 255).astype(np.uint8)
    n = int(rng.integers(1, 4))
    cells = rng.permutation(W.GRID * W.GRID)[:n]
    placed = []
    for cell in cells:
        d = str(int(rng.integers(10)))
        scale = 1 if rng.random() < 0.8 else 2
        glyph = np.pad(_bitmap_text(d, scale), 1)
        gh, gw = glyph.shape
        r, c = divmod(int(cell), W.GRID)
        if free:  # centre inside the cell, glyph anywhere around it (clamped into the canvas)
            y = min(max(r * W.PATCH + int(rng.integers(0, W.PATCH)) - gh // 2, 0), W.SIDE - gh)
            x = min(max(c * W.PATCH + int(rng.integers(0, W.PATCH)) - gw // 2, 0), W.SIDE - gw)
        else:
            y = r * W.PATCH + int(rng.integers(0, W.PATCH - gh + 1))
            x = c * W.PATCH + int(rng.integers(0, W.PATCH - gw + 1))
        back = img[y:y + gh, x:x + gw].reshape(-1, 3).mean(0)
        if rng.random() < 0.5:  # the digit on a box of its own colour
            back = rng.integers(0, 256, size=3)
            img[y:y + gh, x:x + gw] = back
        ink = np.array([0, 0, 0] if _luma(back) > 128 else [255, 255, 255])
        if rng.random() < 0.3:  # coloured ink, still legible
            for _ in range(10):
                cand = rng.integers(0, 256, size=3)
                if abs(_luma(cand) - _luma(back)) > 90:
                    ink = cand
                    break
        img[y:y + gh, x:x + gw][glyph] = ink
        placed.append((d, x + gw // 2, y + gh // 2))
    placed.sort(key=lambda t: (t[1], t[2]))
    return img, placed


def label_canvas(rng: np.random.Generator, looks: bool = False) -> tuple[np.ndarray, list[tuple]]:
    """A plain canvas with 1-3 single digits drawn as labels: a 3x5 px glyph on an opaque-ish 5x7 px box
    (white on dark or dark on light), each centred in its own patch cell (`W.LABEL_GRID`): the look of a
    printed label, never on an instance. Returns (image, [(digit, cx, cy)] left to right); `looks` adds
    each box's "dark" / "light" as a fourth field (the same image)."""
    from data_gen.som import _label_patch, _paste_label

    bg = rng.integers(0, 256, size=3)
    img = np.empty((W.SIDE, W.SIDE, 3), np.int16)
    img[:] = bg
    img += rng.integers(-6, 7, size=(W.SIDE, W.SIDE, 1), dtype=np.int16)
    img = np.clip(img, 0, 255).astype(np.uint8)
    cells = rng.permutation(W.GRID * W.GRID)[:int(rng.integers(1, 4))]
    g = W.LABEL_GRID
    placed = []
    for cell in cells:
        d = str(int(rng.integers(10)))
        r, c = divmod(int(cell), W.GRID)
        cx, cy = c * g + g // 2, r * g + g // 2
        look = "image" if rng.random() < 0.5 else "video"  # dark box / light box
        _paste_label(img, _label_patch(d, 5, look, round(float(rng.uniform(0.65, 0.95)), 2)), cx, cy)
        placed.append((d, cx, cy, "dark" if look == "image" else "light") if looks else (d, cx, cy))
    placed.sort(key=lambda t: (t[1], t[2]))
    return img, placed


def digit_example(rng: np.random.Generator, free: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    img, placed = digit_canvas(rng, free)
    labels = {k: np.zeros(W.GRID * W.GRID, np.int32) for k in HEADS}
    for d, cx, cy in placed:
        labels["digit"][(cy // W.PATCH) * W.GRID + cx // W.PATCH] = 1 + int(d)
    return img, labels, 0


def label_example(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    img, placed = label_canvas(rng)
    labels = {k: np.zeros(W.GRID * W.GRID, np.int32) for k in HEADS}
    for d, cx, cy in placed:
        labels["digit"][(cy // W.PATCH) * W.GRID + cx // W.PATCH] = 1 + int(d)
    return img, labels, 0


def tower_batch(seed: int, index: int, size: int, digit_share: float = 0.3, free_digits: bool = False,
                label_share: float = 0.0) -> dict[str, np.ndarray]:
    """Batch `index` of the tower stage: pixels uint8 [B,S,S,3], labels {head: [B,G*G]}, count [B].

    Each example is a label canvas (`label_share`), a digit canvas (`digit_share`) or an unmarked scene."""
    rng = np.random.default_rng([seed, index, 11])
    imgs, labels, counts = [], {k: [] for k in HEADS}, []
    for _ in range(size):
        u = rng.random() if label_share > 0 else 1.0  # (no extra draw: older stages' batches unchanged)
        if u < label_share:
            img, lab, n = label_example(rng)
        else:
            img, lab, n = digit_example(rng, free_digits) if rng.random() < digit_share else scene_example(rng)
        imgs.append(img)
        counts.append(n)
        for k in HEADS:
            labels[k].append(lab[k])
    out = {"pixels": np.stack(imgs), "count": np.asarray(counts, np.int32)}
    out.update({k: np.stack(v) for k, v in labels.items()})
    return out


# -------------------------------------------------------------------------------------- questions


def _q(question: str, answer: str, distractors: list[str]) -> dict[str, Any]:
    return {"question": question, "answer": answer, "distractors": [d for d in distractors if d != answer]}


def _unique(trs: list[Track], key) -> list[Track]:
    return [tr for tr in trs if sum(key(o) == key(tr) for o in trs) == 1]


def _present(scene: Scene, t: int) -> list[Track]:
    return [tr for tr in scene.tracks if tr.present[t]]


def generic_image_questions(scene: Scene, t: int = 0) -> list[dict[str, Any]]:
    """Unmarked image-level questions: counting, presence, attributes of named / only / largest objects,
    relations between named shapes. Every answer is read off the pixels; no instance IDs."""
    trs = _present(scene, t)
    n = len(trs)
    qs = [_q("How many shapes are there?", str(n), [str(k) for k in range(1, W.MAX_COUNT + 1)])]
    pick = np.random.default_rng([scene.texture_seed, t, 5])  # two shapes and one colour asked about
    for shape in pick.permutation(SHAPES)[:2]:
        here = any(tr.shape == shape for tr in trs)
        qs.append(_q(f"Is there a {shape}?", "yes" if here else "no", []))
    for colour in pick.permutation(list(COLOURS))[:1]:
        here = any(tr.colours[t] == colour for tr in trs)
        qs.append(_q(f"Is there a {colour} shape?", "yes" if here else "no", []))

    def about(tr: Track, ref: str, skip: str = "") -> None:
        if skip != "colour":
            qs.append(_q(f"What colour is {ref}?", tr.colours[t], list(COLOURS)))
        if skip != "shape":
            qs.append(_q(f"What shape is {ref}?", tr.shape, list(SHAPES)))
        qs.append(_q(f"What texture does {ref} have?", tr.texture, [*TEXTURES, "checked"]))
        qs.append(_q(f"How big is {ref}?", tr.size, [*SIZES, "none of these"]))
        where = position_words(tr.xs[t], tr.ys[t], scene.side)
        qs.append(_q(f"Where is {ref}?", where, ["top left", "top right", "bottom left", "bottom right",
                                                  "center", "middle left", "middle right"]))

    if n == 1:
        about(trs[0], "the only shape")
    for tr in _unique(trs, lambda o: o.shape):
        about(tr, f"the {tr.shape}", skip="shape")
    for tr in _unique(trs, lambda o: o.colours[t]):
        about(tr, f"the {tr.colours[t]} shape", skip="colour")
    vis = scene.visible[t] if scene.visible else {}
    if n >= 2 and vis:
        areas = sorted(((vis.get(tr.iid, 0), tr) for tr in trs), key=lambda a: -a[0])
        if areas[0][0] > 1.3 * areas[1][0]:
            about(areas[0][1], "the largest shape")
    named = _unique(trs, lambda o: o.shape)
    for i, a in enumerate(named):
        for b in named[i + 1:]:
            dx, dy = a.xs[t] - b.xs[t], a.ys[t] - b.ys[t]
            others = [s for s in SHAPES if s not in (a.shape, b.shape)]
            if abs(dx) > 8:
                left = a if dx < 0 else b
                qs.append(_q(f"Which is further left, the {a.shape} or the {b.shape}?", left.shape,
                             [a.shape, b.shape, *others]))
            if abs(dy) > 8:
                top = a if dy < 0 else b
                qs.append(_q(f"Which is higher, the {a.shape} or the {b.shape}?", top.shape,
                             [a.shape, b.shape, *others]))
    return qs


def _span(tr: Track) -> tuple[int, int]:
    first = tr.present.index(True)
    return first, len(tr.present) - 1 - tr.present[::-1].index(True)


def generic_video_questions(scene: Scene) -> list[dict[str, Any]]:
    """Unmarked video questions about named shapes: motion, colour at a frame, changes, entering/leaving."""
    T = scene.num_frames
    trs = [tr for tr in scene.tracks if any(tr.present)]
    stamps = [f"<{k}>" for k in range(1, T + 1)]
    qs = [_q("How many shapes appear in the video?", str(len(trs)), [str(k) for k in range(1, W.MAX_COUNT + 1)]),
          _q("How many shapes enter?", str(sum(tr.enter is not None for tr in trs)), [str(k) for k in range(6)])]
    for tr in _unique(trs, lambda o: o.shape):
        ref = f"the {tr.shape}"
        a, b = _span(tr)
        mid = a + (b - a) // 2
        qs.append(_q(f"What colour is {ref} at <{mid + 1}>?", tr.colours[mid], list(COLOURS)))
        qs.append(_q(f"Which way does {ref} move?", tr.direction, [*DIRECTIONS, "still"]))
        qs.append(_q(f"What texture does {ref} have?", tr.texture, [*TEXTURES, "checked"]))
        if tr.enter is not None:
            qs.append(_q(f"When does {ref} enter?", f"<{tr.enter + 1}>", stamps))
        if tr.leave is not None:
            qs.append(_q(f"After which frame does {ref} leave?", f"<{tr.leave + 1}>", stamps))
        if tr.recolour_at is not None:
            c = tr.colours[tr.recolour_at]
            qs.append(_q(f"What colour does {ref} become?", c, [x for x in COLOURS if x != tr.colours[0]]))
    for d in DIRECTIONS:
        movers = [tr for tr in trs if tr.direction == d]
        if len(movers) == 1 and len(_unique(trs, lambda o: o.shape)) == len(trs):
            qs.append(_q(f"Which shape moves {d}?", movers[0].shape, list(SHAPES)))
    changers = [tr for tr in trs if tr.recolour_at is not None]
    if len(changers) == 1 and len(_unique(trs, lambda o: o.shape)) == len(trs):
        qs.append(_q("Which shape changes colour?", changers[0].shape, list(SHAPES)))
    return qs


def digit_questions(placed: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Questions about a digit canvas (numbers on a plain background, no instance)."""
    digits = [d for d, _, _ in placed]
    qs = [_q("How many numbers are written?", str(len(digits)), ["1", "2", "3", "4", "5"])]
    if len(digits) == 1:
        qs.append(_q("What number is written?", digits[0], list("0123456789")))
    else:
        qs.append(_q("What numbers are written, from left to right?", " ".join(digits), []))
        qs.append(_q("What is the leftmost number?", digits[0], list("0123456789")))
        qs.append(_q("What is the rightmost number?", digits[-1], list("0123456789")))
    for d, cx, cy in placed:
        where = position_words(cx, cy, W.SIDE)
        if sum(position_words(x, y, W.SIDE) == where for _, x, y in placed) == 1:
            qs.append(_q(f"What number is in the {where}?", d, list("0123456789")))
    return qs


def label_lookup_questions(placed: list[tuple[str, int, int, str]]) -> list[dict[str, Any]]:
    """Questions that find a printed label by its digit (a label canvas with looks, no instance): where it
    is, whether it is there, what its box looks like; the reading questions of `digit_questions` too."""
    qs = digit_questions([p[:3] for p in placed])
    digits = [d for d, *_ in placed]
    for d, cx, cy, look in placed:
        if digits.count(d) == 1:
            qs.append(_q(f"Where is the number {d}?", position_words(cx, cy, W.SIDE),
                         ["top left", "top center", "top right", "middle left", "center", "middle right",
                          "bottom left", "bottom center", "bottom right"]))
            qs.append(_q(f"Is the {d} on a dark or a light box?", look, []))
    absent = [str(k) for k in range(10) if str(k) not in digits]
    for d in (digits[0], absent[int(len(absent) * 0.37)]):
        qs.append(_q(f"Is there a {d}?", "yes" if d in digits else "no", []))
    return qs


def write_label_lookup_set(root: Path, seed: int, *, count: int, turns: int = 5) -> Path:
    """Label canvases (`label_canvas`) with `label_lookup_questions`: `root/labels.json` + PNGs."""
    recs = []
    for k in range(count):
        rng = np.random.default_rng([seed, k, 25])
        img, placed = label_canvas(rng, looks=True)
        rel = f"labels/{k:06d}.png"
        _save(root / rel, img)
        recs.append({"id": f"lab-{k}", "image": rel,
                     "conversations": qa_conversation(label_lookup_questions(placed), rng, "image", turns)})
    out = root / "labels.json"
    out.write_text(json.dumps(recs))
    return out


# ------------------------------------------------------------------------------------ conversations

# The multiple-choice layout is the bench's (question, lettered options, a line ending "The best answer is: ")
# with instructions of our own that say nothing about marks.
MC_PRE = {"image": "Look at the image and choose the right option. Reply with the letter only (A, B, C or D).",
          "video": "Watch the frames of the video and choose the right option. Frames are numbered from 1, "
                   "so <t> means frame t. Reply with the letter only (A, B, C or D).",
          "text": "Read the description and choose the right option. Reply with the letter only (A, B, C or D)."}
# Open-ended layout: instruction line, lead-in line, question (the bench's OE layout).
OE_PRE = {"image": ("Answer the question about the image in a few words.", "Question:"),
          "video": ("Answer the question about the video in a few words. Frames are numbered from 1, so <t> "
                    "means frame t.", "Question:"),
          "text": ("Answer the question about the description in a few words.", "Question:")}
MC_POST = "The best answer is: "


def shuffled_options(q: dict[str, Any], rng: np.random.Generator) -> tuple[list[str], str]:
    """Four options (the answer and 3 of its distractors, shuffled) and the answer's letter."""
    ds = list(dict.fromkeys(q["distractors"]))
    pick = [ds[i] for i in rng.permutation(len(ds))[:3]]
    opts = [q["answer"], *pick]
    order = rng.permutation(4)
    return [opts[i] for i in order], "ABCD"[int(np.flatnonzero(order == 0)[0])]


def mc_turn(q: dict[str, Any], rng: np.random.Generator, kind: str, first: bool) -> tuple[str, str]:
    opts, letter = shuffled_options(q, rng)
    options = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", opts))
    body = f"{q['question']}\n{options}\n{MC_POST}"
    return (f"{MC_PRE[kind]}\n{body}" if first else body), letter


def oe_turn(q: dict[str, Any], kind: str, first: bool) -> tuple[str, str]:
    pre, post = OE_PRE[kind]
    return (f"{pre}\n{post}\n{q['question']}" if first else q["question"]), q["answer"]


def qa_conversation(qs: list[dict[str, Any]], rng: np.random.Generator, kind: str, turns: int,
                    context: str = "") -> list[dict[str, str]]:
    """Up to `turns` QA turns (MC where 3 distractors exist, else OE; 50/50 where both can), placeholder
    `<image>` first for media, `context` (a description) first for text-only reading."""
    picks = [qs[int(i)] for i in rng.permutation(len(qs))[:turns]]
    conv = []
    for i, q in enumerate(picks):
        can_mc = len(set(q["distractors"])) >= 3
        text, ans = mc_turn(q, rng, kind, i == 0) if can_mc and rng.random() < 0.5 else oe_turn(q, kind, i == 0)
        if i == 0:
            text = (f"{context}\n{text}" if context else f"<image>\n{text}")
        conv += [{"from": "human", "value": text}, {"from": "gpt", "value": ans}]
    return conv


LOOKUP_FIELDS = {"colour": list(COLOURS), "shape": list(SHAPES), "texture": [*TEXTURES, "checked"],
                 "size": [*SIZES, "tiny"], "place": ["top left", "top center", "top right", "middle left", "center",
                                                     "middle right", "bottom left", "bottom center", "bottom right"],
                 "number": [str(k) for k in range(10)], "frame": [f"<{k}>" for k in range(1, W.FRAMES + 1)],
                 "direction": [*DIRECTIONS, "still"]}


def lookup_question(field: str, answer: str, rng: np.random.Generator) -> str:
    """A question that states its own answer ("Which option says blue?"), one of three wordings."""
    return (f"Which option says {answer}?", f"Note: the {field} is {answer}.\nWhat is the {field}?",
            f"The answer is {answer}. Which option is it?")[int(rng.integers(3))]


def option_lookup_conversations(seed: int, count: int, turns: int = 8) -> list[dict]:
    """Text-only multiple choice whose answer is stated in the question ("Which option says blue?",
    "Note: the colour is blue. What is the colour?"): the decoder learns to find the option that holds an
    answer it already has and to reply with that option's letter, which every MC question needs."""
    out = []
    fields = list(LOOKUP_FIELDS)
    for k in range(count):
        rng = np.random.default_rng([seed, k, 43])
        conv = []
        for i in range(turns):
            field = fields[int(rng.integers(len(fields)))]
            vocab = LOOKUP_FIELDS[field]
            ans = vocab[int(rng.integers(len(vocab)))]
            question = lookup_question(field, ans, rng)
            text, letter = mc_turn(_q(question, ans, vocab), rng, "text", i == 0)
            conv += [{"from": "human", "value": text}, {"from": "gpt", "value": letter}]
        out.append({"id": f"lookup-{k}", "conversations": conv})
    return out


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1)


def _save_frames(folder: Path, frames: list[tuple[np.ndarray, Any]]) -> None:
    """A video as `folder/001.png, 002.png, ...` (frames as `sample_scene` gives them)."""
    for t, (img, _) in enumerate(frames):
        _save(folder / f"{t + 1:03d}.png", img)


def write_generic_set(root: Path, seed: int, *, images: int, videos: int, digits: int, turns: int = 8,
                      labels: int = 0) -> Path:
    """Generic visual instruction data on UNMARKED media: PNGs under `root` and `root/generic.json`
    (`labels`: also that many label canvases with their reading questions)."""
    recs = []
    for k in range(images):
        rng = np.random.default_rng([seed, k, 21])
        scene, frames = sample_scene(rng, W.BASE_DIFFICULTY)
        rel = f"images/{k:06d}.png"
        _save(root / rel, frames[0][0])
        recs.append({"id": f"gen-img-{k}", "image": rel,
                     "conversations": qa_conversation(generic_image_questions(scene), rng, "image", turns)})
    for k in range(videos):
        rng = np.random.default_rng([seed, k, 22])
        scene, frames = sample_scene(rng, W.BASE_VIDEO_DIFFICULTY, num_frames=W.FRAMES)
        rel = f"videos/{k:06d}"
        _save_frames(root / rel, frames)
        recs.append({"id": f"gen-vid-{k}", "video": rel,
                     "conversations": qa_conversation(generic_video_questions(scene), rng, "video", turns)})
    for k in range(digits):
        rng = np.random.default_rng([seed, k, 23])
        img, placed = digit_canvas(rng)
        rel = f"digits/{k:06d}.png"
        _save(root / rel, img)
        recs.append({"id": f"gen-dig-{k}", "image": rel,
                     "conversations": qa_conversation(digit_questions(placed), rng, "image", 3)})
    for k in range(labels):
        rng = np.random.default_rng([seed, k, 24])
        img, placed = label_canvas(rng)
        rel = f"labels/{k:06d}.png"
        _save(root / rel, img)
        recs.append({"id": f"gen-lab-{k}", "image": rel,
                     "conversations": qa_conversation(digit_questions(placed), rng, "image", 4)})
    out = root / "generic.json"
    out.write_text(json.dumps(recs))
    return out


CAPTION_PROMPTS = {"image": ("Describe the image briefly.", "What does this image show?", "Write a short caption."),
                   "video": ("Describe the video briefly.", "What happens in this video?")}


def write_caption_set(root: Path, seed: int, *, images: int, videos: int) -> Path:
    """Projector-alignment captions of UNMARKED media (instances in reading order, no IDs)."""
    recs = []
    for k in range(images):
        rng = np.random.default_rng([seed, k, 31])
        scene, frames = sample_scene(rng, W.BASE_DIFFICULTY)
        rel = f"images/{k:06d}.png"
        _save(root / rel, frames[0][0])
        prompt = CAPTION_PROMPTS["image"][int(rng.integers(3))]
        recs.append({"id": f"cap-img-{k}", "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": plain_caption(scene, 0)}]})
    for k in range(videos):
        rng = np.random.default_rng([seed, k, 32])
        scene, frames = sample_scene(rng, W.BASE_VIDEO_DIFFICULTY, num_frames=W.FRAMES)
        rel = f"videos/{k:06d}"
        _save_frames(root / rel, frames)
        prompt = CAPTION_PROMPTS["video"][int(rng.integers(2))]
        recs.append({"id": f"cap-vid-{k}", "video": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": plain_video_caption(scene)}]})
    out = root / "captions.json"
    out.write_text(json.dumps(recs))
    return out


def text_reading_conversations(seed: int, count: int, turns: int = 8) -> list[dict]:
    """Text-only reading: a plain description of a scene, then questions about it (the LLM stage).

    The questions are the generic image ones, so the decoder learns the question forms, the option-to-
    letter lookup and which words answer what, before it ever sees an image.
    """
    out = []
    for k in range(count):
        rng = np.random.default_rng([seed, k, 41])
        scene, _ = sample_scene(rng, W.BASE_DIFFICULTY)
        context = "Description: " + plain_caption(scene, 0)
        out.append({"id": f"read-{k}", "conversations": qa_conversation(
            generic_image_questions(scene), rng, "text", turns, context=context)})
    return out


def reading_order_words(scene: Scene, t: int = 0) -> list[str]:
    """Shapes of frame t in reading order (for probes)."""
    return [tr.shape for tr in reading_order(_present(scene, t), t, scene.side)]


def generic_prompts():
    """The bench-layout prompt set of the generic instructions (for probing the base on generic benches)."""
    from eval.prompts import PromptSet

    t = {}
    for kind in ("image", "video"):
        t[f"{kind}_mc"] = {"pre_prompt": MC_PRE[kind], "post_prompt": MC_POST}
        t[f"{kind}_oe"] = {"pre_prompt": OE_PRE[kind][0], "post_prompt": OE_PRE[kind][1]}
    return PromptSet(t, source="demo base generic instructions")


def _bench_rows(qs: list[dict[str, Any]], rng: np.random.Generator, k: int, per_item: int, media: dict
                ) -> tuple[list[dict], list[dict]]:
    mc_rows, oe_rows = [], []
    usable = [q for q in qs if len(set(q["distractors"])) >= 3]
    for j, i in enumerate(sorted(rng.permutation(len(usable))[:per_item])):
        q = usable[int(i)]
        qid = f"{k + 1:03d}-{j + 1:02d}"
        opts, letter = shuffled_options(q, rng)
        mc_rows.append({"question_id": qid, "question": q["question"],
                        **{f"choice_{c}": o for c, o in zip("abcd", opts)}, "answer": letter, **media})
        oe_rows.append({"question_id": qid, "question": q["question"], "answer": q["answer"], **media})
    return mc_rows, oe_rows


def write_generic_bench(root: Path, seed: int, *, images: int, videos: int, digits: int, per_item: int = 3
                        ) -> Path:
    """A held-out bench (Inst-It Bench layout) of GENERIC questions on unmarked media: the base's probe."""
    tables: dict[str, list[dict]] = {c: [] for c in ("image_multi_choice", "image_open_ended",
                                                     "video_multi_choice", "video_open_ended")}
    for k in range(images + digits):
        rng = np.random.default_rng([seed, k, 51])
        if k < images:
            scene, frames = sample_scene(rng, W.BASE_DIFFICULTY)
            img, qs = frames[0][0], generic_image_questions(scene)
        else:
            img, placed = digit_canvas(rng)
            qs = digit_questions(placed)
        rel = f"images/{k + 1:03d}.png"
        _save(root / rel, img)
        mc, oe = _bench_rows(qs, rng, k, per_item, {"image": rel})
        tables["image_multi_choice"] += mc
        tables["image_open_ended"] += oe
    for k in range(videos):
        rng = np.random.default_rng([seed, k, 52])
        scene, frames = sample_scene(rng, W.BASE_VIDEO_DIFFICULTY, num_frames=W.FRAMES)
        rel = f"videos/{k + 1:03d}"
        _save_frames(root / rel, frames)
        mc, oe = _bench_rows(generic_video_questions(scene), rng, k, per_item, {"video_path": rel})
        tables["video_multi_choice"] += mc
        tables["video_open_ended"] += oe
    for name, rows in tables.items():
        (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return root
