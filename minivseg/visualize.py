"""Pictures of panoptic videos: overlays, GT/prediction comparisons, frame strips, GIFs, heatmaps
and 3-D tube plots.

Colours come from `minivseg.panoptic.colorize`: stuff and crowd in their Cityscapes class colour,
void black, and every track in its own colour derived from its panoptic id, so one object keeps
its colour in every frame, clip and figure (a tube in TubeFormer-DeepLab §3.1 is one id's masks
over time).

- `overlay`: label colours blended over the frame, segment edges in white;
- `compare`: GT | prediction, side by side; `strip`: a row (or column) of overlays;
- `save_gif`: a looping GIF written with Pillow;
- `heatmap`: an attention map (or any map) resized and colour-mapped over the frame;
- `depth_picture`: a depth map in metres as colours (near bright, far dark, no depth black);
- `plot_tubes`: a 3-D (x, t, y) plot of every thing tube (`minivseg.panoptic.tube_ids`).

For example, frames 0, 8, 16 and 23 of a synthetic clip as a PNG column::

    from PIL import Image
    from minivseg.synthetic import generate_sequence
    from minivseg.visualize import strip
    f, p = generate_sequence(0, 24)
    Image.fromarray(strip(f[[0, 8, 16, 23]], p[[0, 8, 16, 23]], vertical=True)).save("strip.png")

Not from a paper (no section or equation to cite). Reference code: deeplab2's
``trainer/vis_utils.py``, which plays the same role there.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image
from scipy import ndimage

from minivseg.panoptic import LABEL_DIVISOR, colorize, track_color, tube_ids

WHITE = np.uint8((255, 255, 255))


def edge_mask(panoptic: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels whose right or lower neighbour has a different panoptic id."""
    edge = np.zeros(panoptic.shape, bool)
    edge[:, :-1] |= panoptic[:, 1:] != panoptic[:, :-1]
    edge[:-1] |= panoptic[1:] != panoptic[:-1]
    return edge


def overlay(
    frame, panoptic, alpha: float = 0.5, boundaries: bool = True, label_divisor=LABEL_DIVISOR
) -> np.ndarray:
    """Blend ``colorize(panoptic)`` over ``frame (H, W, 3)`` uint8; returns ``(H, W, 3)`` uint8.

    ``alpha`` is the weight of the label colours; ``boundaries`` draws segment edges in white;
    ``label_divisor``: 65536 (``VIDEO_LABEL_DIVISOR``) for stitched videos.
    """
    frame, panoptic = np.asarray(frame), np.asarray(panoptic)
    colors = colorize(panoptic, label_divisor=label_divisor)
    blend = (1 - alpha) * frame.astype(np.float32) + alpha * colors
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    if boundaries:
        out[edge_mask(panoptic)] = WHITE
    return out


def _tile(images, gap: int, vertical: bool) -> np.ndarray:
    """Concatenate ``(H, W, 3)`` images with ``gap`` white pixels between them."""
    axis, pieces = 0 if vertical else 1, []
    for k, image in enumerate(images):
        if k and gap:
            shape = list(image.shape)
            shape[axis] = gap
            pieces.append(np.full(shape, 255, np.uint8))
        pieces.append(image)
    return np.concatenate(pieces, axis=axis)


def compare(frame, gt, pred, alpha=0.5, gap=4, label_divisor=LABEL_DIVISOR) -> np.ndarray:
    """Ground truth (left) and prediction (right) overlaid on one frame: ``(H, 2W + gap, 3)``."""
    pictures = [overlay(frame, x, alpha, label_divisor=label_divisor) for x in (gt, pred)]
    return _tile(pictures, gap, vertical=False)


def strip(frames, panoptic, alpha=0.5, gap=4, vertical=False, label_divisor=LABEL_DIVISOR):
    """Overlays of ``T`` frames side by side: ``(T, H, W, 3)`` + ``(T, H, W)`` ->
    ``(H, T*W + (T-1)*gap, 3)`` uint8, or stacked top to bottom when ``vertical``."""
    pictures = [overlay(f, p, alpha, label_divisor=label_divisor) for f, p in zip(frames, panoptic)]
    return _tile(pictures, gap, vertical)


def save_gif(path, images, fps: float = 5) -> None:
    """Write ``images`` (a sequence of ``(H, W, 3)`` uint8) as a looping GIF.

    Creates the parent folder. Pillow merges identical consecutive frames into one longer frame.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pictures = [Image.fromarray(np.asarray(image, np.uint8)) for image in images]
    duration = int(round(1000 / fps))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=duration, loop=0)


def heatmap(frame, values, alpha: float = 0.6, cmap: str = "magma") -> np.ndarray:
    """Colour-mapped ``values (h, w)`` (e.g. one attention map), resized bilinearly to the frame and
    blended over it; min-max normalised. Returns ``(H, W, 3)`` uint8."""
    frame, values = np.asarray(frame), np.asarray(values, np.float64)
    H, W = frame.shape[:2]
    values = ndimage.zoom(values, (H / values.shape[0], W / values.shape[1]), order=1)
    span = values.max() - values.min()
    values = (values - values.min()) / (span if span > 0 else 1.0)
    colours = matplotlib.colormaps[cmap](values)[..., :3] * 255
    return np.clip(np.rint((1 - alpha) * frame + alpha * colours), 0, 255).astype(np.uint8)


def depth_picture(depth, max_depth: float = 80.0, cmap: str = "magma") -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8: near bright, far dark, 0 (no depth) black.

    Inverse depth is coloured (as depth figures usually are), so that the near street, where
    most of the detail is, gets most of the colour range.
    """
    depth = np.asarray(depth, np.float32)
    inverse = np.where(depth > 0, 1.0 / np.maximum(depth, 1e-3), 0.0)
    nearest = 1.0 / max(float(depth[depth > 0].min()), 1e-3) if (depth > 0).any() else 1.0
    values = np.clip((inverse - 1.0 / max_depth) / max(nearest - 1.0 / max_depth, 1e-6), 0, 1)
    picture = (matplotlib.colormaps[cmap](values)[..., :3] * 255).astype(np.uint8)
    picture[depth <= 0] = 0
    return picture


def plot_tubes(panoptic, pan_ids=None, stride: int = 4, ax=None, label_divisor=LABEL_DIVISOR):
    """3-D plot of tubes: every ``stride``-th pixel of each id's masks, stacked along time.

    ``panoptic (T, H, W)``; axes are image column, frame and image row (up is up); one colour per
    track (`track_color`). ``pan_ids`` defaults to every tracked thing. Returns the axes.
    ``label_divisor``: 65536 for stitched videos, as in every function here.
    """
    import matplotlib.pyplot as plt

    panoptic = np.asarray(panoptic)[:, ::stride, ::stride]  # (T, h, w)
    if pan_ids is None:
        pan_ids = tube_ids(panoptic, label_divisor=label_divisor)
    pan_ids = [int(i) for i in pan_ids]
    if ax is None:
        ax = plt.figure(figsize=(8, 4)).add_subplot(projection="3d")
    for pan_id in pan_ids:
        t, row, col = np.nonzero(panoptic == pan_id)
        rgb = np.array(track_color(*divmod(pan_id, label_divisor))) / 255
        ax.scatter(col * stride, t, -row * stride, color=rgb, marker="s", s=4, depthshade=False)
    T, h, w = panoptic.shape
    ax.set(xlim=(0, w * stride), ylim=(0, T - 1), zlim=(-h * stride, 0))
    ax.set(xlabel="x (column)", ylabel="t (frame)", zlabel="-y (row)")
    ax.set_box_aspect((w, 0.8 * w, h))
    return ax
