"""Set-of-Marks rendering (data_gen.som) and the instit-som CLI."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data_gen.masks import encode_rle
from data_gen.som import id_color, label_point, number_by_area, render_marks, render_video_marks
from data_gen.som_cli import main as som_main


def _disk(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _reference_point(mask):
    """The reference rule on the full frame: zero-padded EDT, middle of the maximal pixels."""
    dt = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(dt == dt.max())
    return int(xs[len(xs) // 2]), int(ys[len(ys) // 2])


def test_label_point_is_farthest_interior_point():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = np.zeros((60, 80), bool)
        for _ in range(3):
            x1, y1 = rng.integers(0, 60), rng.integers(0, 40)
            m[y1:y1 + rng.integers(3, 30), x1:x1 + rng.integers(3, 30)] = True
        x, y = label_point(m)
        assert m[y, x]
        assert (x, y) == _reference_point(m)


def test_label_point_shapes():
    m = np.zeros((40, 40), bool)
    m[10:21, 5:36] = True  # 11 x 31 bar: the ridge is row 15, the middle of it is column 20
    assert label_point(m) == (20, 15)
    ring = _disk(64, 64, 32, 32, 20) & ~_disk(64, 64, 32, 32, 12)
    x, y = label_point(ring)
    assert ring[y, x]
    border = np.zeros((30, 30), bool)
    border[:, :10] = True  # touches the left edge: the border counts as boundary
    assert label_point(border)[0] in (4, 5)
    assert label_point(np.zeros((5, 5), bool)) is None


def test_label_point_fast_path_stays_on_mask():
    m = _disk(720, 1280, 500, 300, 250) & ~_disk(720, 1280, 520, 300, 120)
    x, y = label_point(m, dt_max_side=96)
    assert m[y, x]
    dt = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    assert dt[y, x] >= 0.9 * dt.max()


def test_render_marks_basic_and_info():
    img = np.full((120, 160, 3), 128, np.uint8)
    big = _disk(120, 160, 60, 60, 40)
    small = _disk(120, 160, 70, 60, 8)  # on top of big: big's label must avoid it
    out, infos = render_marks(img, [(1, big), (2, small), (3, np.zeros((120, 160), bool))],
                              return_info=True)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    by_id = {i.id: i for i in infos}
    assert by_id["3"].skipped == "empty" and by_id["3"].label_xy is None
    x2, y2 = by_id["2"].label_xy
    assert small[y2, x2]
    x1, y1 = by_id["1"].label_xy
    assert big[y1, x1] and not small[y1, x1]
    # contour pixels carry the ID colour
    assert tuple(out[20, 60]) == id_color(1)
    # 'image' style: white digits on a dark box; 'video' style: dark on light
    bx1, by1, bx2, by2 = by_id["2"].label_box
    patch = out[by1:by2, bx1:bx2].reshape(-1, 3)
    assert patch.max() == 255 and patch.min() < 60
    out_v, infos_v = render_marks(img, [(2, small)], "video", return_info=True)
    bx1, by1, bx2, by2 = infos_v[0].label_box
    patch = out_v[by1:by2, bx1:bx2].reshape(-1, 3)
    assert patch.min() == 0 and np.median(patch) > 200


def test_label_box_in_the_id_colour():
    img = np.full((84, 84, 3), 200, np.uint8)
    masks = [(1, _disk(84, 84, 20, 20, 12)), (3, _disk(84, 84, 60, 60, 12))]
    out, infos = render_marks(img, masks, label_box="id", return_info=True)
    plain = render_marks(img, masks)
    for info in infos:
        bx1, by1, bx2, by2 = info.label_box
        patch = out[by1:by2, bx1:bx2].reshape(-1, 3).astype(int)
        # 0.8-opaque box over the lightly tinted mask: most box pixels are within ~40 of the ID colour
        # (the rest are the digit's ink), far from the plain style's dark box
        near = np.abs(patch - np.asarray(id_color(info.id))).max(axis=1) <= 40
        assert near.mean() > 0.5, (info.id, patch[:5])
        assert not np.array_equal(out[by1:by2, bx1:bx2], plain[by1:by2, bx1:bx2])
    with pytest.raises(ValueError, match="label_box"):
        render_marks(img, masks, label_box="rainbow")


def test_tiny_and_border_labels_clamped_inside():
    img = np.zeros((40, 40, 3), np.uint8)
    one = np.zeros((40, 40), bool)
    one[0, 39] = True
    out, infos = render_marks(img, [(17, one), (5, [0, 30, 3, 40])], return_info=True)
    for inf in infos:
        x1, y1, x2, y2 = inf.label_box
        assert 0 <= x1 < x2 <= 40 and 0 <= y1 < y2 <= 40
    assert infos[-1].label_xy == (39, 0)


def test_all_spec_kinds_agree():
    img = np.full((50, 70, 3), 90, np.uint8)
    m = np.zeros((50, 70), bool)
    m[10:30, 20:45] = True
    specs = [m, encode_rle(m), encode_rle(m, compress=False), [[20, 10, 44, 10, 44, 29, 20, 29]],
             [20, 10, 45, 30], {"box": [20, 10, 45, 30]}]
    outs = [render_marks(img, [(4, s)]) for s in specs]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_id_colour_stable_across_frames_and_seeded_style():
    frames = [np.full((64, 64, 3), 200, np.uint8) for _ in range(3)]
    tracks = [[(7, _disk(64, 64, 20 + 10 * t, 30, 9)), (2, _disk(64, 64, 45, 45, 6))] for t in range(3)]
    outs = render_video_marks(frames, tracks)
    for t, o in enumerate(outs):
        assert tuple(o[30, 20 + 10 * t - 9]) == id_color(7)  # leftmost contour pixel
    a = render_video_marks(frames, tracks, seed=3)
    b = render_video_marks(frames, tracks, seed=3)
    c = render_video_marks(frames, tracks, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, render_marks(f, t, "video", seed=3)) for x, f, t in zip(a, frames, tracks))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert id_color("7") == id_color(7) and id_color("car") == id_color("car")
    with pytest.raises(ValueError, match="2 per-frame"):
        render_video_marks(frames, tracks[:2])


def test_number_by_area_and_bad_input():
    masks = [_disk(30, 30, 15, 15, 3), _disk(30, 30, 15, 15, 9), np.zeros((30, 30), bool)]
    numbered = number_by_area(masks)
    assert [k for k, _ in numbered] == [1, 2] and numbered[0][1] is masks[1]
    with pytest.raises(ValueError, match="uint8"):
        render_marks(np.zeros((4, 4, 3), np.float32), [])
    with pytest.raises(ValueError, match="instance 0 .id 1.*does not match"):
        render_marks(np.zeros((4, 4, 3), np.uint8), [(1, np.zeros((5, 5), bool))])


def test_small_image_labels_use_bitmap_font():
    img = np.full((56, 56, 3), 230, np.uint8)
    out, infos = render_marks(img, [(12, _disk(56, 56, 28, 28, 10))], "video", return_info=True)
    x1, y1, x2, y2 = infos[0].label_box
    assert (y2 - y1, x2 - x1) == (7, 9)  # 3x5 digits, 1 px gap, 1 px padding
    assert (out[y1:y2, x1:x2] == 0).any()


def test_cli_marks_a_frame_folder(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    masks = {}
    for t in range(2):
        Image.fromarray(np.full((32, 48, 3), 100 + t, np.uint8)).save(frames / f"{t:03d}.png")
        masks[f"{t:03d}.png"] = {"1": encode_rle(_disk(32, 48, 10 + 5 * t, 15, 6)), "2": [30, 5, 45, 25]}
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(frames / "009.png")  # no masks
    mp = tmp_path / "masks.json"
    mp.write_text(json.dumps(masks))
    assert som_main([str(frames), "--masks", str(mp), "--out", str(tmp_path / "out")]) == 0
    out0 = np.asarray(Image.open(tmp_path / "out" / "000.png"))
    tracks = [(k, v) for k, v in masks["000.png"].items()]
    np.testing.assert_array_equal(out0, render_marks(np.full((32, 48, 3), 100, np.uint8), tracks, "video"))
    assert (np.asarray(Image.open(tmp_path / "out" / "009.png")) == 0).all()
    assert som_main([str(frames), "--masks", str(mp), "--out", str(tmp_path / "out_id"), "--label-box", "id"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out_id" / "000.png")),
                                  render_marks(np.full((32, 48, 3), 100, np.uint8), tracks, "video", label_box="id"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"000.png": {"1": {"size": [3, 3], "counts": [9]}}}))
    with pytest.raises(SystemExit, match="bad.json: frame '000.png'.*does not match"):
        som_main([str(frames), "--masks", str(bad), "--out", str(tmp_path / "out2")])


def test_label_grid_centres_each_label_in_its_own_cell():
    """label_grid=G: every label box sits inside one G-px cell, one label per cell, on its instance
    where a free cell's centre is on it."""
    from data_gen.synthetic_scene import Difficulty, finalize_visibility, make_scene

    for seed in range(12):
        rng = np.random.default_rng(seed)
        scene = make_scene(rng, side=84, num_frames=1, difficulty=Difficulty(2, 4, small=0.2, occlusion=0.3),
                           dynamic=False)
        img, masks = finalize_visibility(scene)[0]
        out, infos = render_marks(img, masks, label_grid=14, return_info=True)
        cells = set()
        for info in infos:
            if info.skipped:
                continue
            x1, y1, x2, y2 = info.label_box
            assert x1 // 14 == (x2 - 1) // 14 and y1 // 14 == (y2 - 1) // 14, info
            cells.add((x1 // 14, y1 // 14))
            cx, cy = info.label_xy
            assert cx % 14 == 7 and cy % 14 == 7
        assert len(cells) == sum(not i.skipped for i in infos)
        free = render_marks(img, masks, return_info=True)[1]
        assert [i.id for i in free] == [i.id for i in infos]
