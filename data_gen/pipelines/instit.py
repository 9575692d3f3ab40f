"""Inst-IT video and image pipelines: one manifest item in, one official-schema record out.

Video: frames are annotated in order (frame t sees marked X_t, marked X_{t-1} and the annotation of
t-1); then the video-level description and the QA pairs are asked in parallel from the frame
annotations. Every answer's `[ID]` and `<t>` references are re-checked here, whatever the annotator.
"""
from __future__ import annotations

import asyncio

from data_gen.client.chat import AnnotationError
from data_gen.manifest import ManifestItem, load_image_item, load_video
from data_gen.pipelines import schemas as S
from data_gen.pipelines.annotator import Annotator


def _check_frame(ann: S.FrameCaptions, ids: set[str], n: int, where: str) -> None:
    try:
        S.check_instance_keys(list(ann.instance_level), ids)
        S.check_refs(list(ann.instance_level.values()) + [ann.image_level, ann.temporal_change or ""], ids, n)
    except ValueError as err:
        raise AnnotationError(f"{where}: {err}") from err


async def annotate_video(item: ManifestItem, annotator: Annotator) -> dict:
    """The official Inst-IT video record for one manifest item (raises InputError / AnnotationError)."""
    video = await asyncio.to_thread(load_video, item)
    ctx = video.context
    ids, n = set(ctx.instance_ids), ctx.num_frames
    frames: list[S.FrameCaptions] = []
    prev_frame = None
    for k in range(n):
        frame = await asyncio.to_thread(video.marked_frame, k)
        ann = await annotator.annotate_frame(ctx, k + 1, frame, prev_frame, frames[-1] if frames else None)
        _check_frame(ann, ids, n, f"frame <{k + 1}>")
        frames.append(ann)
        prev_frame = frame
    description, pairs = await asyncio.gather(annotator.describe_video(ctx, frames), annotator.qa(ctx, frames))
    try:
        S.check_refs([description], ids, n)
        S.check_refs([x for p in pairs for x in (p["question"], p["answer"])], ids, n)
    except ValueError as err:
        raise AnnotationError(f"video-level answer: {err}") from err
    return {
        "video_id": item.record["video_id"],
        "frame_level_caption": [
            {"timestamp": t, "frame_name": name, "instance_level": f.instance_level,
             "image_level": f.image_level, "temporal_change": f.temporal_change}
            for t, (name, f) in enumerate(zip(ctx.frame_names, frames), start=1)],
        "question_answer_pairs": pairs,
        "video_level_caption": description,
        "video_path": video.video_path,
    }


async def annotate_image(item: ManifestItem, annotator: Annotator) -> dict:
    """The official Inst-IT image record for one manifest item."""
    image = await asyncio.to_thread(load_image_item, item)
    marked = await asyncio.to_thread(image.marked)
    result = await annotator.annotate_image(image.context, marked)
    ids = set(image.context.instance_ids)
    try:
        S.check_instance_keys(list(result.instance_level), ids)
        S.check_refs(list(result.instance_level.values()) + [result.image_level], ids)
    except ValueError as err:
        raise AnnotationError(f"image answer: {err}") from err
    return {"image_id": item.record["image_id"], "instance_level_caption": result.instance_level,
            "image_level_caption": result.image_level, "image_path": image.image_path}


def estimate_video(item: ManifestItem, annotator) -> list[tuple[int, int]]:
    video = load_video(item)
    return annotator.estimate_video(video.context, video.size)


def estimate_image(item: ManifestItem, annotator) -> list[tuple[int, int]]:
    image = load_image_item(item)
    return annotator.estimate_image(image.context, image.size)
