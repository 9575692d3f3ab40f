"""README's "The real-scale path", run command by command at tiny scale, so README and code cannot drift.

The commands are read from README's block and run through their console entry points, in a scratch folder
that holds what the block expects to find there (videos and images with masks under media/, LLaVA JSON
data, a llava-hf checkpoint, a bench). Only sizes and places change: the annotation endpoint is the local
OpenAI-compatible server (tests/openai_server.py), the 7B recipe is the same recipe with configs/tiny.py's
sizes, the TPU topology is this machine's 8 CPU devices, the gs:// workdir is a local folder, shard counts
are small and the Batch API is polled every 50 ms. The exported model is loaded by transformers at the end.
"""
from __future__ import annotations

import importlib
import json
import re
import shlex
import time
from pathlib import Path

import annotate_data as D
import numpy as np
import torch
import transformers as T
from openai_server import OpenAIServer, instit_responder
from PIL import Image

from data_gen.synthetic import generate_bench
from instit_jax.convert.hf_config import to_llava_hf
from instit_jax.loading import load_pretrained
from instit_jax.tokenizer import train_tiny_tokenizer
from instit_jax.train.config import llava_config, load_config

ROOT = Path(__file__).resolve().parents[1]

# The 7B recipe with configs/tiny.py's model and loop sizes (a few steps, short sequences).
RECIPE = '''
from configs import llava_next_vicuna_7b_instit as real, tiny


def get_config():
    c = real.get_config()
    t = tiny.get_config()
    c.model = t.model
    c.model.text.vocab_size = {vocab}
    c.model.image_token_id = {image_token_id}
    c.freeze = t.freeze
    c.train = t.train
    c.train.total_steps = 2
    c.train.checkpoint_every = 2
    c.data.max_tokens = 256
    c.data.max_tiles = t.data.max_tiles
    c.data.max_frames = t.data.max_frames
    return c
'''


def readme_commands() -> list[list[str]]:
    """The shell commands of README's real-scale block (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## The real-scale path", 1)[1].split("```", 2)[1]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.strip():
            commands.append(shlex.split(current, comments=True))
        current = ""
    return commands


def console_scripts() -> dict[str, str]:
    """name -> "module:function" from setup.py's entry points."""
    return dict(re.findall(r'"(instit-[a-z-]+)=([\w.]+:\w+)"', (ROOT / "setup.py").read_text()))


def substitute(argv: list[str], subs: dict[str, str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--num-shards":
            arg = "2"
        out.append(subs.get(arg, arg))
        if arg == "--batch":  # the local server finishes a batch at once: poll it often
            out += ["--batch-gather-s", "0.05", "--batch-poll-s", "0.05"]
    return out


def _inputs(root: Path, tokenizer) -> None:
    """What the block starts from: annotated media, LLaVA JSON data, a llava-hf checkpoint, a bench."""
    D.write_videos(root / "media", n_ok=2, frames=2)  # media/videos.jsonl + frames + masks
    D.write_images(root / "media", n=2)  # media/images.jsonl
    (root / "llava_next_sft").mkdir()
    rows = []
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
            root / "llava_next_sft" / f"{k}.png")
        rows.append({"id": f"sft{k}", "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "Coloured noise."}]})
    (root / "llava_next_sft.json").write_text(json.dumps(rows))
    generate_bench(root / "inst-it-bench", num_images=1, num_videos=1, frames_per_video=2, questions_per_item=1)
    config = load_config(str(root / "tiny_recipe.py"))
    hf_dir = root / "llava-v1.6-vicuna-7b-hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(to_llava_hf(llava_config(config))))
    torch.manual_seed(0)
    T.LlavaNextForConditionalGeneration(T.AutoConfig.from_pretrained(hf_dir)).save_pretrained(hf_dir)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def test_readme_real_scale_path_runs_at_tiny_scale(tmp_path, monkeypatch):
    corpus = ["What is in the picture? Coloured noise. USER: ASSISTANT: object moved scene frame video"]
    tokenizer = train_tiny_tokenizer(corpus, vocab_size=320)
    (tmp_path / "tiny_recipe.py").write_text(RECIPE.format(vocab=tokenizer.get_vocab_size(),
                                                          image_token_id=tokenizer.token_to_id("<image>")))
    _inputs(tmp_path, tokenizer)
    monkeypatch.chdir(tmp_path)
    scripts = console_scripts()
    commands = readme_commands()
    with OpenAIServer(instit_responder) as srv:
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)  # the bench judge's endpoint
        subs = {"https://api.openai.com/v1": srv.base_url, "gs://bucket/run": "run", "v5p:2x2x1": "cpu:1",
                "configs/llava_next_vicuna_7b_instit.py": str(tmp_path / "tiny_recipe.py")}
        for argv in commands:
            module, func = scripts[argv[0]].split(":")
            main = getattr(importlib.import_module(module), func)
            t0 = time.perf_counter()
            code = main(substitute(argv[1:], subs))
            print(f"{shlex.join(argv[:2])}: {time.perf_counter() - t0:.1f} s")
            assert code in (0, None), f"{shlex.join(argv)} exited {code}"
        assert sum(srv.received.values()) > 0
    programs = [a[0] for a in commands]
    assert {"instit-annotate", "instit-build-data", "instit-convert", "instit-compile", "instit-train",
            "instit-eval"} <= set(programs)
    for source in ("instit_video", "instit_image", "llava_next_sft"):
        assert (tmp_path / "data" / "records" / source / "manifest.json").is_file()
    preds = [json.loads(line) for line in (tmp_path / "results" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and (tmp_path / "results" / "results.md").is_file()
    # the exported model: transformers loads it with its tokenizer and computes our logits
    out = tmp_path / "llava-next-instit-hf"
    hf = T.LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    hf_tok = T.AutoTokenizer.from_pretrained(out)
    ids = np.asarray([hf_tok.encode("USER: What is in the picture? ASSISTANT:")], np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(load_pretrained(tmp_path / "run")(ids, np.ones_like(ids)))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
