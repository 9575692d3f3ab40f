"""Answer schemas (what the model returns) and reference checks for `[ID]`, `<t>` and SVIT boxes."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from data_gen.confine import ascii_digits

ID_REF = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
TIME_REF = re.compile(r"<(\d+)>(?:\s*-\s*<(\d+)>)?")
BOX_REF = re.compile(r"<st>(.*?)<ed>\s*\[([^\]]*)\]")


# ----------------------------------------------------------------------------- model answers
class InstanceCaption(BaseModel):
    id: str = Field(description="the instance ID as drawn, e.g. '3'")
    caption: str


class FrameAnswer(BaseModel):
    instances: list[InstanceCaption]
    image_caption: str
    temporal_change: str


class VideoDescriptionAnswer(BaseModel):
    description: str


class QA(BaseModel):
    question: str
    answer: str


class VideoQAAnswer(BaseModel):
    pairs: list[QA] = Field(min_length=1)


class ImageAnswer(BaseModel):
    instances: list[InstanceCaption]
    image_caption: str


class Conversation(BaseModel):
    turns: list[QA] = Field(min_length=5, max_length=5)


class SvitConversationAnswer(BaseModel):
    conversations: list[Conversation] = Field(min_length=3, max_length=3)


class SvitComplexAnswer(BaseModel):
    pairs: list[QA] = Field(min_length=15, max_length=15)


class SvitReferringAnswer(BaseModel):
    pairs: list[QA] = Field(min_length=10, max_length=10)


class SvitDetailAnswer(BaseModel):
    description: str


# ----------------------------------------------------------------------------- pipeline values
@dataclass
class FrameCaptions:
    """What an annotator writes for one video frame (`temporal_change` None on frame 1); the pipeline adds
    the timestamp and frame name when it writes the official record (`instit_jax.data.schema.FrameAnnotation`)."""

    instance_level: dict[str, str]
    image_level: str
    temporal_change: str | None


@dataclass
class ImageAnnotationResult:
    instance_level: dict[str, str]
    image_level: str


@dataclass
class VideoContext:
    """What an annotator knows about a video: its ID, instance IDs, frame names, and manifest extras."""

    video_id: str
    instance_ids: list[str]
    frame_names: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)


@dataclass
class ImageContext:
    image_id: str
    instance_ids: list[str]
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- reference checks
def id_refs(text: str) -> list[str]:
    """All instance IDs referenced as [3] or [1, 2] in `text`."""
    return [i.strip() for m in ID_REF.finditer(text) for i in m.group(1).split(",")]


def check_refs(texts: list[str], ids: set[str], num_frames: int | None = None) -> None:
    """Raise ValueError naming the first unknown [ID] or out-of-range <t> / <t1>-<t2>."""
    for text in texts:
        for ref in id_refs(text):
            if ref not in ids:
                raise ValueError(f"instance [{ref}] does not exist (valid IDs: {', '.join(sorted(ids, key=_num))})")
        if num_frames is None:
            continue
        for m in TIME_REF.finditer(text):
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) else a
            if not (1 <= a <= num_frames and 1 <= b <= num_frames and a <= b):
                raise ValueError(f"time reference {m.group(0)} is outside <1>-<{num_frames}>")


def check_instance_keys(keys: list[str], ids: set[str]) -> None:
    """Keys may be '3' or the quirk '1,2'; each ID must exist."""
    for key in keys:
        for part in key.split(","):
            if part.strip() not in ids:
                raise ValueError(f"caption for unknown instance '{key}' (valid IDs: {', '.join(sorted(ids, key=_num))})")


def parse_boxes(text: str) -> list[tuple[str, list[float]]]:
    """`<st>name<ed>[x1, y1, x2, y2]` references; ValueError if a box is malformed or not in [0, 1]."""
    out = []
    for m in BOX_REF.finditer(text):
        name = m.group(1).strip()
        try:
            coords = [float(v) for v in m.group(2).split(",")]
        except ValueError as err:
            raise ValueError(f"box of <st>{name}<ed> is not four numbers: [{m.group(2)}]") from err
        if len(coords) != 4:
            raise ValueError(f"box of <st>{name}<ed> has {len(coords)} numbers, expected 4")
        x1, y1, x2, y2 = coords
        if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
            raise ValueError(f"box of <st>{name}<ed> {coords} must satisfy 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1")
        if not name:
            raise ValueError("empty object name in <st><ed>")
        out.append((name, coords))
    return out


def _num(s: str) -> tuple[int, str]:
    return (int(s), s) if ascii_digits(s) else (1 << 30, s)
