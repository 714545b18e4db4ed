"""Joint histogram of (ground-truth id, predicted id) pixel pairs, the statistic of every metric.

STQ (`minivseg.stq`), VPQ (`minivseg.vpq`) and video mask AP (`minivseg.video_ap`) all reduce a
frame to one sufficient statistic: how many pixels carry each (GT id, predicted id) pair.
`PairCounter` computes it with two look-up-table reads, a multiply-add and one integer
``bincount`` per pixel, with no per-pixel Python. STQ keeps one such table per sequence, summed
over frames; VPQ keeps the last four frames' tables and scores every window as it closes; video
AP keeps per-video sums of the thing pairs. No frame is stored, so memory does not grow with
the number of frames.

`PanopticMetric` is the set-up STQ and VPQ share: the class table, the id range and the check
that every id is ``semantic * label_divisor + instance`` with a known class or the ignore label.
`class_iou` turns a confusion matrix into per-class IoU (STQ's SQ, `MeanIoU`).

This file is bookkeeping, not a paper's method: the metrics' papers are cited in their modules.
Deliberate difference from deeplab2: ``ignore_label`` must be >= ``num_classes`` (deeplab2 also
allows an ignore id inside the class range).
"""

from __future__ import annotations

import math

import numpy as np


class PairCounter:
    """Joint histogram of (GT id, predicted id) pixel pairs, one frame per call.

    Ids are turned into small codes through look-up tables kept between frames, so a frame costs
    two table look-ups and one integer ``bincount``. Code 0 means "not seen yet": when a pair
    histogram has counts in code 0, the new ids get codes and the slice is counted again. When the
    code space outgrows the frame, the tables start afresh.
    """

    chunk_pixels = 1 << 16  # frames are counted in slices this long to keep temporaries in cache

    def __init__(self, id_limit: int):
        self.id_limit = id_limit  # ids must lie in [0, id_limit)
        self._tables = [np.zeros(id_limit, dtype=np.intp) for _ in range(2)]
        self._values = [np.full(1, -1, dtype=np.int64) for _ in range(2)]  # id of each code

    def reset(self) -> None:
        for table, values in zip(self._tables, self._values):
            table[values[1:]] = 0
        self._values = [np.full(1, -1, dtype=np.int64) for _ in range(2)]

    def _learn(self, side: int, ids: np.ndarray) -> None:
        """Give the next free codes to the ids that have none yet."""
        table, values = self._tables[side], self._values[side]
        fresh = np.unique(ids[np.take(table, ids) == 0])  # not bincount: ids may reach 256·65536
        table[fresh] = np.arange(len(values), len(values) + len(fresh))
        self._values[side] = np.concatenate([values, fresh])

    def _count(self, gt: np.ndarray, pred: np.ndarray):
        """Histogram of the pair codes ``gt_code * num_pred + pred_code`` of a slice of pixels."""
        num_pred = len(self._values[1])
        codes = np.take(self._tables[0], gt)
        codes *= num_pred
        codes += np.take(self._tables[1], pred)
        histogram = np.bincount(codes)
        if histogram[:num_pred].any() or histogram[::num_pred].any():
            self._learn(0, gt)
            self._learn(1, pred)
            return self._count(gt, pred)
        return histogram, num_pred

    def __call__(self, gt: np.ndarray, pred: np.ndarray):
        """``gt, pred (H, W)`` int ids -> ``(gt_ids, pred_ids, counts)``, one entry per pair."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        if len(self._values[0]) * len(self._values[1]) > gt.size:
            self.reset()
        gt, pred = gt.ravel(), pred.ravel()
        keys, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for start in range(0, gt.size, self.chunk_pixels):
            gt_part = gt[start : start + self.chunk_pixels]
            pred_part = pred[start : start + self.chunk_pixels]
            try:
                if gt_part.min() < 0 or pred_part.min() < 0:
                    raise IndexError
                histogram, num_pred = self._count(gt_part, pred_part)
            except IndexError:
                raise ValueError(f"panoptic ids must be integers in [0, {self.id_limit})") from None
            pairs = np.flatnonzero(histogram)
            gt_ids, pred_ids = self._values[0][pairs // num_pred], self._values[1][pairs % num_pred]
            keys.append(gt_ids * self.id_limit + pred_ids)
            counts.append(histogram[pairs])
        keys, counts = merge_counts(np.concatenate(keys), np.concatenate(counts))
        return keys // self.id_limit, keys % self.id_limit, counts


def merge_counts(keys: np.ndarray, counts: np.ndarray):
    """Sum ``counts`` of equal ``keys``: returns sorted unique keys and their int64 totals."""
    keys, inverse = np.unique(keys, return_inverse=True)
    return keys, np.bincount(inverse, weights=counts, minlength=len(keys)).astype(np.int64)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """``(K, K)`` confusion (rows GT, columns prediction) -> ``(K,)`` IoU, NaN where union is 0."""
    hits = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / union


def nanmean(values) -> float:
    """Mean of the values that are not NaN; NaN (without a warning) when none is left."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


class PanopticMetric:
    """Shared set-up of STQ and VPQ: class table, id range and validation of panoptic ids."""

    def __init__(self, num_classes, thing_classes, label_divisor, ignore_label):
        if ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} must be >= num_classes {num_classes}")
        self.num_classes = num_classes
        self.label_divisor = label_divisor
        self.ignore_label = ignore_label
        self.thing_classes = tuple(thing_classes)
        self.id_limit = (ignore_label + 1) * label_divisor
        self._counter = PairCounter(self.id_limit)

    def _count_pairs(self, gt, pred):
        gt_ids, pred_ids, counts = self._counter(gt, pred)
        for name, ids in (("ground truth", gt_ids), ("prediction", pred_ids)):
            semantic = ids // self.label_divisor
            bad = semantic[(semantic >= self.num_classes) & (semantic != self.ignore_label)]
            if bad.size:
                raise ValueError(
                    f"{name} has unknown class ids {sorted(set(bad.tolist()))}: expected "
                    f"0..{self.num_classes - 1} or the ignore label {self.ignore_label}"
                )
        return gt_ids, pred_ids, counts

    def _class_index(self, ids: np.ndarray) -> np.ndarray:
        """Semantic class of each id, with void moved to index ``num_classes``."""
        semantic = ids // self.label_divisor
        return np.where(semantic == self.ignore_label, self.num_classes, semantic)

    def _is_thing(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids // self.label_divisor, self.thing_classes)
