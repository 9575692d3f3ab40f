"""instit-som: draw Set-of-Marks on an image or a folder of frames from a masks JSON; writes marked PNGs.

Masks JSON: ``{"<frame file name>": {"<id>": RLE | polygon | box, ...}, ...}`` (COCO RLE with string
or list counts, COCO polygon rings, or ``[x1, y1, x2, y2]``); for a single image a bare
``{"<id>": spec}`` mapping is accepted too. Frames without an entry are copied unmarked (and listed).

    instit-som frames_dir/ --masks masks.json --out marked/ [--style video] [--seed 3]
    instit-som photo.jpg --masks masks.json --out marked/
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_gen.masks import MaskFormatError
from data_gen.som import LABEL_BOXES, STYLES, render_marks

FRAME_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _is_spec(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, dict) and (
        {"size", "counts"} <= set(v) or bool({"polygon", "segmentation", "box", "bbox_xyxy"} & set(v))))


def load_masks(path: Path, frame_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Read the masks JSON into ``{frame name: {id: spec}}`` (a bare ``{id: spec}`` for one frame)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected an object mapping frame names to {{id: mask}}")
    if len(frame_names) == 1 and data and all(_is_spec(v) for v in data.values()):
        return {frame_names[0]: data}
    for k, v in data.items():
        if not isinstance(v, dict):
            raise SystemExit(f"{path}: entry {k!r} must be an object {{id: mask}}, got {type(v).__name__}")
    return data


def mark_files(inputs: Sequence[Path], masks: dict[str, dict[str, Any]], out_dir: Path, *, style: str,
               alpha: float, seed: int | None, masks_path: Path, label_box: str = "plain"
               ) -> tuple[list[Path], list[str]]:
    """Render every input frame into ``out_dir/<stem>.png``; returns (written, frames without masks)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, unmarked = [], []
    for p in inputs:
        img = np.asarray(Image.open(p).convert("RGB"))
        entry = masks.get(p.name, masks.get(p.stem))
        if entry is None:
            unmarked.append(p.name)
            out = img
        else:
            try:
                out = render_marks(img, list(entry.items()), style, alpha=alpha, seed=seed, label_box=label_box)
            except (MaskFormatError, ValueError) as e:
                raise SystemExit(f"{masks_path}: frame {p.name!r}: {e}") from None
        dst = out_dir / (p.stem + ".png")
        Image.fromarray(out).save(dst)
        written.append(dst)
    return written, unmarked


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``instit-som``."""
    ap = argparse.ArgumentParser(prog="instit-som", description=__doc__.splitlines()[0])
    ap.add_argument("input", type=Path, help="an image file or a folder of frames (sorted by name)")
    ap.add_argument("--masks", type=Path, required=True, help="masks JSON: {frame name: {id: RLE|polygon|box}}")
    ap.add_argument("--out", type=Path, required=True, help="output folder for marked PNGs")
    ap.add_argument("--style", choices=STYLES, default=None,
                    help="'image' (white on dark) or 'video' (dark on light); default: video for folders")
    ap.add_argument("--alpha", type=float, default=0.1, help="fill opacity")
    ap.add_argument("--seed", type=int, default=None, help="randomise the mark style reproducibly")
    ap.add_argument("--label-box", choices=LABEL_BOXES, default="plain",
                    help="'plain': the style's dark/light label box; 'id': the box in the ID's colour")
    args = ap.parse_args(argv)
    if args.input.is_dir():
        inputs = sorted(p for p in args.input.iterdir() if p.suffix.lower() in FRAME_EXTS)
        style = args.style or "video"
    elif args.input.is_file():
        inputs, style = [args.input], args.style or "image"
    else:
        raise SystemExit(f"{args.input}: no such image or folder")
    if not inputs:
        raise SystemExit(f"{args.input}: no frames ({', '.join(FRAME_EXTS)})")
    if not args.masks.is_file():
        raise SystemExit(f"{args.masks}: masks JSON not found")
    masks = load_masks(args.masks, [p.name for p in inputs])
    written, unmarked = mark_files(inputs, masks, args.out, style=style, alpha=args.alpha, seed=args.seed,
                                   masks_path=args.masks, label_box=args.label_box)
    print(f"instit-som: wrote {len(written)} marked frame(s) to {args.out}")
    if unmarked:
        print(f"instit-som: {len(unmarked)} frame(s) had no masks and were copied unmarked: "
              + ", ".join(unmarked[:10]) + (" ..." if len(unmarked) > 10 else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
