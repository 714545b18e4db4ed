"""Video segmentation metrics: STQ, VPQ, mIoU and flicker rate.

Every panoptic metric here is computed from one sufficient statistic, the joint histogram of
(ground-truth id, predicted id) pixel pairs of a frame (`PairCounter`); no frame is kept.

- **STQ** (STEP, Weber et al. 2021; TubeFormer-DeepLab §4.1 on KITTI-STEP): with tubes ``g``
  (GT tracks) and ``p`` (predicted tracks) pooled over a sequence,
  ``AQ = 1/|G| Σ_g 1/|g| Σ_p TPA(p,g)·IoU(p,g)``, ``SQ`` = mean class IoU,
  ``STQ = sqrt(AQ·SQ)``. Numbers equal deeplab2's numpy ``STQuality`` (which encodes ids by bit
  shift; ours are ``semantic*label_divisor + instance``), including its conventions: crowd (thing,
  instance 0) is left out of association on both sides; predicted thing pixels on GT void or
  stuff enlarge the predicted tube; a void prediction on a labelled pixel enters SQ as an extra
  "void" class of IoU 0; AQ is pooled by tube over sequences; SQ comes from the summed confusion
  matrix over classes with non-zero union.
- **VPQ** (VPSNet, Kim et al. 2020, official ``tools/eval_vpq.py`` at 72d59ab3 or later; reported
  in TubeFormer-DeepLab §5): windows of 1-4 consecutive frames sliding by one; tubes are the
  stacked segments; PQ matching at tube IoU > 0.5 with the union discounting GT-void overlap;
  crowd is never a false negative and discounts same-class false positives; IoU/TP/FP/FN are
  summed per class over all windows; ``VPQ`` = mean over window sizes of 100·PQ.
- **mIoU** from a confusion matrix (STT §4.1.2); **flicker rate**, the share of pixels whose
  predicted class changes while the GT class does not (a flow-free stand-in for the TC of STT
  §4.1.2).
- Video mask AP/AR on whole videos with the YouTube-VIS rules is in `minivseg.video_ap`.

Deliberate differences:
- counts are exact int64; deeplab2's numpy STQ under NumPy >= 2 accumulates areas in float32,
  so its AQ drifts by ~1e-7 relative (it matched to 1e-9 when run with float64 areas);
- ``ignore_label`` must be >= ``num_classes`` (deeplab2 also allows an ignore id inside the range);
- VPQ in our id format: a panoptic id is a segment, every void id ``255*1000 + x`` is VOID, a GT
  thing pixel with instance 0 is the crowd segment of its class, and all pixels of a stuff class
  (whatever their instance number) are one segment, in GT and prediction alike;
- VPQ groups (all/thing/stuff) with no class present give NaN where upstream divides by zero;
- deeplab2's TF ``VideoPanopticQuality`` differs from the official VPQ (and so from ours): it
  scores whatever frames the caller concatenates (its trainer logs 2-frame windows only), only the
  id ``ignore*max_instances`` counts as void, it has no crowd (crowd must be encoded as void), and
  it reports no thing/stuff split; its docstring warns it "may give a bit higher VPQ".
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from pathlib import Path

import numpy as np
from einops import rearrange

from minivseg.panoptic import (
    IGNORE_LABEL,
    LABEL_DIVISOR,
    NUM_CLASSES,
    THING_CLASSES,
    VIDEO_LABEL_DIVISOR,
    frame_order,
    read_kitti_step_png,
)


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


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


class _PanopticMetric:
    """Shared set-up: class table, id range and validation of panoptic ids."""

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


class STQ(_PanopticMetric):
    """Segmentation and Tracking Quality, accumulated frame by frame and sequence by sequence."""

    def __init__(
        self, num_classes, thing_classes, label_divisor=LABEL_DIVISOR, ignore_label=IGNORE_LABEL
    ):
        super().__init__(num_classes, thing_classes, label_divisor, ignore_label)
        self._pairs = {}  # sequence id -> (keys gt_id*id_limit + pred_id, pixel counts)
        self._num_frames = collections.Counter()

    def update(self, gt: np.ndarray, pred: np.ndarray, sequence_id=0) -> None:
        """Add one frame: ``gt, pred (H, W)`` panoptic ids ``semantic*label_divisor + instance``."""
        gt_ids, pred_ids, counts = self._count_pairs(gt, pred)
        keys = gt_ids * self.id_limit + pred_ids
        old_keys, old_counts = self._pairs.get(sequence_id, (keys[:0], counts[:0]))
        self._pairs[sequence_id] = merge_counts(
            np.concatenate([old_keys, keys]), np.concatenate([old_counts, counts])
        )
        self._num_frames[sequence_id] += 1

    def _confusion(self, gt_ids, pred_ids, counts) -> np.ndarray:
        size = self.num_classes + 1
        cells = self._class_index(gt_ids) * size + self._class_index(pred_ids)
        confusion = np.bincount(cells, weights=counts, minlength=size * size)
        confusion = rearrange(confusion, "(g p) -> g p", p=size)
        confusion[self.num_classes] = 0  # predictions on GT void do not count
        return confusion

    def _association(self, gt_ids, pred_ids, counts):
        """Unnormalised AQ of one sequence, ``Σ_g 1/|g| Σ_p TPA·IoU``, and its number of tubes."""
        gt_thing, pred_thing = self._is_thing(gt_ids), self._is_thing(pred_ids)
        crowd = gt_thing & (gt_ids % self.label_divisor == 0)
        in_tube, in_prediction = gt_thing & ~crowd, pred_thing & ~crowd
        tube_ids, tube_index = np.unique(gt_ids[in_tube], return_inverse=True)
        tube_area = np.bincount(tube_index, weights=counts[in_tube])
        track_ids, track_index = np.unique(pred_ids[in_prediction], return_inverse=True)
        track_area = np.bincount(track_index, weights=counts[in_prediction])
        hit = in_tube & pred_thing
        tpa = counts[hit].astype(np.float64)
        g_area = tube_area[np.searchsorted(tube_ids, gt_ids[hit])]
        p_area = track_area[np.searchsorted(track_ids, pred_ids[hit])]
        iou = tpa / (g_area + p_area - tpa)  # IoU(p, g) = TPA / (TPA + FPA + FNA)
        # AQ (STEP §4), before dividing by the number of tubes: Σ_g 1/|g| Σ_p TPA(p,g)·IoU(p,g)
        return float(np.sum(tpa * iou / g_area)), len(tube_ids)

    def result(self) -> dict:
        """``STQ``, ``AQ``, ``SQ`` over all sequences, and per sequence under ``per_sequence``."""
        size = self.num_classes + 1
        total_confusion, total_aq, total_tubes = np.zeros((size, size)), 0.0, 0
        per_sequence = {}
        for sequence_id, (keys, counts) in self._pairs.items():
            gt_ids, pred_ids = np.divmod(keys, self.id_limit)
            confusion = self._confusion(gt_ids, pred_ids, counts)
            aq_sum, num_tubes = self._association(gt_ids, pred_ids, counts)
            total_confusion += confusion
            total_aq, total_tubes = total_aq + aq_sum, total_tubes + num_tubes
            aq = aq_sum / num_tubes if num_tubes else 0.0
            sq = _nanmean(class_iou(confusion))  # the void column stays in: deeplab2 convention
            per_sequence[sequence_id] = {
                "STQ": math.sqrt(aq * sq),
                "AQ": aq,
                "SQ": sq,
                "num_frames": self._num_frames[sequence_id],
                "num_tubes": num_tubes,
            }
        aq = total_aq / total_tubes if total_tubes else 0.0  # pooled by tube, not by sequence
        sq = _nanmean(class_iou(total_confusion))
        # STQ = sqrt(AQ · SQ)
        return {"STQ": math.sqrt(aq * sq), "AQ": aq, "SQ": sq, "per_sequence": per_sequence}


class VPQ(_PanopticMetric):
    """Video Panoptic Quality over sliding windows of consecutive frames (official VPSNet rules)."""

    def __init__(
        self,
        num_classes,
        thing_classes,
        label_divisor=LABEL_DIVISOR,
        ignore_label=IGNORE_LABEL,
        window_sizes=(1, 2, 3, 4),
    ):
        super().__init__(num_classes, thing_classes, label_divisor, ignore_label)
        self.window_sizes = tuple(window_sizes)
        self.void_id = ignore_label * label_divisor
        # Per window size: summed IoU, TP, FP, FN of each class over every window seen.
        self._stats = {size: np.zeros((4, num_classes)) for size in self.window_sizes}
        self._recent = collections.deque(maxlen=max(self.window_sizes))

    def update(self, gt_video: np.ndarray, pred_video: np.ndarray) -> None:
        """Add one whole video: ``gt_video, pred_video (T, H, W)`` panoptic ids."""
        self.start_video()
        for gt, pred in zip(gt_video, pred_video, strict=True):
            self.update_frame(gt, pred)

    def start_video(self) -> None:
        """Begin a new video: windows never span two videos."""
        self._recent.clear()

    def update_frame(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add the next ``(H, W)`` frame of the current video and score the windows it closes."""
        gt_ids, pred_ids, counts = self._count_pairs(gt, pred)
        keys = self._segment(gt_ids) * self.id_limit + self._segment(pred_ids)
        self._recent.append(merge_counts(keys, counts))
        for size in self.window_sizes:
            if len(self._recent) >= size:
                window = list(self._recent)[-size:]
                keys, counts = merge_counts(*map(np.concatenate, zip(*window)))
                self._stats[size] += self._score_window(keys, counts)

    def _segment(self, ids: np.ndarray) -> np.ndarray:
        """Segment of each id: itself for things (crowd included), the class for stuff, VOID."""
        semantic = ids // self.label_divisor
        segment = np.where(self._is_thing(ids), ids, semantic * self.label_divisor)
        return np.where(semantic == self.ignore_label, self.void_id, segment)

    def _score_window(self, keys, counts) -> np.ndarray:
        """Per-class ``(4, K)`` IoU sum, TP, FP, FN of one window of stacked frames."""
        num_classes = self.num_classes
        gt_ids, g = np.unique(keys // self.id_limit, return_inverse=True)
        pred_ids, p = np.unique(keys % self.id_limit, return_inverse=True)
        gt_area, pred_area = np.bincount(g, weights=counts), np.bincount(p, weights=counts)
        gt_class, pred_class = gt_ids // self.label_divisor, pred_ids // self.label_divisor
        gt_void, pred_void = gt_ids == self.void_id, pred_ids == self.void_id
        gt_crowd = self._is_thing(gt_ids) & (gt_ids % self.label_divisor == 0)
        same_class = gt_class[g] == pred_class[p]
        on_void = np.bincount(p, weights=counts * gt_void[g], minlength=len(pred_ids))
        # Tube IoU with the union discounting the prediction's overlap with GT void.
        union = pred_area[p] + gt_area[g] - counts - on_void[p]
        with np.errstate(divide="ignore", invalid="ignore"):  # only GT-void pairs can have 0
            iou = counts / union
        match = same_class & ~gt_void[g] & ~gt_crowd[g] & (iou > 0.5)
        gt_matched = np.zeros(len(gt_ids), bool)
        gt_matched[g[match]] = True
        pred_matched = np.zeros(len(pred_ids), bool)
        pred_matched[p[match]] = True
        # An unmatched prediction lying mostly on void or same-class crowd is not a false positive.
        crowd = gt_crowd[g] & same_class
        on_crowd = np.bincount(p, weights=counts * crowd, minlength=len(pred_ids))
        ignored = (on_void + on_crowd) / pred_area > 0.5
        false_negative = ~gt_matched & ~gt_void & ~gt_crowd
        false_positive = ~pred_matched & ~pred_void & ~ignored
        return np.stack(
            [
                np.bincount(gt_class[g[match]], weights=iou[match], minlength=num_classes),
                np.bincount(gt_class[g[match]], minlength=num_classes),
                np.bincount(pred_class[false_positive], minlength=num_classes),
                np.bincount(gt_class[false_negative], minlength=num_classes),
            ]
        )

    def _window_result(self, stats) -> dict:
        iou, tp, fp, fn = stats
        present = tp + fp + fn > 0
        # PQ_c = ΣIoU / (TP + FP/2 + FN/2) = SQ_c · RQ_c, with SQ_c = ΣIoU / TP (0 if no TP)
        denominator = np.where(present, tp + 0.5 * fp + 0.5 * fn, 1.0)
        pq, rq = 100 * iou / denominator, 100 * tp / denominator
        sq = 100 * iou / np.maximum(tp, 1)
        thing = np.isin(np.arange(self.num_classes), self.thing_classes)
        result = {"PQ_per_class": np.where(present, pq, np.nan).tolist()}
        for suffix, group in (
            ("", present),
            ("_thing", present & thing),
            ("_stuff", present & ~thing),
        ):
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                result[name + suffix] = _nanmean(values[group])
        return result

    def result(self) -> dict:
        """``VPQ``, ``VPQ_thing``, ``VPQ_stuff`` (x100, mean over window sizes), ``per_window``."""
        per_window = {size: self._window_result(self._stats[size]) for size in self.window_sizes}
        result = {
            f"VPQ{suffix}": float(np.mean([per_window[s]["PQ" + suffix] for s in per_window]))
            for suffix in ("", "_thing", "_stuff")
        }
        return result | {"per_window": per_window}


class MeanIoU:
    """Mean IoU of semantic maps from a confusion matrix; GT-void pixels are not counted."""

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL):
        if ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} must be >= num_classes {num_classes}")
        self.num_classes, self.ignore_label = num_classes, ignore_label
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
        """``mIoU`` (mean over classes with non-zero union) and ``IoU_per_class`` (NaN if absent).

        A void prediction on a labelled pixel is a miss for the GT class; unlike STQ's SQ it adds
        no "void class" to the mean.
        """
        confusion = self.confusion.copy()
        confusion[self.num_classes] = 0
        iou = class_iou(confusion)[: self.num_classes]
        return {"mIoU": _nanmean(iou), "IoU_per_class": iou.tolist()}


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


# ---- command line: python -m minivseg.metrics --gt DIR --pred DIR [--split val] [--json OUT] ----


def _sequence_root(root: Path, split: str) -> Path:
    """``ROOT/panoptic_maps/SPLIT`` for a KITTI-STEP root, else ``ROOT`` (``ROOT/SEQ/*.png``)."""
    kitti = root / "panoptic_maps" / split
    return kitti if kitti.is_dir() else root


def _list_frames(gt_root: Path, pred_root: Path):
    """``{sequence: [(gt_path, pred_path), ...]}``; raises naming the first missing prediction."""
    if not gt_root.is_dir():
        raise FileNotFoundError(f"ground-truth folder {gt_root} does not exist")
    frames = {}
    for sequence in sorted(p for p in gt_root.iterdir() if p.is_dir()):
        gt_paths = frame_order(sequence.glob("*.png"))  # time order: 2 before 10
        if gt_paths:
            frames[sequence.name] = [
                (path, pred_root / sequence.name / path.name) for path in gt_paths
            ]
    if not frames:
        raise FileNotFoundError(f"no SEQ/FRAME.png ground truth under {gt_root}")
    for pairs in frames.values():
        for _, pred_path in pairs:
            if not pred_path.is_file():
                raise FileNotFoundError(f"missing prediction {pred_path}")
    return frames


def evaluate_folders(gt_dir, pred_dir, split="val") -> dict:
    """STQ, VPQ and mIoU of KITTI-STEP panoptic PNGs (``DIR/SEQ/FRAME.png`` or a dataset root).

    Predicted instance ids may be up to 65535 (stitched videos); ids are read with divisor 65536.
    """
    gt_root = _sequence_root(Path(gt_dir), split)
    frames = _list_frames(gt_root, _sequence_root(Path(pred_dir), split))
    divisor = VIDEO_LABEL_DIVISOR
    stq, vpq = STQ(NUM_CLASSES, THING_CLASSES, divisor), VPQ(NUM_CLASSES, THING_CLASSES, divisor)
    miou = MeanIoU(NUM_CLASSES)
    for sequence, pairs in frames.items():
        vpq.start_video()
        for gt_path, pred_path in pairs:
            gt = read_kitti_step_png(gt_path, divisor)
            pred = read_kitti_step_png(pred_path, divisor)
            try:
                stq.update(gt, pred, sequence)
                vpq.update_frame(gt, pred)
                miou.update(gt // divisor, pred // divisor)
            except ValueError as error:
                raise ValueError(f"{pred_path} (ground truth {gt_path}): {error}") from error
    stq_result, vpq_result = stq.result(), vpq.result()
    summary = {key: stq_result[key] for key in ("STQ", "AQ", "SQ")}
    summary |= {key: vpq_result[key] for key in ("VPQ", "VPQ_thing", "VPQ_stuff")}
    details = {"per_sequence": stq_result["per_sequence"], "per_window": vpq_result["per_window"]}
    return summary | miou.result() | details


def format_table(result: dict) -> str:
    """A plain-text report of `evaluate_folders` output (STQ parts in [0, 1], VPQ x100)."""
    rows = [
        (str(sequence), seq["num_frames"], seq["num_tubes"], seq["STQ"], seq["AQ"], seq["SQ"])
        for sequence, seq in result["per_sequence"].items()
    ]
    frames, tubes = sum(row[1] for row in rows), sum(row[2] for row in rows)
    rows.append(("all", frames, tubes, result["STQ"], result["AQ"], result["SQ"]))
    lines = [f"{'sequence':<10} {'frames':>6} {'tubes':>5} {'STQ':>6} {'AQ':>6} {'SQ':>6}"]
    lines += ["{:<10} {:>6} {:>5} {:>6.3f} {:>6.3f} {:>6.3f}".format(*row) for row in rows]
    lines += ["", f"{'window':<10} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'PQ_thing':>8} {'PQ_stuff':>8}"]
    for size, window in result["per_window"].items():
        values = [window[key] for key in ("PQ", "SQ", "RQ", "PQ_thing", "PQ_stuff")]
        lines.append(
            "{:<10} {:>6.2f} {:>6.2f} {:>6.2f} {:>8.2f} {:>8.2f}".format(f"{size} frames", *values)
        )
    lines.append("VPQ {VPQ:.2f} (thing {VPQ_thing:.2f}, stuff {VPQ_stuff:.2f})".format(**result))
    lines.append(f"mIoU {result['mIoU']:.4f}")
    return "\n".join(lines)


def to_json(value):
    """Strict JSON values: NaN and infinities (which JSON lacks) become null, keys strings."""
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minivseg.metrics",
        description="STQ / VPQ / mIoU of KITTI-STEP-format panoptic PNG predictions.",
    )
    parser.add_argument("--gt", required=True, help="DIR/SEQ/FRAME.png or a KITTI-STEP root")
    parser.add_argument("--pred", required=True, help="same layout as --gt, same file names")
    parser.add_argument("--split", default="val", help="split under ROOT/panoptic_maps/")
    parser.add_argument("--json", help="also write the full result to this JSON file")
    args = parser.parse_args(argv)
    try:
        result = evaluate_folders(args.gt, args.pred, args.split)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
