"""`minivseg.panoptic`: the KITTI-STEP PNG codec round-trips and stores R = semantic,
G*256+B = instance; a bad PNG raises naming the file; the class table and the thing-then-stuff
order; crowd detection and stable colours; the depth PNG codec (16-bit, metres * 256, 0 = none)
round-trips, keeps 0 and positive apart, clips at 256 m and rejects 8-bit, RGB and bad values.
"""

import numpy as np
import pytest

from minivseg import panoptic as P


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    semantic = rng.choice([*range(19), 255], size=(7, 11))
    instance = np.where(np.isin(semantic, P.THING_CLASSES), rng.integers(0, 999, size=(7, 11)), 0)
    panoptic = semantic * P.LABEL_DIVISOR + instance
    P.write_kitti_step_png(tmp_path / "a" / "000000.png", panoptic)
    back = P.read_kitti_step_png(tmp_path / "a" / "000000.png")
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, panoptic)


def test_png_channels_are_kitti_step_encoding(tmp_path):
    from PIL import Image

    P.write_kitti_step_png(tmp_path / "x.png", np.array([[13 * 1000 + 300]]))
    rgb = np.asarray(Image.open(tmp_path / "x.png"))
    assert rgb[0, 0].tolist() == [13, 300 // 256, 300 % 256]  # R = semantic, G*256+B = instance


def test_bad_png_names_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        P.read_kitti_step_png(bad)


def test_class_table_and_order():
    assert len(P.CLASS_NAMES) == len(P.CLASS_COLORS) == 19
    assert P.CLASS_NAMES[11] == "person" and P.CLASS_NAMES[13] == "car"
    order = P.thing_stuff_class_ids()
    assert order[:2] == (11, 13) and order[2:] == P.STUFF_CLASSES and len(P.STUFF_CLASSES) == 17


def test_crowd_and_colours_are_stable():
    pan = np.array([[11000, 11005, 13005, 255000, 2000]])
    assert P.is_crowd(pan).tolist() == [[True, False, False, False, False]]
    colours = P.colorize(pan)
    assert colours.shape == (1, 5, 3) and colours.dtype == np.uint8
    assert tuple(colours[0, 4]) == P.CLASS_COLORS[2] and tuple(colours[0, 3]) == (0, 0, 0)
    assert tuple(colours[0, 1]) != tuple(colours[0, 2])  # same instance number, other class
    again = P.colorize(np.array([[13005]]))
    assert tuple(again[0, 0]) == tuple(colours[0, 2])  # a track keeps its colour


def test_depth_png_round_trip_keeps_zero_and_clips(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    depth = rng.uniform(0, P.MAX_DEPTH, size=(6, 9)).astype(np.float32)
    depth[0, :3] = 0.0  # no depth
    depth[1, :3] = (1e-4, 0.5 / 256, 300.0)  # tiny stays positive; beyond 65535/256 is clipped
    P.write_depth_png(tmp_path / "d" / "000000.png", depth)
    with Image.open(tmp_path / "d" / "000000.png") as png:
        assert png.mode == "I;16"  # 16-bit grayscale, values = round(depth * 256)
        raw = np.asarray(png, dtype=np.int64)
    np.testing.assert_array_equal(raw[2:], np.round(depth[2:] * P.DEPTH_SCALE))
    back = P.read_depth_png(tmp_path / "d" / "000000.png")
    assert back.dtype == np.float32 and back.shape == depth.shape
    assert (back[0, :3] == 0).all() and (back[1, :3] > 0).all()
    assert back[1, 2] == 65535 / P.DEPTH_SCALE
    np.testing.assert_allclose(back[2:], depth[2:], atol=0.5 / P.DEPTH_SCALE + 1e-6)


def test_depth_png_rejects_8_bit_rgb_and_bad_values(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 5), 9, np.uint8)).save(tmp_path / "eight_bit.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "colour.png")
    for name in ("eight_bit.png", "colour.png"):
        with pytest.raises(ValueError, match=name + ".*16-bit"):
            P.read_depth_png(tmp_path / name)
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="bad.png"):
            P.write_depth_png(tmp_path / "bad.png", np.array([[1.0, bad]]))
    with pytest.raises(ValueError, match="2-D"):
        P.write_depth_png(tmp_path / "bad.png", np.ones((2, 2, 1)))
