"""Prediction files: what evaluation writes for each frame, in the dataset's own layout.

`PredictionWriter` writes one sequence's predictions as they stream out of
`minivseg.tasks.predict_frames`: KITTI-STEP PNGs of video ids (label divisor 65536, which
``python -m minivseg.metrics`` scores again) and DVPS depth PNGs, VSPW masks, and an overlay GIF
per sequence. YouTube-VIS predictions are one ``results.json`` for the whole split
(`minivseg.youtube_vis.ResultsWriter`), the file the benchmark server scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minivseg.panoptic import VIDEO_LABEL_DIVISOR, write_depth_png, write_kitti_step_png
from minivseg.splits import read_image

GIF_FRAMES, GIF_WIDTH = 200, 640  # an overlay GIF shows at most this many frames, this wide


class PredictionWriter:
    """Writes a sequence's predictions as they come, in the dataset's layout (``layout``), and
    an overlay GIF of at most ``GIF_FRAMES`` frames evenly spaced, at most ``GIF_WIDTH`` wide
    (ground truth above the prediction when the frames have labels).

    kitti-step: a KITTI-STEP PNG per frame (video ids) under ``OUT/panoptic_maps/SPLIT/SEQ/``
    and, with depth, ``OUT/depth/SPLIT/SEQ/``; vspw: a VSPW mask of the semantic prediction
    under ``OUT/masks/VIDEO/`` (the folder VSPW's tooling reads); youtube-vis: only the GIF
    (the tracks go to ``results.json``, `minivseg.youtube_vis.ResultsWriter`).
    """

    def __init__(self, out_dir, split, sequence, image_paths, gif=True, layout="kitti-step"):
        self.out_dir, self.sequence, self.layout = Path(out_dir), sequence, layout
        self.png_dir = Path(out_dir) / "panoptic_maps" / split / sequence
        self.depth_dir = Path(out_dir) / "depth" / split / sequence  # DVPS: 16-bit depth x 256
        self.gif_path = Path(out_dir) / "overlays" / f"{sequence}.gif" if gif else None
        self.paths = list(image_paths)
        picked = np.linspace(0, len(self.paths) - 1, min(GIF_FRAMES, len(self.paths)))
        self.gif_frames, self.pictures = set(np.round(picked).astype(int).tolist()), []

    def add(self, t: int, pred: dict, gt: np.ndarray | None = None) -> None:
        """Frame ``t``'s prediction: ``panoptic`` video ids, ``semantic``, optional ``depth``;
        ``gt`` (video ids, label divisor 65536) puts the ground truth above it in the GIF."""
        panoptic, depth, frame = pred["panoptic"], pred.get("depth"), self.paths[t].stem
        if self.layout == "kitti-step":
            write_kitti_step_png(self.png_dir / f"{frame}.png", panoptic, VIDEO_LABEL_DIVISOR)
        elif self.layout == "vspw":
            from minivseg.vspw import prediction_path, write_mask

            write_mask(prediction_path(self.out_dir / "masks", self.sequence, frame),
                       pred["semantic"])  # fmt: skip
        if depth is not None:
            write_depth_png(self.depth_dir / f"{frame}.png", depth)
        if self.gif_path is not None and t in self.gif_frames:
            self.pictures.append(self.picture(read_image(self.paths[t]), panoptic, depth, gt))

    @staticmethod
    def picture(image, panoptic, depth=None, gt=None) -> np.ndarray:
        """One GIF frame: the prediction's overlay (and its depth colour map beside it), with the
        ground truth's overlay above it when given; at most ``GIF_WIDTH`` wide."""
        from PIL import Image

        from minivseg.visualize import depth_picture, overlay

        picture = overlay(image, panoptic, label_divisor=VIDEO_LABEL_DIVISOR)
        if depth is not None:  # the depth colour map beside the panoptic overlay
            gap = np.full((picture.shape[0], 4, 3), 255, np.uint8)
            picture = np.concatenate([picture, gap, depth_picture(depth)], axis=1)
        if gt is not None:  # ground truth on top, prediction below, white between
            truth = overlay(image, gt, label_divisor=VIDEO_LABEL_DIVISOR)
            truth = np.pad(truth, ((0, 4), (0, picture.shape[1] - truth.shape[1]), (0, 0)),
                           constant_values=255)  # fmt: skip
            picture = np.concatenate([truth, picture], axis=0)
        height, width = picture.shape[:2]
        if width > GIF_WIDTH:
            size = (GIF_WIDTH, max(1, round(height * GIF_WIDTH / width)))
            picture = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
        return picture

    def close(self) -> None:
        if self.gif_path is not None and self.pictures:
            from minivseg.visualize import save_gif

            save_gif(self.gif_path, self.pictures)
