"""instit-annotate end to end against the local server: outputs, bad inputs, re-asks, estimate, budget, batch."""
from __future__ import annotations

import asyncio
import functools
import json

import annotate_data as D
import numpy as np
import pytest
from openai_server import OpenAIServer, instit_responder

from data_gen.cli import EXIT_BUDGET, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from data_gen.manifest import read_manifest
from data_gen.pipelines import schemas as S
from data_gen.pipelines.runner import Journal, RunSummary, run_pipeline
from instit_jax.data.schema import load_image_annotations, load_video_annotations


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ann")
    return {"root": root, "video": D.write_videos(root, n_ok=4, bad=True), "image": D.write_images(root),
            "svit": D.write_svit(root)}


def cli(kind, manifest, out, url, *extra):
    return main([kind, "--manifest", str(manifest), "--out", str(out), "--base-url", url, "--no-progress",
                 "--backoff-base", "0.01", *extra])


def test_video_pipeline_bad_inputs_are_item_errors_and_reasks_fix_ids(data, tmp_path):
    with OpenAIServer(functools.partial(instit_responder, bad_first=True)) as srv:
        code = cli("video", data["video"], tmp_path / "out", srv.base_url)
    assert code == EXIT_PARTIAL
    errors = {e["item_id"]: e["reason"] for e in map(json.loads, (tmp_path / "out/errors.jsonl").open())}
    assert set(errors) == {"missing_frame", "corrupt", "mask_mismatch"}
    assert "file not found" in errors["missing_frame"] and "none.png" in errors["missing_frame"]
    assert "cannot decode image" in errors["corrupt"]
    assert "do not match the mask IDs" in errors["mask_mismatch"]
    out = tmp_path / "out/inst_it_dataset_video.json"
    records = json.loads(out.read_text())
    assert [r["video_id"] for r in records] == ["v0", "v1", "v2", "v3"]
    parsed = load_video_annotations(out)  # the training side reads what we write
    assert len(parsed) == 4
    for rec in records:
        ids = {"1", "2"} if rec["video_id"] in ("v0", "v2") else {"1", "2", "3"}
        frames = rec["frame_level_caption"]
        assert [f["timestamp"] for f in frames] == [1, 2, 3] and frames[0]["temporal_change"] is None
        texts = [c for f in frames for c in f["instance_level"].values()] + [rec["video_level_caption"]]
        S.check_refs(texts, ids, 3)  # the [99] of every first ask was re-asked away
        assert all("[99]" not in t for t in texts)
        assert rec["question_answer_pairs"] and rec["video_path"] == f"frames/{rec['video_id']}"
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["ok"] == 4 and summary["failed"] == 3 and summary["reasks"] > 0 and summary["cost_usd"] > 0


def test_masks_are_drawn_into_the_frames_sent(data, tmp_path):
    seen = []

    def responder(body):
        for m in body["messages"]:
            if isinstance(m["content"], list):
                seen.extend(p["image_url"]["url"] for p in m["content"] if p["type"] == "image_url")
        return instit_responder(body)

    with OpenAIServer(responder) as srv:
        assert cli("image", data["image"], tmp_path / "o", srv.base_url) == EXIT_OK
    import base64
    import io

    from PIL import Image
    raw = np.asarray(Image.open(data["root"] / "img/i0.png").convert("RGB")).astype(int)
    sent = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",")[1])))).astype(int) for u in seen]
    assert len(sent) == 3 and min(np.abs(s - raw).mean() for s in sent) > 1.0  # marks changed the pixels
    assert len(load_image_annotations(tmp_path / "o/inst_it_dataset_image.json")) == 3


def test_svit_pipeline_boxes_validated_and_vg_converted(data, tmp_path):
    with OpenAIServer(functools.partial(instit_responder, bad_first=True)) as srv:
        assert cli("svit", data["svit"], tmp_path / "s", srv.base_url) == EXIT_OK
    items = json.loads((tmp_path / "s/svit_dataset.json").read_text())
    tasks = [i["task"] for i in items if i["image_id"] == 1]
    assert tasks == ["conversation"] * 3 + ["complex_reasoning", "referring_qa", "detail_description"]
    by_task = {i["task"]: i for i in items if i["image_id"] == 1}
    assert len(by_task["complex_reasoning"]["qa"]) == 15 and len(by_task["referring_qa"]["qa"]) == 10
    for qa in by_task["referring_qa"]["qa"]:
        assert S.parse_boxes(qa["question"])  # the out-of-range first answer was re-asked
    from data_gen.pipelines.svit_scene import scene_from_record
    scene = scene_from_record(D.vg_scene(5), "t")
    assert scene.objects[0] == ("dog", [0.1, 0.4, 0.35, 0.9])
    with pytest.raises(ValueError, match="x1 < x2"):
        S.parse_boxes("<st>cat<ed>[0.5, 0.1, 0.2, 0.3]")


def test_estimate_makes_no_calls_and_max_cost_stops_cleanly(data, tmp_path, capsys):
    with OpenAIServer(instit_responder) as srv:
        assert cli("video", data["video"], tmp_path / "e", srv.base_url, "--estimate") == EXIT_OK
        est = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert sum(srv.received.values()) == 0
        assert est["requests"] == 4 * 5 and est["unusable_items"] == 3 and est["cost_usd"] > 0
        code = cli("video", data["video"], tmp_path / "b", srv.base_url, "--max-cost", "0.03", "--max-tokens", "300",
                   "--concurrency", "1", "--items-in-flight", "1")
        spent = json.loads((tmp_path / "b/summary.json").read_text())
    assert code == EXIT_BUDGET and spent["stopped_by_budget"] and spent["cost_usd"] <= 0.03
    assert 0 < spent["ok"] < 4


def test_max_cost_refuses_a_model_without_a_price(data, tmp_path, capsys):
    model = ["--model", "gpt-4o-2099-01-01", "--max-cost", "1", "--max-tokens", "300"]  # not in the table
    with OpenAIServer(instit_responder) as srv:
        assert cli("video", data["video"], tmp_path / "u", srv.base_url, *model) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "no price for model 'gpt-4o-2099-01-01'" in err and "--price-in" in err
        assert sum(srv.received.values()) == 0 and not (tmp_path / "u/summary.json").exists()
        assert cli("video", data["video"], tmp_path / "p", srv.base_url, *model, "--price-in", "2.5",
                   "--price-out", "10") == EXIT_PARTIAL  # the three broken videos of the fixture
    summary = json.loads((tmp_path / "p/summary.json").read_text())
    assert summary["ok"] == 4 and summary["cost_usd"] == pytest.approx(
        (summary["input_tokens"] * 2.5 + summary["output_tokens"] * 10) / 1e6, abs=1e-5)


def test_batch_mode_output_equals_sync_output(data, tmp_path):
    with OpenAIServer(instit_responder, batch_plan=lambda cid, n: "fail" if n == 1 and cid[0] < "5" else "ok") as srv:
        assert cli("image", data["image"], tmp_path / "sync", srv.base_url) == EXIT_OK
        code = cli("image", data["image"], tmp_path / "batch", srv.base_url, "--batch", "--batch-poll-s", "0.02",
                   "--batch-gather-s", "0.02")
        assert code == EXIT_OK and srv.batches
    a = json.loads((tmp_path / "sync/inst_it_dataset_image.json").read_text())
    b = json.loads((tmp_path / "batch/inst_it_dataset_image.json").read_text())
    assert a == b


class GroundTruthAnnotator:
    """A non-LLM backend through the same pipeline interface (what data_gen.synthetic provides)."""

    async def annotate_frame(self, video, t, frame, prev_frame, prev):
        assert (prev is None) == (t == 1) and frame.dtype == np.uint8
        return S.FrameCaptions({i: f"[{i}] truth" for i in video.instance_ids}, f"frame <{t}>",
                                 None if t == 1 else f"[{video.instance_ids[0]}] moved")

    async def describe_video(self, video, frames):
        return f"{len(frames)} frames"

    async def qa(self, video, frames):
        return [{"question": "How many frames?", "answer": str(len(frames))}]

    async def annotate_image(self, image, marked):
        return S.ImageAnnotationResult({i: "x" for i in image.instance_ids}, "img")

    async def svit_task(self, scene, task):
        return [[{"question": "q", "answer": "a"}]]


def test_pluggable_annotator_runs_through_the_same_pipeline(data, tmp_path):
    items = read_manifest(data["video"], "video")
    summary = asyncio.run(run_pipeline("video", items, GroundTruthAnnotator(), tmp_path, progress=False))
    assert summary.ok == 4 and summary.failed == 3
    recs = json.loads((tmp_path / "inst_it_dataset_video.json").read_text())
    assert recs[0]["question_answer_pairs"] == [{"question": "How many frames?", "answer": "3"}]


def test_resume_after_a_torn_journal_line_keeps_the_next_finished_item(data, tmp_path):
    items = [it for it in read_manifest(data["video"], "video") if it.item_id in ("v0", "v1")]

    def resume() -> RunSummary:
        return asyncio.run(run_pipeline("video", items, GroundTruthAnnotator(), tmp_path, progress=False))

    assert resume().ok == 2
    journal = tmp_path / "progress.jsonl"
    first, second = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(first + second[:len(second) // 2])  # killed while writing v1's line
    again = resume()
    assert (again.resumed, again.ok) == (1, 2)  # v1 redone and appended
    reader = Journal(journal)
    done = reader.load()
    reader.close()
    assert set(done) == {"v0", "v1"} and journal.read_bytes() == first + second
    assert resume().resumed == 2  # nothing redone
    journal.write_bytes(first + second.rstrip(b"\n"))  # a whole line without its newline is kept
    assert resume().resumed == 2 and journal.read_bytes() == first + second


def test_video_file_sampling_and_frame_name_keyed_masks(tmp_path):
    import imageio.v3 as iio

    from data_gen.masks import encode_rle
    frames = np.random.default_rng(0).integers(0, 255, (5, 24, 32, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "clip.gif", frames, extension=".gif", loop=0)
    box = np.zeros((24, 32), bool)
    box[4:12, 4:12] = True
    masks = {"frames": {"000000.jpg": {"1": encode_rle(box)}, "000004.jpg": {"1": encode_rle(box)}}}
    small = {"frames": {"000000.jpg": {"1": encode_rle(np.zeros((8, 8), bool))}}}
    lines = [{"video_id": "gif", "video": "clip.gif", "num_frames": 3, "masks": masks},
             {"video_id": "gif_premarked", "video": "clip.gif", "num_frames": 2, "instance_ids": [1]},
             {"video_id": "bad_size", "video": "clip.gif", "num_frames": 3, "masks": small},
             {"video_id": "no_file", "video": "nope.mp4", "instance_ids": [1]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = read_manifest(tmp_path / "m.jsonl", "video")
    summary = asyncio.run(run_pipeline("video", items, GroundTruthAnnotator(), tmp_path / "o", progress=False))
    assert summary.ok == 2 and summary.failed == 2
    recs = {r["video_id"]: r for r in json.loads((tmp_path / "o/inst_it_dataset_video.json").read_text())}
    assert [f["frame_name"] for f in recs["gif"]["frame_level_caption"]] == ["000000.jpg", "000002.jpg", "000004.jpg"]
    assert recs["gif"]["video_path"] == "clip.gif" and len(recs["gif_premarked"]["frame_level_caption"]) == 2
    errors = {e["item_id"]: e["reason"] for e in map(json.loads, (tmp_path / "o/errors.jsonl").open())}
    assert "does not match the frame's [H, W]" in errors["bad_size"]
    assert "video file not found" in errors["no_file"]


def test_video_file_keeps_only_the_sampled_frames(tmp_path):
    """A long video file: the 8 sampled frames come back, and memory never holds the decoded video."""
    import tracemalloc

    import imageio.v3 as iio

    from data_gen.manifest import load_video

    n, h, w = 150, 64, 96
    colours = [(t, 255 - t, (37 * t) % 256) for t in range(n)]  # one distinct solid colour per frame
    iio.imwrite(tmp_path / "long.gif", np.stack([np.full((h, w, 3), c, np.uint8) for c in colours]),
                extension=".gif", loop=0)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video_id": "long", "video": "long.gif", "instance_ids": [1]}))
    item = read_manifest(tmp_path / "m.jsonl", "video")[0]
    load_video(item)  # first call: the reader's lazy imports happen outside the traced call
    tracemalloc.start()
    try:
        video = load_video(item)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    idx = np.linspace(0, n - 1, 8).astype(int)  # the reference's truncating uniform sampling
    assert video.context.frame_names == [f"{i:06d}.jpg" for i in idx]
    for k, i in enumerate(idx):
        assert (video.marked_frame(k) == colours[i]).all()
    assert peak < n * h * w * 3 / 4, f"peak {peak} bytes while reading a {n * h * w * 3}-byte video"


def test_fault_storm_leaves_the_output_unchanged(data, tmp_path):
    kinds = ["429", "500", "drop", "slow"]
    storm = lambda body, key, attempt: None if attempt else kinds[int(key[:8], 16) % 5] if int(key[:8], 16) % 5 < 4 else None
    with OpenAIServer(instit_responder) as srv:
        assert cli("image", data["image"], tmp_path / "calm", srv.base_url) == EXIT_OK
    with OpenAIServer(instit_responder, faults=storm, slow_s=0.3) as srv:
        assert cli("image", data["image"], tmp_path / "storm", srv.base_url, "--timeout", "0.15") == EXIT_OK
        assert sum(srv.faults_sent.values()) >= 2
    calm = json.loads((tmp_path / "calm/inst_it_dataset_image.json").read_text())
    assert json.loads((tmp_path / "storm/inst_it_dataset_image.json").read_text()) == calm
