"""TFDS builders inst_it_dataset / inst_it_bench from a zipped synthetic release: exact round trip, same
TFRecord payloads as the JSON path, safe extraction, and errors that name the missing file / bad field."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from data_gen.synthetic import generate_bench, generate_world  # noqa: E402
from instit_jax.data import build  # noqa: E402
from instit_jax.data.archives import UnsafeArchiveError  # noqa: E402
from instit_jax.data.schema import SchemaError, load_records  # noqa: E402
from instit_jax.data.tfds import InstItBench, InstItDataset, ManualDirError  # noqa: E402
from instit_jax.data.tfds.convert import (  # noqa: E402
    TfdsSampleSource,
    iter_tfds_payloads,
    open_split,
    to_annotations,
)
from instit_jax.data.tfds.manual import extract_media, rgb_bytes  # noqa: E402

tfds.disable_progress_bar()
IMAGE_JSON, VIDEO_JSON = "inst_it_dataset_image_51k.json", "inst_it_dataset_video_21k.json"
BENCH_CONFIGS = ("image_multi_choice", "image_open_ended", "video_multi_choice", "video_open_ended")


def _zip_tree(zpath: Path, base: Path, sub: str) -> None:
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted((base / sub).rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(base).as_posix())


def _pixels(data) -> np.ndarray:
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def _prepare(builder_cls, data_dir: Path, manual: Path, **kw):
    b = builder_cls(data_dir=str(data_dir), **kw)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return b


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A zipped release: official JSON names (with the release's quirks) + images_vpt.zip + videos_vpt.zip."""
    root = tmp_path_factory.mktemp("tfds_world")
    paths = generate_world(root / "world", num_images=3, num_videos=2, frames_per_video=3, image_size=40,
                           frame_ext="jpg")
    images = json.loads(Path(paths["image_json"]).read_text())
    images[0]["instance_level_caption"]["1,2"] = "[1] and [2] touch."  # multi-id key
    images[1]["image_id"] = "sa_000002"  # string ids exist too
    videos = json.loads(Path(paths["video_json"]).read_text())
    videos[1]["frame_level_caption"][1]["temporal_change"] = ""  # empty (not null) stays empty
    manual = root / "manual"
    manual.mkdir()
    (manual / IMAGE_JSON).write_text(json.dumps(images, ensure_ascii=False))
    (manual / VIDEO_JSON).write_text(json.dumps(videos, ensure_ascii=False))
    _zip_tree(manual / "images_vpt.zip", root / "world", "images/marked")
    _zip_tree(manual / "videos_vpt.zip", root / "world", "videos/marked")
    data_dir = root / "tfds"
    builders = {c: _prepare(InstItDataset, data_dir, manual, config=c) for c in ("image", "video")}
    return {"root": root / "world", "manual": manual, "data_dir": data_dir, "builders": builders,
            "images": images, "videos": videos}


def test_image_config_round_trip(world):
    ds = world["builders"]["image"].as_data_source(split="train")
    assert len(ds) == len(world["images"])
    for src, ex in zip(world["images"], ds):  # disable_shuffling: JSON order is kept
        assert ex["image_id"].decode() == str(src["image_id"])
        assert ex["image_path"].decode() == src["image_path"]
        assert ex["image_level_caption"].decode() == src["image_level_caption"]
        caps = ex["instance_level_caption"]
        assert dict(zip([k.decode() for k in caps["id"]], [c.decode() for c in caps["caption"]])) \
            == src["instance_level_caption"]
        assert [k.decode() for k in caps["id"]] == list(src["instance_level_caption"])  # order kept
        np.testing.assert_array_equal(ex["image"], _pixels(world["root"] / src["image_path"]))


def test_video_config_round_trip(world):
    ds = world["builders"]["video"].as_data_source(split="train")
    assert len(ds) == len(world["videos"])
    for src, ex in zip(world["videos"], ds):
        assert ex["video_id"].decode() == str(src["video_id"])
        assert ex["video_level_caption"].decode() == src["video_level_caption"]
        fr, inst = ex["frames"], ex["instance_level"]
        assert len(fr["image"]) == len(src["frame_level_caption"])
        for j, sf in enumerate(src["frame_level_caption"]):
            assert fr["timestamp"][j].decode() == sf["timestamp"]
            assert fr["frame_name"][j].decode() == sf["frame_name"]
            assert fr["image_level"][j].decode() == sf["image_level"]
            assert bool(fr["has_temporal_change"][j]) == (sf["temporal_change"] is not None)
            assert fr["temporal_change"][j].decode() == (sf["temporal_change"] or "")
            got = {k.decode(): c.decode() for f, k, c in zip(inst["frame"], inst["id"], inst["caption"]) if f == j}
            assert got == sf["instance_level"]
            np.testing.assert_array_equal(fr["image"][j],
                                          _pixels(world["root"] / src["video_path"] / sf["frame_name"]))
        qa = ex["question_answer_pairs"]
        assert [(q.decode(), a.decode()) for q, a in zip(qa["question"], qa["answer"])] \
            == [(p["question"], p["answer"]) for p in src["question_answer_pairs"]]


def _as_str_ids(rec):
    d = json.loads(json.dumps(rec))
    key = "image_id" if "image_id" in d else "video_id"
    d[key] = str(d[key])
    return d


@pytest.mark.parametrize("config,name", [("image", IMAGE_JSON), ("video", VIDEO_JSON)])
def test_converter_gives_the_schema_records_and_identical_tfrecords(world, config, name):
    from instit_jax.data.schema import record_to_dict

    src = load_records(world["manual"] / name, config)
    got = list(to_annotations(open_split(str(world["data_dir"]), config)))
    assert [record_to_dict(g) for g in got] == [_as_str_ids(record_to_dict(s)) for s in src]
    # The TFRecord payloads equal what instit-build-data writes from the JSON + extracted media.
    kw = {"levels": ("instance", "image", "temporal", "video", "qa"), "seed": 3, "max_frames": 2}
    ref = list(build.iter_payloads([str(world["manual"] / name)], str(world["root"]), **kw))
    new = list(iter_tfds_payloads(open_split(str(world["data_dir"]), config), source_name=name, **kw))
    assert len(new) == len(ref) > 0 and new == ref


def test_grain_pipeline_reads_the_tfds_source(world, tmp_path):
    from instit_jax import processing
    from instit_jax.data.pipeline import PipelineConfig, build_pipeline
    from instit_jax.data.records import parse_sample
    from instit_jax.tokenizer import train_tiny_tokenizer

    src = pickle.loads(pickle.dumps(TfdsSampleSource(str(world["data_dir"]), "video", max_frames=2,
                                                     source_name=VIDEO_JSON)))
    ref = [parse_sample(p) for p in build.iter_payloads([str(world["manual"] / VIDEO_JSON)], str(world["root"]),
                                                        max_frames=2)]
    assert len(src) == len(ref)
    for i, want in enumerate(ref):
        got = src[i]
        assert got.keys() == want.keys() and len(got["media"]) == 2
        np.testing.assert_array_equal(got.pop("media_sizes"), want.pop("media_sizes"))
        assert got == want
    # Same batches from our shards and from the TFDS source.
    shards = tmp_path / "shards"
    build.build([str(world["manual"] / VIDEO_JSON)], str(world["root"]), str(shards), 1, max_frames=2)
    tok = train_tiny_tokenizer([json.dumps(world["videos"]), "USER: ASSISTANT: A chat between"] * 3, vocab_size=300)
    cfg = PipelineConfig(batch_size=2, max_length=4096, length_buckets=(4096,), num_tiles=0, num_frames=2, seed=5,
                         image=processing.ImageProcessorConfig(tile_size=28, grid_pinpoints=((28, 28),)))
    a = next(iter(build_pipeline([str(shards)], tok, cfg, shard_index=0, shard_count=1)))
    b = next(iter(build_pipeline([src], tok, cfg, shard_index=0, shard_count=1)))
    assert a.keys() == b.keys() and a["pixel_values_videos"].any()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_stored_bytes_are_the_released_bytes(world):
    src = world["videos"][0]
    ex = open_split(str(world["data_dir"]), "video")[0]
    first = world["root"] / src["video_path"] / src["frame_level_caption"][0]["frame_name"]
    assert ex["frames"]["image"][0] == first.read_bytes()  # JPEG kept as released, not re-encoded


def test_non_rgb_media_becomes_rgb_png():
    buf = io.BytesIO()
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), "L").save(buf, format="PNG")
    data, size = rgb_bytes(buf.getvalue(), "t")
    assert size == (3, 4)
    assert _pixels(data).shape == (3, 4, 3) and Image.open(io.BytesIO(data)).mode == "RGB"


def _manual_copy(world, tmp_path, drop=()):
    manual = tmp_path / "manual"
    shutil.copytree(world["manual"], manual)
    for name in drop:
        (manual / name).unlink()
    return manual


def test_unsafe_zip_is_refused_before_writing(world, tmp_path):
    manual = _manual_copy(world, tmp_path, drop=["images_vpt.zip"])
    with zipfile.ZipFile(manual / "images_vpt.zip", "w") as zf:
        zf.writestr("images/marked/ok.png", b"x")
        zf.writestr("../evil.png", b"pwned")
    with pytest.raises(UnsafeArchiveError, match=r"images_vpt\.zip: member '\.\./evil\.png' contains '\.\.'"):
        _prepare(InstItDataset, tmp_path / "tfds", manual, config="image")
    assert not list(tmp_path.rglob("evil.png")) and not list(tmp_path.rglob("ok.png"))


def test_missing_files_are_named(world, tmp_path):
    manual = _manual_copy(world, tmp_path, drop=[IMAGE_JSON, "videos_vpt.zip"])
    with pytest.raises(ManualDirError, match=r"missing the image annotation JSON; expected one of "
                                             r"\['inst_it_dataset_image_51k\.json'"):
        _prepare(InstItDataset, tmp_path / "a", manual, config="image")
    with pytest.raises(ManualDirError, match=r"missing the video media archive; expected one of "
                                             r"\['videos_vpt\.zip', 'videos\.zip'\]"):
        _prepare(InstItDataset, tmp_path / "b", manual, config="video")


def test_bad_record_names_file_record_and_field(world, tmp_path):
    manual = _manual_copy(world, tmp_path)
    images = json.loads((manual / IMAGE_JSON).read_text())
    del images[2]["image_level_caption"]
    (manual / IMAGE_JSON).write_text(json.dumps(images))
    with pytest.raises(SchemaError, match=rf"{IMAGE_JSON}: record 2 \(id 3\): missing field 'image_level_caption'"):
        _prepare(InstItDataset, tmp_path / "tfds", manual, config="image")
    images[2]["image_level_caption"], images[1]["image_path"] = "ok", "images/marked/none.png"
    (manual / IMAGE_JSON).write_text(json.dumps(images))
    with pytest.raises(ManualDirError, match=r"record 1 \(id 'sa_000002'\), field 'image_path': file "
                                             r"'images/marked/none\.png' not found"):
        _prepare(InstItDataset, tmp_path / "tfds2", manual, config="image")
    images[1]["image_path"] = "../world/images/marked/000001.png"
    (manual / IMAGE_JSON).write_text(json.dumps(images))
    with pytest.raises(ValueError, match=r"record 1 .* field 'image_path': media path '\.\./world.*' must be relative"):
        _prepare(InstItDataset, tmp_path / "tfds3", manual, config="image")


def test_zip_is_extracted_once_per_version(world, tmp_path):
    manual = _manual_copy(world, tmp_path)
    out = tmp_path / "media"
    roots = extract_media(str(manual), ["images_vpt.zip"], [], str(out), "images")
    assert roots == [str(out), str(out / "images_vpt"), str(manual)]
    (out / world["images"][0]["image_path"]).unlink()
    extract_media(str(manual), ["images_vpt.zip"], [], str(out), "images")
    assert not (out / world["images"][0]["image_path"]).exists()  # marker: not extracted again
    os.utime(manual / "images_vpt.zip", ns=(1, 1))
    extract_media(str(manual), ["images_vpt.zip"], [], str(out), "images")
    assert (out / world["images"][0]["image_path"]).exists()  # a changed zip is extracted again


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A bench in the Hugging Face layout: parquet folder (embedded image bytes), JSON tables, zips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("tfds_bench")
    paths = generate_bench(root / "bench", num_images=2, num_videos=2, frames_per_video=3, image_size=40,
                           questions_per_item=2)
    manual = root / "manual"
    (manual / "image_open_ended").mkdir(parents=True)
    tables = {c: json.loads(Path(paths[c]).read_text()) for c in BENCH_CONFIGS}
    rows = [{**r, "image": {"bytes": (root / "bench" / r["image"]).read_bytes(), "path": r["image"]}}
            for r in tables["image_open_ended"]]
    pq.write_table(pa.Table.from_pylist(rows), manual / "image_open_ended" / "test-00000-of-00001.parquet")
    (manual / "image_multi_choices.json").write_text(json.dumps(tables["image_multi_choice"]))  # release name
    for c in ("video_multi_choice", "video_open_ended"):
        (manual / f"{c}.json").write_text(json.dumps(tables[c]))
    _zip_tree(manual / "images_vpt.zip", root / "bench", "images")
    _zip_tree(manual / "videos_vpt.zip", root / "bench", "videos")
    return {"root": root / "bench", "manual": manual, "tables": tables,
            "builder": _prepare(InstItBench, root / "tfds", manual)}


def test_bench_round_trip(bench):
    b = bench["builder"]
    for split in ("image", "video"):
        ds = b.as_data_source(split=split)
        want = [(c, r) for c in ("image_open_ended", "image_multi_choice", "video_open_ended", "video_multi_choice")
                if c.startswith(split) for r in bench["tables"][c]]
        assert len(ds) == len(want)
        for (cfg, src), ex in zip(want, ds):
            assert (ex["config"].decode(), ex["question_id"].decode()) == (cfg, src["question_id"])
            assert ex["question"].decode() == src["question"] and ex["answer"].decode() == src["answer"]
            choices = [src[k] for k in ("choice_a", "choice_b", "choice_c", "choice_d")] if "multi" in cfg else []
            assert [c.decode() for c in ex["choices"]] == choices
            rel = src.get("image") or src["video_path"]
            assert ex["media_path"].decode() == rel
            files = [bench["root"] / rel] if split == "image" else sorted((bench["root"] / rel).iterdir())
            assert [n.decode() for n in ex["frame_names"]] == ([] if split == "image" else [p.name for p in files])
            assert len(ex["media"]) == len(files)
            for got, f in zip(ex["media"], files):
                np.testing.assert_array_equal(got, _pixels(f))


def test_bench_missing_table_is_named(bench, tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(bench["manual"], manual)
    (manual / "video_open_ended.json").unlink()
    with pytest.raises(ManualDirError, match=r"missing the bench table for 'video_open_ended'; expected a folder "
                                             r"video_open_ended/ .* \['video_open_ended\.parquet'"):
        _prepare(InstItBench, tmp_path / "tfds", manual)


def test_importing_instit_jax_does_not_import_tfds():
    code = ("import sys, instit_jax, instit_jax.data.build, instit_jax.data.pipeline, instit_jax.data.archives; "
            "sys.exit(int('tensorflow_datasets' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
