"""The synthetic street-scene generator (`minivseg.synthetic`) and its renderer.

Shapes and label values; the same seed gives the same bytes; every one of the ten classes, crowd
and void appear; track ids persist, keep their class and move a few pixels per frame; tracks
enter and leave; cars are not tiny; projection (nearer is lower, larger and occludes); the void
ring; the CLI's written layout reads back with the same ids and pixels. Depth: the same frames
and ids with ``depth=True``; 0 exactly on the sky and beyond ``MAX_DEPTH``, positive elsewhere;
the ground's depth is ``f * CAM_HEIGHT / y``; a thing's pixels are nearer than the background
they cover and a near thing's nearer than the far thing it hides; the CLI writes the depth PNGs
(``--no-depth``: none).
"""

import numpy as np
import pytest
from PIL import Image

from minivseg import synthetic, synthetic_render
from minivseg.panoptic import (
    LABEL_DIVISOR,
    MAX_DEPTH,
    VOID_ID,
    instance_of,
    read_depth_png,
    read_kitti_step_png,
    semantic_of,
)

REQUIRED = {"road": 0, "sidewalk": 1, "building": 2, "pole": 5, "traffic sign": 7,
            "vegetation": 8, "terrain": 9, "sky": 10, "person": 11, "car": 13}  # fmt: skip


@pytest.fixture(scope="module")
def videos():
    """Six 12-frame sequences at the default 128x416."""
    return [synthetic.generate_sequence(seed, 12) for seed in range(6)]


def tracks(panoptic):
    """``{pan_id: [(t, rows, cols), ...]}`` for every tracked thing pixel set in a video."""
    out = {}
    for t, frame in enumerate(panoptic):
        for pan_id in np.unique(frame):
            if semantic_of(pan_id) in (11, 13) and instance_of(pan_id) > 0:
                rows, cols = np.nonzero(frame == pan_id)
                out.setdefault(int(pan_id), []).append((t, rows, cols))
    return out


def test_shapes_dtypes_and_label_values():
    frames, panoptic = synthetic.generate_sequence(3, 4, height=64, width=208)
    assert frames.shape == (4, 64, 208, 3) and frames.dtype == np.uint8
    assert panoptic.shape == (4, 64, 208) and panoptic.dtype == np.int64
    semantic, instance = semantic_of(panoptic), instance_of(panoptic)
    assert set(np.unique(semantic)) <= set(REQUIRED.values()) | {255}
    assert not instance[~np.isin(semantic, (11, 13))].any()  # stuff and void have no instance
    assert frames.std() > 20  # not a flat image


def test_same_seed_same_bytes_and_different_seed_differs():
    a_frames, a_panoptic = synthetic.generate_sequence(11, 5, height=64, width=208)
    b_frames, b_panoptic = synthetic.generate_sequence(11, 5, height=64, width=208)
    c_frames, c_panoptic = synthetic.generate_sequence(12, 5, height=64, width=208)
    assert a_frames.tobytes() == b_frames.tobytes()
    assert a_panoptic.tobytes() == b_panoptic.tobytes()
    assert (a_frames != c_frames).mean() > 0.5
    assert (a_panoptic != c_panoptic).mean() > 0.1


def test_every_required_class_crowd_and_void_appear(videos):
    panoptic = np.stack([p for _, p in videos])
    semantic, instance = semantic_of(panoptic), instance_of(panoptic)
    present = set(np.unique(semantic).tolist())
    missing = {name for name, c in REQUIRED.items() if c not in present}
    assert not missing, f"classes never generated: {missing}"
    assert (np.isin(semantic, (11, 13)) & (instance == 0)).any(), "no crowd"
    assert (panoptic == VOID_ID).any(), "no void"
    assert 0.001 < (panoptic == VOID_ID).mean() < 0.05


def test_track_ids_persist_move_little_and_keep_their_class(videos):
    steps, others = [], []
    for _, panoptic in videos:
        by_id = tracks(panoptic)
        instance_class = {}
        for pan_id in by_id:  # one counter for all things: an instance number has one class
            assert instance_class.setdefault(pan_id % LABEL_DIVISOR, pan_id // LABEL_DIVISOR) == (
                pan_id // LABEL_DIVISOR
            )
        centroid = {
            (pan_id, t): (rows.mean(), cols.mean())
            for pan_id, masks in by_id.items()
            for t, rows, cols in masks
            if len(rows) >= 50
        }
        for (pan_id, t), c in centroid.items():
            if (pan_id, t + 1) in centroid:
                steps.append(np.hypot(*np.subtract(centroid[pan_id, t + 1], c)))
            for (other, s), d in centroid.items():
                if s == t + 1 and other != pan_id:
                    others.append(np.hypot(*np.subtract(d, c)))
    steps, others = np.array(steps), np.array(others)
    assert len(steps) > 100
    assert np.median(steps) < 5 and np.percentile(steps, 95) < 20  # a few px per frame
    assert np.median(others) > 5 * np.median(steps)  # a swapped id would be caught


def test_tracks_enter_and_leave_and_a_moderate_number_is_visible(videos):
    per_frame, births, deaths = [], 0, 0
    for _, panoptic in videos:
        by_id = tracks(panoptic)
        for t in range(len(panoptic)):
            per_frame.append(sum(any(s == t for s, _, _ in masks) for masks in by_id.values()))
        births += sum(masks[0][0] > 0 for masks in by_id.values())
        deaths += sum(masks[-1][0] < len(panoptic) - 1 for masks in by_id.values())
    assert 2 <= np.mean(per_frame) <= 8
    assert births > 0 and deaths > 0


def test_cars_are_not_microscopic(videos):
    heights = [
        rows.max() - rows.min() + 1
        for _, panoptic in videos
        for pan_id, masks in tracks(panoptic).items()
        if pan_id // LABEL_DIVISOR == 13
        for _, rows, _ in masks
    ]
    assert np.median(heights) >= 15


def test_projection_nearer_is_lower_larger_and_occludes():
    """Two cars straight ahead: sizes follow f*h/z, the near one is lower and hides the far one."""
    H, W, f = 128, 416, synthetic_render.FOCAL * 128
    camera = (W / 2, synthetic_render.HORIZON * H, 0.0, f)
    image = np.zeros((H, W, 3), np.float32)
    label = np.zeros((H, W), np.int64)
    rgb = np.float32([(200, 0, 0), (40, 50, 62), (22, 22, 22), (200, 20, 20)])
    far = synthetic_render.Thing("car", 0.0, 20.0, 13001, (1.8, 1.5, 4.0), rgb)
    near = synthetic_render.Thing("car", 0.0, 10.0, 13002, (1.8, 1.5, 4.0), rgb)
    for thing in (far, near):
        synthetic_render.draw_thing(image, label, thing, 0, camera)
    rows_far, cols_far = np.nonzero(label == 13001)
    rows_near, cols_near = np.nonzero(label == 13002)
    ground_row = lambda z: camera[1] + f * synthetic_render.CAM_HEIGHT / z
    assert abs(rows_near.max() + 1 - ground_row(10)) <= 1
    assert abs(cols_near.max() - cols_near.min() + 1 - f * 1.8 / 10) <= 2
    assert abs(rows_near.max() - rows_near.min() + 1 - f * 1.5 * 0.97 / 10) <= 2
    assert rows_near.max() > rows_far.max() + 20
    assert len(rows_far) < len(rows_near)
    # the far car's visible pixels are only those not covered by the near car's silhouette
    alone = np.zeros((H, W), np.int64)
    synthetic_render.draw_thing(np.zeros_like(image), alone, far, 0, camera)
    assert (alone == 13001).sum() > len(rows_far)


def test_void_ring_cuts_tracked_instances_from_crowd_of_their_class():
    panoptic = np.full((9, 12), 1000, np.int64)  # sidewalk
    panoptic[:, 0:6] = 11000  # crowd of people
    panoptic[3:6, 3:5] = 11005  # a tracked person inside the crowd
    panoptic[:, 8:10] = 13000  # crowd of cars, next to no tracked car
    out = synthetic_render.void_ring(panoptic.copy(), radius=1)
    expected = panoptic.copy()
    expected[2:7, 2:6][expected[2:7, 2:6] == 11000] = VOID_ID
    np.testing.assert_array_equal(out, expected)


def test_written_layout_reads_back_with_the_same_ids(tmp_path, capsys):
    args = "--train-seqs 2 --val-seqs 1 --frames 3 --seed 5 --height 32 --width 104".split()
    synthetic.main(["--out", str(tmp_path), *args])
    printed = capsys.readouterr().out
    assert "train/0000" in printed and "val/0002" in printed and "class pixel shares" in printed
    for index, split in ((0, "train"), (1, "train"), (2, "val")):
        frames, panoptic = synthetic.generate_sequence(
            synthetic.sequence_seed(5, index), 3, 32, 104
        )
        for t in range(3):
            name = f"{split}/{index:04d}/{t:06d}.png"
            np.testing.assert_array_equal(
                read_kitti_step_png(tmp_path / "panoptic_maps" / name), panoptic[t]
            )
            np.testing.assert_array_equal(
                np.asarray(Image.open(tmp_path / "images" / name)), frames[t]
            )
    assert not (tmp_path / "images" / "val" / "0000").exists()
    assert len(list(tmp_path.rglob("*.png"))) == 3 * 3 * 3  # images, panoptic maps, depth
    assert "pixels with depth" in printed


def test_written_depth_reads_back_and_no_depth_writes_none(tmp_path):
    args = "--train-seqs 1 --val-seqs 1 --frames 2 --seed 5 --height 32 --width 104".split()
    synthetic.main(["--out", str(tmp_path / "a"), *args])
    for index, split in ((0, "train"), (1, "val")):
        seed = synthetic.sequence_seed(5, index)
        _, _, depth = synthetic.generate_sequence(seed, 2, 32, 104, depth=True)
        for t in range(2):
            back = read_depth_png(tmp_path / "a" / "depth" / split / f"{index:04d}/{t:06d}.png")
            assert ((back == 0) == (depth[t] == 0)).all()
            np.testing.assert_allclose(back, depth[t], atol=1 / 512 + 1e-6)
    synthetic.main(["--out", str(tmp_path / "b"), "--no-depth", *args])
    assert not (tmp_path / "b" / "depth").exists()
    assert len(list((tmp_path / "b").rglob("*.png"))) == 2 * 2 * 2


@pytest.mark.parametrize("seed,size", [(0, (128, 416)), (4, (65, 209))])
def test_depth_is_zero_on_sky_and_beyond_range_and_positive_elsewhere(seed, size):
    frames, panoptic = synthetic.generate_sequence(seed, 6, *size)
    frames_d, panoptic_d, depth = synthetic.generate_sequence(seed, 6, *size, depth=True)
    assert frames_d.tobytes() == frames.tobytes() and panoptic_d.tobytes() == panoptic.tobytes()
    assert depth.shape == panoptic.shape and depth.dtype == np.float32
    semantic = semantic_of(panoptic)
    sky, things = semantic == 10, np.isin(semantic, (5, 7, 11, 13)) | (panoptic == VOID_ID)
    assert (depth[sky] == 0).all()
    assert (depth[things] > 0).all()  # poles, signs, people, cars and boxes are all near
    assert depth.max() <= MAX_DEPTH and (depth[~sky] > 0).mean() > 0.9
    # Any other 0 is a surface beyond MAX_DEPTH: the ground near the horizon or a far facade.
    H, f, yh = size[0], synthetic_render.FOCAL * size[0], synthetic_render.HORIZON * size[0]
    rows = np.broadcast_to(np.arange(H)[None, :, None] + 0.5 - yh, depth.shape)
    ground = np.isin(semantic, (0, 1, 9))
    far = ground & (depth == 0)
    assert far.any()
    assert (f * synthetic_render.CAM_HEIGHT / rows[far] > MAX_DEPTH).all()
    assert (np.isin(semantic, (2, 8)) & (depth == 0)).any()  # facades far down the street
    near = ground & (depth > 0)  # the ground is seen at z = f * CAM_HEIGHT / (row offset)
    ground_z = f * synthetic_render.CAM_HEIGHT / rows[near]
    np.testing.assert_allclose(depth[near], ground_z, rtol=1e-5)


def test_things_are_nearer_than_what_they_cover_and_near_hides_far():
    rng = np.random.default_rng(1)
    H, W = 128, 416
    street = synthetic.plan_street(rng, 60.0)
    texture = synthetic_render.noise_texture(rng)
    camera = (W / 2, synthetic_render.HORIZON * H, 0.0, synthetic_render.FOCAL * H)
    image, cls, background = synthetic_render.render_background(street, texture, camera, (H, W))
    rgb = np.float32([(200, 0, 0), (40, 50, 62), (22, 22, 22), (200, 20, 20)])
    far = synthetic_render.Thing("car", 0.5, 20.0, 13001, (1.8, 1.5, 4.0), rgb)
    near = synthetic_render.Thing("car", -0.5, 10.0, 13002, (1.8, 1.5, 4.0), rgb)
    side = synthetic_render.Thing("car", -3.5, 12.0, 13003, (1.8, 1.5, 4.0), rgb)  # side visible
    label, depth = cls * LABEL_DIVISOR, background.copy()
    for thing in (far, side, near):  # painter's order, far to near
        synthetic_render.draw_thing(image, label, thing, 0, camera, depth)
    drawn = label // LABEL_DIVISOR == 13
    assert drawn.sum() > 500
    assert ((depth[drawn] < background[drawn]) | (background[drawn] == 0)).all()
    np.testing.assert_allclose(depth[label == 13002], 10.0)  # the near car's rear face
    np.testing.assert_allclose(depth[label == 13001], 20.0)
    side_depth = depth[label == 13003]  # rear face at 12 m, side face from 12 m to 16 m
    assert side_depth.min() >= 12.0 - 1e-4 and side_depth.max() <= 16.0 + 1e-4
    assert side_depth.max() > 13.0
    # where the near car hides the far one, the depth is the near car's
    alone = np.zeros((H, W), np.int64)
    synthetic_render.draw_thing(np.zeros_like(image), alone, far, 0, camera)
    hidden = (alone == 13001) & (label == 13002)
    assert hidden.sum() > 50 and (depth[hidden] == 10.0).all()


def test_z_far_bounds_thing_depth_makes_things_bigger_and_reaches_the_cli(tmp_path):
    """``z_far``: no car or person pixel is farther than it plus a car's length; at 20 m the
    median car is taller than at 30 m; the CLI's ``--z-far`` writes the same video as
    ``generate_sequence(z_far=...)``; a distance outside (Z_NEAR, Z_END] is refused."""
    heights = {}
    for z_far in (20.0, 30.0):
        heights[z_far] = []
        for seed in range(4):
            _, panoptic, depth = synthetic.generate_sequence(seed, 8, depth=True, z_far=z_far)
            things = np.isin(semantic_of(panoptic), (11, 13))
            assert things.any() and depth[things].max() < z_far + 4.8  # a car is up to 4.8 m long
            heights[z_far] += [
                rows.max() - rows.min() + 1
                for pan_id, masks in tracks(panoptic).items()
                if pan_id // LABEL_DIVISOR == 13
                for _, rows, _ in masks
            ]
    assert np.median(heights[20.0]) > np.median(heights[30.0])
    args = "--train-seqs 1 --val-seqs 0 --frames 2 --seed 5 --height 32 --width 104".split()
    synthetic.main(["--out", str(tmp_path), *args, "--z-far", "12", "--no-depth"])
    _, panoptic = synthetic.generate_sequence(synthetic.sequence_seed(5, 0), 2, 32, 104, z_far=12)
    for t in range(2):
        name = tmp_path / "panoptic_maps" / "train" / "0000" / f"{t:06d}.png"
        np.testing.assert_array_equal(read_kitti_step_png(name), panoptic[t])
    for bad in (synthetic.Z_NEAR, 1e4):
        with pytest.raises(ValueError, match="z_far must lie in"):
            synthetic.generate_sequence(0, 1, 32, 104, z_far=bad)
