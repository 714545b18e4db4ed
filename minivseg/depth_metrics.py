r"""Monocular depth errors (SILog, relative errors, the δ < 1.25 inlier share), averaged per frame.

The four numbers deeplab2 reports for depth (``evaluation/depth_metrics.py``, logged by its
evaluator as ``SILog``, ``SqErrorRel``, ``AbsErrorRel``, ``DepthInlier``), after Eigen et al.
(NeurIPS 2014, "Depth map prediction from a single image using a multi-scale deep network") and
the KITTI depth benchmark (Uhrig et al. 3DV 2017, "Sparsity Invariant CNNs"). On the pixels of
one frame with ground-truth depth ``d* > 0`` (``n`` of them; the prediction ``d`` is read there
whatever it is) and ``e = log d − log d*``:

    silog       = 100 · sqrt(1/n Σ e² − (1/n Σ e)²)       scale-invariant log error (x100)
    sq_rel      = 1/n Σ ((d − d*) / d*)²                   relative squared error
    abs_rel     = 1/n Σ |d − d*| / d*                      relative absolute error
    delta_1.25  = 1/n #{max(d / d*, d* / d) < 1.25}        share of inliers (strict <)
    rmse        = sqrt(1/n Σ (d − d*)²)                    root mean squared error (metres)

Each number is computed per frame and then averaged over frames (every frame weighs the same,
however many labelled pixels it has), as deeplab2 does. Note ``sq_rel`` is deeplab2's
(dimensionless, squared *relative* error), not Eigen's ``Σ (d − d*)² / d*`` (metres). DSTQ's
depth term (`minivseg.dstq`) is another inlier share: pooled over pixels, ``<=`` the threshold.

Usage::

    depth = DepthMetrics()
    for gt_depth, pred_depth in frames:  # (H, W) metres, 0 = no ground truth
        depth.update(gt_depth, pred_depth)
    depth.result()  # {"silog", "sq_rel", "abs_rel", "delta_1.25", "rmse", "num_frames"}

Like deeplab2: depths are compared in float32 (deeplab2 casts to float32); a frame without any
ground-truth pixel, or with a prediction <= 0 on one (its log), makes ``silog`` (and for the
empty frame every number) NaN, and so the average; the model's depth is
``sigmoid · max_depth > 0``. Deliberate differences from deeplab2: errors and means are summed in
float64 (deeplab2: float32), and ``silog`` takes the square root of ``max(variance, 0)`` so that
rounding cannot make a constant log error NaN. deeplab2 reports no RMSE; ``rmse`` is the KITTI
depth benchmark's (Eigen et al.'s linear RMSE), per frame like the others.

Measured against deeplab2 at 64bc1c1a6505 (TF ``DepthMetrics``) on 200 random video sets (1513
frames), its unit-test vectors and the hand frames of tests/test_depth_metrics.py (command in
tests/test_dstq.py): the same inlier decision on every pixel; max |diff| silog 1.2e-5 (of
values near 86), sq_rel 1.0e-8, abs_rel 2.6e-8, delta_1.25 1.1e-7, all from deeplab2's float32
sums; NaN where deeplab2 has NaN. ``update`` takes 1.4 ms per 375×1242 frame with 5% of pixels
labelled, 5.7 ms with all (one thread).
"""

from __future__ import annotations

import numpy as np

KEYS = ("silog", "sq_rel", "abs_rel", "delta_1.25", "rmse")


def depth_ratio(gt_depth: np.ndarray, pred_depth: np.ndarray) -> np.ndarray:
    """``max(d / d*, d* / d)``, the ratio of the inlier test (Eigen et al. 2014)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(pred_depth / gt_depth, gt_depth / pred_depth)


def depth_pair(gt_depth, pred_depth):
    """The two depth maps as float32 arrays (as deeplab2 casts them), checked for equal shapes."""
    gt_depth = np.asarray(gt_depth, dtype=np.float32)
    pred_depth = np.asarray(pred_depth, dtype=np.float32)
    if gt_depth.shape != pred_depth.shape:
        raise ValueError(
            f"ground-truth depth {gt_depth.shape} and predicted depth {pred_depth.shape} differ "
            "in shape (upsample the prediction first: minivseg.depth.upsample_depth)"
        )
    return gt_depth, pred_depth


class DepthMetrics:
    """SILog, relative squared and absolute error and δ < 1.25, per frame, averaged over frames."""

    def __init__(self):
        self._sums = np.zeros(len(KEYS))  # per-frame values summed over frames
        self.num_frames = 0

    def update(self, gt_depth, pred_depth) -> None:
        """Add one frame: ``gt_depth, pred_depth (H, W)`` in metres, ``gt_depth == 0``: none."""
        gt_depth, pred_depth = depth_pair(gt_depth, pred_depth)
        labelled = gt_depth > 0
        gt, pred = gt_depth[labelled], pred_depth[labelled]
        inlier = depth_ratio(gt, pred) < 1.25
        gt, pred = gt.astype(np.float64), pred.astype(np.float64)
        n = np.float64(gt.size)  # no labelled pixel: every mean is 0/0 = NaN, as in deeplab2
        with np.errstate(divide="ignore", invalid="ignore"):
            error = np.log(pred) - np.log(gt)
            # SILog = 100 · sqrt(mean(e²) − mean(e)²)
            silog = 100 * np.sqrt(np.maximum(np.sum(error**2) / n - (np.sum(error) / n) ** 2, 0))
            sq_rel = np.sum(((gt - pred) / gt) ** 2) / n
            abs_rel = np.sum(np.abs(gt - pred) / gt) / n
            delta = np.count_nonzero(inlier) / n
            rmse = np.sqrt(np.sum((gt - pred) ** 2) / n)
        self._sums += [silog, sq_rel, abs_rel, delta, rmse]
        self.num_frames += 1

    def result(self) -> dict:
        """The frame averages (NaN before any frame), and ``num_frames``."""
        means = self._sums / self.num_frames if self.num_frames else np.full(len(KEYS), np.nan)
        return dict(zip(KEYS, means.tolist())) | {"num_frames": self.num_frames}
