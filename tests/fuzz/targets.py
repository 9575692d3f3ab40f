"""Fuzz targets: one per entry point that reads other people's files or messages.

Each target builds its own valid seed inputs (tiny images, shards, checkpoints, replies) in a work folder,
draws mutated input files from them (``strategy``) and feeds them to the loader (``run``). The loader must
either accept the input or raise one of ``errors`` whose message names the input (``names``); any other
exception, an unnamed error or a hang is a crash.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from data_gen.confine import InputRejected

from .mutate import json_document, jsonl_document, mutate_bytes, mutate_tree

Files = dict[str, bytes]


@dataclasses.dataclass
class Target:
    name: str
    doc: str
    setup: Callable[[Path], Any]  # work folder -> context (static media, seed files, the input folder)
    run: Callable[[Any, Files], None]  # writes the files and calls the loader
    errors: tuple[type[BaseException], ...]
    names: Callable[[Any, BaseException], bool]  # does the error message name the input?


def png_bytes(w: int = 8, h: int = 8, color: tuple = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (w, h), color)
    im.putpixel((1, 1), (0, 0, 255))
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_files(folder: Path, files: Files, names: list[str]) -> None:
    """Every name of ``names`` removed from ``folder``, then ``files`` written there."""
    for n in names:
        p = folder / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for n, data in files.items():
        (folder / n).write_bytes(data)


def _kind_strategy(kind: str, value: Any) -> st.SearchStrategy[bytes]:
    if kind == "json":
        return json_document(value)
    if kind == "jsonl":
        return jsonl_document(value)
    if kind == "bytes":
        return mutate_bytes(value, max_ops=4)
    if kind == "strategy":
        return value[0]
    raise ValueError(kind)


def _render(kind: str, value: Any) -> bytes:
    if kind == "json":
        return json.dumps(value).encode()
    if kind == "jsonl":
        return b"".join(json.dumps(v).encode() + b"\n" for v in value)
    if kind == "bytes":
        return value
    return value[1]


def seed_files(seeds: dict[str, tuple[str, Any]]) -> Files:
    """The unmutated input files."""
    return {n: _render(k, v) for n, (k, v) in seeds.items()}


@st.composite
def mutated_files(draw, seeds: dict[str, tuple[str, Any]], droppable: frozenset = frozenset()) -> Files:
    """The seed files with one or two of them mutated (one time in twenty a file another names is left out)."""
    out = seed_files(seeds)
    names = sorted(seeds)
    for _ in range(draw(st.integers(1, 2))):
        n = draw(st.sampled_from(names))
        if n in droppable and draw(st.integers(0, 19)) == 0:
            out.pop(n, None)
            continue
        kind, value = seeds[n]
        out[n] = draw(_kind_strategy(kind, value))
    return out


def _names_any(ctx: Any, err: BaseException) -> bool:
    msg = str(err)
    return any(n in msg for n in ctx.file_names) or str(ctx.folder) in msg


@dataclasses.dataclass
class Ctx:
    """What a target's ``run`` needs: the folder its input files go to, their names and seeds, extras."""

    folder: Path
    seeds: dict[str, tuple[str, Any]]
    extra: dict = dataclasses.field(default_factory=dict)
    droppable: frozenset = frozenset()  # files named by another input file, so their absence is an input error

    @property
    def file_names(self) -> list[str]:
        return sorted(self.seeds)

    def strategy(self) -> st.SearchStrategy[Files]:
        return mutated_files(self.seeds, self.droppable)


def _outside(work: Path) -> None:
    """A file outside the input roots and a symlink to it, reachable by the mutations' path strings."""
    (work / "outside").mkdir(exist_ok=True)
    (work / "outside" / "o.png").write_bytes(png_bytes())


# ------------------------------------------------------------------------------- Inst-IT / LLaVA JSON
def _media(root: Path) -> None:
    (root / "vid").mkdir(parents=True, exist_ok=True)
    (root / "img.png").write_bytes(png_bytes())
    (root / "vid" / "f1.png").write_bytes(png_bytes(color=(10, 200, 10)))
    (root / "vid" / "f2.png").write_bytes(png_bytes(color=(10, 10, 200)))
    (root / "notimage.txt").write_text("not an image")
    (root / "bad.png").write_bytes(png_bytes()[:40])
    if not (root / "escape_link").exists():
        os.symlink(root.parent / "outside", root / "escape_link")


INSTIT_SEED = [
    {"image_id": 1, "instance_level_caption": {"1": "a red square", "2": "a blue dot", "3,4": "two shapes"},
     "image_level_caption": "A red square [1] and a blue dot [2].", "image_path": "img.png"},
    {"video_id": "v1",
     "frame_level_caption": [
         {"timestamp": 1, "frame_name": "f1.png", "instance_level": {"1": "green"}, "image_level": "a frame",
          "temporal_change": None},
         {"timestamp": "<2>", "frame_name": "f2.png", "instance_level": {"1": "blue"}, "image_level": "later",
          "temporal_change": "[1] turned blue"}],
     "question_answer_pairs": [{"question": "What did [1] do at <2>?", "answer": "It turned blue."}],
     "video_level_caption": "[1] changes colour.", "video_path": "vid"},
]
LLAVA_SEED = [
    {"id": "a", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat is [1]?"},
                                                       {"from": "gpt", "value": "A red square."}]},
    {"id": "b", "video": "vid", "frames": ["vid/f1.png", "vid/f2.png"],
     "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Shapes."}]},
    {"id": "c", "video": "vid", "conversations": [{"from": "system", "value": "Be brief."},
                                                  {"from": "human", "value": "<image>\nColour?"},
                                                  {"from": "gpt", "value": "Green."}]},
    {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"id": "s", "image_id": 5, "image": "img.png", "task": "conversation",
     "qa": [{"question": "What is it?", "answer": "A square."}]},
]


def _setup_dataset(seed: list) -> Callable[[Path], Ctx]:
    def setup(work: Path) -> Ctx:
        _outside(work)
        media = work / "media"
        _media(media)
        (work / "in").mkdir(exist_ok=True)
        return Ctx(work / "in", {"data.json": ("json", seed)}, {"media": media, "out": work / "out"})
    return setup


def _run_dataset(ctx: Ctx, files: Files) -> None:
    from instit_jax.data.build import build

    write_files(ctx.folder, files, ctx.file_names)
    out = ctx.extra["out"]
    try:
        build([str(ctx.folder / "data.json")], str(ctx.extra["media"]), str(out), 1, max_frames=4)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------- manifests and masks
def _setup_manifest(work: Path) -> Ctx:
    from data_gen.masks import encode_rle

    _outside(work)
    man = work / "man"
    (man / "f").mkdir(parents=True, exist_ok=True)
    (man / "img.png").write_bytes(png_bytes())
    (man / "f" / "0001.png").write_bytes(png_bytes(color=(0, 90, 0)))
    (man / "f" / "0002.png").write_bytes(png_bytes(color=(0, 0, 90)))
    (man / "notimage.txt").write_text("not an image")
    if not (man / "escape_link").exists():
        os.symlink(work / "outside", man / "escape_link")
    m1 = np.zeros((8, 8), bool)
    m1[1:4, 2:6] = True
    m2 = np.zeros((8, 8), bool)
    m2[5:8, 0:3] = True
    r1, r2 = encode_rle(m1), encode_rle(m2, compress=False)
    seeds = {
        "videos.jsonl": ("jsonl", [
            {"video_id": "v1", "frames": ["f/0001.png", "f/0002.png"], "masks": "masks_v.json"},
            {"video_id": "v2", "frames": ["f/0001.png", "f/0002.png"], "instance_ids": [1, 2]},
            {"video_id": "v3", "frames": ["f/0001.png", "f/0002.png"],
             "masks": {"frames": {"0001.png": {"1": r1}, "0002.png": {"1": r1, "2": r2}}}}]),
        "images.jsonl": ("jsonl", [
            {"image_id": "i1", "image": "img.png", "masks": "masks_i.json"},
            {"image_id": "i2", "image": "img.png", "instance_ids": [1, 2, 3]},
            {"image_id": "i3", "image": "img.png", "masks": {"1": r1, "2": r2}, "instance_ids": ["1", "2"]}]),
        "svit.jsonl": ("jsonl", [
            {"image_id": 42, "width": 800, "height": 600, "captions": ["a dog on grass"],
             "objects": [{"names": ["dog"], "x": 10, "y": 20, "w": 50, "h": 40},
                         {"name": "ball", "bbox": [0.1, 0.1, 0.2, 0.3]}],
             "regions": [{"phrase": "a brown dog", "x": 5, "y": 5, "width": 100, "height": 80}]},
            {"image_id": 43, "scene": "scene.json"}]),
        "masks_v.json": ("json", {"frames": [{"1": r1, "2": r2}, {"1": r1}]}),
        "masks_i.json": ("json", {"1": r1, "2": r2}),
        "scene.json": ("json", {"width": 100, "height": 100, "captions": ["two cats"],
                                "objects": [{"name": "cat", "bbox": [0.0, 0.0, 0.5, 0.5]}],
                                "regions": [{"phrase": "cat", "bbox": [0.5, 0.5, 1.0, 1.0]}]}),
    }
    return Ctx(man, seeds, droppable=frozenset({"masks_v.json", "masks_i.json", "scene.json"}))


def _run_manifest(ctx: Ctx, files: Files) -> None:
    from data_gen.manifest import load_image_item, load_svit_item, load_video, read_manifest
    from data_gen.pipelines.svit_scene import scene_text

    write_files(ctx.folder, files, ctx.file_names)
    for name, kind in (("videos.jsonl", "video"), ("images.jsonl", "image"), ("svit.jsonl", "svit")):
        path = ctx.folder / name
        if not path.exists():
            continue
        for item in read_manifest(path, kind):
            if kind == "video":
                video = load_video(item)
                for i in range(video.context.num_frames):
                    video.marked_frame(i)
            elif kind == "image":
                load_image_item(item).marked()
            else:
                scene_text(load_svit_item(item))


# ------------------------------------------------------------------------------- bench files
BENCH_MC = [{"question_id": "q1", "question": "Which colour is [1]?", "choice_a": "red", "choice_b": "blue",
             "choice_c": "green", "choice_d": "grey", "answer": "A", "image": "q1.png"},
            {"question_id": 2, "question": "And [2]?", "choice_a": "red", "choice_b": "blue",
             "choice_c": "green", "choice_d": "grey", "answer": "B", "image_path": "images/q1.png"}]
BENCH_OE = [{"question_id": "o1", "question": "Describe [1].", "answer": "A red square.", "image": "q1.png"}]
BENCH_VMC = [{"question_id": "v1", "question": "What does [1] do at <2>?", "choice_a": "moves",
              "choice_b": "stays", "choice_c": "spins", "choice_d": "fades", "answer": "C", "video_path": "v1"}]
BENCH_VOE = {"test": [{"question_id": "vo1", "question": "Describe the video.", "answer": "Shapes move.",
                       "video_path": "v1"}]}
BENCH_GENERIC = [{"question_id": "g1", "question": "Which?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
                  "choice_d": "d", "answer": "D", "image": "images/q1.png"},
                 {"question_id": "g2", "question": "What happens?", "answer": "x", "video_path": "videos/v1"},
                 {"question_id": "g3", "config": "image_open_ended", "question": "Q?", "answer": "y",
                  "image": {"bytes": None, "path": "images/q1.png"}}]


def _parquet(records: list) -> bytes | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(records)
        buf = io.BytesIO()
        pq.write_table(table, buf)
    except Exception:  # records pyarrow cannot type (mixed types): the strategy falls back to the seed
        return None
    return buf.getvalue()


@st.composite
def parquet_document(draw, seed: list, seed_bytes: bytes) -> bytes:
    tree = draw(mutate_tree(seed))
    data = _parquet(tree) if isinstance(tree, list) and all(isinstance(r, dict) for r in tree) else None
    data = data or seed_bytes
    if draw(st.integers(0, 2)) == 0:
        data = draw(mutate_bytes(data, max_ops=4))
    return data


def _setup_bench(work: Path) -> Ctx:
    _outside(work)
    bench = work / "bench"
    (bench / "images").mkdir(parents=True, exist_ok=True)
    (bench / "videos" / "v1").mkdir(parents=True, exist_ok=True)
    (bench / "images" / "q1.png").write_bytes(png_bytes())
    (bench / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    for i in range(3):
        (bench / "videos" / "v1" / f"{i:03d}.png").write_bytes(png_bytes(color=(i * 80, 0, 0)))
    if not (bench / "escape_link").exists():
        os.symlink(work / "outside", bench / "escape_link")
    pq_seed = _parquet(BENCH_VMC)
    seeds = {
        "image_multi_choice.json": ("json", BENCH_MC),
        "image_open_ended.jsonl": ("jsonl", BENCH_OE),
        "video_multi_choice.parquet": ("strategy", (parquet_document(BENCH_VMC, pq_seed), pq_seed)),
        "video_open_ended.json": ("json", BENCH_VOE),
        "generic.jsonl": ("jsonl", BENCH_GENERIC),
    }
    return Ctx(bench, seeds, droppable=frozenset(seeds))


def _run_bench(ctx: Ctx, files: Files) -> None:
    from eval.bench import load_bench, load_generic, load_image, load_video

    write_files(ctx.folder, files, ctx.file_names)
    benches = []
    generic = ctx.folder / "generic.jsonl"
    if generic.exists():
        benches.append(load_generic(generic))
        generic.rename(ctx.folder / "generic.txt")  # not a table of the folder bench
    try:
        benches.append(load_bench(ctx.folder))
    finally:
        if (ctx.folder / "generic.txt").exists():
            (ctx.folder / "generic.txt").unlink()
    for bench in benches:
        for item in bench.all_items():
            if item.split == "image":
                load_image(item)
            else:
                load_video(item, max_frames=2)


# ------------------------------------------------------------------------------- TFRecord shards + index
SHARD = "data-00000-of-00001.tfrecord"


def _payloads() -> list[bytes]:
    from instit_jax.data.records import sample_features

    conv = [{"from": "human", "value": "<image>\nWhat is [1]?"}, {"from": "gpt", "value": "A square."}]
    return [sample_features("a", "image", conv, [png_bytes()], source="s.json", frame_names=["img.png"],
                            media_sizes=[(8, 8)]),
            sample_features("b", "video", conv, [png_bytes(), png_bytes()], frame_names=["f1.png", "f2.png"],
                            media_sizes=[(8, 8), (8, 8)]),
            sample_features("t", "text", conv)]


def _shard_files(payloads: list[bytes], manifest_extra: dict | None = None) -> Files:
    from instit_jax.data.records import FORMAT, frame_record

    framed = [frame_record(p) for p in payloads]
    shard = b"".join(framed)
    offs, pos = [], 0
    for f in framed:
        offs.append((pos, len(f)))
        pos += len(f)
    idx = np.asarray(offs, dtype="<u8").reshape(-1, 2).tobytes()
    man = {"format": FORMAT, "num_records": len(payloads),
           "shards": [{"file": SHARD, "num_records": len(payloads), "bytes": len(shard),
                       "sha256": hashlib.sha256(shard).hexdigest()}], **(manifest_extra or {})}
    return {SHARD: shard, SHARD + ".idx": idx, "manifest.json": json.dumps(man).encode()}


@st.composite
def reframed_payloads(draw, payloads: list[bytes]) -> Files:
    """Shard, index and manifest all consistent, one payload (an Example) mutated: reaches the decoder."""
    from instit_jax.data.example_proto import decode_example, encode_example

    payloads = list(payloads)
    k = draw(st.integers(0, len(payloads) - 1))
    if draw(st.booleans()):
        payloads[k] = draw(mutate_bytes(payloads[k], max_ops=4))
    else:  # a well-formed Example whose features are wrong: mutate the feature dict as a JSON-like tree
        ex = decode_example(payloads[k])
        tree = {key: ([v.decode("latin-1") for v in val] if isinstance(val, list) else val.tolist())
                for key, val in ex.items()}
        tree = draw(mutate_tree(tree))
        feats = {}
        if isinstance(tree, dict):
            for key, val in tree.items():
                vals = val if isinstance(val, list) else [val]
                if all(isinstance(v, str) for v in vals) and vals:
                    feats[str(key)] = [v.encode("utf-8", "surrogatepass") for v in vals]
                elif all(isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 for v in vals):
                    feats[str(key)] = np.asarray(vals, dtype=np.int64)
                elif all(isinstance(v, int | float) for v in vals):
                    feats[str(key)] = np.asarray(vals, dtype=np.float32)
        payloads[k] = encode_example(feats)
    return _shard_files(payloads)


def _setup_records(work: Path) -> Ctx:
    payloads = _payloads()
    files = _shard_files(payloads)
    folder = work / "records"
    folder.mkdir(exist_ok=True)
    seeds = {SHARD: ("bytes", files[SHARD]), SHARD + ".idx": ("bytes", files[SHARD + ".idx"]),
             "manifest.json": ("json", json.loads(files["manifest.json"]))}
    return Ctx(folder, seeds, {"payloads": payloads}, frozenset({SHARD, SHARD + ".idx"}))


@st.composite
def records_files(draw, ctx: Ctx) -> Files:
    if draw(st.integers(0, 2)) == 0:
        return draw(reframed_payloads(ctx.extra["payloads"]))
    return draw(mutated_files(ctx.seeds))


def _run_records(ctx: Ctx, files: Files) -> None:
    from instit_jax.data.records import ShardedRecordSource, verify_manifest

    write_files(ctx.folder, files, ctx.file_names)
    src = ShardedRecordSource(ctx.folder)
    for i in range(len(src)):
        src[i]
    verify_manifest(ctx.folder)


# ------------------------------------------------------------------------------- config.json
HF_CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
    "vision_config": {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 16,
                      "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
    "text_config": {"model_type": "llama", "vocab_size": 128, "hidden_size": 16, "intermediate_size": 32,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
                    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
    "image_token_index": 127, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]],
    "tie_word_embeddings": False,
}
ONEVISION_CONFIG = {**HF_CONFIG, "model_type": "llava_onevision", "video_token_index": 126,
                    "vision_aspect_ratio": "anyres_max_9",
                    "vision_config": {**HF_CONFIG["vision_config"], "model_type": "siglip_vision_model"},
                    "text_config": {**HF_CONFIG["text_config"], "model_type": "qwen2"},
                    "vision_feature_select_strategy": "full"}
ORIGINAL_CONFIG = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
    "vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "anyres",
    "image_grid_pinpoints": "(1x1),...,(2x2)", "mm_patch_merge_type": "spatial_unpad",
    "mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "bilinear", "mm_newline_position": "one_token",
}
ORIGINAL_VISION_CONFIG = {**ORIGINAL_CONFIG, "architectures": ["LlavaQwenForCausalLM"], "mm_vision_tower": "x",
                          "vision_config": HF_CONFIG["vision_config"], "image_grid_pinpoints": [[32, 64]]}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64",
             np.dtype("uint8"): "U8"}
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    data, pos = b"", 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _setup_config(work: Path) -> Ctx:
    import instit_jax.loading  # noqa: F401  (imports JAX: done here, outside the per-input time limit)

    hf = safetensors_bytes({"language_model.lm_head.weight": np.zeros((4, 2), np.float32)})
    orig = safetensors_bytes({"model.mm_projector.0.weight": np.zeros((2, 2), np.float32),
                              "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight":
                                  np.zeros((2,), np.float32)})
    folders = {}
    for name, weights in (("hf", hf), ("orig", orig)):
        folders[name] = work / name
        folders[name].mkdir(exist_ok=True)
        (folders[name] / "model.safetensors").write_bytes(weights)
    seeds = {"hf/config.json": ("json", HF_CONFIG), "hf/onevision.json": ("json", ONEVISION_CONFIG),
             "orig/config.json": ("json", ORIGINAL_CONFIG), "orig/vision.json": ("json", ORIGINAL_VISION_CONFIG)}
    return Ctx(work, seeds)


def _run_config(ctx: Ctx, files: Files) -> None:
    from instit_jax.loading import read_hf_config

    for name in ctx.file_names:
        if name not in files:
            continue
        folder = ctx.folder / name.split("/")[0]
        (folder / "config.json").write_bytes(files[name])
        read_hf_config(folder)


def _names_config(ctx: Ctx, err: BaseException) -> bool:
    return "config.json" in str(err) or "model.safetensors" in str(err)


# ------------------------------------------------------------------------------- safetensors headers
@st.composite
def safetensors_document(draw, header: dict, data: bytes) -> bytes:
    """A header mutated as JSON (its length prefix kept right), or the whole file's bytes mutated."""
    if draw(st.integers(0, 3)) == 0:
        text = json.dumps(header).encode()
        return draw(mutate_bytes(struct.pack("<Q", len(text)) + text + data, max_ops=4))
    from .mutate import dumps
    text = dumps(draw(mutate_tree(header, 4)))
    body = data if draw(st.integers(0, 3)) else data[:draw(st.integers(0, len(data)))]
    length = len(text) if draw(st.integers(0, 7)) else draw(st.sampled_from([0, 7, 2**63, 2**64 - 1,
                                                                           len(text) + 1, len(text) - 1]))
    return struct.pack("<Q", max(0, min(length, 2**64 - 1))) + text + body


def _setup_safetensors(work: Path) -> Ctx:
    import instit_jax.convert.hf_weights  # noqa: F401  (imports JAX: outside the per-input time limit)

    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(4, np.float16),
               "c.ids": np.arange(2, dtype=np.int64), "d.empty": np.zeros((0, 3), np.uint8)}
    whole = safetensors_bytes(tensors)
    (n,) = struct.unpack("<Q", whole[:8])
    header, data = json.loads(whole[8:8 + n]), whole[8 + n:]
    shard2 = safetensors_bytes({"e.weight": np.ones((2, 2), np.float32)})
    index = {"metadata": {"total_size": 48}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}
             | {"e.weight": "model-00002-of-00002.safetensors"}}
    folder = work / "ckpt"
    folder.mkdir(exist_ok=True)
    seeds = {"model-00001-of-00002.safetensors": ("strategy", (safetensors_document(header, data), whole)),
             "model-00002-of-00002.safetensors": ("bytes", shard2),
             "model.safetensors.index.json": ("json", index)}
    return Ctx(folder, seeds, droppable=frozenset(n for n in seeds if n.endswith(".safetensors")))


def _run_safetensors(ctx: Ctx, files: Files) -> None:
    from safetensors import safe_open

    from instit_jax.convert.hf_weights import checkpoint_keys, weight_files

    write_files(ctx.folder, files, ctx.file_names)
    paths = weight_files(ctx.folder)
    checkpoint_keys(paths)  # check_safetensors, then safe_open: a header that passes must open
    for p in paths:
        with safe_open(str(p), framework="numpy") as sf:
            for k in sf.keys():
                sf.get_tensor(k)


# ------------------------------------------------------------------------------- annotation client replies
def _reply(content: Any) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(content),
                                                 "refusal": None}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}}


CLIENT_CALLS = {
    "frame": {"instances": [{"id": "1", "caption": "a red square"}, {"id": "2", "caption": "left of [1]"}],
              "image_caption": "Two shapes [1] [2] at <2>.", "temporal_change": "[1] moved since <1>."},
    "describe": {"description": "[1] moves from <1> to <2>; [2] stays."},
    "qa": {"pairs": [{"question": "What does [1] do at <1>-<2>?", "answer": "It moves."}]},
    "image": {"instances": [{"id": "1", "caption": "a square"}, {"id": "1,2", "caption": "both"}],
              "image_caption": "[1] and [2]."},
    "referring_qa": {"pairs": [{"question": f"Where is <st>dog<ed>[0.1, 0.2, 0.{k + 3}, 0.5]?", "answer": "left"}
                               for k in range(10)]},
}


@st.composite
def reply_files(draw) -> Files:
    call = draw(st.sampled_from(sorted(CLIENT_CALLS)))
    reply = _reply(CLIENT_CALLS[call])
    if draw(st.booleans()):  # mutate the model's JSON answer inside the reply
        reply["choices"][0]["message"]["content"] = json.dumps(draw(mutate_tree(CLIENT_CALLS[call])))
    headers = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
               "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "30000",
               "x-ratelimit-remaining-tokens": "29000", "x-ratelimit-reset-tokens": "1m2.5s"}
    body = draw(json_document(reply, max_ops=3))
    hdr = draw(json_document(headers, max_ops=2)) if draw(st.integers(0, 3)) == 0 else json.dumps(headers).encode()
    return {"call.txt": call.encode(), "reply.json": body, "headers.json": hdr}


class _FakeOpenAI:
    """Stands in for ``openai.AsyncOpenAI``: ``post`` returns the fuzzed reply bytes and headers."""

    def __init__(self):
        self.content, self.headers = b"", {}

    async def post(self, path, body, cast_to):
        import httpx
        return httpx.Response(200, content=self.content, headers=self.headers)

    async def close(self):
        pass


def _setup_client(work: Path) -> Ctx:
    from data_gen.client import ChatClient
    from data_gen.pipelines.annotator import OpenAIAnnotator

    client = ChatClient("http://127.0.0.1:9/v1", "gpt-4o-2024-08-06", api_key="sk-fuzz", max_retries=0,
                        max_reasks=1, backoff_base=0.0, backoff_cap=0.0)
    client.oa = _FakeOpenAI()
    seeds = {"call.txt": ("bytes", b"frame"), "reply.json": ("json", _reply(CLIENT_CALLS["frame"])),
             "headers.json": ("json", {})}
    return Ctx(work, seeds, {"client": client, "annotator": OpenAIAnnotator(client)})


def _run_client(ctx: Ctx, files: Files) -> None:
    import httpx

    from data_gen.pipelines.schemas import ImageContext, VideoContext
    from data_gen.pipelines.svit_scene import SvitScene

    fake = ctx.extra["client"].oa
    fake.content = files.get("reply.json", b"")
    try:
        hdr = json.loads(files.get("headers.json", b"{}"))
        fake.headers = httpx.Headers({str(k): str(v) for k, v in hdr.items()} if isinstance(hdr, dict) else {})
    except (ValueError, RecursionError):  # headers arrive as text; only what httpx can carry is tried
        fake.headers = httpx.Headers({})
    ann = ctx.extra["annotator"]
    video = VideoContext("v1", ["1", "2"], ["f1.png", "f2.png"])
    frame = np.zeros((8, 8, 3), np.uint8)
    call = files.get("call.txt", b"frame").decode("ascii", "replace")
    prev = None
    if call == "frame":
        coro = ann.annotate_frame(video, 2, frame, frame, prev)
    elif call == "describe":
        coro = ann.describe_video(video, [])
    elif call == "qa":
        coro = ann.qa(video, [])
    elif call == "image":
        coro = ann.annotate_image(ImageContext("i1", ["1", "2"]), frame)
    else:
        coro = ann.svit_task(SvitScene("42", None, ["a dog"], [("dog", [0.1, 0.2, 0.3, 0.5])], []),
                             "referring_qa")
    asyncio.run(coro)


def _names_client(ctx: Ctx, err: BaseException) -> bool:
    return bool(str(err).strip())


# ------------------------------------------------------------------------------- server requests
class _Answer:
    def __init__(self, n: int):
        self.text, self.tokens, self.num_prompt_tokens = "ok", [5] * n, 3


class _FakeAssistant:
    """Checks what the server hands the model: a question string, RGB images, finite sampling numbers."""

    stop_ids = (2,)

    def answer(self, question, *, max_new_tokens, temperature, top_p, seed, stop, image=None, frames=None):
        import math
        assert isinstance(question, str)
        assert isinstance(max_new_tokens, int) and max_new_tokens >= 1
        assert math.isfinite(temperature) and temperature >= 0, temperature
        assert math.isfinite(top_p) and 0 < top_p <= 1, top_p
        assert isinstance(seed, int) and -(2**63) <= seed < 2**64, seed
        assert all(isinstance(s, str) for s in stop)
        for im in ([image] if image is not None else []) + list(frames or []):
            assert im.mode == "RGB"
        return _Answer(min(max_new_tokens, 4))


@st.composite
def request_files(draw, png: bytes) -> Files:
    img = png if draw(st.integers(0, 2)) else draw(mutate_bytes(png, max_ops=3))
    url = "data:image/png;base64," + base64.b64encode(img).decode()
    seeds = [
        {"model": "tiny", "messages": [{"role": "user", "content": "Hello?"}]},
        {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "What is [1]?"}, {"type": "image_url", "image_url": {"url": url}}]}],
         "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"]},
        {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": url},
            {"type": "text", "text": "What happens at <2>?"}]}], "stop": "END", "n": 1, "stream": True},
        {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "img.png"}}, {"type": "text", "text": "Colour?"}]}],
         "max_completion_tokens": 4},
    ]
    return {"body.json": draw(json_document(draw(st.sampled_from(seeds)), max_ops=4))}


def _setup_serve(work: Path) -> Ctx:
    from instit_jax.serve import Server

    _outside(work)
    media = work / "media"
    _media(media)
    server = Server(_FakeAssistant(), "tiny", media_root=str(media), max_tokens_limit=64)
    return Ctx(work, {"body.json": ("json", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]})},
               {"server": server, "png": png_bytes()})


def _run_serve(ctx: Ctx, files: Files) -> None:
    from instit_jax.serve import parse_body

    ctx.extra["server"].complete(parse_body(files.get("body.json", b"")))


def _names_serve(ctx: Ctx, err: BaseException) -> bool:
    msg = str(err)
    return bool(msg) and (getattr(err, "param", None) is not None or ":" in msg)


# ------------------------------------------------------------------------------- the table
def _errors_serve() -> tuple:
    from instit_jax.serve import BadRequest
    return (BadRequest,)


def _errors_client() -> tuple:
    from data_gen.client import AnnotationError
    return (AnnotationError,)


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("instit_json", "Inst-IT image/video JSON -> instit-build-data (build)", _setup_dataset(INSTIT_SEED),
           _run_dataset, (InputRejected,), _names_any),
    Target("llava_json", "LLaVA / SVIT JSON -> instit-build-data (build)", _setup_dataset(LLAVA_SEED),
           _run_dataset, (InputRejected,), _names_any),
    Target("manifest", "manifest JSONL (video / image / svit) + mask files (COCO RLE) -> load_video / "
           "load_image_item / load_svit_item, marks drawn", _setup_manifest, _run_manifest, (InputRejected,),
           _names_any),
    Target("bench", "bench folder (JSON / JSONL / parquet tables) and generic JSONL -> load_bench / "
           "load_generic, media opened", _setup_bench, _run_bench, (InputRejected,), _names_any),
    Target("records", "TFRecord shard + .idx + manifest.json -> ShardedRecordSource, every record parsed",
           _setup_records, _run_records, (InputRejected,), _names_any),
    Target("hf_config", "config.json (llava-hf, onevision, original, original + vision_config) -> "
           "loading.read_hf_config", _setup_config, _run_config, (InputRejected,), _names_config),
    Target("safetensors", "safetensors files + model.safetensors.index.json -> weight_files, "
           "check_safetensors, safe_open", _setup_safetensors, _run_safetensors, (InputRejected,), _names_any),
    Target("client_reply", "chat-completion reply bytes + rate-limit headers -> OpenAIAnnotator calls "
           "(ChatClient reply parsing, schema, [ID] / <t> / box checks)", _setup_client, _run_client,
           (), _names_client),
    Target("serve_request", "instit-serve request body -> parse_body + Server.complete (fake model)",
           _setup_serve, _run_serve, (), _names_serve),
]}


def errors_of(target: Target) -> tuple[type[BaseException], ...]:
    """The accepted error types of ``target`` (imported lazily for the client and the server)."""
    if target.name == "client_reply":
        return _errors_client()
    if target.name == "serve_request":
        return _errors_serve()
    return target.errors


def strategy_of(target: Target, ctx: Ctx) -> st.SearchStrategy[Files]:
    if target.name == "records":
        return records_files(ctx)
    if target.name == "client_reply":
        return reply_files()
    if target.name == "serve_request":
        return request_files(ctx.extra["png"])
    return ctx.strategy()
