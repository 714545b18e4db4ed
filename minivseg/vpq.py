"""Video Panoptic Quality: panoptic quality of tubes over windows of 1-4 consecutive frames.

VPQ is defined in VPSNet (Kim et al. 2020, "Video Panoptic Segmentation"); TubeFormer-DeepLab
reports it on KITTI-STEP in §5 (Tab. 8). The numbers equal the official VPSNet
``tools/eval_vpq.py`` (mcahny/vps, 72d59ab3 "fix data tampering in vpq evaluation" or later;
older versions summed areas across windows) on the same frames. For a window size k, with
classes c, tubes u (GT) and û (prediction) stacked over the window's frames:

    VPQ^k = 1/|C| Σ_c Σ_{(u, û) ∈ TP_c} IoU(u, û) / (|TP_c| + ½|FP_c| + ½|FN_c|)
    VPQ = ¼ Σ_{k=1..4} VPQ^k

Usage::

    vpq = VPQ(NUM_CLASSES, THING_CLASSES)          # window_sizes=(1, 2, 3, 4)
    vpq.update(gt_video, pred_video)               # (T, H, W) ids, one whole video at a time
    vpq.start_video(); vpq.update_frame(gt, pred)  # or stream a long video frame by frame
    vpq.result()  # {"VPQ", "VPQ_thing", "VPQ_stuff", "per_window": {1: {"PQ", "SQ", "RQ",
                  #   "PQ_thing", ..., "PQ_per_class"}, 2: ...}}, all x100 as VPSNet prints them

The rules are the official code's:

- windows of k consecutive frames slide by one over each video (never across two videos); a
  tube is a segment stacked over the window's frames, so a tube counts once per window;
- a GT/prediction pair of the same class matches when tube IoU > 0.5, the union discounting
  the prediction's overlap with GT void;
- crowd is never a false negative; an unmatched prediction is not a false positive when more
  than half of it lies on GT void plus same-class crowd;
- IoU/TP/FP/FN are summed per class over all windows of all videos; PQ is the mean over the
  classes present (TP + FP + FN > 0), split into things and stuff; VPQ is the mean over window
  sizes.

Our ids map to its segments as follows: a panoptic id is a segment, every void id
``255*1000 + x`` is VOID, a GT thing pixel with instance 0 is the crowd segment of its class, and
all pixels of one stuff class (whatever their instance number) are one segment, in GT and
prediction alike.

Where this differs from upstream: a thing/stuff group with no class present gives NaN (the
official code divides by zero), so a window size longer than every video also gives NaN.

deeplab2's TF ``VideoPanopticQuality`` (evaluation/video_panoptic_quality.py) is a different
number: it scores whatever frames the caller concatenates side by side (its trainer logs only
2-frame windows), treats only the id ``ignore * max_instances`` as void, has no crowd (crowd must
be pre-encoded as void) and reports no thing/stuff split; its own docstring says it "may give a
bit higher VPQ". Use the official numbers (these) to compare with papers.

VPSNet's text is not among this project's papers/, so the formula is written out here rather
than cited by number.
"""

from __future__ import annotations

import collections

import numpy as np

from minivseg.pair_counting import PanopticMetric, merge_counts, nanmean
from minivseg.panoptic import IGNORE_LABEL, LABEL_DIVISOR


class VPQ(PanopticMetric):
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
        match = same_class & ~gt_void[g] & ~gt_crowd[g] & (iou > 0.5)  # TP: tube IoU > 0.5
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
        # VPQ^k per class: PQ_c = ΣIoU / (TP + FP/2 + FN/2) = SQ_c · RQ_c, SQ_c = ΣIoU / TP (0 if
        # no TP); summed over all windows of size k before dividing, as eval_vpq.py does
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
                result[name + suffix] = nanmean(values[group])
        return result

    def result(self) -> dict:
        """``VPQ``, ``VPQ_thing``, ``VPQ_stuff`` (x100, mean over window sizes), ``per_window``."""
        per_window = {size: self._window_result(self._stats[size]) for size in self.window_sizes}
        # VPQ = mean over window sizes k of VPQ^k
        result = {
            f"VPQ{suffix}": float(np.mean([per_window[s]["PQ" + suffix] for s in per_window]))
            for suffix in ("", "_thing", "_stuff")
        }
        return result | {"per_window": per_window}
