"""Clip-to-video stitching: link the tubes of overlapping clips into video-long tracks by IoU.

TubeFormer-DeepLab §3.4 ("Video-level inference"): clip inference runs on every T consecutive
frames, moving one frame at a time (T − 1 overlapping frames), and the clip results "are stitched
together by matching tubes in the overlapping frames based on their IoUs, similar to [ViP-DeepLab]".
Clip ``i`` covers frames ``[i·stride, i·stride + T)``. The rules, all deliberate:

- A *tube* is a (thing class, instance > 0) id of a clip. Stuff, crowd (thing, instance 0) and
  void pixels pass through unchanged.
- A new clip's tubes are matched to the video tracks shown on the T − stride overlapping frames,
  with IoU taken over those frames jointly (3-D pixel sets), same class only. The assignment
  maximises the total IoU (Hungarian, ``scipy.optimize.linear_sum_assignment``); a pair is linked
  only when its IoU > ``min_iou`` (default 0: any overlap links).
- Unmatched tubes start new tracks. Track ids count up from 1 per class and are never reused; an
  id that would reach ``label_divisor`` raises ``ValueError``.
- A frame covered by several clips shows the newest clip's prediction. This is ViP-DeepLab's
  choice (frame t comes from the pair starting at t, with ids propagated from the previous pair),
  and it means the pixels used to link clip i are exactly the ones the video shows.
- With no overlap (stride = T, e.g. T = 1) nothing can be linked: every tube starts a new track.

Differences from deeplab2's ViP-DeepLab stitcher (model/post_processor/vip_deeplab.py): that one
links a single overlapping frame by mutual-best IoU and offsets unmatched ids by
label_divisor // 2; here all overlapping frames are used, the assignment is Hungarian, and new
ids come from a per-class counter.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from minivseg.panoptic import LABEL_DIVISOR, THING_CLASSES


def tube_ids(panoptic: np.ndarray, thing_classes=THING_CLASSES, label_divisor=LABEL_DIVISOR):
    """Sorted panoptic ids of the tubes (thing class, instance > 0) present in ``panoptic``."""
    ids = np.unique(panoptic)
    is_tube = np.isin(ids // label_divisor, thing_classes) & (ids % label_divisor > 0)
    return ids[is_tube]


def _index_in(ids: np.ndarray, panoptic: np.ndarray) -> np.ndarray:
    """Index of every pixel's id in the sorted ``ids``, or −1 where its id is not among them."""
    if len(ids) == 0:
        return np.full(panoptic.shape, -1)
    index = np.searchsorted(ids, panoptic).clip(max=len(ids) - 1)
    return np.where(ids[index] == panoptic, index, -1)


def tube_iou(a_ids, a: np.ndarray, b_ids, b: np.ndarray) -> np.ndarray:
    """IoU between every tube of ``a_ids`` in ``a`` and of ``b_ids`` in ``b`` (same pixel grid).

    a, b: (T, H, W) panoptic maps over the same frames. Returns (len(a_ids), len(b_ids)).
    """
    a_index, b_index = _index_in(a_ids, a), _index_in(b_ids, b)
    a_area = np.bincount(a_index[a_index >= 0], minlength=len(a_ids))
    b_area = np.bincount(b_index[b_index >= 0], minlength=len(b_ids))
    both = (a_index >= 0) & (b_index >= 0)
    pair = a_index[both] * len(b_ids) + b_index[both]
    intersection = np.bincount(pair, minlength=len(a_ids) * len(b_ids))
    intersection = intersection.reshape(len(a_ids), len(b_ids))
    union = a_area[:, None] + b_area[None, :] - intersection
    return intersection / np.maximum(union, 1)


def match_tubes(
    shown: np.ndarray,
    clip: np.ndarray,
    thing_classes=THING_CLASSES,
    label_divisor: int = LABEL_DIVISOR,
    min_iou: float = 0.0,
) -> dict[int, int]:
    """Link the tubes of ``clip`` to the tracks of ``shown`` on the same (overlapping) frames.

    Returns {clip tube id: video track id}, one-to-one, same class, IoU > min_iou, chosen to
    maximise the total IoU.
    """
    video_ids = tube_ids(shown, thing_classes, label_divisor)
    clip_ids = tube_ids(clip, thing_classes, label_divisor)
    iou = tube_iou(clip_ids, clip, video_ids, shown)  # (clip tubes, video tracks)
    same_class = clip_ids[:, None] // label_divisor == video_ids[None, :] // label_divisor
    iou = np.where(same_class & (iou > min_iou), iou, 0.0)
    # §3.4: tubes matched "in the overlapping frames based on their IoUs"; max total IoU.
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return {int(clip_ids[r]): int(video_ids[c]) for r, c in zip(rows, cols) if iou[r, c] > 0}


def stitch_clips(
    clip_panoptics,
    stride: int = 1,
    thing_classes=THING_CLASSES,
    label_divisor: int = LABEL_DIVISOR,
    min_iou: float = 0.0,
) -> np.ndarray:
    """Stitch clip panoptic maps into one video with track ids consistent over all frames.

    clip_panoptics: list of (T, H, W) int arrays (numpy or torch); clip i covers frames
    [i·stride, i·stride + T), with 1 ≤ stride ≤ T. Returns (F, H, W) int64, F = (n−1)·stride + T.
    """
    clips = [
        np.asarray(c.detach().cpu() if isinstance(c, torch.Tensor) else c) for c in clip_panoptics
    ]
    if not clips:
        raise ValueError("stitch_clips needs at least one clip")
    shape = clips[0].shape
    if len(shape) != 3 or any(c.shape != shape for c in clips):
        raise ValueError(
            f"every clip must be (T, H, W) with one shape, got {[c.shape for c in clips]}"
        )
    num_frames = shape[0]
    if not 1 <= stride <= num_frames:
        raise ValueError(
            f"stride must lie in 1..T={num_frames} (no gaps between clips), got {stride}"
        )
    video = np.zeros(((len(clips) - 1) * stride + num_frames, *shape[1:]), dtype=np.int64)
    next_id = dict.fromkeys(thing_classes, 1)
    for i, clip in enumerate(clips):
        clip = clip.astype(np.int64)
        start = i * stride
        overlap = num_frames - stride if i > 0 else 0
        links = match_tubes(
            video[start : start + overlap], clip[:overlap], thing_classes, label_divisor, min_iou
        )
        clip_ids = tube_ids(clip, thing_classes, label_divisor)
        video_ids = np.empty_like(clip_ids)
        for k, clip_id in enumerate(clip_ids.tolist()):
            if clip_id in links:
                video_ids[k] = links[clip_id]
                continue
            semantic = clip_id // label_divisor
            if next_id[semantic] >= label_divisor:
                raise ValueError(
                    f"class {semantic} needs track id {next_id[semantic]} in clip {i}, which does"
                    f" not fit under label_divisor={label_divisor}: use a larger divisor or a"
                    " shorter video"
                )
            video_ids[k] = semantic * label_divisor + next_id[semantic]
            next_id[semantic] += 1
        index = _index_in(clip_ids, clip)  # −1 selects the appended 0, then ``clip`` is kept
        video[start : start + num_frames] = np.where(
            index >= 0, np.append(video_ids, 0)[index], clip
        )
    return video
