"""`minivseg.panoptic`: the KITTI-STEP PNG codec round-trips and stores R = semantic,
G*256+B = instance; a bad PNG raises naming the file; the class table and the thing-then-stuff
order; crowd detection and stable colours.
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
