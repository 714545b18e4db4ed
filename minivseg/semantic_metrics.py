"""Semantic video metrics: mean IoU from a confusion matrix, and the flicker rate.

STT §4.1.2 scores video semantic segmentation by segmentation accuracy, mIoU, and temporal
consistency, TC (ETC's metric, "based on the mean flow warping error between all consecutive
frames"); the paper numbers no equation for either.

- `MeanIoU` is that mIoU: per-class IoU from a (K+1)×(K+1) confusion matrix summed over all
  frames, averaged over the classes with non-zero union. GT-void pixels are not counted; a void
  prediction on a labelled pixel is a miss for the GT class and, unlike STQ's SQ, adds no "void
  class" to the mean. ``mean_over="gt"`` averages over the classes with GT pixels instead, as
  VSPW's evaluator does (``utils.py`` ``Evaluator``, its ``isval``; `minivseg.vspw`): a class
  that is only predicted, never in the GT, then adds no IoU of 0 to the mean.
- `Flicker` / `flicker_rate` is a flow-free stand-in for TC, not TC's number: the share of
  pixels whose predicted class changes between consecutive frames while the GT class does not
  (GT void excluded), pooled over all frame pairs of all videos. TC warps the next prediction
  onto the current one with optical flow and compares predictions only; flicker uses the GT to
  find the pixels that should not change, so it needs no flow model.

Usage::

    miou, flicker = MeanIoU(NUM_CLASSES), Flicker()
    miou.update(semantic_of(gt_video), semantic_of(pred_video))     # any equal shapes
    flicker.update(semantic_of(gt_video), semantic_of(pred_video))  # (T, H, W) class maps
    miou.result(), flicker.result()  # {"mIoU", "IoU_per_class"}, {"flicker", ...}

Neither has a reference implementation to reproduce; tests/test_metrics.py checks them on
hand-computed maps.
"""

from __future__ import annotations

import math

import numpy as np
from einops import rearrange

from minivseg.pair_counting import class_iou, nanmean
from minivseg.panoptic import IGNORE_LABEL


class MeanIoU:
    """Mean IoU of semantic maps from a confusion matrix; GT-void pixels are not counted."""

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, mean_over="union"):
        if ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} must be >= num_classes {num_classes}")
        if mean_over not in ("union", "gt"):
            raise ValueError(f"mean_over must be 'union' or 'gt', got {mean_over!r}")
        self.num_classes, self.ignore_label, self.mean_over = num_classes, ignore_label, mean_over
        self.confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def _index(self, semantic: np.ndarray, name: str) -> np.ndarray:
        index = np.where(semantic == self.ignore_label, self.num_classes, semantic).ravel()
        if index.size and (index.min() < 0 or index.max() > self.num_classes):
            raise ValueError(f"{name} has class ids outside 0..{self.num_classes - 1} and ignore")
        return index

    def update(self, gt_semantic: np.ndarray, pred_semantic: np.ndarray) -> None:
        """Add class maps of any equal shape, e.g. ``(H, W)`` or ``(T, H, W)``."""
        gt_semantic, pred_semantic = np.asarray(gt_semantic), np.asarray(pred_semantic)
        if gt_semantic.shape != pred_semantic.shape:
            raise ValueError(f"shapes differ: {gt_semantic.shape} vs {pred_semantic.shape}")
        size = self.num_classes + 1
        cells = self._index(gt_semantic, "ground truth") * size
        cells += self._index(pred_semantic, "prediction")
        self.confusion += rearrange(np.bincount(cells, minlength=size**2), "(g p) -> g p", p=size)

    def result(self) -> dict:
        """``mIoU`` (mean over classes with non-zero union, or with GT pixels for
        ``mean_over="gt"``) and ``IoU_per_class`` (NaN where the union is 0).

        A void prediction on a labelled pixel is a miss for the GT class; unlike STQ's SQ it adds
        no "void class" to the mean.
        """
        confusion = self.confusion.copy()
        confusion[self.num_classes] = 0
        iou = class_iou(confusion)[: self.num_classes]  # STT §4.1.2: mIoU
        if self.mean_over == "gt":  # VSPW: only classes with GT pixels enter the mean
            return {"mIoU": nanmean(iou[confusion.sum(1)[:-1] > 0]), "IoU_per_class": iou.tolist()}
        return {"mIoU": nanmean(iou), "IoU_per_class": iou.tolist()}


class Flicker:
    """Share of pixels whose predicted class changes between consecutive frames while the GT
    class stays the same (GT void excluded), pooled over all frame pairs of all videos."""

    def __init__(self, ignore_label=IGNORE_LABEL):
        self.ignore_label = ignore_label
        self.stable_pixels, self.flickering_pixels = 0, 0

    def update(self, gt_semantic_video: np.ndarray, pred_semantic_video: np.ndarray) -> None:
        """Add one video of class maps ``(T, H, W)``."""
        gt, pred = np.asarray(gt_semantic_video), np.asarray(pred_semantic_video)
        if gt.shape != pred.shape or gt.ndim != 3:
            raise ValueError(f"expected two equal (T, H, W) videos, got {gt.shape}, {pred.shape}")
        stable = (gt[1:] == gt[:-1]) & (gt[1:] != self.ignore_label)
        self.stable_pixels += int(stable.sum())
        self.flickering_pixels += int((stable & (pred[1:] != pred[:-1])).sum())

    def result(self) -> dict:
        rate = self.flickering_pixels / self.stable_pixels if self.stable_pixels else math.nan
        return {
            "flicker": rate,
            "stable_pixels": self.stable_pixels,
            "flickering_pixels": self.flickering_pixels,
        }


def flicker_rate(gt_semantic_video, pred_semantic_video, ignore_label=IGNORE_LABEL) -> float:
    """Flicker rate of one ``(T, H, W)`` video (see `Flicker`)."""
    flicker = Flicker(ignore_label)
    flicker.update(gt_semantic_video, pred_semantic_video)
    return flicker.result()["flicker"]
