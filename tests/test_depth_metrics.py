"""Tests for minivseg.depth_metrics (SILog, sq_rel, abs_rel, δ < 1.25, averaged per frame).

deeplab2's unit-test vectors (evaluation/depth_metrics_test.py: one frame 14.154233 / 0.0268667
/ 0.13191505 / 0.7, three frames 18.442057 / 0.0388692 / 0.13392223 / 0.8052287), hand-computed
frames for each rule (worked out in the comments), and a naive per-pixel reference on random
frames with missing depth and ratios on the threshold.

Measured against deeplab2 at 64bc1c1a6505 (its TensorFlow ``DepthMetrics``), outside make test,
with the command in tests/test_dstq.py's docstring (/tmp/dvps_check/check_dvps.py): on the
frames of 200 random video sets (1513 frames; every 10th set keeps predictions <= 0), the
deeplab2 vectors and the hand frames here, the per-pixel inlier decisions are identical and
max |diff| is silog 1.2e-5 (of values near 86), sq_rel 1.0e-8, abs_rel 2.6e-8, delta_1.25
1.1e-7 (deeplab2's float32 means); where a prediction <= 0 makes silog NaN, deeplab2's is NaN.
"""

import math

import numpy as np
import pytest

from minivseg.depth_metrics import DepthMetrics
from tests.test_dstq import random_depth

# deeplab2 depth_metrics_test.py: (ground truth, prediction) per frame, 0 = no ground truth
DEEPLAB2_FRAMES = [
    (
        [
            [5.44108091, 53.30197697, 61.06181767, 14.36723114],
            [0, 39.68081126, 58.77974067, 0],
            [40.57883826, 22.15134852, 31.46813478, 13.52603324],
        ],
        [
            [4.87694111, 50.09085582, 55.74533641, 10.13579195],
            [13.76178147, 41.62431592, 56.97362032, 81.48369608],
            [43.12005689, 15.54622258, 24.1993478, 12.14451783],
        ],
    ),
    (
        [
            [79.56192404, 25.68145225, 0, 39.88486608, 68.91602466],
            [79.53460057, 2.55741031, 36.05057241, 68.04747416, 3.7783227],
            [0, 0, 72.47336778, 59.02611644, 66.07499008],
            [25.88578395, 58.2202574, 27.39066477, 29.83094038, 37.99239669],
        ],
        [
            [83.80952145, 27.23367361, 72.52687468, 35.28400183, 72.41126444],
            [77.62373864, 0.87004049, 32.1619225, 66.91361903, 2.60688436],
            [15.30294603, 9.76419241, 68.61650198, 57.14559324, 66.88452603],
            [24.54818109, 61.60855251, 31.50312052, 26.02325866, 36.4019569],
        ],
    ),
    (
        [[50.80100791, 0.41130084, 58.85031668], [29.44932853, 23.48806627, 30.17890056]],
        [[49.66563966, 0.62070026, 58.84231026], [32.26735775, 28.07405648, 33.7131882]],
    ),
]
KEYS = ("silog", "sq_rel", "abs_rel", "delta_1.25", "rmse")  # deeplab2 reports the first four


def depth_of(frames) -> dict:
    metric = DepthMetrics()
    for gt, pred in frames:
        metric.update(np.array(gt), np.array(pred))
    return metric.result()


@pytest.mark.parametrize(
    "num_frames, expected",
    [
        (1, (14.154233, 0.0268667, 0.13191505, 0.7)),
        (3, (18.442057, 0.0388692, 0.13392223, 0.8052287)),
    ],
)
def test_depth_metrics_deeplab2_vectors(num_frames, expected):
    result = depth_of(DEEPLAB2_FRAMES[:num_frames])
    for key, value in zip(KEYS, expected):
        assert result[key] == pytest.approx(value, abs=1e-6), key  # deeplab2 checks 4 places
    assert result["num_frames"] == num_frames


def test_depth_metrics_hand_computed_frame():
    # Labelled pixels 2 -> 1 and 4 -> 4 (the 0 is left out): e = (-ln 2, 0), mean e = -ln 2 / 2,
    # mean e² = ln² 2 / 2, SILog = 100 · sqrt(ln² 2 / 4) = 50 ln 2; relative errors 1/2 and 0.
    result = depth_of([([[2, 4, 0]], [[1, 4, 7]])])
    assert result["silog"] == pytest.approx(50 * math.log(2), abs=1e-12)
    assert result["sq_rel"] == pytest.approx(0.125, abs=1e-12)  # (1/4 + 0) / 2
    assert result["abs_rel"] == pytest.approx(0.25, abs=1e-12)  # (1/2 + 0) / 2
    assert result["delta_1.25"] == 0.5  # ratios 2 and 1
    assert result["rmse"] == pytest.approx(math.sqrt(0.5), abs=1e-12)  # sqrt((1² + 0²) / 2)


def test_depth_metrics_inlier_test_is_strict():
    # 4 -> 5 and 5 -> 4: ratio exactly 1.25 (exact in float32), not an inlier here (DSTQ's
    # ``<=`` counts it); 10 -> 12: 1.2, an inlier.
    assert depth_of([([[4, 5, 10]], [[5, 4, 12]])])["delta_1.25"] == pytest.approx(1 / 3)


def test_depth_metrics_average_frames_not_pixels():
    # Frame 1: one labelled pixel, an inlier (δ 1, abs_rel 0); frame 2: three, ratio 2 (δ 0,
    # abs_rel 1). Per frame: δ 1/2, abs_rel 1/2 (pooled over pixels it would be 1/4 and 3/4).
    result = depth_of([([[3, 0]], [[3, 9]]), ([[1, 2, 3]], [[2, 4, 6]])])
    assert result["delta_1.25"] == pytest.approx(0.5)
    assert result["abs_rel"] == pytest.approx(0.5)
    assert result["silog"] == pytest.approx(0.0, abs=1e-12)  # a constant log error: no SILog


def test_depth_metrics_scale_invariance_and_nan_cases():
    gt = np.array([[1.0, 7.5, 30.0, 0.0]])
    result = depth_of([(gt, 2 * gt)])
    assert 0 <= result["silog"] < 1e-5  # max(variance, 0): rounding cannot make it NaN
    assert result["abs_rel"] == pytest.approx(1.0) and result["sq_rel"] == pytest.approx(1.0)
    empty = depth_of([(np.zeros((2, 2)), np.ones((2, 2)))])  # no labelled pixel: NaN (deeplab2)
    assert all(math.isnan(empty[key]) for key in KEYS)
    assert math.isnan(depth_of([([[3.0, 4.0]], [[0.0, 4.0]])])["silog"])  # log 0
    assert math.isnan(DepthMetrics().result()["silog"])
    with pytest.raises(ValueError, match="shape"):
        DepthMetrics().update(np.ones((4, 4)), np.ones((1, 1)))


def reference_frame(gt, pred):
    """The five numbers of one frame by a loop over pixels (float32 ratio, float64 errors)."""
    errors, sq_rel, abs_rel, inliers, squares = [], 0.0, 0.0, 0, 0.0
    for d_star, d in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if d_star > 0:
            errors.append(math.log(d) - math.log(d_star))
            sq_rel += ((d - d_star) / d_star) ** 2
            abs_rel += abs(d - d_star) / d_star
            squares += (d - d_star) ** 2
            f, f_star = np.float32(d), np.float32(d_star)
            inliers += bool(max(f / f_star, f_star / f) < 1.25)
    n = len(errors)
    variance = sum(e * e for e in errors) / n - (sum(errors) / n) ** 2
    rmse = math.sqrt(squares / n)
    return 100 * math.sqrt(max(variance, 0)), sq_rel / n, abs_rel / n, inliers / n, rmse


def test_depth_metrics_match_the_naive_reference_on_random_frames():
    rng = np.random.default_rng(11)
    metric, per_frame = DepthMetrics(), []
    for _ in range(20):
        shape = (int(rng.integers(2, 9)), int(rng.integers(3, 15)))
        gt, pred = random_depth(rng, shape)
        pred = np.abs(pred) + 0.5 * (pred <= 0)  # positive predictions: SILog takes their log
        metric.update(gt, pred)
        per_frame.append(reference_frame(gt, pred))
    result, expected = metric.result(), np.mean(per_frame, axis=0)
    for key, value in zip(KEYS, expected):
        assert result[key] == pytest.approx(value, rel=1e-12), key
    assert 0.2 < result["delta_1.25"] < 0.9 and result["silog"] > 5
