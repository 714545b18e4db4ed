"""`minivseg.visualize`: edges match a pixel loop; overlays blend colours and draw white
boundaries; a track keeps its colour across frames; compare and strip layouts; GIFs hold every
frame; heatmaps resize and map the peak to the top colour; tube plots draw every subsampled tube
pixel; stitched-video ids (divisor 65536) draw like clip ids.
"""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from minivseg import visualize
from minivseg.panoptic import (
    VIDEO_LABEL_DIVISOR,
    VOID_ID,
    colorize,
    is_crowd,
    relabel,
    track_color,
    tube_ids,
)


def clip(T=3, H=6, W=10):
    """A tiny video: road, a car (track 2) moving right, a person (track 1), crowd, void."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    panoptic = np.zeros((T, H, W), np.int64)
    panoptic[:, :2] = 10000  # sky
    for t in range(T):
        panoptic[t, 3:5, t : t + 3] = 13002
    panoptic[:, 2:5, 8] = 11001
    panoptic[:, 5, 9] = 11000  # crowd
    panoptic[:, 0, 0] = VOID_ID
    return frames, panoptic


def test_edge_mask_matches_a_pixel_loop():
    panoptic = np.random.default_rng(1).integers(0, 3, (7, 9)) * 1000
    expected = np.zeros((7, 9), bool)
    for r in range(7):
        for c in range(9):
            right = c + 1 < 9 and panoptic[r, c + 1] != panoptic[r, c]
            down = r + 1 < 7 and panoptic[r + 1, c] != panoptic[r, c]
            expected[r, c] = right or down
    np.testing.assert_array_equal(visualize.edge_mask(panoptic), expected)


def test_overlay_blends_colours_and_draws_white_boundaries():
    frames, panoptic = clip()
    out = visualize.overlay(frames[0], panoptic[0])
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(
        visualize.overlay(frames[0], panoptic[0], alpha=0.0, boundaries=False), frames[0]
    )
    np.testing.assert_array_equal(
        visualize.overlay(frames[0], panoptic[0], alpha=1.0, boundaries=False),
        colorize(panoptic[0]),
    )
    half = visualize.overlay(frames[0], panoptic[0], alpha=0.5, boundaries=False).astype(int)
    expected = np.rint((frames[0].astype(float) + colorize(panoptic[0])) / 2)
    assert np.abs(half - expected).max() <= 1
    edges = visualize.edge_mask(panoptic[0])
    assert (out[edges] == 255).all() and edges.any()


def test_a_track_keeps_its_colour_across_frames():
    frames, panoptic = clip()
    car = np.array(track_color(13, 2))
    for t in range(3):
        painted = visualize.overlay(frames[t], panoptic[t], alpha=1.0, boundaries=False)
        assert (painted[panoptic[t] == 13002] == car).all()


def test_compare_and_strip_layouts():
    frames, panoptic = clip()
    pair = visualize.compare(frames[0], panoptic[0], panoptic[1], gap=4)
    assert pair.shape == (6, 24, 3) and pair.dtype == np.uint8
    np.testing.assert_array_equal(pair[:, :10], visualize.overlay(frames[0], panoptic[0]))
    np.testing.assert_array_equal(pair[:, 14:], visualize.overlay(frames[0], panoptic[1]))
    assert (pair[:, 10:14] == 255).all()
    row = visualize.strip(frames, panoptic, gap=2)
    assert row.shape == (6, 3 * 10 + 2 * 2, 3)
    np.testing.assert_array_equal(row[:, 24:34], visualize.overlay(frames[2], panoptic[2]))
    column = visualize.strip(frames, panoptic, gap=0, vertical=True)
    assert column.shape == (18, 10, 3)
    np.testing.assert_array_equal(column[6:12], visualize.overlay(frames[1], panoptic[1]))


def test_save_gif_writes_every_frame(tmp_path):
    frames, panoptic = clip(T=4)
    images = [visualize.overlay(f, p) for f, p in zip(frames, panoptic)]
    path = tmp_path / "overlays" / "clip.gif"  # the folder is created
    visualize.save_gif(path, images, fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (10, 6)
        assert gif.info["duration"] == 200


def test_heatmap_resizes_and_maps_the_peak_to_the_top_colour():
    frames, _ = clip()
    values = np.zeros((3, 5))
    values[1, 2] = 1.0
    out = visualize.heatmap(frames[0], values, alpha=1.0, cmap="magma")
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8
    top = np.rint(np.array(matplotlib.colormaps["magma"](1.0)[:3]) * 255)
    bottom = np.rint(np.array(matplotlib.colormaps["magma"](0.0)[:3]) * 255)
    np.testing.assert_array_equal(out[0, 0], bottom)
    assert np.abs(out.reshape(-1, 3).astype(int) - top).sum(1).min() <= 3
    np.testing.assert_array_equal(visualize.heatmap(frames[0], values, alpha=0.0), frames[0])


def test_tube_ids_and_plot_tubes_draw_every_subsampled_tube_pixel():
    _, panoptic = clip()
    assert tube_ids(panoptic).tolist() == [11001, 13002]  # no stuff, crowd or void
    ax = visualize.plot_tubes(panoptic, stride=2)
    points = sum(len(c.get_offsets()) for c in ax.collections)
    expected = np.isin(panoptic[:, ::2, ::2], [11001, 13002]).sum()
    assert points == expected and len(ax.collections) == 2
    plt.close("all")


def test_stitched_video_ids_draw_like_clip_ids():
    """A stitched video (label divisor 65536) looks exactly like the same ids written with 1000."""
    ids = np.full((2, 4, 5), 2000)
    ids[:, 1:3, 1:3] = 13004
    ids[:, 3, 0] = 13000  # crowd
    video = relabel(ids, 1000, VIDEO_LABEL_DIVISOR)
    frames = np.zeros((2, 4, 5, 3), np.uint8)
    options = {"label_divisor": VIDEO_LABEL_DIVISOR}
    np.testing.assert_array_equal(
        visualize.strip(frames, video, **options), visualize.strip(frames, ids)
    )
    np.testing.assert_array_equal(
        visualize.compare(frames[0], video[0], video[0], **options),
        visualize.compare(frames[0], ids[0], ids[0]),
    )
    assert tube_ids(video, **options).tolist() == [13 * VIDEO_LABEL_DIVISOR + 4]
    assert tube_ids(ids).tolist() == [13004]
    assert (is_crowd(video, label_divisor=VIDEO_LABEL_DIVISOR) == is_crowd(ids)).all()


def test_depth_picture_colours_near_bright_far_dark_and_no_depth_black():
    depth = np.array([[0.0, 2.0, 10.0, 80.0]], np.float32)
    picture = visualize.depth_picture(depth)
    assert picture.shape == (1, 4, 3) and picture.dtype == np.uint8
    assert picture[0, 0].tolist() == [0, 0, 0]  # no depth
    brightness = picture[0, 1:].astype(int).sum(-1)
    assert brightness[0] > brightness[1] > brightness[2]  # nearer is brighter
