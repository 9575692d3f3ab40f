"""Synthetic Inst-IT world: seeded shape images/videos with exact masks, official-schema annotations and
an Inst-It-Bench-layout bench. numpy + Pillow only (no jax), deterministic for a seed.

``generate_world(out_dir, ...)`` writes (paths relative to ``out_dir``)::

    images/raw/000001.png      images/marked/000001.png     images/masks.json  ({file: {id: RLE}})
    videos/raw/000001/001.png  videos/marked/000001/001.png videos/masks/000001.json ({frame: {id: RLE}})
    inst_it_image.json   [{image_id, instance_level_caption{id: caption}, image_level_caption, image_path}]
    inst_it_video.json   [{video_id, frame_level_caption[{timestamp, frame_name, instance_level,
                           image_level, temporal_change}], question_answer_pairs[{question, answer}],
                           video_level_caption, video_path}]
    scenes.json          ground-truth scene parameters (tracks) for debugging
    plain_captions.json  {raw media path: caption without IDs, instances in reading order}

``image_path`` / ``video_path`` point at the SoM-marked media (as the released dataset); swap
``marked`` for ``raw`` to get the unmarked twin. ``generate_bench(out_dir, ...)`` writes
``image_multi_choice.json``, ``image_open_ended.json``, ``video_multi_choice.json``,
``video_open_ended.json`` (records: ``question_id`` "001-01", ``question``, ``choice_a..d`` + letter
``answer`` (MC) or free-text ``answer`` (OE), ``image`` or ``video_path`` relative to ``out_dir``),
marked media under ``images/`` and ``videos/``, and the unmarked twin under ``raw/images``,
``raw/videos`` (same relative names: pass ``out_dir/raw`` as the media root for an unmarked run).

Small images (default 84 px) keep a tiny CPU model fast; ``data_gen.som`` switches to a crisp 3x5
pixel digit font below 11 px so the marks stay legible (5x7 px label box per digit).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_gen.masks import encode_rle
from data_gen.som import MarkStyle, random_style, render_marks
from data_gen.synthetic_scene import (
    DIFFICULTIES,
    Difficulty,
    Scene,
    finalize_visibility,
    make_scene,
    scene_to_dict,
)
from data_gen.synthetic_text import (
    image_caption,
    image_questions,
    instance_captions,
    plain_caption,
    plain_video_caption,
    temporal_change,
    to_multi_choice,
    video_caption,
    video_questions,
)

__all__ = ["generate_world", "generate_bench", "make_scene_set", "BENCH_CONFIGS"]

BENCH_CONFIGS = ("image_multi_choice", "image_open_ended", "video_multi_choice", "video_open_ended")


def _difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)} or a Difficulty, got {difficulty!r}")
    return DIFFICULTIES[difficulty]


def _save_png(path: Path, arr: np.ndarray) -> None:
    """Save an image (PNG lossless; JPEG at quality 95 when the suffix says so)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(arr).save(path, quality=95)
    else:
        Image.fromarray(arr).save(path, compress_level=6)


def make_scene_set(seed: int, count: int, *, side: int, num_frames: int, difficulty: str | Difficulty,
                   dynamic: bool) -> list[tuple[Scene, list[tuple[np.ndarray, dict[int, np.ndarray]]]]]:
    """``count`` scenes with rendered frames; scene k uses ``default_rng([seed, k])`` (order-free)."""
    d = _difficulty(difficulty)
    out = []
    for k in range(count):
        rng = np.random.default_rng([seed, k, 1 if dynamic else 0])
        for _ in range(20):  # resample scenes where nothing is visible on some frame
            scene = make_scene(rng, side=side, num_frames=num_frames, difficulty=d, dynamic=dynamic)
            frames = finalize_visibility(scene)
            if all(scene.visible):
                break
        out.append((scene, frames))
    return out


def mark_look(style: str, mark_seed: int | None, label_box: str = "plain", label_grid: int = 0,
              mask_marks: bool = True) -> MarkStyle:
    """The world's Set-of-Marks look: the default style, or `random_style(mark_seed)`, with these label
    settings; `mask_marks=False` keeps the numeric labels only (no mask tint, no contour)."""
    look = MarkStyle(style=style) if mark_seed is None else random_style(mark_seed, style)
    look = replace(look, label_box=label_box, label_grid=label_grid)
    return look if mask_marks else replace(look, alpha=0.0, contour_px=0)


def _marked(img: np.ndarray, masks: dict[int, np.ndarray], style: str, mark_seed: int | None,
            label_box: str = "plain", label_grid: int = 0, mask_marks: bool = True) -> np.ndarray:
    return render_marks(img, list(masks.items()), style,
                        mark_style=mark_look(style, mark_seed, label_box, label_grid, mask_marks))


def _write_video(root: Path, rel: str, frames, mark_seed: int | None, frame_ext: str, label_box: str = "plain",
                 label_grid: int = 0, mask_marks: bool = True) -> tuple[list[str], dict[str, dict[str, Any]]]:
    names, rles = [], {}
    for t, (img, masks) in enumerate(frames):
        name = f"{t + 1:03d}.{frame_ext}"
        names.append(name)
        _save_png(root / "raw" / rel / name, img)
        _save_png(root / "marked" / rel / name, _marked(img, masks, "video", mark_seed, label_box, label_grid,
                                                                 mask_marks))
        rles[name] = {str(k): encode_rle(m) for k, m in masks.items()}
    return names, rles


def generate_world(out_dir: str | Path, *, num_images: int = 16, num_videos: int = 8,
                   frames_per_video: int = 6, image_size: int = 84, seed: int = 0,
                   difficulty: str | Difficulty = "medium", augment_marks: bool = False, label_box: str = "plain",
                   label_grid: int = 0, mask_marks: bool = True,
                   frame_ext: str = "png") -> dict[str, str]:
    """Write a synthetic Inst-IT training world (see module docstring); returns {name: path}.

    Marks: `label_box` / `label_grid` as in `data_gen.som.render_marks`; `mask_marks=False` draws the numeric
    labels only (no mask tint or contour, which recolour small objects)."""
    if not 1 <= frames_per_video <= 64:
        raise ValueError(f"frames_per_video must be in [1, 64], got {frames_per_video}")
    if frame_ext not in ("png", "jpg"):
        raise ValueError(f"frame_ext must be 'png' or 'jpg', got {frame_ext!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    image_records, video_records, scenes = [], [], {"images": [], "videos": []}
    plain: dict[str, str] = {}  # unmarked media path -> caption without IDs (reading order)

    img_masks: dict[str, dict[str, Any]] = {}
    for k, (scene, frames) in enumerate(make_scene_set(seed, num_images, side=image_size, num_frames=1,
                                                       difficulty=difficulty, dynamic=False)):
        name = f"{k + 1:06d}.png"
        img, masks = frames[0]
        _save_png(root / "images" / "raw" / name, img)
        mark_seed = (seed * 1_000_003 + k) if augment_marks else None
        _save_png(root / "images" / "marked" / name, _marked(img, masks, "image", mark_seed, label_box, label_grid,
                                                                      mask_marks))
        img_masks[name] = {str(i): encode_rle(m) for i, m in masks.items()}
        image_records.append({
            "image_id": k + 1,
            "instance_level_caption": instance_captions(scene, 0),
            "image_level_caption": image_caption(scene, 0),
            "image_path": f"images/marked/{name}",
        })
        scenes["images"].append(scene_to_dict(scene))
        plain[f"images/raw/{name}"] = plain_caption(scene, 0)

    (root / "videos" / "masks").mkdir(parents=True, exist_ok=True)
    for k, (scene, frames) in enumerate(make_scene_set(seed, num_videos, side=image_size,
                                                       num_frames=frames_per_video, difficulty=difficulty,
                                                       dynamic=True)):
        vid = f"{k + 1:06d}"
        mark_seed = (seed * 1_000_003 + 500_000 + k) if augment_marks else None
        names, rles = _write_video(root / "videos", vid, frames, mark_seed, frame_ext, label_box, label_grid,
                                   mask_marks)
        (root / "videos" / "masks" / f"{vid}.json").write_text(json.dumps(rles))
        video_records.append({
            "video_id": k + 1,
            "frame_level_caption": [
                {"timestamp": f"<{t + 1}>", "frame_name": names[t], "instance_level": instance_captions(scene, t),
                 "image_level": image_caption(scene, t), "temporal_change": temporal_change(scene, t)}
                for t in range(scene.num_frames)],
            "question_answer_pairs": [{"question": q["question"], "answer": q["answer"]}
                                      for q in video_questions(scene)],
            "video_level_caption": video_caption(scene),
            "video_path": f"videos/marked/{vid}",
        })
        scenes["videos"].append(scene_to_dict(scene))
        plain[f"videos/raw/{vid}"] = plain_video_caption(scene)

    paths = {
        "root": str(root),
        "image_json": str(root / "inst_it_image.json"),
        "video_json": str(root / "inst_it_video.json"),
        "image_masks": str(root / "images" / "masks.json"),
        "video_masks_dir": str(root / "videos" / "masks"),
        "scenes": str(root / "scenes.json"),
        "plain_captions": str(root / "plain_captions.json"),
    }
    Path(paths["image_json"]).write_text(json.dumps(image_records, indent=1))
    Path(paths["video_json"]).write_text(json.dumps(video_records, indent=1))
    Path(paths["image_masks"]).write_text(json.dumps(img_masks))
    Path(paths["scenes"]).write_text(json.dumps(scenes))
    Path(paths["plain_captions"]).write_text(json.dumps(plain, indent=1))
    return paths


def generate_bench(out_dir: str | Path, *, num_images: int = 20, num_videos: int = 10,
                   frames_per_video: int = 6, image_size: int = 84, seed: int = 1_000,
                   difficulty: str | Difficulty = "medium", questions_per_item: int = 3,
                   label_box: str = "plain", label_grid: int = 0, mask_marks: bool = True) -> dict[str, str]:
    """Write a synthetic Inst-It Bench (four config JSON files + marked and raw media); returns paths.
    Marks as in `generate_world`.

    Use a different ``seed`` from the training world (scenes are keyed by seed). Every question is
    asked both as MC and OE (same ``question_id`` in the two configs).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[dict[str, Any]]] = {c: [] for c in BENCH_CONFIGS}

    for k, (scene, frames) in enumerate(make_scene_set(seed, num_images, side=image_size, num_frames=1,
                                                       difficulty=difficulty, dynamic=False)):
        name = f"{k + 1:03d}.png"
        img, masks = frames[0]
        _save_png(root / "raw" / "images" / name, img)
        _save_png(root / "images" / name, _marked(img, masks, "image", None, label_box, label_grid, mask_marks))
        rng = np.random.default_rng([seed, k, 7])
        qs = image_questions(scene, 0)
        for j, i in enumerate(sorted(rng.permutation(len(qs))[:questions_per_item])):
            q, qid = qs[int(i)], f"{k + 1:03d}-{j + 1:02d}"
            tables["image_open_ended"].append({"question_id": qid, "question": q["question"],
                                               "answer": q["answer"], "image": f"images/{name}"})
            tables["image_multi_choice"].append({"question_id": qid, "question": q["question"],
                                                 **to_multi_choice(q, rng), "image": f"images/{name}"})

    for k, (scene, frames) in enumerate(make_scene_set(seed, num_videos, side=image_size,
                                                       num_frames=frames_per_video, difficulty=difficulty,
                                                       dynamic=True)):
        vid = f"{k + 1:03d}"
        for t, (img, masks) in enumerate(frames):
            _save_png(root / "raw" / "videos" / vid / f"{t + 1:03d}.png", img)
            _save_png(root / "videos" / vid / f"{t + 1:03d}.png",
                      _marked(img, masks, "video", None, label_box, label_grid, mask_marks))
        rng = np.random.default_rng([seed, k, 8])
        qs = video_questions(scene)
        for j, i in enumerate(sorted(rng.permutation(len(qs))[:questions_per_item])):
            q, qid = qs[int(i)], f"{k + 1:03d}-{j + 1:02d}"
            tables["video_open_ended"].append({"question_id": qid, "question": q["question"],
                                               "answer": q["answer"], "video_path": f"videos/{vid}"})
            tables["video_multi_choice"].append({"question_id": qid, "question": q["question"],
                                                 **to_multi_choice(q, rng), "video_path": f"videos/{vid}"})

    paths = {"root": str(root), "raw_root": str(root / "raw")}
    for cfg, rows in tables.items():
        p = root / f"{cfg}.json"
        p.write_text(json.dumps(rows, indent=1))
        paths[cfg] = str(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m data_gen.synthetic world|bench OUT_DIR [options]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data_gen.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("world", "bench"))
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--num-videos", type=int, default=None)
    ap.add_argument("--frames", type=int, default=6, help="frames per video")
    ap.add_argument("--size", type=int, default=84, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="medium")
    ap.add_argument("--questions-per-item", type=int, default=3, help="bench only")
    a = ap.parse_args(argv)
    kw: dict[str, Any] = {"frames_per_video": a.frames, "image_size": a.size, "difficulty": a.difficulty}
    for k in ("num_images", "num_videos", "seed"):
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    if a.what == "world":
        paths = generate_world(a.out_dir, **kw)
    else:
        paths = generate_bench(a.out_dir, questions_per_item=a.questions_per_item, **kw)
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
