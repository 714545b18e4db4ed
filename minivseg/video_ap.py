"""Video mask AP/AR of whole-video tracks with the YouTube-VIS rules (VisTR §4, ``ytvoseval.py``).

VisTR §4 evaluates by "average precision (AP) and average recall (AR), with the video
Intersection over Union (IoU) of the mask sequences as the threshold"; the paper numbers no
equation for it, and the rules below are those of YouTube-VIS's ``ytvoseval.py`` (COCO's, per
video instead of per image). Each track is scored over the whole video, so an identity switch in
the middle of a stitched video lowers AP (scoring short clips one by one would not see it).
Usage::

    video_ap = VideoAP(label_divisor=65536)        # stitched videos: track ids up to 65535
    for gt_video, pred_video, scores in videos:    # (F, H, W) ids semantic*65536 + instance
        video_ap.start_video()
        for gt, pred in zip(gt_video, pred_video): # one frame at a time
            video_ap.update_frame(gt, pred)        # predicted tracks: thing ids, instance > 0
        video_ap.end_video(scores)                 # {track id: score} for every track seen
        # or at once: video_ap.update_video(gt_video, pred_video, scores)
        # or as tubes that may overlap: video_ap.update(gt_video, [(mask, class, score), ...])
    video_ap.result()  # {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}

A detection is a predicted track over a whole video; its IoU with a ground-truth (GT) track is the
sequence IoU over all frames, ``Σ_t |p_t ∩ g_t| / Σ_t |p_t ∪ g_t|``. Per video and class, COCO's
``evaluateImg`` (ytvoseval's ``evaluateVid``) matches detections greedily in score order to the
free GT of highest IoU, and COCO's ``accumulate`` turns the matches of all videos into 101-point
interpolated precision at IoU 0.50:0.05:0.95. Crowd GT is "ignore": a detection matched to it is
neither a true nor a false positive, it is never a false negative, and it may match any number of
detections; as in ytvoseval its IoU is the plain sequence IoU (COCO's image crowd IoU divides by
the detection's area only), so a small detection inside a large crowd region is a false
positive. Area ranges compare ``avg_area``, the mean area over the frames where a track is
present (small up to 128² pixels, medium 128²-256², large above: YouTube-VIS's bounds;
``area_limits=(32**2, 96**2)`` gives COCO's): GT outside the range is ignored, and so is an
unmatched detection outside it. At most ``max_detections`` (100) detections per video and class
count; ``AR1``, ``AR10``, ``AR{max_detections}`` are the recall with that many detections per
video and class, averaged over IoU thresholds. Every number is a mean over the classes with GT
to find. Only per-video sums are kept (intersection of each detection with each GT, area and
number of frames of each track), so memory does not grow with the number of frames.

Deliberate differences from youtubevos/cocoapi ``ytvoseval.py`` / ``ytvos.py`` (f3f9948):
- input is panoptic ids ``semantic*label_divisor + instance``, not RLE JSON: GT tracks are thing
  ids with instance > 0; the thing pixels with instance 0 are one crowd region (``iscrowd=1``) per
  class and video; GT void pixels are background (a detection's pixels there count in its area);
- a predicted track with no pixel in any frame is no detection (ytvoseval would count an empty
  detection as a false positive); scores of ids never seen are not used;
- precision is ``TP / (TP + FP)`` exactly (0 before the first counted detection); ytvoseval adds
  ``np.spacing(1)`` to the denominator, which lowers a precision of 1/1 by one ulp;
- undefined numbers (no GT that is not ignored, ytvoseval's -1) are NaN; ARs/ARm/ARl are not
  reported; equal scores keep the detection order (track id, or list order for tubes) and the
  video order, as ytvoseval's stable sorts keep the order of its result file.

Checked against ``ytvoseval.py`` on 500 random video sets to 3.3e-16 (lesson 06, "Measured").
"""

from __future__ import annotations

import collections
import math

import numpy as np

from minivseg.pair_counting import PairCounter, merge_counts
from minivseg.panoptic import IGNORE_LABEL, LABEL_DIVISOR, NUM_CLASSES, THING_CLASSES

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # 0.50:0.05:0.95; index 0 is AP50, index 5 AP75
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # 101-point interpolation
YTVIS_AREA_LIMITS = (128**2, 256**2)  # ytvoseval small/medium/large bounds (COCO uses 32², 96²)


class VideoAP:
    """YouTube-VIS video mask AP/AR, fed frame by frame (`update_frame`) or by whole videos."""

    def __init__(
        self,
        num_classes=NUM_CLASSES,
        thing_classes=THING_CLASSES,
        label_divisor=LABEL_DIVISOR,
        max_detections=100,
        area_limits=YTVIS_AREA_LIMITS,
    ):
        if max_detections < 10:
            raise ValueError(f"max_detections {max_detections} must be >= 10 (AR1 and AR10)")
        self.num_classes, self.label_divisor = num_classes, label_divisor
        self.thing_classes, self.max_detections = tuple(thing_classes), max_detections
        small, large = area_limits
        # ytvoseval areaRng all, small, medium, large on avg_area; a range includes both ends
        self.area_ranges = ((0, 1e10), (0, small), (small, large), (large, 1e10))
        self._counter = PairCounter((IGNORE_LABEL + 1) * label_divisor)
        # (class, area range) -> one entry per video that has GT or detections of the class:
        # (scores (D,), matched (T, D), ignored (T, D), number of GT not ignored)
        self._evaluated = collections.defaultdict(list)
        self.start_video()

    # ---- per-video statistics

    def start_video(self) -> None:
        """Begin a new video (an unfinished one is discarded)."""
        self._gt = {}  # GT track or crowd id -> [area summed over frames, frames present]
        self._det = {}  # detection (track id, or tube index) -> [area, frames present]
        self._overlap = collections.Counter()  # (detection, GT id) -> Σ_t |p_t ∩ g_t|

    def update_frame(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add the next frame of the current video: ``gt, pred (H, W)`` panoptic ids. Predicted
        tracks are the thing ids with instance > 0."""
        gt_ids, pred_ids, counts = self._counter(gt, pred)  # checks shapes and the id range
        for name, ids in (("ground truth", gt_ids), ("prediction", pred_ids)):
            semantic = ids // self.label_divisor
            bad = semantic[(semantic >= self.num_classes) & (semantic != IGNORE_LABEL)]
            if bad.size:
                raise ValueError(
                    f"{name} has class ids {sorted(set(bad.tolist()))} outside "
                    f"0..{self.num_classes - 1} (or void {IGNORE_LABEL})"
                )
        gt_thing = np.isin(gt_ids // self.label_divisor, self.thing_classes)  # tracks and crowd
        track = np.isin(pred_ids // self.label_divisor, self.thing_classes)
        track &= pred_ids % self.label_divisor > 0
        _add_frame_areas(self._gt, *merge_counts(gt_ids[gt_thing], counts[gt_thing]))
        _add_frame_areas(self._det, *merge_counts(pred_ids[track], counts[track]))
        both = gt_thing & track
        for g, p, n in zip(gt_ids[both].tolist(), pred_ids[both].tolist(), counts[both].tolist()):
            self._overlap[p, g] += n

    def end_video(self, scores: dict) -> None:
        """Score the current video. ``scores`` maps every predicted track id seen in it to its
        score (its class is ``id // label_divisor``)."""
        scores = {int(track): float(score) for track, score in scores.items()}
        missing = sorted(set(self._det) - set(scores))
        if missing:
            raise ValueError(f"no score for predicted track ids {missing}")
        tracks = sorted(self._det)
        self._score_video([(t, t // self.label_divisor, scores[t]) for t in tracks])

    def update_video(self, gt_video: np.ndarray, pred_video: np.ndarray, scores: dict) -> None:
        """Add one whole video: ``gt_video, pred_video (F, H, W)`` panoptic ids, ``scores`` as in
        `end_video`."""
        gt_video, pred_video = np.asarray(gt_video), np.asarray(pred_video)
        if gt_video.shape != pred_video.shape or gt_video.ndim != 3:
            shapes = f"{gt_video.shape} and {pred_video.shape}"
            raise ValueError(f"expected two (F, H, W) videos of one shape, got {shapes}")
        self.start_video()
        for gt, pred in zip(gt_video, pred_video):
            self.update_frame(gt, pred)
        self.end_video(scores)

    def update(self, gt_video: np.ndarray, tubes) -> None:
        """Add one whole video: ``gt_video (F, H, W)`` panoptic ids and a list of predicted tubes
        ``(mask (F, H, W) bool, class id, score)``, which may overlap; each is one detection."""
        gt_video, tubes = np.asarray(gt_video), list(tubes)
        bad = sorted({int(tube[1]) for tube in tubes if not 0 <= tube[1] < self.num_classes})
        if bad:
            raise ValueError(f"predicted class ids {bad} outside 0..{self.num_classes - 1}")
        if gt_video.ndim != 3:
            raise ValueError(f"expected an (F, H, W) ground-truth video, got {gt_video.shape}")
        masks = [np.asarray(tube[0], dtype=bool) for tube in tubes]
        for k, mask in enumerate(masks):
            if mask.shape != gt_video.shape:
                raise ValueError(f"tube {k}: mask shape {mask.shape} != video {gt_video.shape}")
        self.start_video()
        no_tracks = np.zeros(gt_video.shape[1:], dtype=np.int64)  # instance 0: never a track
        for gt in gt_video:
            self.update_frame(gt, no_tracks)
        for k, mask in enumerate(masks):
            per_frame = mask.sum(axis=(1, 2))  # (F,)
            self._det[k] = [int(per_frame.sum()), int(np.count_nonzero(per_frame))]
            ids, counts = np.unique(gt_video[mask], return_counts=True)
            for g, n in zip(ids.tolist(), counts.tolist()):
                if g in self._gt:
                    self._overlap[k, g] += n
        self._score_video([(k, int(c), float(s)) for k, (_, c, s) in enumerate(tubes)])

    # ---- evaluateImg, per video and class

    def _score_video(self, detections) -> None:
        """Match ``[(key, class, score)]`` to the video's GT at every threshold and area range."""
        divisor = self.label_divisor
        classes = sorted({g // divisor for g in self._gt} | {c for _, c, _ in detections})
        for class_id in classes:
            dets = [d for d in detections if d[1] == class_id]
            order = np.argsort([-score for _, _, score in dets], kind="stable")
            dets = [dets[i] for i in order[: self.max_detections]]  # maxDets per video and class
            gts = sorted(g for g in self._gt if g // divisor == class_id)
            det_stats = np.array([self._det[k] for k, _, _ in dets], dtype=np.int64).reshape(-1, 2)
            gt_stats = np.array([self._gt[g] for g in gts], dtype=np.int64).reshape(-1, 2)
            overlap = [[self._overlap[k, g] for g in gts] for k, _, _ in dets]
            overlap = np.array(overlap, dtype=np.int64).reshape(len(dets), len(gts))
            # sequence IoU = Σ_t |p_t ∩ g_t| / Σ_t |p_t ∪ g_t|, the union being |p| + |g| - overlap
            iou = overlap / (det_stats[:, :1] + gt_stats[:, 0] - overlap)  # (D, G)
            crowd = np.array([g % divisor == 0 for g in gts], dtype=bool)  # iscrowd -> ignore
            det_area, gt_area = _average_area(det_stats), _average_area(gt_stats)
            scores = np.array([score for _, _, score in dets], dtype=np.float64)
            for area_index, (low, high) in enumerate(self.area_ranges):
                gt_ignore = crowd | (gt_area < low) | (gt_area > high)
                matched, ignored = _match(iou, gt_ignore, crowd)
                ignored |= ~matched & ((det_area < low) | (det_area > high))  # unmatched, outside
                entry = (scores, matched, ignored, int(np.count_nonzero(~gt_ignore)))
                self._evaluated[class_id, area_index].append(entry)
        self.start_video()

    # ---- accumulate and summarize

    def _precision_recall(self, class_id: int, area_index: int, max_detections: int):
        """``(T, R)`` interpolated precision and ``(T,)`` recall; None without GT to find."""
        videos = self._evaluated.get((class_id, area_index), [])
        num_gt = sum(video[3] for video in videos)
        if num_gt == 0:
            return None
        scores = np.concatenate([video[0][:max_detections] for video in videos])
        order = np.argsort(-scores, kind="mergesort")  # all videos, highest score first
        matched = np.concatenate([video[1][:, :max_detections] for video in videos], 1)[:, order]
        ignored = np.concatenate([video[2][:, :max_detections] for video in videos], 1)[:, order]
        true_pos = np.cumsum(matched & ~ignored, axis=1)  # (T, D)
        false_pos = np.cumsum(~matched & ~ignored, axis=1)
        recall = true_pos / num_gt
        counted = true_pos + false_pos
        precision = np.divide(true_pos, counted, out=np.zeros(counted.shape), where=counted > 0)
        # precision envelope: p_interp(r) = max_{r' >= r} p(r')
        precision = np.flip(np.maximum.accumulate(np.flip(precision, 1), axis=1), 1)
        interpolated = np.zeros((len(IOU_THRESHOLDS), len(RECALL_POINTS)))
        for t in range(len(IOU_THRESHOLDS)):
            index = np.searchsorted(recall[t], RECALL_POINTS, side="left")
            reached = index < len(scores)  # recall points beyond the last detection stay 0
            interpolated[t, reached] = precision[t, index[reached]]
        final_recall = recall[:, -1] if len(scores) else np.zeros(len(IOU_THRESHOLDS))
        return interpolated, final_recall

    def result(self) -> dict:
        """``AP`` (mean over IoU 0.50:0.05:0.95 and 101 recall points), ``AP50``, ``AP75``,
        ``APs``/``APm``/``APl`` (GT avg_area small, medium, large), and ``AR1``, ``AR10``,
        ``AR{max_detections}`` (recall with that many detections per video and class, mean over
        IoU thresholds), each a mean over the classes with GT that is not ignored (area range
        "all" and ``max_detections`` where not named); NaN where no class has such GT."""
        classes = sorted({class_id for class_id, _ in self._evaluated})

        def mean(area_index, max_detections, part, iou=slice(None)):
            curves = [self._precision_recall(c, area_index, max_detections) for c in classes]
            values = [curve[part][iou] for curve in curves if curve is not None]
            return float(np.mean(values)) if values else math.nan

        top = self.max_detections
        return {
            "AP": mean(0, top, 0),
            "AP50": mean(0, top, 0, 0),
            "AP75": mean(0, top, 0, 5),
            "APs": mean(1, top, 0),
            "APm": mean(2, top, 0),
            "APl": mean(3, top, 0),
            "AR1": mean(0, 1, 1),
            "AR10": mean(0, 10, 1),
            f"AR{top}": mean(0, top, 1),
        }


def _add_frame_areas(stats: dict, ids: np.ndarray, areas: np.ndarray) -> None:
    """Add one frame: ``stats[id] = [area summed over frames, frames where present]``."""
    for track, area in zip(ids.tolist(), areas.tolist()):
        total = stats.setdefault(track, [0, 0])
        total[0] += area
        total[1] += 1


def _average_area(stats: np.ndarray) -> np.ndarray:
    """ytvos avg_area: mean area over the frames where the track is present, 0 if never."""
    return np.divide(stats[:, 0], stats[:, 1], out=np.zeros(len(stats)), where=stats[:, 1] > 0)


def _match(iou: np.ndarray, gt_ignore: np.ndarray, crowd: np.ndarray):
    """COCO evaluateImg greedy matching of ``(D, G)`` IoUs, detections highest score first ->
    ``matched, ignored (T, D)`` bool (a detection matched to an ignored GT is ignored)."""
    matched = np.zeros((len(IOU_THRESHOLDS), len(iou)), dtype=bool)
    ignored = np.zeros_like(matched)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(len(gt_ignore), dtype=bool)
        for d in range(len(iou)):
            # A GT can match once; a crowd region any number of times. IoU >= t is a match.
            free = (iou[d] >= min(threshold, 1 - 1e-10)) & (crowd | ~taken)
            # A GT that is not ignored wins over any ignored one, whatever their IoUs.
            pool = free & ~gt_ignore if (free & ~gt_ignore).any() else free
            if pool.any():
                g = np.flatnonzero(pool & (iou[d] == iou[d, pool].max()))[-1]  # tie: later GT
                taken[g], matched[t, d], ignored[t, d] = True, True, gt_ignore[g]
    return matched, ignored
