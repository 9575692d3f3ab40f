"""Checkpoint inputs that lie: safetensors headers and config.json fields are refused with named errors."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from instit_jax.convert.hf_config import HFConfigError, from_llava_hf, from_original
from instit_jax.convert.hf_weights import weight_files
from instit_jax.convert.safetensors_header import CheckpointFileError, check_safetensors


def _raw(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_valid_file_passes(tmp_path):
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.int8)}, str(tmp_path / "ok.safetensors"))
    assert set(check_safetensors(tmp_path / "ok.safetensors")) == {"a", "b"}


@pytest.mark.parametrize("header,data,msg", [
    ({"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4, "needs"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4096]}}, b"\0" * 4, "outside the data buffer"),
    ({"a": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
      "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, "overlap"),
    ([1, 2], b"", "JSON object"),
])
def test_lying_headers_refused(tmp_path, header, data, msg):
    f = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointFileError, match=msg) as e:
        check_safetensors(f)
    assert "bad.safetensors" in str(e.value)


def test_header_length_beyond_file(tmp_path):
    f = tmp_path / "huge.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CheckpointFileError, match="header length"):
        check_safetensors(f)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointFileError, match="too short"):
        check_safetensors(tmp_path / "short.safetensors")


def test_index_naming_files_outside_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(ValueError, match="outside the root"):
        weight_files(tmp_path)


HF = {"model_type": "llava_next", "vision_config": {"model_type": "clip", "image_size": 336, "patch_size": 14,
                                                    "hidden_size": 64, "num_attention_heads": 4},
      "text_config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}}


@pytest.mark.parametrize("path,value,msg", [
    (("text_config", "vocab_size"), 1 << 40, "vocab_size = .* out of range"),
    (("text_config", "num_hidden_layers"), 0, "num_hidden_layers = 0"),
    (("vision_config", "image_size"), 10 ** 9, "image_size"),
    (("vision_config", "hidden_size"), "big", "must be an integer"),
    (("text_config", "num_key_value_heads"), 3, "multiple of num_key_value_heads"),
    (("image_grid_pinpoints",), [[336, 10 ** 9]], "pinpoints"),
    (("text_config",), [1], "config.json"),
])
def test_hf_config_out_of_range_refused(path, value, msg):
    d = json.loads(json.dumps(HF))
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(HFConfigError, match=msg):
        from_llava_hf(d, "ckpt/config.json")


def test_original_config_refused_and_valid_kept():
    assert from_llava_hf(HF).text.vocab_size == 100
    with pytest.raises(HFConfigError, match="ckpt/config.json"):
        from_original({"mm_vision_tower": "openai/clip-vit-large-patch14-336", "hidden_size": -4}, 24,
                      "ckpt/config.json")
    with pytest.raises(HFConfigError, match="JSON object"):
        from_original([], 24)
