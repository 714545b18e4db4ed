"""Tests for minivseg.dstq (DSTQ = (STQ² · DQ)^(1/3), DQ the pooled share of depth inliers).

deeplab2's "complex example" (evaluation/depth_aware_segmentation_and_tracking_quality_test.py):
thresholds (1.25, 1.1), DSTQ 0.5552059833215103, DQ 0.3830597195261614 (DQ@1.1 = 13/61, DQ@1.25 =
42/61), and all depth numbers 0 without depth labels. Then one hand-computed case per rule
(`HAND_CASES`, worked out in the comments), and a naive per-pixel reference (loops over pixels
for DQ, tests/benchmarks/bench_metrics.py's ``reference_stq`` for STQ) on random videos with
several sequences, crowd, void, pixels without depth, predictions <= 0 and ratios on the
threshold, before and after permuting the ids.

Measured against deeplab2 at 64bc1c1a6505 (its TensorFlow ``DSTQuality``), outside make test,
on 200 random video sets (1-4 sequences of 1-5 frames up to 39x59, `random_video` and
`random_depth`; thresholds (1.25,) and (1.25, 1.1) alternately) and every case of `HAND_CASES`:

    cd /work/main && TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3 CUDA_VISIBLE_DEVICES= \
      PYTHONPATH=/tmp/minivseg-peer/src:/work/main /tmp/minivseg-peer/venv/bin/python \
      /tmp/dvps_check/check_dvps.py 200 [--float64]

    max |diff|   DSTQ 2.7e-8   DSTQ@1.25 2.9e-8   DSTQ@1.1 2.2e-8   STQ 4.0e-8   AQ 7.6e-8
                 DQ, DQ@1.25, DQ@1.1, SQ: 0
    per sequence DSTQ@τ 3.1e-8   STQ 4.1e-8   AQ 7.9e-8   DQ@τ, SQ: 0; same ids and lengths

The differences are deeplab2's tube areas, summed in float32: with them summed in float64
(``--float64``) every number agrees to 3.3e-16.
"""

import math

import numpy as np
import pytest

from minivseg.dstq import DSTQ
from tests.test_metrics import (
    GT_INSTANCE,
    GT_SEMANTIC,
    PRED_INSTANCE,
    PRED_SEMANTIC,
    _digits,
    bench,
    random_video,
    relabel,
)

TUBE, CROWD, STUFF, VOID = 1, 0, 1000, 255000  # two classes: 0 is a thing, 1 stuff

# deeplab2's complex example: one 8x8 depth map pair, used for all three frames (0 = no depth).
GT_DEPTH = """
56.1 50.9 54.0 63.6 68.6 50.9 50.9 58.1  62.6 52.1 00.0 60.9 62.4 52.6 56.3 63.4
57.1 61.2 63.8 63.1 52.3 54.3 52.1 51.4  65.8 50.5 58.9 54.3 00.0 65.4 63.8 56.8
50.6 56.5 53.0 66.9 51.8 58.6 65.9 66.4  53.5 56.2 53.6 50.6 64.6 51.1 68.7 50.3
69.0 65.3 66.4 51.9 68.3 50.5 00.0 67.4  59.7 51.3 50.1 67.2 68.8 62.8 64.9 59.5"""
PRED_DEPTH = """
67.5 36.9 65.7 77.9 75.0 45.1 68.2 63.3  43.8 63.0 79.4 78.1 82.2 36.9 59.2 83.2
70.6 73.2 77.8 71.3 41.3 47.5 58.8 64.8  60.5 51.7 72.2 49.8 56.1 60.7 72.2 73.0
34.5 55.7 46.7 47.4 69.6 43.5 82.3 84.8  46.9 39.5 35.4 61.3 79.4 42.2 48.9 56.3
57.0 75.0 84.2 46.3 67.4 55.5 46.9 70.0  62.3 58.3 59.4 74.5 70.6 54.6 78.6 48.1"""


def _depth(text: str) -> np.ndarray:
    return np.array(text.split(), dtype=np.float32).reshape(8, 8)


def deeplab2_frames(with_depth=True):
    """The complex example as ``(sequence, gt, pred, gt_depth, pred_depth)``, sequence 1."""
    gt_depth = _depth(GT_DEPTH) * with_depth  # deeplab2's "no valid depth labels": all 0
    frames = []
    for gs, gi, ps, pi in zip(GT_SEMANTIC, GT_INSTANCE, PRED_SEMANTIC, PRED_INSTANCE):
        gt, pred = _digits(gs) * 1000 + _digits(gi), _digits(ps) * 1000 + _digits(pi)
        frames.append((1, gt, pred, gt_depth, _depth(PRED_DEPTH)))
    return frames


STQ_ONLY = {"STQ": 0.66841773352, "AQ": 0.55366581415, "SQ": 0.8069529580309542}
ZERO_DEPTH = {key: 0.0 for key in ("DSTQ", "DQ", "DSTQ@1.25", "DQ@1.25", "DSTQ@1.1", "DQ@1.1")}

# name -> (num_classes, thing_classes, depth thresholds, frames, expected); frames hold
# (sequence, gt, pred, gt_depth, pred_depth); an expected key "a/DQ" is per_sequence["a"]["DQ"].
HAND_CASES = {
    "deeplab2_complex_example": (
        3,
        (2,),
        (1.25, 1.1),
        deeplab2_frames(),
        STQ_ONLY
        | {
            "DSTQ": 0.5552059833215103,
            "DQ": 0.3830597195261614,
            "DSTQ@1.25": 0.6750539157136957,
            "DQ@1.25": 42 / 61,  # 0.6885245901639344: 61 labelled pixels (3 of 64 have none)
            "DSTQ@1.1": 0.45663565048742255,
            "DQ@1.1": 13 / 61,  # 0.21311475409836064
            "1/DSTQ@1.25": 0.6750539157136957,
            "1/DQ@1.1": 13 / 61,
        },
    ),
    "deeplab2_no_depth_labels": (
        3,
        (2,),
        (1.25, 1.1),
        deeplab2_frames(with_depth=False),
        STQ_ONLY | ZERO_DEPTH,
    ),
    # GT depth 4 5 10 10 0 8 (0: no depth), prediction 5 4 13 0 7 -8: ratios 1.25 (<= 1.25: an
    # inlier), 1.25, 1.3 (outlier), prediction 0 and -8 (outliers, though -8/8 = -1 <= 1.25); the
    # pixel without GT depth does not count: DQ = 2/5. Perfect panoptic: STQ = 1.
    "inlier_rule": (
        2,
        (0,),
        (1.25,),
        [(0, [[TUBE] * 6], [[TUBE] * 6], [[4, 5, 10, 10, 0, 8]], [[5, 4, 13, 0, 7, -8]])],
        {"DQ": 0.4, "DQ@1.25": 0.4, "DSTQ": 0.4 ** (1 / 3), "STQ": 1.0, "0/num_depth_pixels": 5},
    ),
    # Frame 1: one labelled pixel, an inlier; frame 2: three, all outliers (ratio 2). Pooled by
    # pixel DQ = 1/4, not the mean of frames 1/2.
    "pooled_over_frames": (
        2,
        (0,),
        (1.25,),
        [
            (0, [[TUBE, TUBE]], [[TUBE, TUBE]], [[3, 0]], [[3, 3]]),
            (0, [[TUBE, TUBE, TUBE]], [[TUBE, TUBE, TUBE]], [[1, 2, 3]], [[2, 4, 6]]),
        ],
        {"DQ": 0.25, "DSTQ": 0.25 ** (1 / 3), "STQ": 1.0},
    ),
    # Sequence a: a perfect 2-pixel tube, both depths inliers (DQ 1, DSTQ 1). Sequence b: a 6-pixel
    # tube split 3/3 between two tracks, AQ = (3·3/6 + 3·3/6)/6 = 1/2, SQ 1; 6 labelled pixels, 1
    # inlier: DQ 1/6, DSTQ = (1/2 · 1/6)^(1/3). Overall AQ pooled by tube (1 + 1/2)/2 = 3/4, DQ
    # pooled by pixel 3/8 (the mean of sequences would be 7/12): DSTQ = (3/4 · 3/8)^(1/3).
    "pooled_over_sequences": (
        2,
        (0,),
        (1.25,),
        [
            ("a", [[TUBE, TUBE]], [[7, 7]], [[2, 3]], [[2, 3]]),
            ("b", [[TUBE] * 6], [[1, 1, 1, 2, 2, 2]], [[1] * 6], [[1, 2, 3, 4, 5, 6]]),
        ],
        {
            "a/DQ": 1.0,
            "a/DSTQ": 1.0,
            "b/AQ": 0.5,
            "b/DQ": 1 / 6,
            "b/DSTQ": (1 / 12) ** (1 / 3),
            "AQ": 0.75,
            "DQ": 3 / 8,
            "DSTQ": (9 / 32) ** (1 / 3),
        },
    ),
    # GT tube, tube, crowd, void; predicted track everywhere. Depth counts on crowd and void too:
    # 3 inliers of 4 (the void pixel's 9 vs 2 is not), DQ 3/4. The predicted tube is 3 pixels
    # (the one on crowd is left out, the one on void kept): IoU 2/3, AQ 2/3; SQ 1 (void row
    # dropped): DSTQ = (2/3 · 1 · 3/4)^(1/3) = (1/2)^(1/3).
    "depth_counts_on_crowd_and_void": (
        2,
        (0,),
        (1.25,),
        [(0, [[TUBE, TUBE, CROWD, VOID]], [[TUBE] * 4], [[2, 2, 2, 2]], [[2, 2, 2, 9]])],
        {"AQ": 2 / 3, "SQ": 1.0, "DQ": 0.75, "DSTQ": 0.5 ** (1 / 3)},
    ),
    # Ratios 1.05, 1.2, 1.5, 1: DQ@1.25 = 3/4, DQ@1.1 = 2/4, DQ = sqrt(3/4 · 1/2); STQ = 1.
    "two_thresholds": (
        2,
        (0,),
        (1.25, 1.1),
        [(0, [[TUBE] * 4], [[TUBE] * 4], [[10, 10, 10, 10]], [[10.5, 12, 15, 10]])],
        {
            "DQ@1.25": 0.75,
            "DQ@1.1": 0.5,
            "DQ": math.sqrt(3 / 8),
            "DSTQ@1.25": 0.75 ** (1 / 3),
            "DSTQ@1.1": 0.5 ** (1 / 3),
            "DSTQ": (3 / 8) ** (1 / 6),
        },
    ),
    # Sequence a has depth (all inliers), sequence b none: b's DQ and DSTQ are 0 (deeplab2), the
    # total DQ counts a's pixels only: 1.
    "sequence_without_depth": (
        2,
        (0,),
        (1.25,),
        [
            ("a", [[TUBE, STUFF]], [[TUBE, STUFF]], [[5, 5]], [[5, 5]]),
            ("b", [[TUBE, STUFF]], [[TUBE, STUFF]], [[0, 0]], [[5, 5]]),
        ],
        {"a/DQ": 1.0, "b/DQ": 0.0, "b/DSTQ": 0.0, "b/STQ": 1.0, "DQ": 1.0, "DSTQ": 1.0},
    ),
}


def dstq_of(num_classes, thing_classes, thresholds, frames):
    metric = DSTQ(num_classes, thing_classes, depth_threshold=thresholds)
    for sequence, gt, pred, gt_depth, pred_depth in frames:
        metric.update(
            np.array(gt), np.array(pred), np.array(gt_depth), np.array(pred_depth), sequence
        )
    return metric.result()


def lookup(result, key):
    """``result["DQ"]`` for "DQ", ``result["per_sequence"]["a"]["DQ"]`` for "a/DQ"."""
    if "/" not in key:
        return result[key]
    sequence, name = key.split("/")
    sequences = {str(s): values for s, values in result["per_sequence"].items()}
    return sequences[sequence][name]


@pytest.mark.parametrize("name", HAND_CASES)
def test_dstq_hand_cases_and_deeplab2_vectors(name):
    num_classes, thing_classes, thresholds, frames, expected = HAND_CASES[name]
    result = dstq_of(num_classes, thing_classes, thresholds, frames)
    for key, value in expected.items():
        assert lookup(result, key) == pytest.approx(value, abs=1e-10), key


def test_dstq_is_the_geometric_mean_of_aq_sq_and_dq():
    result = dstq_of(*HAND_CASES["deeplab2_complex_example"][:4])
    assert result["DSTQ"] ** 3 == pytest.approx(result["AQ"] * result["SQ"] * result["DQ"])
    assert result["DQ"] ** 2 == pytest.approx(result["DQ@1.25"] * result["DQ@1.1"])
    one = dstq_of(3, (2,), 1.25, HAND_CASES["deeplab2_complex_example"][3])
    assert one["DSTQ"] == one["DSTQ@1.25"] and "DQ@1.1" not in one  # one threshold: DQ = DQ@τ


def test_dstq_official_scorer_recipe_drops_gt_void_from_the_panoptic_maps_only():
    gt, pred = np.array([[TUBE, VOID]]), np.array([[TUBE, TUBE]])
    gt_depth, pred_depth = np.array([[5.0, 5.0]]), np.array([[5.0, 9.0]])
    metric = DSTQ(2, (0,))
    metric.update(gt, pred, gt_depth, pred_depth)
    assert metric.result()["AQ"] == pytest.approx(0.5)  # the predicted tube covers void
    keep = gt // 1000 != 255
    official = DSTQ(2, (0,))
    official.update(gt[keep], pred[keep], gt_depth, pred_depth)  # depth: the whole frame
    result = official.result()
    assert result["AQ"] == 1.0 and result["DQ"] == 0.5  # the void pixel's depth still counts
    assert result["DSTQ"] == pytest.approx(0.5 ** (1 / 3))


def test_dstq_rejects_depth_maps_of_other_shapes():
    metric = DSTQ(2, (0,))
    with pytest.raises(ValueError, match="depth"):
        metric.update(
            np.zeros((2, 4), int), np.zeros((2, 4), int), np.ones((2, 4)), np.ones((1, 1))
        )
    with pytest.raises(ValueError, match="at least one"):
        DSTQ(2, (0,), depth_threshold=())


# ---------------------------------------------------------------- naive per-pixel reference


def random_depth(rng, shape):
    """GT depth in metres with 30% missing (0); a prediction with noise, zeros, negatives and
    ratios exactly 1.25 (4 -> 5 and 5 -> 4 are exact in float32)."""
    gt = np.where(rng.random(shape) < 0.3, 0, rng.uniform(1, 80, shape)).astype(np.float32)
    pred = (gt * np.exp(rng.normal(0, 0.2, shape))).astype(np.float32)
    pred[rng.random(shape) < 0.05] = 0
    pred[rng.random(shape) < 0.03] = -3
    exact = rng.random(shape) < 0.1
    gt[exact], pred[exact] = 4, rng.choice([5, 4], size=int(exact.sum()))
    exact = rng.random(shape) < 0.1
    gt[exact], pred[exact] = 5, 4
    return gt, pred


def random_dvps_videos(rng, num_sequences):
    """Random ``(sequence, gt, pred, gt_depth, pred_depth)`` videos ``(T, H, W)``, crowd, void."""
    videos = []
    for sequence in range(num_sequences):
        num_frames, height, width = rng.integers(1, 4), rng.integers(2, 9), rng.integers(3, 15)
        gt, pred = random_video(rng, int(num_frames), int(height), int(width))
        videos.append((sequence, gt, pred, *random_depth(rng, gt.shape)))
    return videos


def frames_of(videos):
    return [(s, *frame) for s, *video in videos for frame in zip(*video)]


def reference_dstq(frames, num_classes, thing_classes, thresholds):
    """DSTQ by a loop over pixels for DQ and bench_metrics' naive STQ."""
    stq = bench.reference_stq([frame[:3] for frame in frames], num_classes, thing_classes)
    counts = {}
    for sequence, _, _, gt_depth, pred_depth in frames:
        seq = counts.setdefault(sequence, [0] * (1 + len(thresholds)))
        for d_star, d in zip(gt_depth.ravel().tolist(), pred_depth.ravel().tolist()):
            if d_star > 0:
                seq[0] += 1
                d, d_star = np.float32(d), np.float32(d_star)  # the ratio in float32, as deeplab2
                for i, threshold in enumerate(thresholds):
                    if d > 0 and max(d / d_star, d_star / d) <= np.float32(threshold):
                        seq[1 + i] += 1

    def depth_quality(stq_value, labelled, *inliers):
        dq_at = [n / labelled if labelled else 0.0 for n in inliers]
        dq = math.prod(dq_at) ** (1 / len(dq_at))
        return {"DQ": dq, "DSTQ": (stq_value**2 * dq) ** (1 / 3)} | {
            f"DQ@{t}": v for t, v in zip(thresholds, dq_at)
        }

    total = np.sum(list(counts.values()), axis=0).tolist()
    result = stq | depth_quality(stq["STQ"], *total)
    for sequence, values in stq["per_sequence"].items():
        values |= depth_quality(values["STQ"], *counts[sequence])
    return result


def test_dstq_matches_the_naive_reference_on_random_videos_and_permuted_ids():
    rng = np.random.default_rng(7)
    informative = 0
    for trial in range(12):
        thresholds = (1.25, 1.1) if trial % 2 else (1.25,)
        videos = random_dvps_videos(rng, int(rng.integers(1, 4)))
        frames = frames_of(videos)
        reference = reference_dstq(frames, 5, (1, 3), thresholds)
        permuted = frames_of(
            [
                (s, relabel(gt, (1, 3), rng), relabel(pred, (1, 3), rng), gd, pd)
                for s, gt, pred, gd, pd in videos
            ]
        )
        for video in (frames, permuted):
            ours = dstq_of(5, (1, 3), thresholds, video)
            for key in ("DSTQ", "DQ", "STQ", "AQ", "SQ", *(f"DQ@{t}" for t in thresholds)):
                assert ours[key] == pytest.approx(reference[key], abs=1e-12), key
                for sequence, values in reference["per_sequence"].items():
                    got = ours["per_sequence"][sequence][key]
                    assert got == pytest.approx(values[key], abs=1e-12, nan_ok=True), key
        informative += 0.05 < reference["DQ"] < 0.95 and 0.05 < reference["AQ"] < 0.95
    assert informative >= 9  # most trials have tubes, inliers and outliers
