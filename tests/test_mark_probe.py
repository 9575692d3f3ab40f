"""demo.mark_probe on the shipped base: the probes run, and the base reads instance colours from its visual
tokens of unmarked frames far above the majority class (what the label-only marks preserve)."""
import json

import numpy as np
import pytest

from demo import mark_probe


def test_scenes_follow_the_look():
    full = mark_probe.marked_scenes(6, "full")
    labels = mark_probe.marked_scenes(6, "labels")
    for (m_full, raw, meta), (m_lab, raw2, _) in zip(full, labels):
        np.testing.assert_array_equal(raw, raw2)  # the same held-out scenes
        assert meta["labels"] and all(0 <= p < 36 for _, p, _ in meta["labels"])
        # labels only: pixels change only inside the label boxes, so far fewer than with tint + contours
        assert (m_lab != raw).any(axis=-1).sum() < (m_full != raw).any(axis=-1).sum()
    with pytest.raises(ValueError, match="look must be one of"):
        mark_probe.marked_scenes(1, "boxes")


def test_probe_on_the_shipped_base(capsys):
    mark_probe.main(["--scenes", "48", "--look", "labels"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"digit_at_label", "colour_at_label", "colour_marked", "colour_unmarked"}
    plain = result["colour_unmarked"]
    assert plain["n"] > 100 and plain["accuracy"] > plain["majority"] + 0.4


def test_label_questions_on_the_shipped_base():
    result = mark_probe.label_questions(mark_probe.Path(__file__).resolve().parents[1] / "demo" / "base", 6)
    assert set(result) <= {"read", "where", "box", "present"} and {"read", "where"} <= set(result)
    assert all(r["n"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in result.values())


def test_lone_reading_on_the_shipped_base():
    """The base's answers about a lone instance, beside each attribute's variance share in its visual tokens."""
    result = mark_probe.lone_reading(mark_probe.Path(__file__).resolve().parents[1] / "demo" / "base", 16)
    assert set(result) == {"colour", "shape", "texture", "size"}
    assert all(0.0 < r["variance_share"] < 1.0 for r in result.values())
    assert result["texture"]["answer_accuracy"] >= 0.75  # the base names a lone instance's texture


def test_label_attention_finds_a_head_that_looks_at_the_asked_label():
    result = mark_probe.label_attention(mark_probe.Path(__file__).resolve().parents[1] / "demo" / "base", 12)
    assert len(result) == 16 and all({"match", "other", "wins"} == set(r) for r in result.values())
    best = max(result.values(), key=lambda r: r["match"] - r["other"])
    assert best["match"] > 2 * best["other"] and best["wins"] > 0.5


def test_colour_binding_runs_the_demo_recipe_end_to_end(tmp_path):
    base = mark_probe.Path(__file__).resolve().parents[1] / "demo" / "base"
    result = mark_probe.colour_binding(base, tmp_path, scenes=12, steps=2, held_out=4, one_question=True)
    assert result["steps"] == 2 and 0.0 <= result["accuracy"] <= 1.0 and result["final_train_loss"] > 0
    convs = mark_probe.json.loads((tmp_path / "train.json").read_text())
    labels = sum(len(meta["labels"]) for _, _, meta in mark_probe.marked_scenes(12, "labels", seed=555))
    assert result["conversations"] == len(convs) == labels  # one question per conversation
    assert all(len(c["conversations"]) == 2 and c["conversations"][0]["value"].startswith("<image>\n") for c in convs)
    asked = sum(r["n"] for r in result["by_instances"].values())
    assert asked >= 8 and sum(result["wrong"].values()) <= asked
    assert all(r["baseline"] == round(1 / int(n), 2) for n, r in result["by_instances"].items())
