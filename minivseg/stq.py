"""Segmentation and Tracking Quality, ``STQ = sqrt(AQ · SQ)``, accumulated frame by frame.

STQ is defined in STEP (Weber et al. 2021, "STEP: Segmenting and Tracking Every Pixel") §4 and
is KITTI-STEP's metric in TubeFormer-DeepLab §4.1 ("the geometric mean of SQ and AQ"). With GT
tubes ``g`` and predicted tubes ``p`` pooled over all frames of a sequence, in pixels:

    IoU(p, g) = TPA / (TPA + FPA + FNA)             TPA(p, g) = |p ∩ g|
    AQ = 1/|G| Σ_g 1/|g| Σ_{p: |p∩g| > 0} TPA(p, g) · IoU(p, g)
    SQ = mean class IoU (blind to ids),             STQ = sqrt(AQ · SQ)

AQ measures who is who, SQ what is where; neither needs a matching threshold (lesson 06 works
examples). Usage::

    stq = STQ(NUM_CLASSES, THING_CLASSES)          # label_divisor=1000, ignore_label=255
    for gt, pred in zip(gt_video, pred_video):     # (H, W) ids semantic*1000 + instance
        stq.update(gt, pred, sequence_id=name)     # one frame at a time
    stq.result()  # {"STQ", "AQ", "SQ", "per_sequence": {name: {"STQ", "AQ", "SQ",
                  #                                           "num_frames", "num_tubes"}}}

STQ, AQ and SQ lie in [0, 1], as deeplab2 prints them. The numbers equal deeplab2's numpy
``STQuality`` (evaluation/numpy/segmentation_and_tracking_quality.py), conventions included:

- a thing pixel with instance 0 is crowd and is left out of association on both sides (GT and
  prediction); a tube id is the full panoptic id, so one instance number under two classes is
  two tubes;
- predicted thing pixels on GT void or stuff enlarge the predicted tube (they cost AQ);
- predictions on GT void do not count in SQ, but a void prediction on a labelled pixel enters
  SQ as an extra "void" class of IoU 0 (`MeanIoU` counts it only as a miss);
- AQ is pooled by tube over all sequences (Σ_seq AQ_seq / Σ_seq #tubes); SQ comes from the
  confusion matrix summed over sequences, averaged over the classes with non-zero union;
- with no GT tube at all, AQ and so STQ are 0.

Deliberate differences from deeplab2:

- ids are ``semantic * label_divisor + instance``; deeplab2 encodes them by bit shift;
- counts are exact int64; deeplab2's numpy STQ under NumPy >= 2 (NEP 50 promotion) accumulates
  areas and AQ in float32 and then differs from ours by up to 9.2e-8 (AQ 0.52000004 for 0.52);
  run with float64 areas it agrees to 3.3e-16 (lesson 06, "Measured");
- ``ignore_label`` must be >= ``num_classes`` (see `minivseg.pair_counting`).

STEP's text is not among this project's papers/, so its equations are written out here rather
than cited by number.
"""

from __future__ import annotations

import collections
import math

import numpy as np
from einops import rearrange

from minivseg.pair_counting import PanopticMetric, class_iou, merge_counts, nanmean
from minivseg.panoptic import IGNORE_LABEL, LABEL_DIVISOR


class STQ(PanopticMetric):
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
        iou = tpa / (g_area + p_area - tpa)  # STEP §4: IoU(p, g) = TPA / (TPA + FPA + FNA)
        # STEP §4, AQ before dividing by the number of tubes: Σ_g 1/|g| Σ_p TPA(p,g)·IoU(p,g)
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
            sq = nanmean(class_iou(confusion))  # the void column stays in: deeplab2 convention
            per_sequence[sequence_id] = {
                "STQ": math.sqrt(aq * sq),
                "AQ": aq,
                "SQ": sq,
                "num_frames": self._num_frames[sequence_id],
                "num_tubes": num_tubes,
            }
        aq = total_aq / total_tubes if total_tubes else 0.0  # pooled by tube, not by sequence
        sq = nanmean(class_iou(total_confusion))  # STEP §4: SQ = mIoU
        # STEP §4: STQ = sqrt(AQ · SQ)
        return {"STQ": math.sqrt(aq * sq), "AQ": aq, "SQ": sq, "per_sequence": per_sequence}
