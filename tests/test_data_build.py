"""instit-build-data on LLaVA JSON: images, frame folders, text-only; missing media named."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instit_jax.data.build import main
from instit_jax.data.records import ShardedRecordSource, verify_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_llava_json_build(tmp_path):
    (tmp_path / "clip").mkdir()
    for t in range(5):
        Image.fromarray(np.full((8, 12, 3), 40 * t, np.uint8)).save(tmp_path / "clip" / f"{t:02d}.png")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "a.bmp")  # re-encoded to PNG
    recs = [{"id": "img", "image": "a.bmp", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                             {"from": "gpt", "value": "A"}]},
            {"id": "vid", "video": "clip", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                            {"from": "gpt", "value": "A"}]},
            {"id": "txt", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "llava.json"), "--media-root", str(tmp_path), "--out", str(out),
                 "--num-shards", "1", "--max-frames", "3"]) == 0
    verify_manifest(out)
    src = ShardedRecordSource(out)
    by_id = {src[i]["id"]: src[i] for i in range(len(src))}
    assert by_id["img"]["media"][0][:8] == b"\x89PNG\r\n\x1a\n" and by_id["img"]["media_sizes"].tolist() == [[6, 6]]
    assert by_id["vid"]["frame_names"] == ["clip/00.png", "clip/02.png", "clip/04.png"]  # linspace of 5 -> 3
    assert by_id["txt"]["kind"] == "text" and by_id["txt"]["media"] == []
    recs[0]["image"] = "missing.jpg"
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    with pytest.raises(FileNotFoundError, match=r"llava.json: conversation 0 \(id 'img'\).*missing.jpg"):
        main(["--input", str(tmp_path / "llava.json"), "--media-root", str(tmp_path), "--out", str(out)])
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert main(["--input", str(tmp_path / "llava.json"), "--media-root", str(tmp_path), "--out", str(out),
                 "--skip-missing", "--num-shards", "1"]) == 0
    assert len(ShardedRecordSource(out)) == 2


def test_build_data_loads_no_jax_orbax_or_grain(tmp_path):
    """instit-build-data is numpy + Pillow: importing and running it loads no JAX, Orbax or Grain (~3 s)."""
    (tmp_path / "llava.json").write_text(json.dumps(
        [{"id": "txt", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]))
    code = ("import sys\n"
            "from instit_jax.data.build import main\n"
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'orbax', 'grain'})\n"
            "print(heavy())\n"
            f"main(['--input', {str(tmp_path / 'llava.json')!r}, '--media-root', {str(tmp_path)!r},"
            f" '--out', {str(tmp_path / 'out')!r}, '--num-shards', '1'])\n"
            "print(heavy())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[]", f"importing instit_jax.data.build loaded {lines[0]}"
    assert lines[-1] == "[]", f"running instit-build-data loaded {lines[-1]}"
