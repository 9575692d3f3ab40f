"""Media paths named by datasets, manifests and benches stay under their roots; size limits hold."""
import json
import os

import pytest
from PIL import Image

from data_gen.confine import InputRejected, ResourceLimitError, UnsafePathError, check_pixels, confine
from data_gen.manifest import load_image_item, read_manifest
from instit_jax.data.bench import load_bench
from instit_jax.data.build import llava_to_payload, read_media
from instit_jax.data.build import main as build_main


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (8, 6), "red").save(root / "img" / "a.png")
    Image.new("RGB", (8, 6), "blue").save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "img" / "link.png")
    return root


@pytest.mark.parametrize("rel,msg", [("../outside.png", "outside the root"), ("img/link.png", "outside the root"),
                                     ("/etc/passwd", "absolute path"), ("a\0b.png", "NUL byte"),
                                     ("x" * 300 + ".png", "longer than 255"), ("", "empty")])
def test_confine_refuses_escapes_and_bad_names(tree, rel, msg):
    with pytest.raises(UnsafePathError, match=msg) as e:
        confine(rel, tree, "data.json: record 3: field 'image'")
    assert "data.json: record 3: field 'image'" in str(e.value)


def test_confine_inside_and_opt_in(tree):
    assert confine("img/a.png", tree, "w") == (tree / "img" / "a.png").resolve()
    assert confine("img/../img/a.png", tree, "w").name == "a.png"
    assert confine("img/link.png", tree, "w", allow_outside_root=True).name == "outside.png"
    assert confine("../outside.png", tree, "w", allow_outside_root=True).is_file()


def _conv(image):
    return {"id": "r1", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]}


def test_build_refuses_escaping_media_unless_allowed(tree, tmp_path):
    assert llava_to_payload(_conv("img/a.png"), str(tree), "d.json: conversation 0", "d.json", 4)
    for bad in ("../outside.png", str(tmp_path / "outside.png"), "img/link.png"):
        with pytest.raises(UnsafePathError, match=r"d.json: conversation 0: field 'image'"):
            llava_to_payload(_conv(bad), str(tree), "d.json: conversation 0", "d.json", 4)
        assert llava_to_payload(_conv(bad), str(tree), "w", "d.json", 4, allow_outside_root=True)
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([_conv("../outside.png")]))
    with pytest.raises(UnsafePathError, match="llava.json"):
        build_main(["--input", str(data), "--media-root", str(tree), "--out", str(tmp_path / "o1"),
                    "--num-shards", "1"])
    assert build_main(["--input", str(data), "--media-root", str(tree), "--out", str(tmp_path / "o2"),
                       "--num-shards", "1", "--allow-outside-root"]) == 0


def test_read_media_names_corrupt_and_oversized(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputRejected, match="bad.png"):
        read_media(bad, "d.json: conversation 2")
    with pytest.raises(ResourceLimitError, match="pixels"):
        check_pixels(100_000, 100_000, "big.png")
    Image.new("L", (64, 64)).save(tmp_path / "ok.png")
    with pytest.raises(ResourceLimitError, match="ok.png"):
        read_media(tmp_path / "ok.png", "d.json", max_pixels=100)


def test_bench_refuses_escaping_image(tree, tmp_path):
    rec = {"question_id": "q1", "question": "what?", "answer": "x", "image": "../outside.png"}
    (tree / "image_open_ended.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(UnsafePathError, match=r"image_open_ended.jsonl: record 0 .*field 'image'"):
        load_bench(tree)
    assert load_bench(tree, allow_outside_root=True).all_items()[0].image.endswith("outside.png")
    rec["image"] = "img/a.png"
    (tree / "image_open_ended.jsonl").write_text(json.dumps(rec) + "\n")
    assert load_bench(tree).all_items()[0].image == str(tree / "img/a.png")


def test_manifest_refuses_escaping_image(tree, tmp_path):
    man = tree / "m.jsonl"
    man.write_text(json.dumps({"image_id": "i1", "image": "../outside.png", "instance_ids": [1]}) + "\n")
    (item,) = read_manifest(man, "image")
    with pytest.raises(UnsafePathError, match=r"m.jsonl:1 \(image_id 'i1'\): field 'image'"):
        load_image_item(item)
    (item,) = read_manifest(man, "image", allow_outside_root=True)
    assert load_image_item(item).size == (8, 6)


def test_eval_cli_refuses_escaping_bench_media_unless_allowed(tree, tmp_path, capsys):
    from eval.cli import main as eval_main

    rec = {"question_id": "q1", "question": "what?", "answer": "x", "image": "../outside.png"}
    (tree / "image_open_ended.jsonl").write_text(json.dumps(rec) + "\n")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"question_id": "q1", "config": "image_open_ended", "question": "what?",
                                 "ground_truth": "x", "model_prediction": "x", "split": "image"}) + "\n")
    argv = ["score", "--bench", str(tree), "--predictions", str(preds), "--mode", "strict", "--judge", "rule",
            "--out", str(tmp_path / "scores")]
    assert eval_main(argv) == 2
    assert "field 'image'" in capsys.readouterr().err
    assert eval_main([*argv, "--allow-outside-root"]) == 0
