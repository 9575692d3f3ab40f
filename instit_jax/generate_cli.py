"""instit-generate: answer one prompt about an image, a video (folder of frames) or nothing, from a checkpoint.

    instit-generate --ckpt DIR --image cat.jpg --prompt "What is [1] doing?"
    instit-generate --ckpt DIR --video frames/ --prompt "What changes at <3>?" --max-frames 32

DIR is anything `instit_jax.load_pretrained` reads (our Orbax checkpoint, llava-hf or original LLaVA-NeXT)
and must hold a tokenizer.json (or pass --tokenizer). The prompt gets one `<image>` placeholder in front,
is rendered with the chat template (default: vicuna_v1 for Llama, qwen_1_5 for Qwen2) and decoded greedily
unless --temperature > 0. The answer is printed on stdout (with --json: one JSON object with tokens too). The work is done by
`instit_jax.Assistant`, the Python API this command wraps.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_gen.frames import uniform_frame_indices
from instit_jax.assistant import Assistant

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_frames(directory: Path, max_frames: int | None) -> list[Path]:
    """Frame files of a video folder sorted by name, sampled uniformly down to max_frames."""
    if not directory.is_dir():
        raise FileNotFoundError(f"--video {directory}: not a directory of frames")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--video {directory}: no frame images ({', '.join(FRAME_SUFFIXES)})")
    if max_frames and len(files) > max_frames:
        files = [files[i] for i in uniform_frame_indices(len(files), max_frames)]
    return files


def _open_rgb(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read as an image ({e})") from e


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, prepare, generate through `Assistant`; returns {"text", "tokens", "num_prompt_tokens"}."""
    bot = Assistant.from_pretrained(args.ckpt, tokenizer=args.tokenizer, template=args.template, dtype=args.dtype)
    image = _open_rgb(args.image) if args.image is not None else None
    frames = ([_open_rgb(p) for p in list_frames(args.video, args.max_frames)]
              if args.video is not None else None)
    return bot.answer(args.prompt, image=image, frames=frames, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed).to_dict()


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
