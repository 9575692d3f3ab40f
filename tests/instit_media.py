"""A tiny Inst-IT-schema world on disk (random-pixel images + frame folders + the two JSONs) for data tests,
and the same world built into TFRecord shards with a tokenizer trained on it."""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from instit_jax.data.build import main as build_main
from instit_jax.tokenizer import train_tiny_tokenizer


def random_image(path: Path, hw: tuple[int, int], seed: int) -> None:
    """A random RGB image of size hw saved at path (format from the suffix)."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)


def write_tiny_world(root: Path, *, num_videos: int, frames_per_video: int) -> tuple[list[dict], list[dict]]:
    """6 images (three aspect ratios) + num_videos frame folders under root, root/img.json and root/vid.json.

    -> (image records, video records) as written.
    """
    os.makedirs(root / "images")
    images = []
    for i in range(6):
        random_image(root / "images" / f"{i}.png", [(20, 50), (50, 20), (40, 40)][i % 3], i)
        images.append({"image_id": i, "instance_level_caption": {"1": f"object {i}", "2": "a box"},
                       "image_level_caption": f"[1] is near [2] in image {i}.", "image_path": f"images/{i}.png"})
    videos = []
    for v in range(num_videos):
        os.makedirs(root / "videos" / str(v))
        frames = []
        for t in range(frames_per_video):
            random_image(root / "videos" / str(v) / f"{t:03d}.jpg", (30, 40), 100 * v + t)
            frames.append({"timestamp": t + 1, "frame_name": f"{t:03d}.jpg", "instance_level": {"1": "a ball"},
                           "image_level": f"[1] at <{t + 1}>.", "temporal_change": None if t == 0 else "[1] moves."})
        videos.append({"video_id": v, "frame_level_caption": frames,
                       "question_answer_pairs": [{"question": "Where is [1]?", "answer": "On the left."}],
                       "video_level_caption": "[1] rolls.", "video_path": f"videos/{v}"})
    (root / "img.json").write_text(json.dumps(images))
    (root / "vid.json").write_text(json.dumps(videos))
    return images, videos


def build_tiny_shards(tmp_path_factory, *, frames_per_video: int, video_shards: int, max_frames: int):
    """The tiny world (3 videos of frames_per_video frames) built by instit-build-data: images in 2 shards,
    videos in video_shards shards capped at max_frames frames, plus a 400-token tokenizer trained on the
    two JSONs. -> (image shard dir, video shard dir, tokenizer)."""
    root = tmp_path_factory.mktemp("media")
    images, videos = write_tiny_world(root, num_videos=3, frames_per_video=frames_per_video)
    out_i, out_v = tmp_path_factory.mktemp("shards_i"), tmp_path_factory.mktemp("shards_v")
    assert build_main(["--input", str(root / "img.json"), "--media-root", str(root), "--out", str(out_i),
                       "--num-shards", "2"]) == 0
    assert build_main(["--input", str(root / "vid.json"), "--media-root", str(root), "--out", str(out_v),
                       "--num-shards", str(video_shards), "--max-frames", str(max_frames)]) == 0
    corpus = [json.dumps(images), json.dumps(videos), "USER: ASSISTANT: A chat between"] * 5
    return out_i, out_v, train_tiny_tokenizer(corpus, vocab_size=400)
