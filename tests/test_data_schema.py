"""Inst-IT / LLaVA JSON: validation errors name file, record and field; byte-exact round trip; levels."""

import json

import pytest

from instit_jax.chat_template import render_prompt
from instit_jax.data.annotations_to_llava import (
    annotations_to_llava,
    format_instance_captions,
    video_conversations,
)
from instit_jax.data.schema import (
    SchemaError,
    dump_json,
    load_image_annotations,
    load_records,
    load_video_annotations,
    svit_to_llava,
)

VIDEO = {
    "video_id": 7,
    "frame_level_caption": [
        {"timestamp": 1, "frame_name": "000.jpg", "instance_level": {"1": "a red cube", "2,3": "two balls"},
         "image_level": "[1] sits left of [2] and [3].", "temporal_change": None},
        {"timestamp": 2, "frame_name": "001.jpg", "instance_level": {"1": "the red cube, moved"},
         "image_level": "[1] moved right.", "temporal_change": "[1] slides to the right."},
    ],
    "question_answer_pairs": [{"question": "Where does [1] go?", "answer": "Right, at <2>."}],
    "video_level_caption": "At <1> [1] rests; at <2> it slides right.",
    "video_path": "videos/7",
}
IMAGE = {"image_id": 3, "instance_level_caption": {"1": "a cat", "2": "a mat"},
         "image_level_caption": "[1] lies on [2].", "image_path": "images/3.jpg", "extra_key": "ünï"}


def test_round_trip_is_byte_exact(tmp_path):
    src = tmp_path / "video.json"
    src.write_text(json.dumps([VIDEO], indent=4, ensure_ascii=False), encoding="utf-8")
    recs = load_video_annotations(src)
    assert recs[0].frame_level_caption[0].temporal_change is None
    assert recs[0].frame_level_caption[0].instance_level["2,3"] == "two balls"
    out = tmp_path / "out.json"
    dump_json(recs, out, indent=4)
    assert out.read_bytes() == src.read_bytes()
    img = tmp_path / "img.json"
    img.write_text(json.dumps([IMAGE], indent=None, ensure_ascii=False), encoding="utf-8")
    dump_json(load_image_annotations(img), out, indent=None)
    assert out.read_bytes() == img.read_bytes()


def test_errors_name_file_record_and_field(tmp_path):
    bad = json.loads(json.dumps(VIDEO))
    bad["frame_level_caption"][1]["image_level"] = 5
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([VIDEO, bad]))
    with pytest.raises(SchemaError, match=r"bad\.json: record 1 \(id 7\), frame_level_caption\[1\]: field 'image_level'"):
        load_records(p)
    bad2 = dict(IMAGE, instance_level_caption={"one": "x"})
    p.write_text(json.dumps([bad2]))
    with pytest.raises(SchemaError, match="record 0.*'instance_level_caption' has key 'one'"):
        load_records(p)
    p.write_text(json.dumps([{"id": "a", "conversations": [{"from": "bot", "value": "x"}]}]))
    with pytest.raises(SchemaError, match=r"conversations\[0\]: field 'from'"):
        load_records(p)


def test_levels_and_templates(tmp_path):
    p = tmp_path / "v.json"
    p.write_text(json.dumps([VIDEO]))
    (rec,) = load_video_annotations(p)
    full = video_conversations(rec, seed=0)[0]
    assert full["frames"] == ["videos/7/000.jpg", "videos/7/001.jpg"]
    answers = [t["value"] for t in full["conversations"][1::2]]
    assert answers == ["[1]: a red cube\n[2], [3]: two balls", "[1]: the red cube, moved",
                       "[1] sits left of [2] and [3].", "[1] moved right.", "[1] slides to the right.",
                       "At <1> [1] rests; at <2> it slides right.", "Right, at <2>."]
    questions = [t["value"] for t in full["conversations"][0::2]]
    assert questions[0].startswith("<image>\n") and "<1>" in questions[0]
    assert "<1>" in questions[4] and "<2>" in questions[4]  # temporal change between frames 1 and 2
    only_qa = video_conversations(rec, levels=["qa"])[0]
    assert [t["value"] for t in only_qa["conversations"]] == ["<image>\nWhere does [1] go?", "Right, at <2>."]
    per_level = video_conversations(rec, group_by="level")
    assert [r["id"].split("/")[1] for r in per_level] == ["instance", "image", "temporal", "video", "qa"]
    # deterministic in the seed, varies with it somewhere in a batch of records
    assert video_conversations(rec, seed=0) == video_conversations(rec, seed=0)
    many = [json.loads(json.dumps(VIDEO)) | {"video_id": i} for i in range(20)]
    p.write_text(json.dumps(many))
    recs = load_video_annotations(p)
    a = [c["conversations"][0]["value"] for c in annotations_to_llava(recs, seed=0)]
    b = [c["conversations"][0]["value"] for c in annotations_to_llava(recs, seed=1)]
    assert a != b
    prompt = render_prompt("vicuna_v1", full["conversations"])
    assert prompt.count("<image>") == 1
    with pytest.raises(ValueError, match="unknown annotation level"):
        video_conversations(rec, levels=["frames"])


def test_svit_and_caption_format(tmp_path):
    rec = svit_to_llava({"image_id": 5, "qa": [{"question": "Is <st>man<ed>[0.1, 0.2, 0.3, 0.4] tall?",
                                                "answer": "Yes."}]})
    assert rec.conversations[0]["value"].startswith("<image>\n") and rec.id == "5"
    p = tmp_path / "svit.json"
    p.write_text(json.dumps([{"id": "5_referring_qa_0", "image_id": 5, "image": "vg/5.jpg", "task": "referring_qa",
                              "qa": [{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}]},
                             {"id": "5_detail_0", "image_id": 5, "image": "vg/5.jpg", "task": "detail", "qa": [{}]}]))
    with pytest.raises(SchemaError, match=r"svit.json: record 1, qa\[0\]: missing field 'question'"):
        load_records(p)
    items = json.loads(p.read_text())[:1]
    p.write_text(json.dumps(items))
    (r,) = load_records(p)
    assert (r.id, r.image, len(r.conversations)) == ("5_referring_qa_0", "vg/5.jpg", 4)
    assert format_instance_captions({"10": "b", "2": "a"}) == "[2]: a\n[10]: b"
    assert format_instance_captions({"1": "[1] is red.", "2": "blue"}) == "[1] is red.\n[2]: blue"


def test_bracketed_timestamps(tmp_path):
    v = json.loads(json.dumps(VIDEO))
    v["frame_level_caption"][0]["timestamp"], v["frame_level_caption"][1]["timestamp"] = "<2>", "<10>"
    v["frame_level_caption"].reverse()
    p = tmp_path / "v.json"
    p.write_text(json.dumps([v]))
    conv = video_conversations(load_video_annotations(p)[0], levels=["temporal"])[0]["conversations"]
    assert "<2>" in conv[0]["value"] and "<10>" in conv[0]["value"] and "<<" not in conv[0]["value"]
