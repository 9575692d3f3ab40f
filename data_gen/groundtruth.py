"""Ground-truth annotator of the synthetic world, run through the same pipelines as GPT-4o.

``GroundTruthAnnotator`` implements ``data_gen.pipelines.annotator.Annotator`` from the world's scene
state (``scenes.json``), with the very text functions ``generate_world`` uses, so the pipeline output
equals the world's own ``inst_it_image.json`` / ``inst_it_video.json`` (except the video
``timestamp``, which the pipeline writes as an int ``1`` where the world writes ``"<1>"``).

``world_manifest(world_dir, kind)`` writes a manifest (format of ``data_gen.manifest``) of the RAW
media plus masks, so the pipeline draws its own Set-of-Marks with ``data_gen.som``; each line's
``image_path`` / ``video_path`` names the world's marked media, so output media paths are relative to
``world_dir`` (exactly as in the world's own JSON; pass ``world_dir`` as the media root).

``annotate_world(world_dir, out_dir)`` runs ``run_pipeline`` for images and videos and writes
``OUT/inst_it_dataset_image.json`` and ``OUT/inst_it_dataset_video.json``; each kind's journal,
errors and summary live in ``OUT/image/`` and ``OUT/video/`` (a rerun resumes: finished items are
not redone). Any other annotator runs the same way, e.g. a local OpenAI-compatible server::

    client = ChatClient("http://127.0.0.1:8000/v1", "gpt-4o-2024-08-06", cache_path="cache.sqlite")
    annotate_world(world, out, annotator=OpenAIAnnotator(client), client=client)  # closes `client`

(inside a running event loop use ``await annotate_world_async(...)`` and close the client yourself).
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_gen.client.chat import AnnotationError, ChatClient
from data_gen.manifest import read_manifest
from data_gen.pipelines import schemas as S
from data_gen.pipelines.runner import OUTPUT_NAMES, RunSummary, run_pipeline, write_json_atomic
from data_gen.pipelines.svit_scene import InputError, SvitScene
from data_gen.synthetic_scene import Scene, Track
from data_gen.synthetic_text import (
    image_caption,
    instance_captions,
    temporal_change,
    video_caption,
    video_questions,
)

__all__ = ["GroundTruthAnnotator", "scene_from_dict", "load_world_scenes", "world_manifest",
           "annotate_world", "annotate_world_async"]

WORLD_KINDS = ("image", "video")


def scene_from_dict(d: dict[str, Any], where: str = "scene") -> Scene:
    """Inverse of ``synthetic_scene.scene_to_dict`` (tracks as saved after visibility was finalised)."""
    try:
        tracks = [Track(**t) for t in d["tracks"]]
        return Scene(side=int(d["side"]), num_frames=int(d["num_frames"]), background=tuple(d["background"]),
                     tracks=tracks)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{where}: not a synthetic scene ({type(err).__name__}: {err})") from err


def load_world_scenes(world_dir: str | Path) -> dict[str, list[Scene]]:
    """{"images": [...], "videos": [...]} from ``world_dir/scenes.json``; scene k has item id k + 1."""
    path = Path(world_dir) / "scenes.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (is {world_dir} a world written by data_gen.synthetic.generate_world?)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected an object with 'images' and 'videos'")
    return {key: [scene_from_dict(d, f"{path}: {key}[{k}]") for k, d in enumerate(raw.get(key, []))]
            for key in ("images", "videos")}


class GroundTruthAnnotator:
    """``Annotator`` answering from scene state; item ID ``k + 1`` is scene ``k`` (as generate_world)."""

    def __init__(self, images: Sequence[Scene], videos: Sequence[Scene]):
        self.images, self.videos = list(images), list(videos)

    @classmethod
    def from_world(cls, world_dir: str | Path) -> GroundTruthAnnotator:
        scenes = load_world_scenes(world_dir)
        return cls(scenes["images"], scenes["videos"])

    # ------------------------------------------------------------------ lookup
    def _scene(self, table: list[Scene], kind: str, item_id: str, instance_ids: list[str]) -> Scene:
        try:
            k = int(item_id) - 1
        except ValueError:
            k = -1
        if not 0 <= k < len(table):
            raise AnnotationError(f"{kind} {item_id!r} is not in the synthetic world "
                                  f"(ids 1..{len(table)})")
        scene = table[k]
        truth = sorted(str(tr.iid) for tr in scene.tracks if any(tr.present))
        if sorted(instance_ids) != truth:
            raise AnnotationError(f"{kind} {item_id!r}: marked instances {sorted(instance_ids)} differ from the "
                                  f"scene's visible instances {truth} (manifest from another world?)")
        return scene

    def _video(self, video: S.VideoContext) -> Scene:
        scene = self._scene(self.videos, "video", video.video_id, video.instance_ids)
        if scene.num_frames != video.num_frames:
            raise AnnotationError(f"video {video.video_id!r}: {video.num_frames} frames given, "
                                  f"the scene has {scene.num_frames}")
        return scene

    # ------------------------------------------------------------------ Annotator methods
    async def annotate_frame(self, video: S.VideoContext, t: int, frame: np.ndarray,
                             prev_frame: np.ndarray | None, prev: S.FrameCaptions | None) -> S.FrameCaptions:
        scene = self._video(video)
        return S.FrameCaptions(instance_captions(scene, t - 1), image_caption(scene, t - 1),
                                 temporal_change(scene, t - 1))

    async def describe_video(self, video: S.VideoContext, frames: list[S.FrameCaptions]) -> str:
        return video_caption(self._video(video))

    async def qa(self, video: S.VideoContext, frames: list[S.FrameCaptions]) -> list[dict]:
        return [{"question": q["question"], "answer": q["answer"]} for q in video_questions(self._video(video))]

    async def annotate_image(self, image: S.ImageContext, marked: np.ndarray) -> S.ImageAnnotationResult:
        scene = self._scene(self.images, "image", image.image_id, image.instance_ids)
        return S.ImageAnnotationResult(instance_captions(scene, 0), image_caption(scene, 0))

    async def svit_task(self, scene: SvitScene, task: str) -> list[list[dict]]:
        raise AnnotationError(f"SVIT task {task!r} is not supported by the ground-truth annotator")


# ----------------------------------------------------------------------------- manifests
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: not found (is it a world written by data_gen.synthetic.generate_world?)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err


def _image_lines(root: Path) -> list[dict]:
    masks = _read_json(root / "images" / "masks.json")
    lines = []
    for k, rec in enumerate(_read_json(root / "inst_it_image.json")):
        name = os.path.basename(rec["image_path"])
        if name not in masks:
            raise InputError(f"{root / 'images' / 'masks.json'}: no masks for image {name!r} (record {k})")
        lines.append({"image_id": rec["image_id"], "image": f"images/raw/{name}", "masks": masks[name],
                      "image_path": rec["image_path"]})
    return lines


def _video_lines(root: Path) -> list[dict]:
    lines = []
    for rec in _read_json(root / "inst_it_video.json"):
        vid = os.path.basename(rec["video_path"].rstrip("/"))
        frames = [f"videos/raw/{vid}/{f['frame_name']}" for f in rec["frame_level_caption"]]
        masks = _read_json(root / "videos" / "masks" / f"{vid}.json")
        lines.append({"video_id": rec["video_id"], "frames": frames, "masks": {"frames": masks},
                      "video_path": rec["video_path"]})
    return lines


def world_manifest(world_dir: str | Path, kind: str, path: str | Path | None = None) -> Path:
    """Write the ``kind`` ("image" | "video") manifest of a world (raw media + masks); returns its path.

    Default path: ``world_dir/manifest_{kind}.jsonl``. Media paths in it are relative to ``world_dir``,
    so a manifest written elsewhere uses absolute paths.
    """
    if kind not in WORLD_KINDS:
        raise ValueError(f"kind must be one of {WORLD_KINDS}, got {kind!r}")
    root = Path(world_dir).resolve()
    lines = _image_lines(root) if kind == "image" else _video_lines(root)
    out = Path(path) if path is not None else root / f"manifest_{kind}.jsonl"
    if out.resolve().parent != root:
        media_key = "image" if kind == "image" else "frames"
        for line in lines:
            v = line[media_key]
            line[media_key] = str(root / v) if isinstance(v, str) else [str(root / f) for f in v]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- running
async def annotate_world_async(world_dir: str | Path, out_dir: str | Path, *, annotator: Any = None,
                               client: ChatClient | None = None, concurrency: int = 8,
                               progress: bool = False, strict: bool | None = None) -> dict[str, Any]:
    """Annotate every image and video of a world through ``run_pipeline``; see ``annotate_world``."""
    world, out = Path(world_dir), Path(out_dir)
    if annotator is None:
        annotator = GroundTruthAnnotator.from_world(world)
    if strict is None:
        strict = isinstance(annotator, GroundTruthAnnotator)
    result: dict[str, Any] = {"media_root": str(world.resolve())}
    summaries: dict[str, RunSummary] = {}
    for kind in WORLD_KINDS:
        work = out / kind
        manifest = world_manifest(world, kind, work / "manifest.jsonl")
        # world_manifest wrote this file itself, naming the world's files by absolute path.
        items = read_manifest(manifest, kind, allow_outside_root=True)
        summaries[kind] = await run_pipeline(kind, items, annotator, work, client=client,
                                             items_in_flight=concurrency, progress=progress)
        final = out / OUTPUT_NAMES[kind]
        await asyncio.to_thread(write_json_atomic, final, json.loads((work / OUTPUT_NAMES[kind]).read_text()))
        result.update({kind: str(final), f"{kind}_json": str(final), f"{kind}_manifest": str(manifest), f"{kind}_summary": str(work / "summary.json"),
                       f"{kind}_errors": str(work / "errors.jsonl")})
    failed = {k: s.failed for k, s in summaries.items() if s.failed}
    if strict and failed:
        raise AnnotationError(f"annotate_world: failed items {failed}; reasons in "
                              + ", ".join(result[f"{k}_errors"] for k in failed))
    result["summaries"] = summaries
    return result


def annotate_world(world_dir: str | Path, out_dir: str | Path, *, annotator: Any = None,
                   client: ChatClient | None = None, concurrency: int = 8, progress: bool = False,
                   strict: bool | None = None) -> dict[str, Any]:
    """Annotate a synthetic world with ``annotator`` (default: ground truth) through the pipelines.

    Returns {"image", "video" (aliases "image_json", "video_json"): dataset JSON paths under OUT,
    "media_root": world_dir (the root their ``image_path`` / ``video_path`` are relative to),
    "{kind}_manifest" / "{kind}_summary" / "{kind}_errors": paths, "summaries": {kind: RunSummary}}. ``client`` (the annotator's ChatClient, if any) adds request and
    cost counts to the summaries (the client's running totals: images run first, so the video summary
    counts both kinds) and is closed before returning, since its connections belong to this call's
    event loop. ``concurrency``: items in flight. ``strict`` (default: True for the ground
    truth annotator) raises AnnotationError if any item failed.
    """
    async def run() -> dict[str, Any]:
        try:
            return await annotate_world_async(world_dir, out_dir, annotator=annotator, client=client,
                                              concurrency=concurrency, progress=progress, strict=strict)
        finally:
            if client is not None:
                await client.aclose()

    return asyncio.run(run())
