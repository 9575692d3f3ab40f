"""Ground-truth text for synthetic scenes: Inst-IT-style captions, QA pairs, bench questions, OE judge.

Conventions (as Inst-IT): instances are written ``[3]``, frames ``<5>`` (1-based), intervals
``<5>-<7>``. The vocabulary is deliberately small (shapes, colours, sizes, textures, directions,
positions, small numbers) so a tiny tokenizer trained on this corpus covers it. Questions refer to
instances only by their mark (``[2]``) or ask for a mark, so they are answerable only from the marks.

``score_open_ended(record, prediction) -> float in [0, 1]`` is a rule-based judge: the key words
(IDs, frame stamps, vocabulary words, numbers) of the reference answer and of the prediction are
compared per category with a Jaccard ratio (so a wrong extra colour costs as much as a missing one),
rounded to 0.1 steps like the official GPT judge.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from data_gen.synthetic_scene import COLOURS, DIRECTIONS, SHAPES, SIZES, TEXTURES, Scene, Track

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
POSITIONS = ("top", "bottom", "middle", "left", "right", "center")
SYNONYMS = {"stationary": "still", "static": "still", "motionless": "still", "none": "0", "centre": "center",
            "grey": "gray", "big": "large", "little": "small",
            "stripes": "striped", "dots": "dotted", "circular": "circle", "triangular": "triangle"}


def position_words(x: float, y: float, side: int) -> str:
    """'top left', 'top center', 'middle left', 'center', ... for a point in a side x side image."""
    col = ("left", "center", "right")[min(2, max(0, int(3 * x / side)))]
    row = ("top", "middle", "bottom")[min(2, max(0, int(3 * y / side)))]
    if row == "middle" and col == "center":
        return "center"
    return f"{row} {col}"


def describe(tr: Track, t: int, side: int, *, where: bool = True) -> str:
    """'a small red striped star in the top left'."""
    tex = "" if tr.texture == "plain" else tr.texture + " "
    text = f"a {tr.size} {tr.colours[t]} {tex}{tr.shape}"
    if where:
        text += f" in the {position_words(tr.xs[t], tr.ys[t], side)}"
    return text


def _present(scene: Scene, t: int) -> list[Track]:
    return sorted((tr for tr in scene.tracks if tr.present[t]), key=lambda tr: tr.iid)


def instance_captions(scene: Scene, t: int) -> dict[str, str]:
    """{"3": "[3] is a small red star in the top left."} for instances visible at frame t."""
    out = {}
    for tr in _present(scene, t):
        cap = f"[{tr.iid}] is {describe(tr, t, scene.side)}."
        if scene.num_frames > 1 and tr.turns:
            cap += " It is turning."
        out[str(tr.iid)] = cap
    return out


def image_caption(scene: Scene, t: int) -> str:
    """Frame / image level caption listing the visible instances."""
    trs = _present(scene, t)
    if not trs:
        return "There are no shapes."
    n = len(trs)
    noun = "shape" if n == 1 else "shapes"
    parts = [f"[{tr.iid}] {describe(tr, t, scene.side, where=False)}" for tr in trs]
    return f"There {'is' if n == 1 else 'are'} {n} {noun}: " + ", ".join(parts) + "."


def reading_order(trs: list[Track], t: int, side: int) -> list[Track]:
    """Instances in reading order of frame t: rows of thirds top to bottom, then left to right."""
    return sorted(trs, key=lambda tr: (min(2, int(3 * tr.ys[t] / side)), tr.xs[t]))


def plain_caption(scene: Scene, t: int) -> str:
    """An unmarked caption of frame t: instances in reading order with their places, no IDs.

    What a caption of the raw image can say: the order follows what is visible (an ID order is
    invisible without marks), so every word is predictable from the pixels.
    """
    trs = reading_order(_present(scene, t), t, scene.side)
    if not trs:
        return "There are no shapes."
    n = len(trs)
    return (f"There {'is' if n == 1 else 'are'} {n} {'shape' if n == 1 else 'shapes'}: "
            + ", ".join(describe(tr, t, scene.side) for tr in trs) + ".")


def plain_video_caption(scene: Scene) -> str:
    """An unmarked video caption: instances in reading order of their first frame, with motion."""
    firsts = {tr.iid: tr.present.index(True) for tr in scene.tracks if any(tr.present)}
    trs = sorted((tr for tr in scene.tracks if tr.iid in firsts),
                 key=lambda tr: (firsts[tr.iid], min(2, int(3 * tr.ys[firsts[tr.iid]] / scene.side)),
                                 tr.xs[firsts[tr.iid]]))
    if not trs:
        return "The scene is empty."
    sents = []
    for tr in trs:
        a = firsts[tr.iid]
        act = f"moves {tr.direction}" if tr.direction != "still" else "stays still"
        extra = f", then turns {tr.colours[tr.recolour_at]}" if tr.recolour_at is not None else ""
        sents.append(f"{describe(tr, a, scene.side)} {act}{extra}")
    return "; ".join(sents) + "."


def temporal_change(scene: Scene, t: int) -> str | None:
    """Changes from frame t-1 to t (None at t = 0, as the official first frames)."""
    if t == 0:
        return None
    events = []
    for tr in sorted(scene.tracks, key=lambda tr: tr.iid):
        was, now = tr.present[t - 1], tr.present[t]
        if now and not was:
            events.append(f"[{tr.iid}] enters." if tr.enter == t else f"[{tr.iid}] appears again.")
        elif was and not now:
            events.append(f"[{tr.iid}] leaves." if tr.leave == t - 1 else f"[{tr.iid}] is hidden.")
        elif now:
            if tr.direction != "still":
                events.append(f"[{tr.iid}] moves {tr.direction}.")
            if tr.turns:
                events.append(f"[{tr.iid}] turns.")
            if tr.recolour_at == t:
                events.append(f"[{tr.iid}] changes from {tr.colours[t - 1]} to {tr.colours[t]}.")
    return " ".join(events) if events else "Nothing changes."


def _span(tr: Track) -> tuple[int, int]:
    first = tr.present.index(True)
    last = len(tr.present) - 1 - tr.present[::-1].index(True)
    return first, last


def video_caption(scene: Scene) -> str:
    """Video-level caption: one sentence per instance, with frame stamps and intervals."""
    sents = []
    for tr in sorted(scene.tracks, key=lambda tr: tr.iid):
        if not any(tr.present):
            continue
        a, b = _span(tr)
        s = f"[{tr.iid}] {describe(tr, a, scene.side, where=False)}"
        acts = []
        if tr.direction != "still":
            acts.append(f"moves {tr.direction} from <{a + 1}> to <{b + 1}>")
        else:
            acts.append(f"stays still during <{a + 1}>-<{b + 1}>")
        if tr.turns:
            acts.append("turns")
        if tr.enter is not None:
            acts.append(f"enters at <{tr.enter + 1}>")
        if tr.leave is not None:
            acts.append(f"leaves after <{tr.leave + 1}>")
        if tr.recolour_at is not None:
            acts.append(f"changes to {tr.colours[tr.recolour_at]} at <{tr.recolour_at + 1}>")
        sents.append(s + " " + ", ".join(acts[:-1]) + (" and " if len(acts) > 1 else "") + acts[-1] + ".")
    return " ".join(sents) if sents else "The scene is empty."


# --------------------------------------------------------------------------------------------- QA


def _ids_choices(answer: str, pool: list[str]) -> list[str]:
    return [c for c in pool if c != answer]


def image_questions(scene: Scene, t: int = 0) -> list[dict[str, Any]]:
    """Mark-grounded questions about one frame: {question, answer, distractors}."""
    trs = _present(scene, t)
    ids = [f"[{tr.iid}]" for tr in trs]
    id_pool = ids + [f"[{k}]" for k in range(1, 10) if f"[{k}]" not in ids]
    qs = []
    for tr in trs:
        ref = f"[{tr.iid}]"
        qs.append({"question": f"What shape is {ref}?", "answer": tr.shape,
                   "distractors": [s for s in SHAPES if s != tr.shape]})
        qs.append({"question": f"What colour is {ref}?", "answer": tr.colours[t],
                   "distractors": [c for c in COLOURS if c != tr.colours[t]]})
        qs.append({"question": f"What texture does {ref} have?", "answer": tr.texture,
                   "distractors": [x for x in TEXTURES if x != tr.texture] + ["checked"]})
        qs.append({"question": f"How big is {ref}?", "answer": tr.size,
                   "distractors": [x for x in SIZES if x != tr.size] + ["none of these"]})
        if sum(o.shape == tr.shape for o in trs) == 1:
            qs.append({"question": f"Which instance is a {tr.shape}?", "answer": ref,
                       "distractors": _ids_choices(ref, id_pool)})
        if sum(o.colours[t] == tr.colours[t] for o in trs) == 1:
            qs.append({"question": f"Which instance is {tr.colours[t]}?", "answer": ref,
                       "distractors": _ids_choices(ref, id_pool)})
    return qs


def video_questions(scene: Scene) -> list[dict[str, Any]]:
    """Mark- and time-grounded questions about a video: {question, answer, distractors}."""
    T = scene.num_frames
    trs = [tr for tr in sorted(scene.tracks, key=lambda tr: tr.iid) if any(tr.present)]
    ids = [f"[{tr.iid}]" for tr in trs]
    id_pool = ids + [f"[{k}]" for k in range(1, 10) if f"[{k}]" not in ids]
    stamps = [f"<{k}>" for k in range(1, T + 1)]
    qs = []
    for tr in trs:
        ref = f"[{tr.iid}]"
        a, b = _span(tr)
        qs.append({"question": f"What shape is {ref}?", "answer": tr.shape,
                   "distractors": [s for s in SHAPES if s != tr.shape]})
        t = int(a + (b - a) // 2)
        qs.append({"question": f"What colour is {ref} at <{t + 1}>?", "answer": tr.colours[t],
                   "distractors": [c for c in COLOURS if c != tr.colours[t]]})
        move = tr.direction if tr.direction != "still" else "still"
        qs.append({"question": f"Which way does {ref} move?", "answer": move,
                   "distractors": [d for d in (*DIRECTIONS, "still") if d != move]})
        if tr.enter is not None:
            qs.append({"question": f"When does {ref} enter?", "answer": f"<{tr.enter + 1}>",
                       "distractors": [s for s in stamps if s != f"<{tr.enter + 1}>"]})
        if tr.leave is not None:
            qs.append({"question": f"After which frame does {ref} leave?", "answer": f"<{tr.leave + 1}>",
                       "distractors": [s for s in stamps if s != f"<{tr.leave + 1}>"]})
        if tr.recolour_at is not None:
            c = tr.colours[tr.recolour_at]
            qs.append({"question": f"What colour does {ref} become?", "answer": c,
                       "distractors": [x for x in COLOURS if x not in (c, tr.colours[0])]})
        if sum(o.shape == tr.shape for o in trs) == 1:
            qs.append({"question": f"Which instance is a {tr.shape}?", "answer": ref,
                       "distractors": _ids_choices(ref, id_pool)})
    for d in DIRECTIONS:
        movers = [tr for tr in trs if tr.direction == d]
        if len(movers) == 1:
            tr = movers[0]
            a, b = _span(tr)
            if b > a:
                qs.append({"question": f"Which instance moves {d} between <{a + 1}> and <{b + 1}>?",
                           "answer": f"[{tr.iid}]", "distractors": _ids_choices(f"[{tr.iid}]", id_pool)})
    n_enter = sum(tr.enter is not None for tr in trs)
    qs.append({"question": "How many instances enter?", "answer": str(n_enter),
               "distractors": [str(k) for k in range(0, 6) if k != n_enter]})
    changers = [tr for tr in trs if tr.recolour_at is not None]
    if len(changers) == 1:
        ref = f"[{changers[0].iid}]"
        qs.append({"question": "Which instance changes colour?", "answer": ref,
                   "distractors": _ids_choices(ref, id_pool)})
    return qs


def to_multi_choice(q: dict[str, Any], rng: np.random.Generator) -> dict[str, str]:
    """Four shuffled choices from the answer + 3 distractors; returns choice_a..d and the letter."""
    ds = list(q["distractors"])
    pick = [ds[i] for i in rng.permutation(len(ds))[:3]]
    opts = [q["answer"], *pick]
    order = rng.permutation(4)
    opts = [opts[i] for i in order]
    rec = {f"choice_{k}": o for k, o in zip("abcd", opts)}
    rec["answer"] = "ABCD"[int(np.flatnonzero(order == 0)[0])]
    return rec


# ---------------------------------------------------------------------------------------- judging

_VOCAB: dict[str, set[str]] = {
    "shape": set(SHAPES), "colour": set(COLOURS), "size": set(SIZES) | {"tiny"},
    "texture": set(TEXTURES) | {"checked"}, "direction": set(DIRECTIONS) | {"still"},
    "position": set(POSITIONS),
}
_TOKEN = re.compile(r"\[\s*\d+\s*\]|<\s*\d+\s*>|[a-z]+|\d+")


def key_terms(text: str) -> dict[str, set[str]]:
    """Key terms by category: 'id' ([3]), 'time' (<5>), 'number', and the vocabulary categories."""
    out: dict[str, set[str]] = {}
    for tok in _TOKEN.findall(str(text).lower()):
        tok = tok.replace(" ", "")
        tok = SYNONYMS.get(tok, tok)
        if tok.startswith("["):
            cat = "id"
        elif tok.startswith("<"):
            cat = "time"
        elif tok.isdigit() or tok in NUMBER_WORDS:
            tok, cat = NUMBER_WORDS.get(tok, tok), "number"
        else:
            cat = next((c for c, words in _VOCAB.items() if tok in words), "")
            if tok == "color":
                continue
        if cat:
            out.setdefault(cat, set()).add(tok)
    return out


def score_open_ended(question_record: Any, prediction: str) -> float:
    """Rule-based OE score in [0, 1] (0.1 steps): per-category Jaccard of key terms, averaged.

    ``question_record`` is a dict (or object) with an ``answer`` field (the reference text).
    Falls back to normalised exact match when the reference has no key terms.
    """
    answer = question_record["answer"] if isinstance(question_record, dict) else question_record.answer
    ref, pred = key_terms(answer), key_terms(prediction or "")
    if not ref:
        norm = lambda s: " ".join(re.findall(r"[a-z0-9]+", str(s).lower()))
        return 1.0 if norm(answer) == norm(prediction) else 0.0
    scores = []
    for cat, want in ref.items():
        got = pred.get(cat, set())
        scores.append(len(want & got) / len(want | got))
    return round(float(np.mean(scores)) * 10) / 10
