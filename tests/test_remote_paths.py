"""Training workdirs carry their tokenizer, and gs:// paths survive every step that handles a path
(through etils.epath; tests/local_gcs.py serves gs:// from local disk)."""
from __future__ import annotations

import json
import os

import pytest
from local_gcs import local_gcs

from eval.report import model_identity
from instit_jax.convert import cli as convert_cli
from instit_jax.convert.orbax_io import CONFIG_NAME, copy_tokenizer_files
from instit_jax.generate_cli import main as generate_main
from instit_jax.loading import load_tokenizer
from instit_jax.tokenizer import train_tiny_tokenizer
from instit_jax.train import checkpoint as train_ckpt


@pytest.fixture
def tokenizer(tmp_path):
    tok = train_tiny_tokenizer(["a tiny corpus for a tiny tokenizer", "USER: ASSISTANT:"], vocab_size=64)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok, path


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path folded to gs:/... would land here, as a relative folder
    with local_gcs(tmp_path / "gcs_root") as root:
        yield root
    assert not (tmp_path / "gs:").exists()


def test_trainer_copies_the_tokenizer_next_to_init_checkpoint_into_the_workdir(tmp_path, tokenizer, monkeypatch):
    """init.checkpoint with its tokenizer files -> the workdir holds them, so export needs no tokenizer; the
    starting params move onto the 8-device mesh, and a relative workdir is fine."""
    import transformers
    from flax import nnx

    from instit_jax.loading import save_pretrained
    from instit_jax.models.llava_next import LlavaNextModel
    from instit_jax.train.config import llava_config, load_config
    from instit_jax.train.trainer import train

    tok, tok_path = tokenizer
    overrides = ["data.max_tiles=1", "data.max_frames=1", "data.max_tokens=64", "train.total_steps=1"]
    model = LlavaNextModel(llava_config(load_config("configs/tiny.py", overrides)), rngs=nnx.Rngs(0))
    start = save_pretrained(model, tmp_path / "start", tok_path.parent)  # model + its tokenizer files
    config = load_config("configs/tiny.py", [*overrides, f"init.checkpoint={start}"])
    monkeypatch.chdir(tmp_path)
    result = train(config, "run")
    assert result.state.params["image_newline"].sharding.mesh.devices.size == 8
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir("run"))
    assert load_tokenizer("run").to_str() == tok.to_str()
    convert_cli.main(["jax-to-hf", "--ckpt", "run", "--out", "hf"])
    hf_tok = transformers.AutoTokenizer.from_pretrained("hf")
    assert hf_tok.encode("a tiny corpus", add_special_tokens=False) == tok.encode("a tiny corpus").ids


def test_write_tokenizer_file_dir_and_missing(tmp_path, tokenizer):
    tok, tok_path = tokenizer
    (tmp_path / "w1").mkdir()
    assert train_ckpt.write_tokenizer(str(tmp_path / "w1"), str(tok_path)) == ["tokenizer.json"]
    assert train_ckpt.write_tokenizer(str(tmp_path / "w1"), str(tmp_path / "w1")) == []  # resume: itself
    assert train_ckpt.write_tokenizer(str(tmp_path / "w1"), "") == []
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        train_ckpt.write_tokenizer(str(tmp_path / "w1"), str(tmp_path / "nope.json"))


def test_gs_urls_survive(gcs, tmp_path, tokenizer):
    tok, tok_path = tokenizer
    run = "gs://bucket/run"
    assert train_ckpt.write_tokenizer(run, str(tok_path.parent)) == ["tokenizer.json", "tokenizer_config.json"]
    assert (gcs / "bucket" / "run" / "tokenizer.json").read_text() == tok_path.read_text()
    assert load_tokenizer(run).to_str() == tok.to_str()
    (tmp_path / "local").mkdir()
    assert train_ckpt.write_tokenizer(str(tmp_path / "local"), f"{run}/tokenizer.json") == ["tokenizer.json"]
    assert copy_tokenizer_files(run, tmp_path / "local") == ["tokenizer.json", "tokenizer_config.json"]
    # a workdir on gs:// is recognised, and results name it as given
    (gcs / "bucket" / "run" / CONFIG_NAME).write_text("{}")
    (gcs / "bucket" / "run" / "checkpoints").mkdir()
    assert train_ckpt.is_workdir(run)
    identity = model_identity(run)
    assert identity["checkpoint"] == run and identity["config_file"] == CONFIG_NAME and identity["config_sha256"]


@pytest.mark.parametrize("argv", [["instit-convert", "jax-to-hf", "--out", "hf_out"],
                                  ["instit-generate", "--prompt", "hi"]])
def test_cli_ckpt_arguments_keep_the_url(gcs, argv):
    """A gs:// --ckpt reaches the loader as written: the error names gs://bucket/none, not gs:/bucket/none."""
    main = convert_cli.main if argv[0] == "instit-convert" else generate_main
    with pytest.raises(FileNotFoundError, match="^gs://bucket/none: no instit_config.json"):
        main([*argv[1:], "--ckpt", "gs://bucket/none"])
