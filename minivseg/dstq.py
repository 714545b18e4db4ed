r"""Depth-aware Segmentation and Tracking Quality, ``DSTQ = (STQ² · DQ)^(1/3)``, frame by frame.

DSTQ is SemKITTI-DVPS's metric for depth-aware video panoptic segmentation (TubeFormer-DeepLab
§4.1: "DSTQ (depth-aware STQ), which considers depth inlier metric in addition to STQ"; Tab. 6,
67.0 on the test set, which ranks ICCV 2021 challenge entries). The task and the dataset come
from ViP-DeepLab (Qiao et al., CVPR 2021), which scores them with DVPQ; DSTQ's formula is that
of deeplab2's ``DSTQuality`` (evaluation/depth_aware_segmentation_and_tracking_quality.py),
the same class as in the challenge's scorer (below). It adds to `minivseg.stq.STQ`
(AQ, SQ, ``STQ = sqrt(AQ · SQ)``) a depth quality DQ: with ``d*`` the ground-truth depth and
``d`` the predicted depth of a pixel, pooled over all pixels of all frames of a sequence,

    DQ@τ = #{d* > 0, d > 0, max(d / d*, d* / d) <= τ} / #{d* > 0}
    DQ   = (Π_τ DQ@τ)^(1/n)                       geometric mean over the n thresholds τ
    DSTQ = (STQ² · DQ)^(1/3) = (AQ · SQ · DQ)^(1/3),       DSTQ@τ = (STQ² · DQ@τ)^(1/3)

Conventions, as deeplab2's:

- every pixel with ground-truth depth counts, whatever its panoptic label (void and crowd
  included); a pixel without it (``d* == 0``) does not; a prediction ``d <= 0`` on a labelled
  pixel is an outlier; the inlier test is ``<= τ`` and runs in float32;
- DQ is pooled by pixel: over the frames of a sequence for the per-sequence numbers, over all
  sequences for the total (not a mean of frames or of sequences);
- a sequence, or the whole, with no ground-truth depth has DQ = 0 and so DSTQ = 0;
- AQ, SQ and STQ are exactly `STQ`'s (deeplab2 calls SQ "IoU"; its TF ``STQuality`` that
  ``DSTQuality`` extends follows the numpy one that `STQ` reproduces).

Usage::

    dstq = DSTQ(NUM_CLASSES, THING_CLASSES)    # depth_threshold=1.25 (or a tuple of them)
    for gt, pred, gt_depth, pred_depth in frames:  # (H, W) ids; (H, W) metres, 0 = none
        dstq.update(gt, pred, gt_depth, pred_depth, sequence_id=name)
    dstq.result()  # {"DSTQ", "DQ", "STQ", "AQ", "SQ", "DSTQ@1.25", "DQ@1.25", "per_sequence":
                   #  {name: the same keys, "num_frames", "num_tubes", "num_depth_pixels"}}

The default threshold 1.25 alone is that of the official SemKITTI-DVPS scorer
(ViP-DeepLab repository, semkitti-dvps/eval_dstq.py at f1c0c43, ``[1.25]``); deeplab2's class
defaults to ``(1.25, 1.1)``, which ``depth_threshold=(1.25, 1.1)`` gives. That scorer also
drops the GT-void pixels from the panoptic maps before scoring (so predicted thing pixels on
void do not cost AQ there, unlike in STQ), but not from the depth maps; to reproduce it pass
``gt[keep], pred[keep]`` with ``keep = gt // label_divisor != ignore_label`` and the whole depth
maps. Differences from deeplab2: those of `STQ` (exact int64 areas: deeplab2's TF ``STQuality``
sums areas in float32), per-sequence ``DSTQ``/``DQ`` over all thresholds (deeplab2 lists per
sequence only the ``@τ`` values), and a check that the two depth maps have one shape.

Measured against deeplab2 at 64bc1c1a6505 (TF ``DSTQuality``) on 200 random video sets and the
cases of tests/test_dstq.py (command there): DQ, DQ@τ and SQ equal; max |diff| AQ 7.9e-8, STQ
4.1e-8, DSTQ 3.1e-8 (deeplab2's float32 areas; summed in float64 they agree to 3.3e-16).
``update`` takes 4.1 ms per 375×1242 frame, STQ's 2.9 ms (one thread; 5% or all pixels with
depth alike).
"""

from __future__ import annotations

import math

import numpy as np

from minivseg.depth_metrics import depth_pair, depth_ratio
from minivseg.panoptic import IGNORE_LABEL, LABEL_DIVISOR
from minivseg.stq import STQ


class DSTQ(STQ):
    """STQ with the depth inlier share DQ, accumulated frame by frame and sequence by sequence."""

    def __init__(
        self,
        num_classes,
        thing_classes,
        label_divisor=LABEL_DIVISOR,
        ignore_label=IGNORE_LABEL,
        depth_threshold=1.25,
    ):
        super().__init__(num_classes, thing_classes, label_divisor, ignore_label)
        thresholds = np.atleast_1d(depth_threshold).tolist()
        if not thresholds:
            raise ValueError("depth_threshold must hold at least one threshold")
        self.depth_thresholds = tuple(float(threshold) for threshold in thresholds)
        # sequence id -> [#pixels with GT depth, #inliers at each threshold], summed over frames
        self._depth_counts = {}

    def update(self, gt, pred, gt_depth, pred_depth, sequence_id=0) -> None:
        """Add one frame: ``gt, pred`` panoptic ids, ``gt_depth, pred_depth (H, W)`` metres."""
        gt_depth, pred_depth = depth_pair(gt_depth, pred_depth)
        labelled = gt_depth > 0
        valid = labelled & (pred_depth > 0)  # a prediction <= 0 on a labelled pixel: an outlier
        ratio = depth_ratio(gt_depth, pred_depth)
        inliers = [np.count_nonzero(valid & (ratio <= t)) for t in self.depth_thresholds]
        super().update(gt, pred, sequence_id)
        counts = np.array([np.count_nonzero(labelled), *inliers], dtype=np.int64)
        self._depth_counts[sequence_id] = self._depth_counts.get(sequence_id, 0) + counts

    def _depth_quality(self, stq: float, counts: np.ndarray) -> dict:
        """DQ and DSTQ, overall and per threshold, from the summed depth counts."""
        labelled, inliers = counts[0], counts[1:]
        dq_at = inliers / labelled if labelled else np.zeros(len(inliers))
        dq = math.prod(dq_at.tolist()) ** (1 / len(dq_at))  # DQ = (Π_τ DQ@τ)^(1/n)
        values = {"DSTQ": (stq**2 * dq) ** (1 / 3), "DQ": dq}  # DSTQ = (STQ² · DQ)^(1/3)
        for threshold, dq_threshold in zip(self.depth_thresholds, dq_at.tolist()):
            values[f"DSTQ@{threshold}"] = (stq**2 * dq_threshold) ** (1 / 3)
            values[f"DQ@{threshold}"] = dq_threshold
        return values

    def result(self) -> dict:
        """``DSTQ``, ``DQ`` and `STQ`'s numbers over all sequences and under ``per_sequence``."""
        result = super().result()
        total = np.zeros(1 + len(self.depth_thresholds), dtype=np.int64)
        for sequence_id, values in result["per_sequence"].items():
            counts = self._depth_counts[sequence_id]
            total += counts
            depth = self._depth_quality(values["STQ"], counts)
            result["per_sequence"][sequence_id] = (
                depth | values | {"num_depth_pixels": int(counts[0])}
            )
        return self._depth_quality(result["STQ"], total) | result
