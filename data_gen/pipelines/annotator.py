"""The annotator interface the pipelines call, and its OpenAI-compatible implementation.

Any backend that implements `Annotator` runs through the same pipelines (ordering, validation,
output files, resume): `OpenAIAnnotator(client)` asks GPT-4o (or any OpenAI-compatible model);
the synthetic world's ground-truth annotator implements the same methods from its scene state.

    class Annotator(Protocol):
        async def annotate_frame(video: VideoContext, t: int, frame, prev_frame, prev) -> FrameCaptions
        async def describe_video(video: VideoContext, frames: list[FrameCaptions]) -> str
        async def qa(video: VideoContext, frames: list[FrameCaptions]) -> list[dict]   # {"question","answer"}
        async def annotate_image(image: ImageContext, marked) -> ImageAnnotationResult
        async def svit_task(scene: SvitScene, task: str) -> list[list[dict]]             # items of QA pairs

`t` is 1-based; `frame` / `prev_frame` / `marked` are Set-of-Marks-rendered HWC uint8 arrays
(`prev_frame` and `prev` are None for t == 1). Errors: raise `AnnotationError(reason)` to fail the
item; the pipelines also re-check every answer's `[ID]` / `<t>` references.
"""
from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np

from data_gen.client.chat import ChatClient
from data_gen.client.messages import encode_image, image_part, text_part
from data_gen.pipelines import schemas as S
from data_gen.pipelines.svit_scene import SvitScene, scene_text
from data_gen.prompts import instit as P
from data_gen.prompts import svit as SP

SVIT_TASKS = ("conversation", "complex_reasoning", "referring_qa", "detail_description")
SVIT_SCHEMAS = {"conversation": S.SvitConversationAnswer, "complex_reasoning": S.SvitComplexAnswer,
                "referring_qa": S.SvitReferringAnswer, "detail_description": S.SvitDetailAnswer}
# Expected answer tokens, used only by --estimate.
OUT_TOKENS = {"frame_base": 80, "per_instance": 45, "describe": 260, "qa_pair": 45, "image_base": 120,
              "conversation": 900, "complex_reasoning": 1500, "referring_qa": 1000, "detail_description": 350}


class Annotator(Protocol):
    async def annotate_frame(self, video: S.VideoContext, t: int, frame: np.ndarray,
                             prev_frame: np.ndarray | None, prev: S.FrameCaptions | None) -> S.FrameCaptions: ...

    async def describe_video(self, video: S.VideoContext, frames: list[S.FrameCaptions]) -> str: ...

    async def qa(self, video: S.VideoContext, frames: list[S.FrameCaptions]) -> list[dict]: ...

    async def annotate_image(self, image: S.ImageContext, marked: np.ndarray) -> S.ImageAnnotationResult: ...

    async def svit_task(self, scene: SvitScene, task: str) -> list[list[dict]]: ...


def frames_text(frames: list[S.FrameCaptions]) -> str:
    return "\n".join(P.format_frame_annotation(t, f.instance_level, f.image_level, f.temporal_change)
                     for t, f in enumerate(frames, start=1))


class OpenAIAnnotator:
    """Annotator backed by a `ChatClient` (structured outputs, re-asks on bad references)."""

    def __init__(self, client: ChatClient, *, detail: str = "high", qa_pairs: int = 12, jpeg_quality: int = 90):
        self.client, self.detail, self.qa_pairs, self.jpeg_quality = client, detail, qa_pairs, jpeg_quality

    # ------------------------------------------------------------------ message builders
    def _image(self, frame: np.ndarray | tuple[int, int]) -> dict[str, Any]:
        if isinstance(frame, tuple):  # (width, height) placeholder for --estimate
            return {"type": "image_url", "image_url": {"url": f"size:{frame[0]}x{frame[1]}", "detail": self.detail}}
        return image_part(encode_image(frame, quality=self.jpeg_quality), self.detail)

    def frame_messages(self, video: S.VideoContext, t: int, frame: Any, prev_frame: Any,
                       prev: S.FrameCaptions | None) -> list[dict[str, Any]]:
        first = t == 1
        text = P.FRAME.format(
            t=t, n=video.num_frames, ids=P.format_ids(video.instance_ids),
            prev_clause="" if first else P.FRAME_PREV_CLAUSE.format(p=t - 1),
            change_task=P.FRAME_CHANGE_FIRST if first else P.FRAME_CHANGE.format(p=t - 1, t=t),
            prev_text="" if prev is None else P.FRAME_PREV_TEXT.format(
                p=t - 1, desc=P.format_frame_annotation(t - 1, prev.instance_level, prev.image_level, None)))
        parts = [text_part(text), self._image(frame)]
        if not first:
            parts.append(self._image(prev_frame))
        return [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": parts}]

    def video_messages(self, video: S.VideoContext, frames: list[S.FrameCaptions], kind: str) -> list[dict]:
        fmt = dict(n=video.num_frames, ids=P.format_ids(video.instance_ids), frames=frames_text(frames))
        text = P.VIDEO_DESCRIPTION.format(**fmt) if kind == "describe" else P.VIDEO_QA.format(k=self.qa_pairs, **fmt)
        return [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": text}]

    def image_messages(self, image: S.ImageContext, marked: Any) -> list[dict[str, Any]]:
        text = P.IMAGE.format(ids=P.format_ids(image.instance_ids))
        return [{"role": "system", "content": P.SYSTEM},
                {"role": "user", "content": [text_part(text), self._image(marked)]}]

    def svit_messages(self, scene: SvitScene, task: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": SP.SYSTEM},
                {"role": "user", "content": scene_text(scene) + "\n" + SP.TASKS[task]}]

    # ------------------------------------------------------------------ Annotator methods
    async def annotate_frame(self, video: S.VideoContext, t: int, frame: np.ndarray,
                             prev_frame: np.ndarray | None, prev: S.FrameCaptions | None) -> S.FrameCaptions:
        ids = set(video.instance_ids)

        def validate(ans: S.FrameAnswer) -> None:
            S.check_instance_keys([i.id for i in ans.instances], ids)
            S.check_refs([i.caption for i in ans.instances] + [ans.image_caption, ans.temporal_change],
                         ids, video.num_frames)

        messages = await asyncio.to_thread(self.frame_messages, video, t, frame, prev_frame, prev)
        ans, _ = await self.client.complete_json(messages, S.FrameAnswer, prompt_version=P.INSTIT_PROMPT_VERSION,
                                                 validate=validate)
        change = ans.temporal_change.strip() if t > 1 else None
        return S.FrameCaptions({i.id: i.caption for i in ans.instances}, ans.image_caption, change or None)

    async def describe_video(self, video: S.VideoContext, frames: list[S.FrameCaptions]) -> str:
        ids = set(video.instance_ids)
        ans, _ = await self.client.complete_json(
            self.video_messages(video, frames, "describe"), S.VideoDescriptionAnswer,
            prompt_version=P.INSTIT_PROMPT_VERSION,
            validate=lambda a: S.check_refs([a.description], ids, video.num_frames))
        return ans.description

    async def qa(self, video: S.VideoContext, frames: list[S.FrameCaptions]) -> list[dict]:
        ids = set(video.instance_ids)
        ans, _ = await self.client.complete_json(
            self.video_messages(video, frames, "qa"), S.VideoQAAnswer, prompt_version=P.INSTIT_PROMPT_VERSION,
            validate=lambda a: S.check_refs([x for p in a.pairs for x in (p.question, p.answer)], ids,
                                            video.num_frames))
        return [{"question": p.question, "answer": p.answer} for p in ans.pairs]

    async def annotate_image(self, image: S.ImageContext, marked: np.ndarray) -> S.ImageAnnotationResult:
        ids = set(image.instance_ids)

        def validate(ans: S.ImageAnswer) -> None:
            S.check_instance_keys([i.id for i in ans.instances], ids)
            S.check_refs([i.caption for i in ans.instances] + [ans.image_caption], ids)

        messages = await asyncio.to_thread(self.image_messages, image, marked)
        ans, _ = await self.client.complete_json(messages, S.ImageAnswer, prompt_version=P.INSTIT_PROMPT_VERSION,
                                                 validate=validate)
        return S.ImageAnnotationResult({i.id: i.caption for i in ans.instances}, ans.image_caption)

    async def svit_task(self, scene: SvitScene, task: str) -> list[list[dict]]:
        def validate(ans: Any) -> None:
            if task == "referring_qa":
                for k, p in enumerate(ans.pairs):
                    found = S.parse_boxes(p.question) + S.parse_boxes(p.answer)
                    if not found:
                        raise ValueError(f"pair {k + 1} has no <st>name<ed>[x1, y1, x2, y2] reference")

        ans, _ = await self.client.complete_json(self.svit_messages(scene, task), SVIT_SCHEMAS[task],
                                                 prompt_version=SP.SVIT_PROMPT_VERSION, validate=validate)
        qa = lambda pairs: [{"question": p.question, "answer": p.answer} for p in pairs]
        if task == "conversation":
            return [qa(c.turns) for c in ans.conversations]
        if task == "detail_description":
            return [[{"question": SP.DETAIL_QUESTION, "answer": ans.description}]]
        return [qa(ans.pairs)]

    # ------------------------------------------------------------------ --estimate
    def estimate_video(self, video: S.VideoContext, size: tuple[int, int]) -> list[tuple[int, int]]:
        """(input, output) token estimates of every request one video makes."""
        n_ids = len(video.instance_ids)
        fake = S.FrameCaptions({i: "x" * 160 for i in video.instance_ids}, "x" * 300, "x" * 200)
        plan = []
        for t in range(1, video.num_frames + 1):
            msgs = self.frame_messages(video, t, size, size, fake if t > 1 else None)
            plan.append((self.client.estimate_tokens(msgs, S.FrameAnswer),
                         OUT_TOKENS["frame_base"] + OUT_TOKENS["per_instance"] * n_ids))
        frames = [fake] * video.num_frames
        plan.append((self.client.estimate_tokens(self.video_messages(video, frames, "describe"),
                                                 S.VideoDescriptionAnswer), OUT_TOKENS["describe"]))
        plan.append((self.client.estimate_tokens(self.video_messages(video, frames, "qa"), S.VideoQAAnswer),
                     OUT_TOKENS["qa_pair"] * self.qa_pairs))
        return plan

    def estimate_image(self, image: S.ImageContext, size: tuple[int, int]) -> list[tuple[int, int]]:
        return [(self.client.estimate_tokens(self.image_messages(image, size), S.ImageAnswer),
                 OUT_TOKENS["image_base"] + OUT_TOKENS["per_instance"] * len(image.instance_ids))]

    def estimate_svit(self, scene: SvitScene) -> list[tuple[int, int]]:
        return [(self.client.estimate_tokens(self.svit_messages(scene, task), SVIT_SCHEMAS[task]), OUT_TOKENS[task])
                for task in SVIT_TASKS]
