"""Inst-It Bench loaders: the official bench from a local directory, the synthetic bench, generic JSONL.

A bench directory holds one table per config (`image_multi_choice`, `image_open_ended`,
`video_multi_choice`, `video_open_ended`) as parquet (the Hugging Face download; needs pyarrow), JSON (a
list of records, or {"test": [...]}) or JSONL, found as `<dir>/<config>.<ext>`, `<dir>/<config>/*.<ext>`
or anywhere below `<dir>` with the config name in the path. Records carry `question_id`, `question`,
`choice_a..choice_d` (MC), `answer` (a letter for MC), and `image` (a path, or the parquet
{bytes, path} struct) or `video_path` (a folder of marked frames, relative to the video root).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_gen.confine import MAX_JSON_BYTES, InputRejected, check_file_size, confine
from data_gen.frames import uniform_frame_indices

CONFIGS: dict[str, tuple[str, str]] = {
    "image_open_ended": ("image", "oe"),
    "image_multi_choice": ("image", "mc"),
    "video_open_ended": ("video", "oe"),
    "video_multi_choice": ("video", "mc"),
}
TABLE_EXTS = (".parquet", ".jsonl", ".json")
FRAME_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")


class BenchError(InputRejected):
    """A bench file or record is missing or malformed."""


def config_name(split: str, fmt: str) -> str:
    """("image", "mc") -> "image_multi_choice"."""
    for name, pair in CONFIGS.items():
        if pair == (split, fmt):
            return name
    raise BenchError(f"no bench config for split={split!r} format={fmt!r}")


@dataclasses.dataclass(frozen=True)
class BenchItem:
    """One bench question; `image` is a file path or encoded bytes, `video_dir` a frame folder."""

    config: str
    question_id: str
    question: str
    answer: str
    choices: tuple[str, str, str, str] | None = None
    image: str | bytes | None = None
    video_dir: str | None = None

    @property
    def split(self) -> str:
        return CONFIGS[self.config][0]

    @property
    def fmt(self) -> str:
        return CONFIGS[self.config][1]


@dataclasses.dataclass
class Bench:
    """Questions per config, in file order."""

    name: str
    root: str
    items: dict[str, list[BenchItem]]

    def all_items(self) -> list[BenchItem]:
        return [it for cfg in CONFIGS if cfg in self.items for it in self.items[cfg]]

    def lookup(self) -> dict[tuple[str, str], BenchItem]:
        """(config, question_id) -> item."""
        return {(it.config, it.question_id): it for it in self.all_items()}

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())


# ----------------------------------------------------------------------------------------- reading


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BenchError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the "
                         "bench to JSON/JSONL") from e
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise BenchError(f"{path}: not a readable parquet table ({e})") from e


def read_records(path: str | Path) -> list[dict]:
    """Records of one table file (.parquet, .jsonl, or .json holding a list or {"test": list})."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    check_file_size(path, MAX_JSON_BYTES, str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except (ValueError, RecursionError) as e:  # JSONDecodeError, integers beyond 4300 digits
                    raise BenchError(f"{path}:{n}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except (ValueError, RecursionError) as e:  # integers beyond 4300 digits, nesting beyond the parser's depth
        raise BenchError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if isinstance(data, dict):
        for key in ("test", "data", "questions"):
            if isinstance(data.get(key), list):
                return data[key]
        raise BenchError(f"{path}: a JSON object must hold a list under 'test', 'data' or 'questions'")
    if not isinstance(data, list):
        raise BenchError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def find_config_files(root: Path, config: str) -> list[Path]:
    """Table files of one config below `root`, sorted (shards are concatenated in name order)."""
    direct = [root / f"{config}{ext}" for ext in TABLE_EXTS if (root / f"{config}{ext}").is_file()]
    if direct:
        return direct[:1]
    found = []
    for p in sorted(root.rglob("*")):
        if p.suffix not in TABLE_EXTS or not p.is_file():
            continue
        rel = p.relative_to(root)
        if config in rel.parts[:-1] or p.stem == config or p.stem.startswith(config + "-"):
            found.append(p)
    return found


# -------------------------------------------------------------------------------------- validation


def _field(rec: dict, key: str, where: str, *, required: bool = True) -> Any:
    if key not in rec or rec[key] is None:
        if required:
            raise BenchError(f"{where}: missing field {key!r}")
        return None
    return rec[key]


def _text(rec: dict, key: str, where: str) -> str:
    val = _field(rec, key, where)
    if not isinstance(val, str) or not val.strip():
        raise BenchError(f"{where}: field {key!r} must be a non-empty string, got {val!r:.60}")
    return val


def _find_under(rel: str, roots: Sequence[Path], where: str, field: str, allow_outside_root: bool,
                exists) -> Path | None:
    """The first existing ``root / rel``; UnsafePathError when it resolves (symlinks followed) outside every root."""
    where = f"{where}: field {field!r}"
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    cands = [(Path(root) / rel, confine(rel, root, where, allow_outside_root=True)) for root in roots]
    found = next(((plain, real) for plain, real in cands if exists(real)), None)
    if not allow_outside_root and real_roots:
        outside = [real for _, real in cands if not any(real.is_relative_to(r) for r in real_roots)]
        if os.path.isabs(rel) or (found and found[1] in outside) or len(outside) == len(cands):
            confine(rel, real_roots[0], where)  # raises, naming the escape
    return found[0] if found else None


def _resolve_video(video_path: str, roots: Sequence[Path], where: str, allow_outside_root: bool = False) -> str:
    found = _find_under(video_path, roots, where, "video_path", allow_outside_root, Path.is_dir)
    if found is not None:
        return str(found)
    tried = ", ".join(str(r) for r in roots)
    raise BenchError(f"{where}: video folder {video_path!r} not found under any of: {tried} "
                     "(unzip the bench's video archive there or pass media_root)")


def _resolve_image(val: Any, roots: Sequence[Path], where: str, allow_outside_root: bool = False) -> str | bytes:
    if isinstance(val, dict):  # the parquet / datasets Image struct
        raw = val.get("bytes")
        if raw:
            if not isinstance(raw, bytes | bytearray):
                raise BenchError(f"{where}: field 'image.bytes' must be bytes, got {type(raw).__name__}")
            return bytes(raw)
        val = val.get("path")
    if isinstance(val, str) and val:
        found = _find_under(val, roots, where, "image", allow_outside_root, Path.is_file)
        if found is not None:
            return str(found)
        raise BenchError(f"{where}: image file {val!r} not found under any of: "
                         + ", ".join(str(r) for r in roots))
    raise BenchError(f"{where}: field 'image' must be a path or a {{bytes, path}} struct, got {val!r:.60}")


def make_item(rec: dict, config: str, where: str, roots: Sequence[Path], *,
              allow_outside_root: bool = False) -> BenchItem:
    """Validate one raw record of `config` and turn it into a BenchItem (`where` names it in errors).

    Media paths must resolve (symlinks followed) under one of `roots` unless `allow_outside_root`.
    """
    if not isinstance(rec, dict):
        raise BenchError(f"{where}: expected an object, got {type(rec).__name__}")
    split, fmt = CONFIGS[config]
    qid = _field(rec, "question_id", where)
    if not isinstance(qid, str | int):
        raise BenchError(f"{where}: field 'question_id' must be a string, got {qid!r}")
    where = f"{where} (question_id={qid!r})"
    question = _text(rec, "question", where)
    answer = _field(rec, "answer", where)
    if not isinstance(answer, str):
        raise BenchError(f"{where}: field 'answer' must be a string, got {answer!r}")
    choices = None
    if fmt == "mc":
        choices = tuple(_text(rec, k, where) for k in CHOICE_KEYS)
        if answer.strip() not in ("A", "B", "C", "D"):
            raise BenchError(f"{where}: field 'answer' must be one of A, B, C, D for a multiple-choice "
                             f"question, got {answer!r}")
    image = video_dir = None
    if split == "image":
        raw = rec.get("image", rec.get("image_path"))
        if raw is None:
            raise BenchError(f"{where}: missing field 'image' (or 'image_path')")
        image = _resolve_image(raw, roots, where, allow_outside_root)
    else:
        vp = rec.get("video_path")
        if not isinstance(vp, str) or not vp:
            raise BenchError(f"{where}: field 'video_path' must be a folder name, got {vp!r}")
        video_dir = _resolve_video(vp, roots, where, allow_outside_root)
    return BenchItem(config, str(qid), question, answer, choices, image, video_dir)  # type: ignore[arg-type]


def _check_unique(items: list[BenchItem], where: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.question_id in seen:
            raise BenchError(f"{where}: duplicate question_id {it.question_id!r} in {it.config}")
        seen.add(it.question_id)


# ----------------------------------------------------------------------------------------- loaders


def load_bench(path: str | Path, *, configs: Iterable[str] | None = None,
               media_root: str | Path | None = None, limit: int | None = None,
               allow_outside_root: bool = False) -> Bench:
    """Load an official or synthetic bench directory, or a generic MC/OE JSONL file.

    Image and video paths must resolve under the bench folder or `media_root` (UnsafePathError
    otherwise) unless `allow_outside_root`.
    `configs` selects configs (default: every one found; a named one that is absent is an error);
    `limit` keeps the first N questions per config (for smoke runs).
    """
    path = Path(path)
    if path.is_file():
        return load_generic(path, media_root=media_root, configs=configs, limit=limit,
                            allow_outside_root=allow_outside_root)
    if not path.is_dir():
        raise BenchError(f"{path}: bench directory or file does not exist")
    wanted = list(configs) if configs is not None else list(CONFIGS)
    for cfg in wanted:
        if cfg not in CONFIGS:
            raise BenchError(f"unknown bench config {cfg!r}; choose from {list(CONFIGS)}")
    extra_roots = [Path(media_root)] if media_root else []
    items: dict[str, list[BenchItem]] = {}
    for cfg in wanted:
        files = find_config_files(path, cfg)
        if not files:
            if configs is not None:
                raise BenchError(f"{path}: no table for config {cfg!r} (expected {cfg}.parquet/.json/.jsonl "
                                 f"or a folder {cfg}/)")
            continue
        cfg_items: list[BenchItem] = []
        for f in files:
            roots = [*extra_roots, f.parent, path, path / "videos_vpt", path / "videos", path / "images"]
            for i, rec in enumerate(read_records(f)):
                cfg_items.append(make_item(rec, cfg, f"{f}: record {i}", roots,
                                           allow_outside_root=allow_outside_root))
        _check_unique(cfg_items, str(path))
        items[cfg] = cfg_items[:limit] if limit else cfg_items
    if not items:
        raise BenchError(f"{path}: no bench tables found (looked for {', '.join(CONFIGS)})")
    return Bench(path.name, str(path), items)


def load_generic(path: str | Path, *, media_root: str | Path | None = None,
                 configs: Iterable[str] | None = None, limit: int | None = None,
                 allow_outside_root: bool = False) -> Bench:
    """Generic JSONL/JSON of mixed questions: MC when `choice_a..d` are present, video when `video_path`.

    A record may also name its `config` explicitly.
    """
    path = Path(path)
    roots = [Path(media_root)] if media_root else []
    roots += [path.parent]
    wanted = set(configs) if configs is not None else set(CONFIGS)
    items: dict[str, list[BenchItem]] = {}
    for i, rec in enumerate(read_records(path)):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise BenchError(f"{where}: expected an object, got {type(rec).__name__}")
        cfg = rec.get("config") or config_name(
            "video" if "video_path" in rec else "image",
            "mc" if any(k in rec for k in CHOICE_KEYS) else "oe")
        if not isinstance(cfg, str) or cfg not in CONFIGS:
            raise BenchError(f"{where}: field 'config' must be one of {list(CONFIGS)}, got {cfg!r:.100}")
        if cfg in wanted:
            items.setdefault(cfg, []).append(make_item(rec, cfg, where, roots,
                                                       allow_outside_root=allow_outside_root))
    for cfg, lst in items.items():
        _check_unique(lst, str(path))
        if limit:
            items[cfg] = lst[:limit]
    if not items:
        raise BenchError(f"{path}: no questions for configs {sorted(wanted)}")
    return Bench(path.stem, str(path.parent), items)


# ------------------------------------------------------------------------------------------ media


def list_frames(video_dir: str | Path, max_frames: int | None = None) -> list[Path]:
    """Frame files of a folder sorted by name (plain string order, as the reference); all unless capped.

    A cap keeps `max_frames` frames (`data_gen.frames.uniform_frame_indices`: uniform, first and last kept).
    """
    video_dir = Path(video_dir)
    frames = sorted((p for p in video_dir.iterdir() if p.suffix.lower() in FRAME_EXTS), key=lambda p: p.name)
    if not frames:
        raise BenchError(f"{video_dir}: no frames ({', '.join(FRAME_EXTS)}) in the video folder")
    if max_frames and len(frames) > max_frames:
        frames = [frames[i] for i in uniform_frame_indices(len(frames), max_frames)]
    return frames


def load_image(item: BenchItem) -> Image.Image:
    """The item's (marked) image as RGB."""
    if item.image is None:
        raise BenchError(f"{item.config} {item.question_id}: no image")
    src = io.BytesIO(item.image) if isinstance(item.image, bytes) else item.image
    with Image.open(src) as im:
        return im.convert("RGB")


def load_video(item: BenchItem, max_frames: int | None = None) -> list[Image.Image]:
    """The item's frames as RGB images, in name order."""
    if item.video_dir is None:
        raise BenchError(f"{item.config} {item.question_id}: no video_path")
    out = []
    for p in list_frames(item.video_dir, max_frames):
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out
