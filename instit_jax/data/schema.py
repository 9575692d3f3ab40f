"""Loading, validating and writing Inst-IT image/video JSON, LLaVA instruction JSON and SVIT output.

Records keep their source key order (and any extra keys), so ``dump_json(load_*(f))`` reproduces the
file byte for byte when written with the same formatting (``indent``/``ensure_ascii``).
Errors name the file, the record index (and id when known) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from data_gen.confine import (
    MAX_JSON_BYTES,
    MAX_LINE_BYTES,
    InputRejected,
    ResourceLimitError,
    ascii_digits,
    check_file_size,
)


class SchemaError(InputRejected):
    """A record does not match the expected schema; the message says file, record and field."""


def _where(source: str, index: int, rid: Any = None) -> str:
    return f"{source}: record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _get(rec: dict, key: str, types: tuple, where: str, *, nullable: bool = False) -> Any:
    if not isinstance(rec, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise SchemaError(f"{where}: missing field {key!r}")
    val = rec[key]
    if val is None and nullable:
        return None
    if not isinstance(val, types) or isinstance(val, bool) and bool not in types:
        names = "/".join(t.__name__ for t in types)
        raise SchemaError(f"{where}: field {key!r} must be {names}, got {type(val).__name__}: {val!r:.80}")
    return val


def _instance_captions(val: Any, field: str, where: str) -> dict[str, str]:
    if not isinstance(val, dict):
        raise SchemaError(f"{where}: field {field!r} must be an object of id -> caption")
    for k, v in val.items():
        ids = k.split(",")  # keys like "1,2" name several instances (a quirk of the released data)
        if not all(ascii_digits(i.strip()) for i in ids):
            raise SchemaError(f"{where}: field {field!r} has key {k!r}; expected ids like '3' or '1,2'")
        if not isinstance(v, str):
            raise SchemaError(f"{where}: field {field!r}[{k!r}] must be a string, got {type(v).__name__}")
    return val


@dataclasses.dataclass
class ImageAnnotation:
    """One Inst-IT image record."""

    image_id: Any
    instance_level_caption: dict[str, str]
    image_level_caption: str
    image_path: str
    raw: dict = dataclasses.field(repr=False, default_factory=dict)  # the source object, key order kept

    kind = "image"

    @property
    def record_id(self) -> str:
        return str(self.image_id)


@dataclasses.dataclass
class FrameAnnotation:
    """One annotated frame of an Inst-IT video; ``timestamp`` is the frame reference used as ``<t>``."""

    timestamp: Any
    frame_name: str
    instance_level: dict[str, str]
    image_level: str
    temporal_change: str | None  # null on the first frame


@dataclasses.dataclass
class QAPair:
    question: str
    answer: str


@dataclasses.dataclass
class VideoAnnotation:
    """One Inst-IT video record."""

    video_id: Any
    frame_level_caption: list[FrameAnnotation]
    question_answer_pairs: list[QAPair]
    video_level_caption: str
    video_path: str
    raw: dict = dataclasses.field(repr=False, default_factory=dict)

    kind = "video"

    @property
    def record_id(self) -> str:
        return str(self.video_id)


@dataclasses.dataclass
class LlavaRecord:
    """One LLaVA-format instruction record (``conversations`` of from/value turns)."""

    id: str
    conversations: list[dict[str, str]]
    image: str | None = None
    video: str | None = None
    raw: dict = dataclasses.field(repr=False, default_factory=dict)

    kind = "llava"

    @property
    def record_id(self) -> str:
        return str(self.id)


def parse_image_record(rec: Any, where: str) -> ImageAnnotation:
    """Validates one image record (``where`` prefixes error messages)."""
    rid = rec.get("image_id") if isinstance(rec, dict) else None
    where = where + (f" (id {rid!r})" if rid is not None else "")
    image_id = _get(rec, "image_id", (int, str), where)
    inst = _instance_captions(_get(rec, "instance_level_caption", (dict,), where), "instance_level_caption", where)
    return ImageAnnotation(image_id, inst, _get(rec, "image_level_caption", (str,), where),
                           _get(rec, "image_path", (str,), where), rec)


def parse_video_record(rec: Any, where: str) -> VideoAnnotation:
    """Validates one video record (``where`` prefixes error messages)."""
    rid = rec.get("video_id") if isinstance(rec, dict) else None
    where = where + (f" (id {rid!r})" if rid is not None else "")
    video_id = _get(rec, "video_id", (int, str), where)
    frames = []
    for j, fr in enumerate(_get(rec, "frame_level_caption", (list,), where)):
        fw = f"{where}, frame_level_caption[{j}]"
        frames.append(FrameAnnotation(
            timestamp=_get(fr, "timestamp", (int, float, str), fw),
            frame_name=_get(fr, "frame_name", (str,), fw),
            instance_level=_instance_captions(_get(fr, "instance_level", (dict,), fw), "instance_level", fw),
            image_level=_get(fr, "image_level", (str,), fw),
            temporal_change=_get(fr, "temporal_change", (str,), fw, nullable=True)))
    qas = []
    for j, qa in enumerate(_get(rec, "question_answer_pairs", (list,), where)):
        qw = f"{where}, question_answer_pairs[{j}]"
        qas.append(QAPair(_get(qa, "question", (str,), qw), _get(qa, "answer", (str,), qw)))
    return VideoAnnotation(video_id, frames, qas, _get(rec, "video_level_caption", (str,), where),
                           _get(rec, "video_path", (str,), where), rec)


def parse_llava_record(rec: Any, where: str) -> LlavaRecord:
    """Validates one LLaVA-format record: from/value turns alternating human/gpt."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    where = where + (f" (id {rid!r})" if rid is not None else "")
    conv = _get(rec, "conversations", (list,), where)
    if not conv:
        raise SchemaError(f"{where}: field 'conversations' is empty")
    for j, turn in enumerate(conv):
        tw = f"{where}, conversations[{j}]"
        role = _get(turn, "from", (str,), tw)
        _get(turn, "value", (str,), tw)
        if role not in ("human", "gpt", "system"):
            raise SchemaError(f"{tw}: field 'from' must be 'human', 'gpt' or 'system', got {role!r}")
    image = _get(rec, "image", (str,), where) if "image" in rec else None
    video = _get(rec, "video", (str,), where) if "video" in rec else None
    return LlavaRecord(str(rec.get("id", "")), conv, image, video, rec)


def detect_kind(rec: Any) -> str:
    """Returns "video", "image", "llava" or "svit" (an item of our SVIT generator) from the record's keys."""
    if isinstance(rec, dict):
        if "frame_level_caption" in rec or "video_level_caption" in rec:
            return "video"
        if "image_level_caption" in rec or "instance_level_caption" in rec:
            return "image"
        if "conversations" in rec:
            return "llava"
        if "qa" in rec and "image_id" in rec:
            return "svit"
    return "unknown"


_PARSERS = {"image": parse_image_record, "video": parse_video_record, "llava": parse_llava_record,
            "svit": lambda rec, where: svit_to_llava(rec, where)}


def read_json_list(path: str | os.PathLike) -> list:
    """Reads a JSON array (or JSON Lines) file; SchemaError / ResourceLimitError naming the file (and line)."""
    path = os.fspath(path)
    check_file_size(path, MAX_JSON_BYTES, path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an integer of > 4300 digits
        data = []
        for n, ln in enumerate(text.splitlines(), 1):
            if not ln.strip():
                continue
            if len(ln) > MAX_LINE_BYTES:
                raise ResourceLimitError(f"{path}:{n}: a JSON line of {len(ln)} characters exceeds the limit "
                                         f"{MAX_LINE_BYTES}") from e
            try:
                data.append(json.loads(ln))
            except (ValueError, RecursionError):
                raise SchemaError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(data, list):
        raise SchemaError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def load_records(path: str | os.PathLike, kind: str | None = None) -> list:
    """Loads and validates every record of an Inst-IT image/video or LLaVA JSON file.

    ``kind`` ("image" | "video" | "llava" | "svit") is detected per record when not given; SVIT items
    come back as LlavaRecord.
    """
    data = read_json_list(path)
    out = []
    for i, rec in enumerate(data):
        k = kind or detect_kind(rec)
        if k not in _PARSERS:
            raise SchemaError(f"{_where(os.fspath(path), i)}: cannot tell the record kind (expected Inst-IT "
                              f"image/video keys or LLaVA 'conversations'); keys: {sorted(rec)[:8]}"
                              if isinstance(rec, dict) else f"{_where(os.fspath(path), i)}: not an object")
        out.append(_PARSERS[k](rec, _where(os.fspath(path), i)))
    return out


def load_image_annotations(path: str | os.PathLike) -> list[ImageAnnotation]:
    """Loads an Inst-IT image JSON (e.g. inst_it_dataset_image_51k.json)."""
    return load_records(path, "image")


def load_video_annotations(path: str | os.PathLike) -> list[VideoAnnotation]:
    """Loads an Inst-IT video JSON (e.g. inst_it_dataset_video_21k.json)."""
    return load_records(path, "video")


def load_llava_records(path: str | os.PathLike) -> list[LlavaRecord]:
    """Loads a LLaVA-format instruction JSON."""
    return load_records(path, "llava")


def svit_to_llava(rec: dict, where: str = "svit") -> LlavaRecord:
    """Converts one SVIT output item to LLaVA format.

    Accepts items that already hold ``conversations`` (SVIT's released LLaVA format) or an item of our
    generator, ``{"id", "image_id", "image", "task", "qa": [{"question", "answer"}]}``.
    """
    if isinstance(rec, dict) and "conversations" in rec:
        out = dict(rec)
        if "id" not in out and "image_id" in out:
            out = {"id": str(out["image_id"]), **out}
        return parse_llava_record(out, where)
    qa = _get(rec, "qa", (list,), where)
    conv = []
    for j, item in enumerate(qa):
        qw = f"{where}, qa[{j}]"
        q, a = _get(item, "question", (str,), qw), _get(item, "answer", (str,), qw)
        conv += [{"from": "human", "value": ("<image>\n" + q) if j == 0 else q}, {"from": "gpt", "value": a}]
    image_id = _get(rec, "image_id", (int, str), where)
    out = {"id": str(rec.get("id", image_id)), "conversations": conv}
    if "image" in rec:
        out["image"] = rec["image"]
    return parse_llava_record(out, where)


def record_to_dict(rec: ImageAnnotation | VideoAnnotation | LlavaRecord) -> dict:
    """The JSON object of a record, in its source key order (new records: the official order)."""
    if rec.raw:
        return rec.raw
    if isinstance(rec, ImageAnnotation):
        return {"image_id": rec.image_id, "instance_level_caption": rec.instance_level_caption,
                "image_level_caption": rec.image_level_caption, "image_path": rec.image_path}
    if isinstance(rec, VideoAnnotation):
        return {"video_id": rec.video_id,
                "frame_level_caption": [
                    {"timestamp": f.timestamp, "frame_name": f.frame_name, "instance_level": f.instance_level,
                     "image_level": f.image_level, "temporal_change": f.temporal_change}
                    for f in rec.frame_level_caption],
                "question_answer_pairs": [{"question": q.question, "answer": q.answer}
                                          for q in rec.question_answer_pairs],
                "video_level_caption": rec.video_level_caption, "video_path": rec.video_path}
    out: dict = {"id": rec.id}
    if rec.image is not None:
        out["image"] = rec.image
    if rec.video is not None:
        out["video"] = rec.video
    out["conversations"] = rec.conversations
    return out


def dump_json(records: Sequence, path: str | os.PathLike, *, indent: int | None = 4,
              ensure_ascii: bool = False) -> None:
    """Writes records (dataclasses or dicts) as a JSON array, atomically (tmp file + rename)."""
    path = os.fspath(path)
    objs = [r if isinstance(r, dict) else record_to_dict(r) for r in records]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(objs, f, indent=indent, ensure_ascii=ensure_ascii)
    os.replace(tmp, path)
