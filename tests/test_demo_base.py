"""The shipped demo base (demo/base/): a real llava-hf folder, the same model in transformers and in JAX, its
model card true to the file, and a recipe whose data sources never hold a marked frame or an instance ID."""
import hashlib
import json
import re

import numpy as np
import pytest

from demo.run import DEFAULT_BASE

BASE = DEFAULT_BASE
ID_REF = re.compile(r"\[\s*\d+\s*\]")  # how Inst-IT text names an instance: [3]


def _have_base() -> bool:
    return (BASE / "model.safetensors").is_file()


needs_base = pytest.mark.skipif(not _have_base(), reason="demo/base/ holds no model.safetensors")


@needs_base
def test_base_folder_is_small_and_complete():
    names = {p.name for p in BASE.iterdir()}
    for want in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "README.md"):
        assert want in names, want
    assert sum(p.stat().st_size for p in BASE.iterdir()) <= 20 * 2**20
    card = (BASE / "README.md").read_text()
    digest = hashlib.sha256((BASE / "model.safetensors").read_bytes()).hexdigest()
    assert digest in card, "the model card's sha256 is not the file's"
    assert "instit-demo build-base" in card


@needs_base
def test_transformers_and_jax_give_the_same_logits_on_the_base():
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from instit_jax import load_pretrained

    hf = LlavaNextForConditionalGeneration.from_pretrained(BASE, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(BASE)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(84, 84, 3), dtype=np.uint8))
    prompt = "USER: <image>\nHow many shapes are there? ASSISTANT:"
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**inputs).logits.numpy()
    ours = load_pretrained(BASE)
    got = np.asarray(ours(input_ids=inputs["input_ids"].numpy(), attention_mask=inputs["attention_mask"].numpy(),
                          pixel_values=inputs["pixel_values"].numpy(), image_sizes=inputs["image_sizes"].numpy()))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_base_recipe_data_holds_no_marked_media_and_no_instance_ids(tmp_path, monkeypatch):
    """Every data source of the base build, generated small: no Set-of-Marks call, no [ID] in any text."""
    import data_gen.som as som
    from demo import base_data as B

    def tripwire(*a, **kw):
        raise AssertionError("the base recipe drew Set-of-Marks")

    monkeypatch.setattr(som, "render_marks", tripwire)
    monkeypatch.setattr(som, "render_video_marks", tripwire)
    texts = []
    gen = json.loads(B.write_generic_set(tmp_path / "g", 0, images=40, videos=12, digits=12, labels=12).read_text())
    cap = json.loads(B.write_caption_set(tmp_path / "c", 0, images=30, videos=8).read_text())
    read = B.text_reading_conversations(0, 40)
    lookup = B.option_lookup_conversations(0, 40)
    labels = json.loads(B.write_label_lookup_set(tmp_path / "l", 0, count=20).read_text())
    for rec in gen + cap + read + lookup + labels:
        texts += [t["value"] for t in rec["conversations"]]
        for key in ("image", "video"):
            if key in rec:
                assert "marked" not in rec[key]
    for i in range(4):
        batch = B.tower_batch(0, i, 16, label_share=0.5)
        assert batch["pixels"].shape == (16, 84, 84, 3)
    from demo.build_base import ground_batch, word_targets
    from instit_jax.loading import load_tokenizer

    pixels, targets = ground_batch(0, 0, word_targets(load_tokenizer(BASE / "tokenizer.json")))
    assert pixels.shape[0] == targets.shape[0] == 32
    bench = B.write_generic_bench(tmp_path / "b", 0, images=8, videos=4, digits=4)
    for f in bench.glob("*.json"):
        texts += [r["question"] for r in json.loads(f.read_text())]
    assert len(texts) > 300
    bad = [t for t in texts if ID_REF.search(t)]
    assert not bad, bad[:3]


def test_tower_batches_are_a_pure_function_of_seed_and_index():
    from demo import base_data as B

    a, b, c = B.tower_batch(3, 7, 8), B.tower_batch(3, 7, 8), B.tower_batch(3, 8, 8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["pixels"], c["pixels"])
    # labels agree with the pixels: a labelled patch is never flat background
    assert (a["colour"] > 0).any() and (a["digit"] > 0).any() or (c["digit"] > 0).any()


def test_label_canvases_put_each_label_inside_one_patch():
    """The tower's label-reading data: every digit's box lies inside the patch it is labelled on."""
    from demo import base_data as B
    from demo import world as W

    for i in range(20):
        rng = np.random.default_rng(i)
        img, placed = B.label_canvas(rng)
        for _d, cx, cy in placed:
            r, c = cy // W.PATCH, cx // W.PATCH
            cell = img[r * W.PATCH:(r + 1) * W.PATCH, c * W.PATCH:(c + 1) * W.PATCH].astype(int)
            ring = np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]])  # the cell's border
            inner = cell[3:-3, 3:-3]
            assert np.ptp(ring, axis=0).max() <= 12, "a label reaches the border of its patch"
            assert np.ptp(inner.reshape(-1, 3), axis=0).max() > 60, "no label drawn in its patch"
        batch = B.tower_batch(0, i, 8, label_share=1.0)
        assert ((batch["digit"] > 0).sum(-1) >= 1).all()


def test_option_lookup_turns_have_four_distinct_options_and_the_right_letter():
    from demo import base_data as B

    for conv in B.option_lookup_conversations(0, 30):
        turns = conv["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            opts = dict(line.split(". ", 1) for line in q["value"].split("\n") if line[:2] in ("A.", "B.", "C.", "D."))
            assert len(set(opts.values())) == 4
            stated = q["value"].split("\n")[-6] if "Note:" not in q["value"] else q["value"]
            assert opts[a["value"]] in stated


@needs_base
def test_start_from_adopts_the_shipped_base_through_its_last_stage(tmp_path):
    """`build-base --start-from demo/base`: the base's recorded stages count as done, its weights become the
    output of its last stage; a base whose weights are not the recorded ones is refused."""
    import shutil

    from demo.build_base import ADOPTABLE, Build, adopt_base
    from instit_jax.loading import load_pretrained

    rec = json.loads((BASE / "build.json").read_text())
    last = [k for k in ADOPTABLE if k in rec["stages"]][-1]
    build = Build(tmp_path / "build", rec["settings"]["seed"], rec["settings"]["scale"])
    adopt_base(build, BASE)
    assert set(rec["stages"]) <= {k for k, v in build.state["stages"].items() if v["inherited"]}
    assert build.done(last) and build.state["started_from"]["sha256"] == rec["sha256"]
    got = load_pretrained(str(tmp_path / "build" / last)).language_model.lm_head.kernel[...]
    want = load_pretrained(str(BASE)).language_model.lm_head.kernel[...]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    fake = tmp_path / "fake"
    shutil.copytree(BASE, fake)
    rec["sha256"] = "0" * 64
    (fake / "build.json").write_text(json.dumps(rec))
    with pytest.raises(SystemExit, match="sha256"):
        adopt_base(Build(tmp_path / "other", rec["settings"]["seed"], rec["settings"]["scale"]), fake)


def test_patch_word_targets_and_the_shipped_base_names_what_its_patches_show():
    """The grounding stage's targets: one distinct single token per class of every dense head (two per
    digit); on a held-out tower batch the shipped base's visual tokens lie nearest to one of their words."""
    from demo.build_base import ground_batch, patch_word_loss, word_targets
    from instit_jax.loading import load_pretrained, load_tokenizer

    table = word_targets(load_tokenizer(BASE / "tokenizer.json"))
    for head, rows in table.items():
        assert (rows[0] == -1).all() and (rows[1:, 0] >= 0).all()
        assert len(set(rows[1:, 0].tolist())) == len(rows) - 1, head
    assert (table["digit"][1:] >= 0).all()
    pixels, targets = ground_batch(12345, 0, table)
    assert pixels.shape == (32, 84, 84, 3) and targets.shape == (32, 36, 10)
    labelled = (targets >= 0).any(-1)
    assert labelled.sum() > 100 and not labelled.all()
    loss, nearest = patch_word_loss(load_pretrained(str(BASE)), pixels, targets, frozen_layers=2)
    assert np.isfinite(float(loss)) and float(nearest) > 0.6
