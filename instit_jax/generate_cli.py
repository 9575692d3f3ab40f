"""instit-generate: answer one prompt about an image, a video (folder of frames) or nothing, from a checkpoint.

    instit-generate --ckpt DIR --image cat.jpg --prompt "What is [1] doing?"
    instit-generate --ckpt DIR --video frames/ --prompt "What changes at <3>?" --max-frames 32

DIR is anything `instit_jax.load_pretrained` reads (our Orbax checkpoint, llava-hf or original LLaVA-NeXT)
and must hold a tokenizer.json (or pass --tokenizer). The prompt gets one `<image>` placeholder in front,
is rendered with the chat template (default: vicuna_v1 for Llama, qwen_1_5 for Qwen2) and decoded greedily
unless --temperature > 0. The answer is printed on stdout (with --json: one JSON object with tokens too).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from instit_jax import processing
from instit_jax.conversation import IMAGE_TOKEN, get_template, stop_token_ids, tokenize_conversation
from instit_jax.generate import SamplingConfig, generate, generate_llava

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_frames(directory: Path, max_frames: int | None) -> list[Path]:
    """Frame files of a video folder sorted by name, sampled uniformly down to max_frames."""
    if not directory.is_dir():
        raise FileNotFoundError(f"--video {directory}: not a directory of frames")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--video {directory}: no frame images ({', '.join(FRAME_SUFFIXES)})")
    if max_frames and len(files) > max_frames:
        keep = np.linspace(0, len(files) - 1, max_frames).round().astype(int)
        files = [files[i] for i in keep]
    return files


def _open_rgb(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read as an image ({e})") from e


def visual_inputs(model: Any, image: Path | None, video: Path | None, max_frames: int | None):
    """-> (plan or None, pixels [1, N, S, S, 3] or None, videos [1, F, S, S, 3] or None)."""
    cfg = model.cfg
    proc = processing.image_processor_config(cfg)
    pps = cfg.vision.patches_per_side
    if image is not None:
        img = _open_rgb(image)
        pixels, _ = processing.preprocess_images([img], proc)
        if cfg.image_aspect_ratio == "single":
            plan = processing.single_view_token_plan(pps)
        else:
            max_patches = (int(cfg.image_aspect_ratio[len("anyres_max_"):])
                           if cfg.image_aspect_ratio.startswith("anyres_max_") else None)
            plan = processing.anyres_token_plan((img.height, img.width), proc.grid_pinpoints, proc.tile_size, pps,
                                                newline=cfg.use_image_newline, max_num_patches=max_patches)
        return plan, pixels[:, :plan.num_views].transpose(0, 1, 3, 4, 2), None
    if video is not None:
        frames = [np.asarray(_open_rgb(p)) for p in list_frames(video, max_frames)]
        clip = processing.preprocess_video(frames, proc).transpose(0, 2, 3, 1)[None]
        pooled = processing.pooled_side(pps, cfg.video_pool_stride, cfg.video_pooling)
        return processing.video_token_plan(len(frames), pooled, cfg.video_newline), None, clip
    return None, None, None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, prepare, generate; returns {"text", "tokens", "num_prompt_tokens"}."""
    from instit_jax.loading import load_pretrained, load_tokenizer

    model = load_pretrained(args.ckpt, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
    cfg = model.cfg
    template = get_template(args.template or ("qwen_1_5" if cfg.text.model_type == "qwen2" else "vicuna_v1"))
    plan, pixels, videos = visual_inputs(model, args.image, args.video, args.max_frames)
    content = args.prompt if plan is None else f"{IMAGE_TOKEN}\n{args.prompt}"
    if plan is not None and tokenizer.token_to_id(IMAGE_TOKEN) != cfg.image_token_id:
        raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {tokenizer.token_to_id(IMAGE_TOKEN)} but the checkpoint "
                         f"expects image_token_id={cfg.image_token_id}; pass the checkpoint's tokenizer")
    tok = tokenize_conversation(tokenizer, template, [{"role": "user", "content": content}],
                                [plan.count] if plan is not None else [], add_generation_prompt=True)
    ids = tok.input_ids[None]
    if videos is not None and cfg.video_token_id is not None:
        ids = np.where(ids == cfg.image_token_id, cfg.video_token_id, ids).astype(np.int32)
    mask = np.ones_like(ids)
    pad_id = tokenizer.token_to_id("<pad>") or 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer, template),
                  stop_strings=template.stop_strings, tokenizer=tokenizer, pad_token_id=pad_id,
                  sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
                  rng=jax.random.key(args.seed))
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
    return {"text": out.texts[0].strip(), "tokens": out.token_lists()[0], "num_prompt_tokens": int(ids.shape[1])}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="instit-generate", description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (ours, llava-hf or original; ours may be gs://)")
    media = ap.add_mutually_exclusive_group()
    media.add_argument("--image", type=Path, help="an image file")
    media.add_argument("--video", type=Path, help="a folder of frames (sorted by file name)")
    ap.add_argument("--prompt", required=True, help="the user's question")
    ap.add_argument("--template", choices=["vicuna_v1", "qwen_1_5"], help="chat template (default by LLM type)")
    ap.add_argument("--tokenizer", help="tokenizer.json or its folder (default: --ckpt)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-frames", type=int, default=32, help="uniformly sample at most this many frames")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype override")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    args = ap.parse_args(argv)
    if args.image is not None and not args.image.is_file():
        ap.error(f"--image {args.image}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result) if args.json else result["text"])
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
