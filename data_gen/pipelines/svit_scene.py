"""SVIT input: a Visual Genome-style scene (captions, objects with boxes, regions) and its prompt text.

Accepted object forms: `{"name": "dog", "bbox": [x1, y1, x2, y2]}` with coordinates already in
[0, 1], or Visual Genome raw `{"names": ["dog"], "x": 10, "y": 20, "w": 50, "h": 40}` (pixels; `w`/`h`
or `width`/`height`). Regions: `{"phrase": ..., "bbox": [...]}` or raw `{"phrase", "x", "y", "width",
"height"}`. Pixel boxes need the scene's `width` and `height`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from data_gen.confine import InputRejected
from data_gen.prompts import svit as SP


class InputError(InputRejected):
    """A manifest item or its files cannot be used; the message names the file, item and field."""


@dataclass
class SvitScene:
    image_id: str
    image: str | None
    captions: list[str]
    objects: list[tuple[str, list[float]]]
    regions: list[tuple[str, list[float]]]
    meta: dict = field(default_factory=dict)


def _norm_box(obj: dict[str, Any], width: float | None, height: float | None, where: str) -> list[float]:
    if "bbox" in obj:
        box = obj["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
            raise InputError(f"{where}: 'bbox' must be [x1, y1, x2, y2], got {box!r:.60}")
        if not all(0.0 <= v <= 1.0 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
            raise InputError(f"{where}: 'bbox' {box} must be normalised with x1 < x2, y1 < y2 in [0, 1]")
        return [round(float(v), 3) for v in box]
    w = obj.get("w", obj.get("width"))
    h = obj.get("h", obj.get("height"))
    if any(v is None for v in (obj.get("x"), obj.get("y"), w, h)):
        raise InputError(f"{where}: needs 'bbox' or Visual Genome 'x', 'y', 'w'/'width', 'h'/'height'")
    if not width or not height:
        raise InputError(f"{where}: pixel boxes need the scene's 'width' and 'height'")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in (obj["x"], obj["y"], w, h, width, height)) or width <= 0 or height <= 0:
        raise InputError(f"{where}: 'x', 'y', 'w', 'h' and the scene's 'width' / 'height' must be finite numbers "
                         "(width and height positive)")
    x1, y1 = max(0.0, obj["x"] / width), max(0.0, obj["y"] / height)
    x2, y2 = min(1.0, (obj["x"] + w) / width), min(1.0, (obj["y"] + h) / height)
    if x1 >= x2 or y1 >= y2:
        raise InputError(f"{where}: empty box after clipping to the image ({obj!r:.80})")
    return [round(x1, 3), round(y1, 3), round(x2, 3), round(y2, 3)]


def scene_from_record(rec: dict[str, Any], where: str) -> SvitScene:
    """Build a scene from a manifest line / VG JSON object; raises InputError naming the field."""
    image_id = rec.get("image_id")
    if image_id is None:
        raise InputError(f"{where}: missing 'image_id'")
    width, height = rec.get("width"), rec.get("height")
    captions = rec.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise InputError(f"{where}: 'captions' must be a list of strings")
    objects = []
    for key in ("objects", "regions"):
        if not isinstance(rec.get(key, []), list):
            raise InputError(f"{where}: '{key}' must be a list of objects")
    for k, obj in enumerate(rec.get("objects", [])):
        w = f"{where}, objects[{k}]"
        if not isinstance(obj, dict):
            raise InputError(f"{w}: expected an object, got {type(obj).__name__}")
        names = obj.get("names") or ([obj["name"]] if "name" in obj else [])
        if not isinstance(names, list):
            raise InputError(f"{w}: 'names' must be a list of strings")
        if not names or not isinstance(names[0], str):
            raise InputError(f"{w}: needs 'name' or 'names'")
        objects.append((names[0], _norm_box(obj, width, height, w)))
    regions = []
    for k, reg in enumerate(rec.get("regions", [])):
        w = f"{where}, regions[{k}]"
        if not isinstance(reg, dict) or not isinstance(reg.get("phrase"), str):
            raise InputError(f"{w}: needs a 'phrase' string")
        regions.append((reg["phrase"].strip(), _norm_box(reg, width, height, w)))
    if not captions and not objects and not regions:
        raise InputError(f"{where}: no captions, objects or regions to describe")
    extra = {k: v for k, v in rec.items() if k not in ("captions", "objects", "regions")}
    return SvitScene(str(image_id), rec.get("image"), captions, objects, regions, extra)


def _fmt_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def scene_text(scene: SvitScene) -> str:
    """The scene as the prompt shows it."""
    return SP.SCENE.format(
        captions="\n".join(f"- {c}" for c in scene.captions) or "(none)",
        objects="\n".join(f"- {n}: {_fmt_box(b)}" for n, b in scene.objects) or "(none)",
        regions="\n".join(f"- {p}: {_fmt_box(b)}" for p, b in scene.regions) or "(none)")
