"""Tests for minivseg.metrics (STQ, VPQ, MeanIoU, Flicker, the pair counter and the command line).

deeplab2's STQ unit-test vectors reproduce: 0.72111026 / 0.82462113 / 0.447213596 and the other
nine one-frame cases, and the three-frame "complex example" STQ 0.66841773352, AQ 0.55366581415,
SQ 0.8069529580309542. Then hand-computed toy videos for every STQ and VPQ rule, the naive
references of tests/benchmarks/bench_metrics.py on random videos, mIoU, flicker and the command
line (video AP: tests/test_video_ap.py)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minivseg.metrics import (
    STQ,
    VPQ,
    Flicker,
    MeanIoU,
    PairCounter,
    evaluate_folders,
    flicker_rate,
    main,
)
from minivseg.panoptic import write_kitti_step_png

_spec = importlib.util.spec_from_file_location(
    "bench_metrics", Path(__file__).parent / "benchmarks" / "bench_metrics.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

ROAD, SIDEWALK, PERSON, CAR, VOID = 0, 1000, 11000, 13000, 255000
KITTI = dict(num_classes=19, thing_classes=(11, 13))


def stq_of(frames, num_classes=2, thing_classes=(0,), sequence_id=0):
    metric = STQ(num_classes, thing_classes)
    for gt, pred in frames:
        metric.update(np.array(gt), np.array(pred), sequence_id)
    return metric.result()


def vpq_of(gt_frames, pred_frames, window_sizes=(1,), **kwargs):
    metric = VPQ(**(KITTI | kwargs), window_sizes=window_sizes)
    metric.update(np.array(gt_frames)[:, None], np.array(pred_frames)[:, None])  # (T, 1, W)
    return metric.result()


def random_video(rng, num_frames, height, width, num_classes=5, things=(1, 3)):
    """Blocky random panoptic video with crowd and void, and a noisy prediction of it."""
    blocks = (height // 3 + 1, width // 3 + 1)

    def blocky(high):
        return rng.integers(0, high, size=blocks).repeat(3, 0).repeat(3, 1)[:height, :width]

    gt = np.empty((num_frames, height, width), np.int64)
    semantic = blocky(num_classes)
    for t in range(num_frames):
        instance = np.where(np.isin(semantic, things), blocky(4), 0)
        gt[t] = semantic * 1000 + instance
        gt[t][rng.random((height, width)) < 0.1] = VOID + rng.integers(0, 3)
    pred = gt.copy()
    noise = rng.random(gt.shape) < 0.2
    classes = rng.integers(0, num_classes, size=gt.shape)
    instances = np.where(np.isin(classes, things), rng.integers(0, 5, size=gt.shape), 0)
    pred[noise] = (classes * 1000 + instances)[noise]
    pred[rng.random(gt.shape) < 0.03] = VOID
    return gt, pred


def relabel(video, things, rng):
    """Permute the instance ids of every thing class, consistently over the video."""
    out = video.copy()
    for c in things:
        mapping = rng.permutation(np.arange(1, 10)) + 10  # instance 0 (crowd) stays 0
        mask = (video // 1000 == c) & (video % 1000 > 0)
        out[mask] = c * 1000 + mapping[video[mask] % 1000 - 1]
    return out


# ---------------------------------------------------------------- STQ: deeplab2's unit-test vectors

TRACK = [1, 1, 1, 1, 1]
CROWD_FIRST = [0, 1, 1, 1, 1, 1]
SKY_FIRST = [1000, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "gt, pred, expected",
    [
        (TRACK, [1, 1, 1, 1, 1], (1.0, 1.0, 1.0)),
        (TRACK, [1, 1, 2, 2, 2], (0.72111026, 0.52, 1.0)),
        (TRACK, [1, 2, 2, 2, 2], (0.82462113, 0.68, 1.0)),
        (TRACK, [1, 2, 3, 4, 5], (0.447213596, 0.2, 1.0)),
        (TRACK, [1, 2, 1, 2, 2], (0.72111026, 0.52, 1.0)),
        (TRACK, [1000, 1, 1, 1, 1], (0.50596443, 0.64, 0.4)),
        (CROWD_FIRST, [1, 1, 1, 1, 1, 1], (1.0, 1.0, 1.0)),
        (CROWD_FIRST, [2, 2, 2, 2, 1, 1], (0.72111026, 0.52, 1.0)),
        (CROWD_FIRST, [2, 2, 1000, 1, 1, 1], (0.40824829, 0.4, 5 / 12)),
        (SKY_FIRST, [1, 1, 1, 1, 1], (0.56568542, 0.8, 0.4)),
        (SKY_FIRST, [2, 2, 2, 1, 1], (0.42426407, 0.45, 0.4)),
        (SKY_FIRST, [2, 2, 1000, 1, 1], (0.3, 0.3, 0.3)),
    ],
)
def test_stq_deeplab2_basic_vectors(gt, pred, expected):
    result = stq_of([([gt], [pred])], sequence_id=1)
    assert result["STQ"] == pytest.approx(expected[0], abs=1e-8)
    assert result["AQ"] == pytest.approx(expected[1], abs=1e-12)
    assert result["SQ"] == pytest.approx(expected[2], abs=1e-12)
    assert result["per_sequence"][1]["STQ"] == pytest.approx(expected[0], abs=1e-8)
    assert result["per_sequence"][1]["num_frames"] == 1


def _digits(rows: str) -> np.ndarray:
    return np.array([[int(v) for v in row] for row in rows.split()])


# deeplab2 segmentation_and_tracking_quality_test.py, test_complex_example (classes: sky,
# vegetation, car; car is the thing class), one 8x8 frame per string, one digit per pixel.
GT_SEMANTIC = [
    "00000000 00000000 00020111 02222111 22222211 22222221 22222221 22222211",
    "00000000 00000000 02001100 22211110 22221111 22222111 22222111 22221111",
    "00000000 00000000 00000000 20111000 22111100 22211110 22211111 22211111",
]
GT_INSTANCE = [
    "00000000 00000000 00020000 02222000 22222200 22222220 22222220 22222200",
    "00000000 00000000 02000000 22200000 22220000 22222000 22222000 22220000",
    "00000000 00000000 00000000 20000000 22000000 22200000 22200000 22200000",
]
PRED_SEMANTIC = [
    "00000000 00000000 00000100 00022111 02222211 22222221 22222221 22222221",
    "00000000 00000000 00001100 02221111 22221111 22222111 22222211 22222111",
    "00000000 00000000 00001000 00111100 22211100 22211111 22221111 22221111",
]
PRED_INSTANCE = [
    "00000000 00000000 00000000 00022000 02222100 22222110 22221110 22221110",
    "00000000 00000000 00000000 02220000 22220000 22222000 22221100 22221000",
    "00000000 00000000 00000000 00000000 22200000 22200000 22220000 22220000",
]


def test_stq_deeplab2_three_frame_example():
    frames = [
        (
            _digits(gs) * 1000 + _digits(gi),
            _digits(ps) * 1000 + _digits(pi),
        )
        for gs, gi, ps, pi in zip(GT_SEMANTIC, GT_INSTANCE, PRED_SEMANTIC, PRED_INSTANCE)
    ]
    result = stq_of(frames, num_classes=3, thing_classes=(2,), sequence_id=1)
    assert result["STQ"] == pytest.approx(0.66841773352, abs=1e-10)
    assert result["AQ"] == pytest.approx(0.55366581415, abs=1e-10)
    assert result["SQ"] == pytest.approx(0.8069529580309542, abs=1e-12)
    assert result["per_sequence"][1]["num_frames"] == 3


# ---------------------------------------------------------------- STQ: one test per rule


def test_stq_crowd_is_left_out_of_association_on_both_sides():
    # A predicted track covering GT crowd: the crowd pixel is dropped from the predicted tube too.
    result = stq_of([([[0, 1, 1]], [[5, 5, 5]])])
    assert result["AQ"] == pytest.approx(1.0)  # with the crowd pixel counted it would be 2/3


def test_stq_predicted_thing_on_gt_void_or_stuff_counts_against_aq():
    assert stq_of([([[VOID, 1]], [[1, 1]])])["AQ"] == pytest.approx(0.5)
    assert stq_of([([[1000, 1]], [[1, 1]])])["AQ"] == pytest.approx(0.5)


def test_stq_void_prediction_enters_sq_as_a_void_class():
    frames = [([[0, 0, 1000, 1000]], [[0, VOID, 1000, 1000]])]
    # class 0: 1/2, class 1: 1, "void" column: 0/1 -> (0.5 + 1 + 0) / 3; plain mIoU: 0.75
    assert stq_of(frames, thing_classes=())["SQ"] == pytest.approx(0.5)
    miou = MeanIoU(2)
    miou.update([[0, 0, 1, 1]], [[0, 255, 1, 1]])
    assert miou.result()["mIoU"] == pytest.approx(0.75)


def test_stq_predictions_on_gt_void_do_not_count_in_sq():
    assert stq_of([([[VOID, 1000]], [[0, 1000]])], thing_classes=())["SQ"] == pytest.approx(1.0)


def test_stq_aq_is_pooled_by_tube_over_sequences():
    metric = STQ(2, (0,))
    metric.update(np.array([[1, 1]]), np.array([[7, 7]]), "a")  # one tube, AQ 1
    # three tubes, each split in half between two predicted tracks: AQ 0.5 each
    metric.update(np.array([[1, 1, 2, 2, 3, 3]]), np.array([[4, 5, 6, 7, 8, 9]]), "b")
    result = metric.result()
    assert result["per_sequence"]["a"]["AQ"] == pytest.approx(1.0)
    assert result["per_sequence"]["b"]["AQ"] == pytest.approx(0.5)
    assert result["per_sequence"]["b"]["num_tubes"] == 3
    assert result["AQ"] == pytest.approx((1 + 3 * 0.5) / 4)  # not the mean over sequences, 0.75


def test_stq_sq_comes_from_the_summed_confusion_over_classes_with_a_union():
    metric = STQ(3, ())
    metric.update(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 0]]), "a")
    metric.update(np.array([[1000, 1000]]), np.array([[1000, 0]]), "b")
    result = metric.result()
    # pooled: class 0 IoU 4/5, class 1 IoU 1/2, class 2 absent -> 0.65 (mean of sequences: 0.625)
    assert result["SQ"] == pytest.approx(0.65)
    assert result["per_sequence"]["a"]["SQ"] == pytest.approx(1.0)
    assert result["per_sequence"]["b"]["SQ"] == pytest.approx(0.25)
    assert result["STQ"] == 0.0  # no tubes at all: AQ is 0 (deeplab2 convention)


def test_stq_id_switch_halfway_halves_aq():
    gt = [[CAR + 1, CAR + 1, ROAD]] * 4
    pred = [[CAR + 1, CAR + 1, ROAD]] * 2 + [[CAR + 2, CAR + 2, ROAD]] * 2
    result = stq_of(zip(gt, pred), **KITTI)
    # one tube of 8 pixels, two predicted tracks of 4: AQ = (4 * 4/8 + 4 * 4/8) / 8
    assert result["AQ"] == pytest.approx(0.5)
    assert result["SQ"] == pytest.approx(1.0)
    assert result["STQ"] == pytest.approx(math.sqrt(0.5))


def test_stq_perfect_prediction_and_relabelling_invariance():
    rng = np.random.default_rng(0)
    gt, pred = random_video(rng, 4, 9, 12)
    perfect = STQ(5, (1, 3))
    for t in range(4):
        perfect.update(gt[t], gt[t])
    assert perfect.result()["STQ"] == pytest.approx(1.0)
    result = stq_of(zip(gt, pred), 5, (1, 3))
    relabelled = stq_of(zip(relabel(gt, (1, 3), rng), relabel(pred, (1, 3), rng)), 5, (1, 3))
    for key in ("STQ", "AQ", "SQ"):
        assert relabelled[key] == pytest.approx(result[key], abs=1e-12)
    assert 0.1 < result["STQ"] < 0.95


def test_stq_matches_the_naive_reference_on_random_sequences():
    rng = np.random.default_rng(1)
    for _ in range(10):
        frames = []
        for sequence in range(int(rng.integers(1, 4))):
            gt, pred = random_video(rng, int(rng.integers(1, 4)), 7, int(rng.integers(3, 15)))
            frames += [(sequence, gt[t], pred[t]) for t in range(len(gt))]
        metric = STQ(5, (1, 3))
        for sequence, gt, pred in frames:
            metric.update(gt, pred, sequence)
        ours, reference = metric.result(), bench.reference_stq(frames, 5, (1, 3))
        for key in ("STQ", "AQ", "SQ"):
            assert ours[key] == pytest.approx(reference[key], abs=1e-12)
        for sequence, values in reference["per_sequence"].items():
            assert ours["per_sequence"][sequence]["AQ"] == pytest.approx(values["AQ"], abs=1e-12)
            assert ours["per_sequence"][sequence]["SQ"] == pytest.approx(values["SQ"], abs=1e-12)


def test_pair_counter_matches_unique_across_frames_slices_and_resets():
    rng = np.random.default_rng(2)
    counter = PairCounter(256_000)
    counter.chunk_pixels = 17  # several slices per frame
    for size in (60, 60, 4, 60, 1):  # size 4 and 1 force the code tables to start afresh
        gt = rng.choice([0, 13001, 13002, 255000, 11000 + rng.integers(1, 999)], size=size)
        pred = rng.choice([0, 13001, 255999, 2000, 13000 + rng.integers(1, 999)], size=size)
        keys, counts = np.unique(gt * 256_000 + pred, return_counts=True)
        gt_ids, pred_ids, ours = counter(gt, pred)
        np.testing.assert_array_equal(gt_ids * 256_000 + pred_ids, keys)
        np.testing.assert_array_equal(ours, counts)


def test_stq_rejects_bad_ids_and_shapes():
    metric = STQ(**KITTI)
    with pytest.raises(ValueError, match="unknown class ids \\[40\\]"):
        metric.update(np.array([[0, 1]]), np.array([[40_000, 1]]))
    with pytest.raises(ValueError, match="panoptic ids"):
        metric.update(np.array([[0, -1]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="panoptic ids"):
        metric.update(np.array([[0, 256_000]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(np.zeros((2, 2), int), np.zeros((2, 3), int))


# ---------------------------------------------------------------- VPQ: one test per rule


def test_vpq_perfect_prediction_is_100():
    rng = np.random.default_rng(3)
    gt, _ = random_video(rng, 5, 9, 12)
    metric = VPQ(5, (1, 3))
    metric.update(gt, gt)
    result = metric.result()
    assert result["VPQ"] == result["VPQ_thing"] == result["VPQ_stuff"] == pytest.approx(100.0)


def test_vpq_windows_stack_frames_and_match_only_above_half():
    # An id switch: every single frame is perfect, but over the 2-frame window the car tube
    # (4 pixels) overlaps each predicted track by exactly half, which is not a match.
    gt = [[ROAD, ROAD, CAR + 1, CAR + 1]] * 2
    pred = [[ROAD, ROAD, CAR + 1, CAR + 1], [ROAD, ROAD, CAR + 2, CAR + 2]]
    result = vpq_of(gt, pred, window_sizes=(1, 2, 3))
    one, two, three = (result["per_window"][k] for k in (1, 2, 3))
    assert one["PQ"] == one["PQ_thing"] == pytest.approx(100.0)
    assert two["PQ_thing"] == pytest.approx(0.0)  # TP 0, FN 1, FP 2
    assert two["PQ_stuff"] == pytest.approx(100.0) and two["PQ"] == pytest.approx(50.0)
    assert math.isnan(three["PQ"])  # no 3-frame window in a 2-frame video
    assert math.isnan(result["VPQ"])
    result = vpq_of(gt, pred, window_sizes=(1, 2))
    assert result["VPQ"] == pytest.approx(75.0)  # mean over window sizes
    assert result["VPQ_thing"] == pytest.approx(50.0)
    assert result["VPQ_stuff"] == pytest.approx(100.0)
    # More than half: the 8-pixel tube is matched with IoU 6/8 (the 2 switched pixels are an FP).
    gt = [[CAR + 1] * 4 + [ROAD]] * 2
    pred = [[CAR + 1] * 4 + [ROAD], [CAR + 1] * 2 + [CAR + 2] * 2 + [ROAD]]
    window = vpq_of(gt, pred, window_sizes=(2,))["per_window"][2]
    assert window["SQ_thing"] == pytest.approx(100 * 6 / 8)
    assert window["RQ_thing"] == pytest.approx(100 * 1 / (1 + 0.5))


def test_vpq_union_discounts_gt_void():
    result = vpq_of([[CAR + 1, CAR + 1, VOID, VOID]], [[CAR + 4] * 4])
    assert result["VPQ_thing"] == pytest.approx(100.0)  # IoU 2 / (4 + 2 - 2 - 2) = 1


def test_vpq_crowd_is_never_a_false_negative():
    result = vpq_of([[CAR, ROAD, ROAD, ROAD]], [[ROAD] * 4])
    assert math.isnan(result["VPQ_thing"])  # the car crowd is no segment to find
    assert result["VPQ"] == pytest.approx(75.0)  # road only: IoU 3/4


def test_vpq_crowd_discounts_false_positives_of_its_own_class_only():
    on_car_crowd = vpq_of([[CAR, CAR, ROAD, ROAD]], [[CAR + 5, CAR + 5, ROAD, ROAD]])
    assert on_car_crowd["VPQ"] == pytest.approx(100.0)
    person_on_car_crowd = vpq_of([[CAR, CAR, ROAD, ROAD]], [[PERSON + 5] * 2 + [ROAD] * 2])
    assert person_on_car_crowd["VPQ_thing"] == pytest.approx(0.0)
    assert person_on_car_crowd["VPQ"] == pytest.approx(50.0)


def test_vpq_unmatched_prediction_is_ignored_only_when_more_than_half_is_void():
    mostly_void = vpq_of([[VOID, VOID, ROAD, ROAD]], [[CAR + 7, CAR + 7, ROAD, ROAD]])
    assert mostly_void["VPQ"] == pytest.approx(100.0)
    half_void = vpq_of([[VOID, ROAD, ROAD, ROAD]], [[CAR + 7, CAR + 7, ROAD, ROAD]])
    assert half_void["VPQ_thing"] == pytest.approx(0.0)  # exactly half: still a false positive
    assert half_void["VPQ"] == pytest.approx((100 * 2 / 3 + 0) / 2)


def test_vpq_sums_per_class_over_windows_and_averages_present_classes():
    # frame 0: car found (IoU 1); frame 1: car missed. Summed: 1 / (1 + 0.5) = 66.7, not 50.
    gt = [[CAR + 1, CAR + 1, ROAD, ROAD]] * 2
    pred = [[CAR + 1, CAR + 1, ROAD, ROAD], [ROAD] * 4]
    result = vpq_of(gt, pred)
    assert result["VPQ_thing"] == pytest.approx(100 / 1.5)
    # road: frame 0 TP (IoU 1); frame 1 road (2 px) vs predicted road (4 px), IoU 1/2: FN + FP
    road_pq = 100 * 1 / (1 + 0.5 + 0.5)
    assert result["VPQ_stuff"] == pytest.approx(road_pq)
    # 19 classes, 2 present: the mean runs over car and road only
    assert result["VPQ"] == pytest.approx((100 / 1.5 + road_pq) / 2)
    assert result["per_window"][1]["PQ_per_class"][0] == pytest.approx(road_pq)
    assert math.isnan(result["per_window"][1]["PQ_per_class"][5])


def test_vpq_stuff_segments_ignore_instance_numbers():
    result = vpq_of([[ROAD] * 4], [[ROAD + 3, ROAD + 3, ROAD + 4, ROAD + 4]])
    assert result["VPQ"] == pytest.approx(100.0)


def test_vpq_relabelling_invariance_and_naive_reference():
    rng = np.random.default_rng(4)
    for _ in range(6):
        videos = [random_video(rng, int(rng.integers(1, 6)), 6, 9) for _ in range(2)]
        metric, relabelled = VPQ(5, (1, 3)), VPQ(5, (1, 3))
        for gt, pred in videos:
            metric.update(gt, pred)
            relabelled.update(relabel(gt, (1, 3), rng), relabel(pred, (1, 3), rng))
        ours, reference = metric.result(), bench.reference_vpq(videos, 5, (1, 3))
        again = relabelled.result()
        for key in ("VPQ", "VPQ_thing", "VPQ_stuff"):
            np.testing.assert_allclose(ours[key], reference[key], atol=1e-9)
            np.testing.assert_allclose(again[key], ours[key], atol=1e-9)
        for size in (1, 2, 3, 4):
            for key in ("PQ", "SQ", "RQ", "PQ_thing", "RQ_stuff"):
                np.testing.assert_allclose(
                    ours["per_window"][size][key], reference["per_window"][size][key], atol=1e-9
                )


def test_vpq_streaming_frames_equals_whole_video():
    rng = np.random.default_rng(5)
    gt, pred = random_video(rng, 5, 6, 9)
    whole, streamed = VPQ(5, (1, 3)), VPQ(5, (1, 3))
    whole.update(gt, pred)
    streamed.start_video()
    for t in range(5):
        streamed.update_frame(gt[t], pred[t])
    assert streamed.result() == whole.result()


# ---------------------------------------------------------------- mIoU, flicker


def test_mean_iou_hand_computed():
    miou = MeanIoU(4)
    miou.update(np.array([[0, 0, 1, 255]]), np.array([[0, 1, 1, 2]]))  # GT void: not counted
    miou.update(np.array([[[0, 1]]]), np.array([[[255, 1]]]))  # a void prediction is a miss
    result = miou.result()
    # class 0: I 1, U 3 (GT 3, pred 1); class 1: I 2, U 3; class 2 and 3: no union
    assert result["IoU_per_class"][:2] == pytest.approx([1 / 3, 2 / 3])
    assert math.isnan(result["IoU_per_class"][2]) and math.isnan(result["IoU_per_class"][3])
    assert result["mIoU"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="class ids"):
        miou.update(np.array([7]), np.array([0]))


def test_mean_iou_over_gt_classes_skips_classes_only_predicted():
    gt, pred = np.array([[0, 0, 1, 1, 255]]), np.array([[0, 2, 1, 1, 2]])
    # class 0: I 1, U 2; class 1: I 2, U 2; class 2: I 0, U 1 (predicted once on a labelled
    # pixel, never in the GT; the prediction on GT void is not counted); class 3: no union
    union, in_gt = MeanIoU(4), MeanIoU(4, mean_over="gt")
    union.update(gt, pred)
    in_gt.update(gt, pred)
    assert union.result()["mIoU"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert in_gt.result()["mIoU"] == pytest.approx((0.5 + 1) / 2)
    assert in_gt.result()["IoU_per_class"][:3] == pytest.approx([0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="mean_over"):
        MeanIoU(4, mean_over="pixels")


def test_flicker_rate_counts_prediction_changes_where_gt_is_stable():
    gt = np.array([[[0, 0, 1, 255]], [[0, 0, 2, 255]], [[0, 0, 2, 255]]])  # (T=3, H=1, W=4)
    pred = np.array([[[0, 0, 1, 3]], [[0, 1, 1, 4]], [[0, 0, 2, 5]]])
    # stable labelled pixels: 2 in pair (0,1) + 3 in pair (1,2) = 5; flicker: 1 + 2 = 3
    assert flicker_rate(gt, pred) == pytest.approx(3 / 5)
    flicker = Flicker()
    flicker.update(gt, pred)
    flicker.update(gt, gt)
    assert flicker.result() == {"flicker": 3 / 10, "stable_pixels": 10, "flickering_pixels": 3}


# ---------------------------------------------------------------- command line


def _write_sequence(root, sequence, frames):
    for t, frame in enumerate(frames):
        write_kitti_step_png(root / sequence / f"{t:06d}.png", np.asarray(frame))


def _toy_frames():
    frame = np.full((4, 6), ROAD)
    frame[:2, :3] = CAR + 1
    frame[3] = VOID
    return [np.roll(frame, t, axis=1) for t in range(4)]


def test_cli_evaluates_folders_and_writes_json(tmp_path, capsys):
    gt_root = tmp_path / "kitti"
    _write_sequence(gt_root / "panoptic_maps" / "val", "0002", _toy_frames())
    _write_sequence(tmp_path / "pred", "0002", _toy_frames())
    out = tmp_path / "metrics.json"
    assert main(["--gt", str(gt_root), "--pred", str(tmp_path / "pred"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0002" in printed and "VPQ 100.00" in printed
    result = json.loads(out.read_text())
    assert result["STQ"] == result["AQ"] == result["SQ"] == result["mIoU"] == 1.0
    assert result["VPQ"] == 100.0 and result["VPQ_stuff"] == 100.0
    assert result["per_sequence"]["0002"]["num_frames"] == 4
    assert result["per_window"]["4"]["PQ"] == 100.0
    assert result["IoU_per_class"][1] is None  # NaN (class absent) is written as null


def test_cli_accepts_stitched_track_ids_above_999(tmp_path):
    gt_root = tmp_path / "gt"
    _write_sequence(gt_root, "0000", _toy_frames())
    frames = [np.where(f == CAR + 1, 13 * 65536 + 1500, f // 1000 * 65536) for f in _toy_frames()]
    for t, frame in enumerate(frames):  # a stitched video: divisor 65536, car track 1500
        write_kitti_step_png(tmp_path / "pred" / "0000" / f"{t:06d}.png", frame, 65536)
    result = evaluate_folders(gt_root, tmp_path / "pred")
    assert result["STQ"] == result["AQ"] == 1.0 and result["VPQ"] == 100.0


def test_cli_names_the_offending_prediction_file(tmp_path, capsys):
    _write_sequence(tmp_path / "gt", "0000", _toy_frames()[:2])
    pred = tmp_path / "pred"
    _write_sequence(pred, "0000", _toy_frames()[:1])  # 000001.png is missing
    args = ["--gt", str(tmp_path / "gt"), "--pred", str(pred)]
    assert main(args) == 2
    assert f"missing prediction {pred / '0000' / '000001.png'}" in capsys.readouterr().err
    write_kitti_step_png(pred / "0000" / "000001.png", np.zeros((4, 5), int))
    assert main(args) == 2
    assert "000001.png" in (err := capsys.readouterr().err) and "shape" in err
    (pred / "0000" / "000001.png").write_bytes(b"not a png")
    assert main(args) == 2
    assert "000001.png" in capsys.readouterr().err
    write_kitti_step_png(pred / "0000" / "000001.png", np.full((4, 6), 40_000))
    assert main(args) == 2
    assert "000001.png" in (err := capsys.readouterr().err) and "unknown class" in err


def test_cli_runs_as_a_module(tmp_path):
    _write_sequence(tmp_path / "gt", "0000", _toy_frames())
    command = [sys.executable, "-m", "minivseg.metrics", "--gt", str(tmp_path / "gt")]
    done = subprocess.run(
        command + ["--pred", str(tmp_path / "gt")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "mIoU 1.0000" in done.stdout
