"""Writes notebooks/colab_tpu_quickstart.ipynb from the cells below (edit here, then re-run this script).

    python notebooks/make_quickstart.py            # rewrite the notebook
    python notebooks/make_quickstart.py --check    # exit 1 if the notebook is not what this script writes

Plain JSON (nbformat 4.5) so no Jupyter package is needed. Each code cell runs top to bottom on a CPU in
a few minutes; with INSTIT_NOTEBOOK_QUICK=1 (the test) every size shrinks to the smallest that works.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import textwrap
from pathlib import Path

NOTEBOOK = Path(__file__).with_name("colab_tpu_quickstart.ipynb")

CELLS: list[tuple[str, str]] = [
    ("markdown", """
    # instit-jax quickstart: Inst-IT in miniature on Colab (TPU, GPU or CPU)

    This notebook runs the whole method end to end with the Python API, on data it generates itself (no
    download, no API key):

    1. a synthetic world of scenes with exact masks and track IDs, drawn with Set-of-Marks visual prompts;
    2. instance-level annotations (ground-truth annotator) -> tokenizer -> TFRecord shards;
    3. a small LLaVA-NeXT trained with the sharded JAX trainer (`configs/tiny_synthetic.py`);
    4. an answer about one marked image;
    5. evaluation on a small held-out synthetic Inst-It-Bench (multiple choice + open ended);
    6. export to the Hugging Face / PyTorch layout and a logit check with `transformers`.

    It runs top to bottom on a CPU runtime in a few minutes; on a TPU runtime
    (Runtime -> Change runtime type -> TPU) the same cells use every TPU core. The model is tiny and
    starts from random weights, so expect accuracies near chance: the point is the pipeline.
    """),
    ("code", """
    import importlib.util
    import os

    QUICK = os.environ.get("INSTIT_NOTEBOOK_QUICK") == "1"  # smallest sizes (used by the test suite)
    WORKDIR = os.environ.get("INSTIT_NOTEBOOK_WORKDIR", "/content/instit_quickstart" if os.path.isdir("/content")
                             else "instit_quickstart")
    # Where to install instit-jax from when it is not importable yet: your copy of the repository as a pip
    # requirement, e.g. "git+https://github.com/<you>/instit-jax.git", or a local checkout path.
    INSTIT_JAX_SOURCE = os.environ.get("INSTIT_JAX_SOURCE", "")

    if importlib.util.find_spec("instit_jax") is None:
        if not INSTIT_JAX_SOURCE:
            raise RuntimeError("instit_jax is not installed: set INSTIT_JAX_SOURCE in this cell to the repository")
        %pip install -q "{INSTIT_JAX_SOURCE}"
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        %pip install -q torch transformers  # only for the PyTorch export check at the end
    """),
    ("code", """
    import jax

    BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu"
    print(f"jax {jax.__version__} on {BACKEND}: {jax.device_count()} device(s)")
    for d in jax.devices():
        print("  ", d.device_kind, d)
    """),
    ("markdown", """
    ## 1-2. Synthetic world, Set-of-Marks annotations, TFRecords

    `generate_world` draws scenes (images and short videos) with exact instance masks; `annotate_world`
    runs the data_gen annotation pipelines (Set-of-Marks rendering + frame-, video- and instance-level
    answers) with the ground-truth annotator. Swap in `OpenAIAnnotator` to annotate with GPT-4o.
    """),
    ("code", """
    import json
    from pathlib import Path

    import matplotlib.pyplot as plt
    from PIL import Image

    from data_gen.groundtruth import annotate_world
    from data_gen.synthetic import generate_bench, generate_world

    SIZE = (dict(images=12, videos=4, qa_images=4, qa_videos=2, bench_images=4, bench_videos=2, steps=6, batch=4)
            if QUICK else dict(images=160, videos=60, qa_images=120, qa_videos=48, bench_images=16, bench_videos=8,
                               steps=150, batch=8))
    wd = Path(WORKDIR).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    world = generate_world(wd / "world", num_images=SIZE["images"], num_videos=SIZE["videos"],
                           frames_per_video=6, seed=0)
    # General instruction data in the bench's question style, from other scenes (what LLaVA's general SFT
    # data does for the real model), and the held-out bench itself.
    qa = generate_bench(wd / "train_qa", num_images=SIZE["qa_images"], num_videos=SIZE["qa_videos"],
                        frames_per_video=6, seed=500)
    bench = generate_bench(wd / "bench", num_images=SIZE["bench_images"], num_videos=SIZE["bench_videos"],
                           frames_per_video=6, seed=1000)  # held out: different scenes
    ann = annotate_world(world["root"], wd / "annotations")

    record = json.loads(Path(ann["image_json"]).read_text())[0]
    marked_image = Path(ann["media_root"]) / record["image_path"]
    print(record["image_level_caption"])
    plt.imshow(Image.open(marked_image))
    plt.axis("off")
    plt.show()
    """),
    ("code", """
    from demo.conversations import bench_style_conversations, train_tokenizer
    from instit_jax.chat_template import IMAGE_TOKEN
    from instit_jax.data.build import build

    qa_json = wd / "train_qa.json"
    qa_json.write_text(json.dumps(bench_style_conversations(Path(qa["root"]), "qa")))  # LLaVA-format JSON
    tokenizer = train_tokenizer(wd, [Path(ann["image_json"]), Path(ann["video_json"]), qa_json])  # a tiny BPE
    for kind, inputs, media_root in [("image", [ann["image_json"]], ann["media_root"]),
                                     ("video", [ann["video_json"]], ann["media_root"]),
                                     ("qa", [str(qa_json)], qa["root"])]:
        manifest = build(inputs, media_root, str(wd / "records" / kind), 2)
        print(f"{kind}: {manifest['num_records']} examples in {len(manifest['shards'])} TFRecord shards")
    """),
    ("markdown", """
    ## 3. Train

    `configs/tiny_synthetic.py` is the demo recipe: a small CLIP-style tower + a small Llama, anyres tiles,
    video frames, the first two vision blocks frozen. Overrides use the same `field=value` syntax as
    `instit-train --config.field=value`; `add_source` mixes in one more weighted TFRecord source. On CPU one
    device is used; on TPU/GPU the default mesh shards over every device (FSDP).
    """),
    ("code", """
    import configs.tiny_synthetic
    from configs.base import add_source
    from instit_jax.sharding import make_mesh
    from instit_jax.train import load_config, train

    overrides = [
        f"init.tokenizer={wd / 'tokenizer.json'}",
        f"model.text.vocab_size={tokenizer.get_vocab_size()}",
        f"model.image_token_id={tokenizer.token_to_id(IMAGE_TOKEN)}",
        f"data.sources.synthetic_image.path={wd / 'records' / 'image'}",
        f"data.sources.synthetic_video.path={wd / 'records' / 'video'}",
        f"train.total_steps={SIZE['steps']}",
        f"train.global_batch_size={SIZE['batch']}",
        f"train.checkpoint_every={SIZE['steps']}",
        "train.log_every=2",
        "optim.lr=3e-3",
        "optim.vision_lr=3e-3",  # random-init tower: it learns as fast as the language model
        f"train.progress_bar={not QUICK}",
    ]
    config = load_config(configs.tiny_synthetic.__file__, overrides)
    add_source(config, "bench_style_qa", str(wd / "records" / "qa"), 2.0)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]) if BACKEND == "cpu" else None
    result = train(config, str(wd / "run"), mesh=mesh)
    losses = [r["loss"] for r in result.history]
    print("loss:", " ".join(f"{x:.3f}" for x in losses[:3]), "...", " ".join(f"{x:.3f}" for x in losses[-3:]))
    plt.plot([r["step"] for r in result.history], losses)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.show()
    """),
    ("markdown", """
    ## 4. Ask about one marked image

    The trained model is saved in our checkpoint layout (Orbax params + config + tokenizer) and loaded
    back by `instit_jax.Assistant`, the Python API behind `instit-generate --ckpt DIR --image IMG --prompt ...`.
    """),
    ("code", """
    from PIL import Image

    import instit_jax

    model = result.model()
    ckpt = instit_jax.save_pretrained(model, wd / "checkpoint", tokenizer)
    question = "What is the object marked [1]?"
    assistant = instit_jax.Assistant.from_pretrained(str(ckpt))
    answer = assistant.answer(question, image=Image.open(marked_image), max_new_tokens=24)
    print("Q:", question)
    print("A:", answer.text)
    """),
    ("markdown", """
    ## 5. Evaluate on the held-out synthetic Inst-It-Bench

    `run_bench` answers the bench's image and video questions with the same engine as the `Assistant` above
    (`instit_jax.assistant.BatchEngine`: continuous batching, a KV cache slot per question);
    `score_predictions` scores multiple choice by letter and open-ended answers with a judge (here the
    synthetic world's rule-based judge; `instit-eval --judge openai` uses GPT-4o like the paper).
    """),
    ("code", """
    from eval.bench import load_bench
    from eval.judge import RuleJudge
    from eval.predictions import score_predictions
    from eval.runner import run_bench

    bench_set = load_bench(bench["root"])
    predictions = run_bench(model, tokenizer, bench_set, batch_size=8, max_new_tokens=16, data_parallel=False,
                            out_path=wd / "eval" / "predictions.jsonl")
    scores = score_predictions(predictions, bench=bench_set, mode="strict", judge=RuleJudge())
    for name, summary in scores.summaries.items():
        acc = summary["accuracy"]
        print(f"{name:20s} accuracy {'-' if acc is None else f'{acc:5.1f}%'}  ({summary['total']} questions)")
    """),
    ("markdown", """
    ## 6. Export to PyTorch and check the logits with transformers

    `instit-convert jax-to-hf` writes a llava-hf directory (`config.json` + safetensors + tokenizer) that
    `LlavaNextForConditionalGeneration.from_pretrained` loads. Both models get the same processor arrays
    (anyres tiles, NCHW) for the marked image and a prompt.
    """),
    ("code", """
    import numpy as np
    import torch
    import transformers

    from instit_jax import processing
    from instit_jax.convert.cli import jax_to_hf

    hf_dir = wd / "hf"
    jax_to_hf(Path(ckpt), hf_dir)
    hf_model = transformers.LlavaNextForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()

    image = Image.open(marked_image).convert("RGB")
    proc = processing.image_processor_config(model.cfg)
    pixel_values, image_sizes = processing.preprocess_images([image], proc)
    plan = processing.token_planner(model.cfg).image((image.height, image.width))
    input_ids = np.array([tokenizer.encode("USER: ").ids + [model.cfg.image_token_id] * plan.count
                          + tokenizer.encode(f" {question} ASSISTANT:").ids], np.int32)
    attention_mask = np.ones_like(input_ids)

    ours = np.asarray(model(input_ids, attention_mask, pixel_values, image_sizes))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.from_numpy(input_ids).long(),
                          attention_mask=torch.from_numpy(attention_mask).long(),
                          pixel_values=torch.from_numpy(pixel_values), image_sizes=torch.from_numpy(image_sizes)
                          ).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"logits {ours.shape}: max |JAX - PyTorch| = {diff:.2e}")
    assert diff < 1e-3, diff
    """),
    ("markdown", """
    ## Next steps

    * Real scale: `configs/llava_next_vicuna_7b_instit.py` / `configs/llava_next_qwen2_7b_instit.py` with
      `init.checkpoint` pointing at a llava-hf LLaVA-NeXT directory (`instit-train`, see docs/tpu_pods.md).
    * LoRA instead of full tuning of the language model: add `lora.rank=8` (and `lora.alpha`) to the
      overrides; exports hold the merged weights.
    * The full demo with a stage-1 / stage-2 comparison: `instit-demo`.
    """),
]


def _source(text: str) -> list[str]:
    lines = textwrap.dedent(text).strip("\n").splitlines(keepends=True)
    if lines:
        lines[-1] = lines[-1].rstrip("\n")
    return lines


def notebook() -> dict:
    """The notebook as nbformat-4.5 JSON data."""
    cells = []
    for i, (kind, text) in enumerate(CELLS):
        cell = {"cell_type": kind, "id": hashlib.sha1(f"{i}:{kind}".encode()).hexdigest()[:8], "metadata": {},
                "source": _source(text)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "TPU",
            "colab": {"name": NOTEBOOK.name, "provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render() -> str:
    return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the notebook differs from what this writes")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not NOTEBOOK.exists() or NOTEBOOK.read_text() != text:
            print(f"{NOTEBOOK} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    NOTEBOOK.write_text(text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
