"""The trainer on Grain-loaded TFRecords (shards built by instit-build-data): trains, checkpoints the
iterator state of the process beside the weights, and resumes the data stream where it stopped."""
import json

import jax
import numpy as np
import pytest
from instit_media import write_tiny_world

from instit_jax import sharding as shd
from instit_jax.chat_template import IMAGE_TOKEN
from instit_jax.data.build import main as build_main
from instit_jax.tokenizer import train_tiny_tokenizer
from instit_jax.train.checkpoint import params_from_workdir
from instit_jax.train.config import load_config
from instit_jax.train.trainer import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    images, videos = write_tiny_world(root, num_videos=2, frames_per_video=4)
    out_i, out_v = tmp_path_factory.mktemp("shards_i"), tmp_path_factory.mktemp("shards_v")
    assert build_main(["--input", str(root / "img.json"), "--media-root", str(root), "--out", str(out_i),
                       "--num-shards", "2"]) == 0
    assert build_main(["--input", str(root / "vid.json"), "--media-root", str(root), "--out", str(out_v),
                       "--num-shards", "1"]) == 0
    tok = train_tiny_tokenizer([json.dumps(images), json.dumps(videos), "USER: ASSISTANT: A chat"] * 5,
                               vocab_size=400)
    tok_path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(tok_path))
    return out_i, out_v, tok_path, tok.get_vocab_size(), tok.token_to_id(IMAGE_TOKEN)


def test_trains_on_grain_and_resumes_data_stream(shards, tmp_path):
    out_i, out_v, tok_path, vocab, image_id = shards
    overrides = [
        "model.vision.image_size=28", "model.vision.patch_size=14", "model.image_grid_pinpoints=((28,56),(56,28),(56,56))",
        f"model.text.vocab_size={vocab}", f"model.image_token_id={image_id}", f"init.tokenizer={tok_path}",
        "data.max_tokens=256", "data.max_tiles=5", "data.max_frames=4", "train.global_batch_size=2",
        "train.total_steps=3", "train.checkpoint_every=2", "train.log_every=1", "train.progress_bar=False",
        "train.async_checkpointing=False", "train.keep_best_checkpoints=1", "mesh.data=1", "mesh.fsdp=1",
        f"data.sources.synthetic_image.path={out_i}", f"data.sources.synthetic_video.path={out_v}"]
    config = load_config("configs/tiny_synthetic.py", overrides)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    first = train(config, str(tmp_path), mesh=mesh)
    assert [r["step"] for r in first.history] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["trained_tokens"] > 0 for r in first.history)
    state_file = tmp_path / "checkpoints" / "3" / "data" / "process_0-of-1.json"
    assert state_file.exists()
    # Continue to step 5 from the step-3 checkpoint: the data stream picks up after batch 3.
    config5 = load_config("configs/tiny_synthetic.py", [*overrides, "train.total_steps=5"])
    second = train(config5, str(tmp_path), mesh=mesh)
    assert [r["step"] for r in second.history] == [4, 5]
    saved = json.loads((tmp_path / "checkpoints" / "5" / "data" / "process_0-of-1.json").read_text())
    assert saved != json.loads(state_file.read_text())
    # keep-best: one params checkpoint, the one with the lowest logged loss among the saved steps
    losses = {r["step"]: r["loss"] for r in first.history + second.history}
    best = [int(p.name) for p in (tmp_path / "best").iterdir() if p.name.isdigit()]
    assert best == [min((2, 3, 4, 5), key=losses.__getitem__)]
    _, params = params_from_workdir(str(tmp_path), best=True)
    assert "language_model" in params
