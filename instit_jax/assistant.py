"""One inference API over a checkpoint: chat template, preprocessing, token plan and KV-cache generation.

    from instit_jax import Assistant
    bot = Assistant.from_pretrained("ckpt/")
    bot.answer("What is [1] doing?", image=Image.open("cat.jpg")).text
    bot.answer("What changes at <3>?", frames=[f0, f1, f2], max_new_tokens=64).text

`instit-generate` is a thin command line over `Assistant.answer`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from instit_jax import processing
from instit_jax.conversation import IMAGE_TOKEN, get_template, stop_token_ids, tokenize_conversation
from instit_jax.generate import SamplingConfig, generate, generate_llava


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer: text (stop strings cut, stripped), generated token ids, prompt length."""

    text: str
    tokens: list[int]
    num_prompt_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "num_prompt_tokens": self.num_prompt_tokens}


def _as_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image: expected a PIL image or uint8 array [H, W, 3], got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def visual_inputs(model: Any, image: Any = None, frames: Sequence[Any] | None = None):
    """-> (plan or None, pixels [1, N, S, S, 3] or None, videos [1, F, S, S, 3] or None)."""
    cfg = model.cfg
    proc = processing.image_processor_config(cfg)
    pps = cfg.vision.patches_per_side
    if image is not None:
        img = _as_rgb(image)
        pixels, _ = processing.preprocess_images([img], proc)
        if cfg.image_aspect_ratio == "single":
            plan = processing.single_view_token_plan(pps)
        else:
            max_patches = (int(cfg.image_aspect_ratio[len("anyres_max_"):])
                           if cfg.image_aspect_ratio.startswith("anyres_max_") else None)
            plan = processing.anyres_token_plan((img.height, img.width), proc.grid_pinpoints, proc.tile_size, pps,
                                                newline=cfg.use_image_newline, max_num_patches=max_patches)
        return plan, pixels[:, :plan.num_views].transpose(0, 1, 3, 4, 2), None
    if frames is not None:
        if not len(frames):
            raise ValueError("frames: a video needs at least one frame")
        arrays = [np.asarray(_as_rgb(f)) for f in frames]
        clip = processing.preprocess_video(arrays, proc).transpose(0, 2, 3, 1)[None]
        pooled = processing.pooled_side(pps, cfg.video_pool_stride, cfg.video_pooling)
        return processing.video_token_plan(len(arrays), pooled, cfg.video_newline), None, clip
    return None, None, None


class Assistant:
    """A loaded LLaVA-NeXT model + tokenizer + chat template that answers questions about images or videos."""

    def __init__(self, model: Any, tokenizer: Any, template: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.template = get_template(template or ("qwen_1_5" if cfg.text.model_type == "qwen2" else "vicuna_v1"))
        self.pad_id = tokenizer.token_to_id("<pad>") or 0
        self.stop_ids = stop_token_ids(tokenizer, self.template)

    @classmethod
    def from_pretrained(cls, ckpt: str, *, tokenizer: str | None = None, template: str | None = None,
                        dtype: str | None = None) -> Assistant:
        """Load anything `load_pretrained` reads; the tokenizer comes from `tokenizer` or the checkpoint."""
        from instit_jax.loading import load_pretrained, load_tokenizer

        return cls(load_pretrained(ckpt, dtype=dtype), load_tokenizer(tokenizer or ckpt), template)

    def prompt_ids(self, question: str, plan: Any, is_video: bool) -> np.ndarray:
        """Token ids [1, T] of the rendered chat prompt, `<image>` expanded by the plan."""
        cfg = self.model.cfg
        content = question if plan is None else f"{IMAGE_TOKEN}\n{question}"
        if plan is not None and self.tokenizer.token_to_id(IMAGE_TOKEN) != cfg.image_token_id:
            raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {self.tokenizer.token_to_id(IMAGE_TOKEN)} but the "
                             f"checkpoint expects image_token_id={cfg.image_token_id}; pass the checkpoint's tokenizer")
        tok = tokenize_conversation(self.tokenizer, self.template, [{"role": "user", "content": content}],
                                    [plan.count] if plan is not None else [], add_generation_prompt=True)
        ids = tok.input_ids[None]
        if is_video and cfg.video_token_id is not None:
            ids = np.where(ids == cfg.image_token_id, cfg.video_token_id, ids)
        return ids.astype(np.int32)

    def answer(self, question: str, *, image: Any = None, frames: Sequence[Any] | None = None,
               max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, stop: Sequence[str] = ()) -> Answer:
        """Answer one question about an image (PIL / uint8 [H, W, 3]), ordered video frames, or nothing.

        Greedy when temperature is 0; `stop` strings are cut from the text in addition to the template's.
        """
        if image is not None and frames is not None:
            raise ValueError("answer: pass an image or frames, not both")
        model, cfg = self.model, self.model.cfg
        plan, pixels, videos = visual_inputs(model, image, frames)
        ids = self.prompt_ids(question, plan, videos is not None)
        mask = np.ones_like(ids)
        kwargs = dict(max_new_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
                      stop_strings=tuple(self.template.stop_strings) + tuple(stop), tokenizer=self.tokenizer,
                      pad_token_id=self.pad_id, sampling=SamplingConfig(temperature, top_k, top_p),
                      rng=jax.random.key(seed))
        if plan is None:
            out = generate(model, ids, mask, **kwargs)
        else:
            sizes = dict(tokens_per_tile=model.tokens_per_tile, num_tiles=0 if pixels is None else pixels.shape[1],
                         tokens_per_frame=model.tokens_per_frame, num_frames=0 if videos is None else videos.shape[1],
                         video_token_id=cfg.video_token_id)
            weights = None
            if plan.weights is not None:  # anyres_max_N downsampling mixes 4 feature rows per token
                visual_index, weights = processing.build_visual_taps(ids, [[plan]], cfg.image_token_id, **sizes)
            else:
                visual_index = processing.build_visual_index(ids, [[plan]], cfg.image_token_id, **sizes)
            out = generate_llava(model, ids, mask, visual_index=visual_index, visual_weights=weights,
                                 pixel_values=pixels, pixel_values_videos=videos, **kwargs)
        return Answer(out.texts[0].strip(), out.token_lists()[0], int(ids.shape[1]))
