"""Benchmark: minivseg's STQ and VPQ against straightforward reference implementations.

Run ``python tests/benchmarks/bench_metrics.py`` (pytest never collects it: only ``test_*.py``
files under ``tests/`` are collected). A synthetic 50-frame 375x1242 sequence with ~20 tracks is
scored by

- ``reference_stq``: per frame ``np.unique`` and dict updates, then a double loop over GT and
  predicted tubes (the algorithm of deeplab2's numpy ``STQuality``, in our id format);
- ``reference_vpq``: per window, stacked frames, ``np.unique`` over (GT, prediction) ids, dicts of
  segments and a loop over pairs (the algorithm of VPSNet's ``eval_vpq.py``);

and by `minivseg.metrics.STQ` / `VPQ`. It checks that the numbers agree and prints the speed
ratios. ``tests/test_metrics.py`` uses the two references as its naive ground truth.

Measured (``OMP_NUM_THREADS=1 python tests/benchmarks/bench_metrics.py``: 50 frames of 375x1242,
20 tracks, one CPU thread, on this project's 2-core x86 CPU machine, shared with other jobs; CPU
time, wall in brackets):

=================  =================  ===========================  ====================
metric             minivseg           straightforward reference    speed-up
=================  =================  ===========================  ====================
STQ                0.094 s (0.146 s)  0.906 s (1.366 s)            9.6x CPU (9.3x wall)
VPQ (windows 1-4)  0.121 s (0.181 s)  18.8 s (30.5 s)              155x CPU (169x wall)
=================  =================  ===========================  ====================

The run before gave 9.7x and 118x CPU; the machine's load moves the VPQ ratio most. The numbers
agree (max |diff| 0 for STQ, 2.3e-13 for VPQ). STQ costs about 2 ms per 375x1242 frame (two
table look-ups, a multiply-add and a ``bincount`` per pixel, which is about as far as numpy
goes). Not run by this script: deeplab2's own numpy ``STQuality`` takes 1.43 s CPU on the same
50 frames (about 15x ours), and the official ``eval_vpq.py`` routine 6.5 s CPU on 20 of them
(ours 0.07 s, about 90x), both without PNG/JSON reading. STQ and VPQ together over 2000 such
frames: 7.7 s CPU, with constant memory.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minivseg.metrics import STQ, VPQ  # noqa: E402


def reference_stq(frames, num_classes, thing_classes, label_divisor=1000, ignore_label=255):
    """STQ of ``frames``, an iterable of ``(sequence_id, gt (H, W), pred (H, W))``."""
    size = num_classes + 1
    sequences = {}
    for sequence_id, gt, pred in frames:
        if sequence_id not in sequences:
            sequences[sequence_id] = {
                "confusion": np.zeros((size, size)),
                "gt": defaultdict(int),
                "pred": defaultdict(int),
                "both": defaultdict(int),
            }
        stats = sequences[sequence_id]
        gt_class = np.where(gt // label_divisor == ignore_label, num_classes, gt // label_divisor)
        pred_class = np.where(
            pred // label_divisor == ignore_label, num_classes, pred // label_divisor
        )
        cells, counts = np.unique(gt_class * size + pred_class, return_counts=True)
        for cell, count in zip(cells, counts):
            stats["confusion"][cell // size, cell % size] += count
        gt_thing = np.isin(gt // label_divisor, thing_classes)
        pred_thing = np.isin(pred // label_divisor, thing_classes)
        crowd = gt_thing & (gt % label_divisor == 0)
        in_tube, in_pred = gt_thing & ~crowd, pred_thing & ~crowd
        for name, ids in (("gt", gt[in_tube]), ("pred", pred[in_pred])):
            for value, count in zip(*np.unique(ids, return_counts=True)):
                stats[name][value] += count
        both = in_tube & pred_thing
        keys, counts = np.unique(gt[both] * 10**7 + pred[both], return_counts=True)
        for key, count in zip(keys, counts):
            stats["both"][(key // 10**7, key % 10**7)] += count

    def mean_iou(confusion):
        confusion = confusion.copy()
        confusion[num_classes] = 0
        ious = []
        for c in range(size):
            union = confusion[c].sum() + confusion[:, c].sum() - confusion[c, c]
            if union > 0:
                ious.append(confusion[c, c] / union)
        return sum(ious) / len(ious) if ious else math.nan

    result, total_aq, total_tubes = {"per_sequence": {}}, 0.0, 0
    total_confusion = np.zeros((size, size))
    for sequence_id, stats in sequences.items():
        aq = 0.0
        for gt_id, gt_area in stats["gt"].items():
            inner = 0.0
            for pred_id, pred_area in stats["pred"].items():
                tpa = stats["both"].get((gt_id, pred_id), 0)
                if tpa:
                    inner += tpa * tpa / (gt_area + pred_area - tpa)
            aq += inner / gt_area
        num_tubes = len(stats["gt"])
        total_aq, total_tubes = total_aq + aq, total_tubes + num_tubes
        total_confusion += stats["confusion"]
        aq = aq / num_tubes if num_tubes else 0.0
        sq = mean_iou(stats["confusion"])
        result["per_sequence"][sequence_id] = {"STQ": math.sqrt(aq * sq), "AQ": aq, "SQ": sq}
    aq = total_aq / total_tubes if total_tubes else 0.0
    sq = mean_iou(total_confusion)
    return result | {"STQ": math.sqrt(aq * sq), "AQ": aq, "SQ": sq}


def reference_vpq(
    videos, num_classes, thing_classes, label_divisor=1000, ignore_label=255, windows=(1, 2, 3, 4)
):
    """VPQ of ``videos``, a list of ``(gt (T, H, W), pred (T, H, W))``, as VPSNet's eval_vpq."""
    void = -1

    def segments(video):  # stuff ids collapse to their class, all void ids to VOID
        semantic = video // label_divisor
        ids = np.where(np.isin(semantic, thing_classes), video, semantic * label_divisor)
        return np.where(semantic == ignore_label, void, ids)

    per_window = {}
    for window in windows:
        stats = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
        for gt_video, pred_video in videos:
            gt_video, pred_video = segments(gt_video), segments(pred_video)
            for start in range(len(gt_video) - window + 1):
                gt, pred = gt_video[start : start + window], pred_video[start : start + window]
                gt_area = dict(zip(*np.unique(gt, return_counts=True)))
                pred_area = dict(zip(*np.unique(pred, return_counts=True)))
                gt_area.pop(void, None)
                pred_area.pop(void, None)
                keys, counts = np.unique((gt + 1) * 10**7 + (pred + 1), return_counts=True)
                overlap = {(k // 10**7 - 1, k % 10**7 - 1): n for k, n in zip(keys, counts)}
                gt_matched, pred_matched, crowd_of_class = set(), set(), {}
                for (gt_id, pred_id), inter in overlap.items():
                    if gt_id == void or pred_id == void:
                        continue
                    gt_class, pred_class = gt_id // label_divisor, pred_id // label_divisor
                    if gt_class in thing_classes and gt_id % label_divisor == 0:
                        continue
                    if gt_class != pred_class:
                        continue
                    union = pred_area[pred_id] + gt_area[gt_id] - inter
                    union -= overlap.get((void, pred_id), 0)
                    if inter / union > 0.5:
                        stats[gt_class]["tp"] += 1
                        stats[gt_class]["iou"] += inter / union
                        gt_matched.add(gt_id)
                        pred_matched.add(pred_id)
                for gt_id in gt_area:
                    gt_class = gt_id // label_divisor
                    if gt_class in thing_classes and gt_id % label_divisor == 0:
                        crowd_of_class[gt_class] = gt_id
                    elif gt_id not in gt_matched:
                        stats[gt_class]["fn"] += 1
                for pred_id, area in pred_area.items():
                    if pred_id in pred_matched:
                        continue
                    pred_class = pred_id // label_divisor
                    ignored = overlap.get((void, pred_id), 0)
                    if pred_class in crowd_of_class:
                        ignored += overlap.get((crowd_of_class[pred_class], pred_id), 0)
                    if ignored / area <= 0.5:
                        stats[pred_class]["fp"] += 1
        result = {}
        for suffix, group in (
            ("", range(num_classes)),
            ("_thing", thing_classes),
            ("_stuff", [c for c in range(num_classes) if c not in thing_classes]),
        ):
            pq, sq, rq = [], [], []
            for c in group:
                s = stats[c]
                if s["tp"] + s["fp"] + s["fn"] == 0:
                    continue
                denominator = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
                pq.append(100 * s["iou"] / denominator)
                sq.append(100 * s["iou"] / s["tp"] if s["tp"] else 0.0)
                rq.append(100 * s["tp"] / denominator)
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                result[name + suffix] = sum(values) / len(values) if values else math.nan
        per_window[window] = result
    final = {
        f"VPQ{suffix}": sum(per_window[w]["PQ" + suffix] for w in windows) / len(windows)
        for suffix in ("", "_thing", "_stuff")
    }
    return final | {"per_window": per_window}


def synthetic_sequence(num_frames=50, height=375, width=1242, num_tracks=20, seed=0):
    """A street-like panoptic video ``(T, H, W)`` and an imperfect prediction of it.

    Stuff bands (sky, building, vegetation, sidewalk, road), ``num_tracks`` moving cars and people
    with void outlines, a crowd block and a void strip. The prediction shifts objects, swaps two
    track ids halfway, adds a false track and mislabels a band of pixels.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(height)[:, None]
    bands = np.select(
        [rows < height * 0.25, rows < height * 0.45, rows < height * 0.55, rows < height * 0.65],
        [10, 2, 8, 1],
        0,
    )
    background = np.broadcast_to(bands * 1000, (height, width))
    start = rng.integers([0, 0], [height - 80, width - 120], size=(num_tracks, 2))
    velocity = rng.integers(-4, 5, size=(num_tracks, 2))
    box = rng.integers([20, 30], [80, 120], size=(num_tracks, 2))
    semantic = np.where(rng.random(num_tracks) < 0.6, 13, 11)
    gt = np.empty((num_frames, height, width), dtype=np.int64)
    pred = np.empty_like(gt)
    for t in range(num_frames):
        gt_frame, pred_frame = background.copy(), background.copy()
        pred_frame[: height // 4, :40] = 8000  # a mislabelled sky corner
        for k in range(num_tracks):
            y, x = np.clip(start[k] + velocity[k] * t, 0, [height - box[k, 0], width - box[k, 1]])
            h, w = box[k]
            gt_frame[y : y + h, x : x + w] = 255000
            gt_frame[y + 1 : y + h - 1, x + 1 : x + w - 1] = semantic[k] * 1000 + k + 1
            track = k + 1 if not (k < 2 and t >= num_frames // 2) else 2 - k  # id swap
            pred_frame[y + 2 : y + h, x + 1 : x + w] = semantic[k] * 1000 + track
        gt_frame[-30:, 400:800] = 13000  # crowd of cars
        gt_frame[-8:] = 255000
        pred_frame[-40:, 420:820] = 13000 + 50
        pred_frame[50:110, 600 + t : 680 + t] = 11000 + 77  # a false track
        gt[t], pred[t] = gt_frame, pred_frame
    return gt, pred


def _timed(function, *args):
    """``function(*args)`` and its (CPU seconds, wall seconds); CPU time is what we compare,
    since on a shared machine wall time also counts waiting for a core."""
    cpu, wall = time.process_time(), time.perf_counter()
    value = function(*args)
    return value, (time.process_time() - cpu, time.perf_counter() - wall)


def run_benchmark(num_frames=50):
    gt, pred = synthetic_sequence(num_frames)
    num_classes, things = 19, (11, 13)

    def ours_stq():
        metric = STQ(num_classes, things)
        for t in range(len(gt)):
            metric.update(gt[t], pred[t], sequence_id=0)
        return metric.result()

    def ours_vpq():
        metric = VPQ(num_classes, things)
        metric.update(gt, pred)
        return metric.result()

    frames = [(0, gt[t], pred[t]) for t in range(len(gt))]
    stq, stq_time = _timed(ours_stq)
    stq_ref, stq_ref_time = _timed(reference_stq, frames, num_classes, things)
    vpq, vpq_time = _timed(ours_vpq)
    vpq_ref, vpq_ref_time = _timed(reference_vpq, [(gt, pred)], num_classes, things)
    stq_diff = max(abs(stq[k] - stq_ref[k]) for k in ("STQ", "AQ", "SQ"))
    vpq_diff = max(abs(vpq[k] - vpq_ref[k]) for k in ("VPQ", "VPQ_thing", "VPQ_stuff"))
    print(f"{num_frames} frames of {gt.shape[1]}x{gt.shape[2]}, {len(np.unique(gt % 1000))} ids")
    for name, ours, reference, diff, time_ours, time_ref in (
        ("STQ", stq["STQ"], stq_ref["STQ"], stq_diff, stq_time, stq_ref_time),
        ("VPQ", vpq["VPQ"], vpq_ref["VPQ"], vpq_diff, vpq_time, vpq_ref_time),
    ):
        cpu_ratio, wall_ratio = time_ref[0] / time_ours[0], time_ref[1] / time_ours[1]
        print(f"{name} {ours:.6f} (reference {reference:.6f}, max |diff| {diff:.1e})")
        print(f"    minivseg {time_ours[0]:.3f} s CPU ({time_ours[1]:.3f} s wall), "
              f"reference {time_ref[0]:.3f} s CPU ({time_ref[1]:.3f} s wall): "
              f"{cpu_ratio:.1f}x faster in CPU time ({wall_ratio:.1f}x wall)")  # fmt: skip
    if stq_diff > 1e-9 or vpq_diff > 1e-9:
        raise SystemExit("minivseg and the reference disagree")


if __name__ == "__main__":
    run_benchmark()
