"""Input pipeline throughput: our Grain pipeline vs a reference-style loader, and vs TPU v5p demand.

Ours: TFRecord shard read + CRC check -> JPEG decode -> anyres tiles / video frames (instit_jax.processing)
-> tokenisation with loss mask -> padded training batch (instit_jax/data/pipeline.py layout) with visual_index. Reference stack (LLaVA-NeXT
style, transformers' processors, written here): open the JPEG files from disk, LlavaNextImageProcessor
(anyres) or CLIPImageProcessor per video frame, tokenizer encode of the rendered prompt; no batching.

Demand: one TPU v5p host (4 chips x 459 bf16 TFLOP/s) training the 7B recipe at 55% MFU consumes
``4 * 459e12 * 0.55 / (6 * 7e9 * tokens_per_sample)`` samples/s (LLM FLOPs only, a conservative bound:
vision-tower FLOPs would lower the demand). Both stacks are measured with ONE worker thread in one
process (so roughly one core); the per-host projection multiplies by ``--host-cores`` (grain workers
scale across processes; a v5p VM host has 208 vCPUs, default 96 for the input pipeline).

    python benchmarks/data_pipeline.py [--images 24] [--videos 6] [--host-cores 96]

Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from instit_jax import processing
from instit_jax.chat_template import render_prompt
from instit_jax.data.build import build
from instit_jax.data.pipeline import PipelineConfig, build_pipeline
from instit_jax.tokenizer import train_tiny_tokenizer

V5P_HOST_FLOPS = 4 * 459e12 * 0.55
N_PARAMS = 7e9
TEXT_TOKENS = 300


def demand(tokens: int) -> float:
    """Samples/s one v5p host consumes for samples of ``tokens`` tokens."""
    return V5P_HOST_FLOPS / (6 * N_PARAMS * tokens)


def natural_image(h: int, w: int, seed: int) -> Image.Image:
    """A smooth random image with mild noise (JPEG sizes close to photos, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8))
    big = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(np.int16)
    big = big + rng.integers(-12, 13, big.shape, dtype=np.int16)
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def make_data(root: str, n_images: int, n_videos: int, img_hw, frame_hw, n_frames: int) -> tuple[str, str]:
    os.makedirs(os.path.join(root, "images"))
    answer = "[1] is a person on the left holding [2], a red umbrella, while [3] walks past. " * 6
    images, videos = [], []
    for i in range(n_images):
        natural_image(*img_hw, i).save(os.path.join(root, "images", f"{i}.jpg"), quality=90)
        images.append({"image_id": i, "instance_level_caption": {"1": answer[:120], "2": answer[:80]},
                       "image_level_caption": answer, "image_path": f"images/{i}.jpg"})
    for v in range(n_videos):
        d = os.path.join(root, "videos", str(v))
        os.makedirs(d)
        frames = []
        for t in range(n_frames):
            natural_image(*frame_hw, 1000 * v + t).save(os.path.join(d, f"{t:04d}.jpg"), quality=90)
            frames.append({"timestamp": t + 1, "frame_name": f"{t:04d}.jpg", "instance_level": {"1": "a ball"},
                           "image_level": "[1] rolls.", "temporal_change": None if t == 0 else "[1] moves."})
        videos.append({"video_id": v, "frame_level_caption": frames, "question_answer_pairs": [],
                       "video_level_caption": answer, "video_path": f"videos/{v}"})
    for name, recs in (("img.json", images), ("vid.json", videos)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(recs, f)
    return os.path.join(root, "img.json"), os.path.join(root, "vid.json")


class _Clock:
    """Wall and process-CPU time since creation (CPU time counts every thread of this process)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, n: int) -> tuple[float, float]:
        """(samples per wall second, samples per CPU second)."""
        return n / (time.perf_counter() - self.wall), n / (time.process_time() - self.cpu)


def time_ours(shards: str, tok, cfg: PipelineConfig, n_batches: int) -> tuple[float, float]:
    cfg = dataclasses.replace(cfg, read_threads=1)
    it = iter(build_pipeline(shards, tok, cfg, shard_index=0, shard_count=1))
    next(it)  # warm-up (imports, first file opens)
    clock = _Clock()
    for _ in range(n_batches):
        next(it)
    return clock.rates(n_batches * cfg.batch_size)


def time_reference_images(root: str, recs: list, tok, n: int) -> tuple[float, float]:
    from transformers import LlavaNextImageProcessor

    proc = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[list(p) for p in processing.ImageProcessorConfig().grid_pinpoints])
    clock = _Clock()
    for k in range(n):
        rec = recs[k % len(recs)]
        img = Image.open(os.path.join(root, rec["image_path"])).convert("RGB")
        proc(images=[img], return_tensors="np")
        msgs = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": rec["image_level_caption"]}]
        tok.encode(render_prompt("vicuna_v1", msgs))
    return clock.rates(n)


def time_reference_video(root: str, rec: dict, tok, n_frames: int, n: int) -> tuple[float, float]:
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    names = sorted(os.listdir(os.path.join(root, rec["video_path"])))
    pick = np.round(np.linspace(0, len(names) - 1, n_frames)).astype(int)
    clock = _Clock()
    for _ in range(n):
        frames = [Image.open(os.path.join(root, rec["video_path"], names[i])).convert("RGB") for i in pick]
        proc(images=frames, return_tensors="np")
        tok.encode(render_prompt("vicuna_v1", [{"from": "human", "value": "<image>\nQ"},
                                               {"from": "gpt", "value": rec["video_level_caption"]}]))
    return clock.rates(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--image-size", default="768x1024", help="HxW of the synthetic photos")
    p.add_argument("--frame-size", default="360x640", help="HxW of the synthetic video frames")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--host-cores", type=int, default=96, help="CPU processes one v5p host gives the pipeline")
    a = p.parse_args()
    img_hw = tuple(int(x) for x in a.image_size.split("x"))
    frame_hw = tuple(int(x) for x in a.frame_size.split("x"))
    with tempfile.TemporaryDirectory() as root:
        img_json, vid_json = make_data(root, a.images, a.videos, img_hw, frame_hw, 32)
        shards_i, shards_v = os.path.join(root, "si"), os.path.join(root, "sv")
        build([img_json], root, shards_i, 4)
        build([vid_json], root, shards_v, 2, max_frames=32)
        with open(img_json) as f:
            img_recs = json.load(f)
        with open(vid_json) as f:
            vid_recs = json.load(f)
        tok = train_tiny_tokenizer([img_recs[0]["image_level_caption"]] * 20, vocab_size=1000)
        base = dict(max_length=6144, length_buckets=(1024, 2048, 4096, 6144), seed=0)
        rows = []
        cfg_i = PipelineConfig(batch_size=4, num_tiles=5, num_frames=0, **base)
        ours = time_ours(shards_i, tok, cfg_i, a.batches)
        ref = time_reference_images(root, img_recs, tok, 8)
        rows.append(("anyres image", 2928 + TEXT_TOKENS, ours, ref))
        for f in (8, 32):
            cfg_v = PipelineConfig(batch_size=2, num_tiles=0, num_frames=f, **base)
            ours = time_ours(shards_v, tok, cfg_v, max(1, a.batches // 2))
            ref = time_reference_video(root, vid_recs[0], tok, f, 3)
            rows.append((f"video {f} frames", f * 144 + TEXT_TOKENS, ours, ref))
    print("rates in samples per CPU-second of one process with one worker thread (wall-clock rates in the "
          "JSON; this machine is shared, so wall rates understate)")
    print(f"{'sample kind':<16} {'tokens':>6} {'ours/cpu-s':>11} {'ref/cpu-s':>10} {'ours/ref':>9} "
          f"{'v5p host needs/s':>17} {'ratio 1 core':>13} {'ratio host':>11}")
    result = {"host_cores": a.host_cores, "v5p_host_flops": V5P_HOST_FLOPS}
    for name, tokens, (ours_wall, ours), (ref_wall, ref) in rows:
        need = demand(tokens)
        print(f"{name:<16} {tokens:>6} {ours:>11.2f} {ref:>10.2f} {ours / ref:>9.2f} {need:>17.2f} "
              f"{ours / need:>13.2f} {ours * a.host_cores / need:>11.1f}")
        result[name.replace(" ", "_")] = {
            "tokens": tokens, "ours_per_cpu_s": round(ours, 3), "ours_per_wall_s": round(ours_wall, 3),
            "reference_per_cpu_s": round(ref, 3), "reference_per_wall_s": round(ref_wall, 3),
            "speedup_vs_reference": round(ours / ref, 3), "v5p_host_demand_samples_per_s": round(need, 3),
            "ratio_1core": round(ours / need, 3), "ratio_per_host": round(ours * a.host_cores / need, 2)}
    result["goal_ratio_ge_10"] = all(v["ratio_per_host"] >= 10 for v in result.values() if isinstance(v, dict))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
