"""Inst-IT annotations -> LLaVA-format training conversations, one switch per annotation level.

Levels (the paper's Table 5 ablation switches them): ``instance`` (per-instance captions), ``image``
(whole image / frame caption), ``temporal`` (change between consecutive annotated frames ``<t-1>`` and
``<t>``), ``video`` (video description), ``qa`` (open-ended QA pairs). Instruction wordings are drawn
from small paraphrase pools with a seeded RNG keyed by the record id, so a build is reproducible and
independent of record order.

Video frames: the model sees the annotated frames (``frame_name`` under ``video_path``) in timestamp
order, and ``<t>`` is the frame's ``timestamp``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Sequence

from instit_jax.data.schema import ImageAnnotation, LlavaRecord, VideoAnnotation

LEVELS = ("instance", "image", "temporal", "video", "qa")

INSTANCE_PROMPTS = (
    "Describe every marked instance in the image, referring to each by its numeric ID like [1].",
    "Give a short description of each object carrying a number mark. Use the format [ID]: description.",
    "For each numbered instance in this picture, say what it is and what it looks like.",
    "List the instances marked with IDs and describe each one.",
)
FRAME_INSTANCE_PROMPTS = (
    "Describe each marked instance visible in frame {t}, using its ID like [1].",
    "In frame {t}, what does every numbered instance look like and do?",
    "Go through the marked instances of frame {t} one by one and describe them.",
)
IMAGE_PROMPTS = (
    "Describe the whole image in detail, mentioning the marked instances by ID.",
    "What is happening in this scene? Refer to the instances by their marks.",
    "Write a detailed caption of the image, citing instance IDs such as [2].",
)
FRAME_IMAGE_PROMPTS = (
    "Describe the scene in frame {t}, referring to instances by ID.",
    "What is happening at {t}? Mention the marked instances.",
    "Give a detailed caption of frame {t}.",
)
TEMPORAL_PROMPTS = (
    "What changed between {prev} and {t}?",
    "Describe how the marked instances move or change from frame {prev} to frame {t}.",
    "Compare frame {prev} with frame {t}: what is different?",
)
VIDEO_PROMPTS = (
    "Describe the whole video, following the marked instances over time. Refer to times like <3>.",
    "Summarise what happens in this video, mentioning instance IDs and frame times.",
    "Give a detailed account of the video from start to end, citing [ID] and <t> references.",
)


def _rng(*key: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _sorted_ids(caps: dict[str, str]) -> list[str]:
    return sorted(caps, key=lambda k: [int(x) for x in k.split(",")])


def format_instance_captions(caps: dict[str, str]) -> str:
    """``{"1": "a dog", "2,3": "two cups"}`` -> ``"[1]: a dog\\n[2], [3]: two cups"``, sorted by id.

    A caption that already starts with its own ``[id]`` is kept as it is.
    """
    lines = []
    for k in _sorted_ids(caps):
        ids = ", ".join(f"[{i.strip()}]" for i in k.split(","))
        cap = caps[k].strip()
        first = f"[{k.split(',')[0].strip()}]"
        lines.append(cap if cap.startswith(first) else f"{ids}: {cap}")  # keep captions that already cite it
    return "\n".join(lines)


def _check_levels(levels: Iterable[str]) -> tuple[str, ...]:
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"unknown annotation level(s) {bad}; choose from {LEVELS}")
    return levels


def _to_llava(rid: str, turns: list[tuple[str, str]], media: dict) -> dict:
    conv = []
    for j, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, **media, "conversations": conv}


def _group(rid: str, per_level: list[tuple[str, list[tuple[str, str]]]], media: dict,
           group_by: str, seed: int) -> list[dict]:
    per_level = [(lv, t) for lv, t in per_level if t]
    if group_by == "level":
        return [_to_llava(f"{rid}/{lv}", t, media) for lv, t in per_level]
    if group_by != "record":
        raise ValueError(f"group_by must be 'record' or 'level', got {group_by!r}")
    turns = [turn for _, t in per_level for turn in t]
    return [_to_llava(rid, turns, media)] if turns else []


def image_conversations(rec: ImageAnnotation, *, levels: Sequence[str] = LEVELS, seed: int = 0,
                        group_by: str = "record") -> list[dict]:
    """LLaVA records (``id``, ``image``, ``conversations``) for one Inst-IT image annotation."""
    levels = _check_levels(levels)
    rng = _rng(seed, "image", rec.image_id)
    per_level = []
    if "instance" in levels and rec.instance_level_caption:
        per_level.append(("instance", [(rng.choice(INSTANCE_PROMPTS),
                                        format_instance_captions(rec.instance_level_caption))]))
    if "image" in levels and rec.image_level_caption.strip():
        per_level.append(("image", [(rng.choice(IMAGE_PROMPTS), rec.image_level_caption.strip())]))
    return _group(f"image_{rec.image_id}", per_level, {"image": rec.image_path}, group_by, seed)


def video_frames(rec: VideoAnnotation) -> list[str]:
    """Relative paths of the annotated frames in timestamp order (what the model sees)."""
    frames = sorted(rec.frame_level_caption, key=lambda f: _num(f.timestamp))
    return [os.path.join(rec.video_path, f.frame_name) for f in frames]


def _num(t: object) -> float:
    try:
        return float(str(t).strip().strip("<>"))
    except ValueError:
        return float("inf")


def frame_ref(timestamp: object) -> str:
    """The text reference of a frame: ``3`` / ``"3"`` / ``"<3>"`` -> ``"<3>"``."""
    t = str(timestamp).strip()
    return t if t.startswith("<") and t.endswith(">") else f"<{t}>"


def video_conversations(rec: VideoAnnotation, *, levels: Sequence[str] = LEVELS, seed: int = 0,
                        group_by: str = "record") -> list[dict]:
    """LLaVA records (``id``, ``video``, ``frames``, ``conversations``) for one Inst-IT video."""
    levels = _check_levels(levels)
    rng = _rng(seed, "video", rec.video_id)
    frames = sorted(rec.frame_level_caption, key=lambda f: _num(f.timestamp))
    inst, img, temp = [], [], []
    for j, fr in enumerate(frames):
        t = frame_ref(fr.timestamp)
        if fr.instance_level:
            inst.append((rng.choice(FRAME_INSTANCE_PROMPTS).format(t=t),
                         format_instance_captions(fr.instance_level)))
        if fr.image_level.strip():
            img.append((rng.choice(FRAME_IMAGE_PROMPTS).format(t=t), fr.image_level.strip()))
        if j > 0 and fr.temporal_change and fr.temporal_change.strip():
            prev = frame_ref(frames[j - 1].timestamp)
            temp.append((rng.choice(TEMPORAL_PROMPTS).format(prev=prev, t=t), fr.temporal_change.strip()))
    per_level = [("instance", inst if "instance" in levels else []),
                 ("image", img if "image" in levels else []),
                 ("temporal", temp if "temporal" in levels else [])]
    if "video" in levels and rec.video_level_caption.strip():
        per_level.append(("video", [(rng.choice(VIDEO_PROMPTS), rec.video_level_caption.strip())]))
    if "qa" in levels:
        per_level.append(("qa", [(qa.question.strip(), qa.answer.strip()) for qa in rec.question_answer_pairs
                                 if qa.question.strip() and qa.answer.strip()]))
    media = {"video": rec.video_path, "frames": video_frames(rec)}
    return _group(f"video_{rec.video_id}", per_level, media, group_by, seed)


def annotations_to_llava(records: Iterable[ImageAnnotation | VideoAnnotation | LlavaRecord], *,
                         levels: Sequence[str] = LEVELS, seed: int = 0, group_by: str = "record") -> list[dict]:
    """Converts a mix of Inst-IT image/video records (LLaVA records pass through) to LLaVA dicts."""
    out: list[dict] = []
    for rec in records:
        if isinstance(rec, ImageAnnotation):
            out += image_conversations(rec, levels=levels, seed=seed, group_by=group_by)
        elif isinstance(rec, VideoAnnotation):
            out += video_conversations(rec, levels=levels, seed=seed, group_by=group_by)
        elif isinstance(rec, LlavaRecord):
            d = dict(rec.raw) if rec.raw else {"id": rec.id, "conversations": rec.conversations}
            if not rec.raw and rec.image:
                d["image"] = rec.image
            out.append(d)
        else:
            raise TypeError(f"unsupported record type {type(rec).__name__}")
    return out
