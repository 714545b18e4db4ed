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
- Unmatched tubes start new tracks. Track ids count up from 1 per class, in the order tracks are
  first *shown*, and are never reused: a tube that is never shown (say, one seen only in a clip's
  last frame, which the next clip then replaces) spends no id. The video is written with
  ``VIDEO_LABEL_DIVISOR = 65536``, not the clips' 1000: a long sequence can need more than 999
  ids per class (a car whose confidence flickers around the threshold starts a new track at
  every detection, about one per two frames); with it a class can hold 65535 tracks, the most a
  KITTI-STEP PNG holds; only the 65536th raises ``ValueError``, which says what to do.
  ``video_label_divisor=1000`` writes the clips' format.
- Each shown track gets a score for video AP: the mean, over the frames that show it, of the
  score its tube had in the clip that showed the frame (TubeFormer: the slot's class confidence).
- A frame covered by several clips shows the newest clip's prediction. This is ViP-DeepLab's
  choice (frame t comes from the pair starting at t, with ids propagated from the previous pair),
  and it means the pixels used to link clip i are exactly the ones the video shows.
- With no overlap (stride = T, e.g. T = 1) nothing can be linked: every tube starts a new track.

Differences from deeplab2's ViP-DeepLab stitcher (model/post_processor/vip_deeplab.py): that one
links a single overlapping frame by mutual-best IoU and offsets unmatched ids by
label_divisor // 2; here all overlapping frames are used, the assignment is Hungarian, and new
ids come from a per-class counter.

`VideoStitcher` is the streaming form (clips in, final frames out; it holds only the T − stride
shared frames); `stitch_clips` runs it over a list of clips; `sliding_clips(frames, num_frames,
T, stride)` cuts a stream of frames into the clips (the end padded by repeating the last frame),
reading each frame once and holding only the frames a clip still needs. Usage::

    video = stitch_clips(clip_panoptics, stride=1)  # list of (T, H, W) -> (F, H, W) int64 ids
                                                    # semantic * 65536 + track
    stitcher = VideoStitcher(clip_length=2, stride=1)
    for clip, scores in clips_with_scores:          # scores: {clip tube id: confidence}
        for t, frame in stitcher.add(clip, scores): # the frames no later clip can change
            ...
    for t, frame in stitcher.finish():              # the last T − stride frames
        ...
    stitcher.scores()                               # {track id: mean score over shown frames}
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from minivseg.panoptic import LABEL_DIVISOR, THING_CLASSES, VIDEO_LABEL_DIVISOR, tube_ids

TRACK_SPACE = 1 << 40  # label divisor of the provisional track ids kept while stitching


def clip_starts(num_frames: int, clip_length: int, stride: int = 1) -> list[int]:
    """First frame of every clip: 0, stride, ... up to the first clip that reaches the end."""
    last = max(math.ceil((num_frames - clip_length) / stride), 0) * stride
    return list(range(0, last + 1, stride))


def sliding_clips(frames, num_frames: int, clip_length: int, stride: int = 1, batch_size: int = 1):
    """Cut a stream of ``num_frames`` frames ``(3, H, W)`` into clips, ``batch_size`` at a time.

    Yields ``(starts, clips (B, T, 3, H, W), valid (B,))``: clip i holds frames
    [starts[i], starts[i] + T), the end of the video padded by repeating its last frame (as
    VisTR's inference does); ``valid`` counts the real frames. Frames are pulled from ``frames``
    only when a clip needs them and dropped when no later clip does, so at most
    ``(batch_size − 1)·stride + T`` frames are held.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    frames, held, pulled = iter(frames), {}, 0
    starts = clip_starts(num_frames, clip_length, stride)
    for k in range(0, len(starts), batch_size):
        batch = starts[k : k + batch_size]
        indices = [[min(s + j, num_frames - 1) for j in range(clip_length)] for s in batch]
        while pulled <= indices[-1][-1]:
            held[pulled] = next(frames, None)
            if held[pulled] is None:
                raise ValueError(f"the video ended after {pulled} of {num_frames} frames")
            pulled += 1
        clips = torch.stack([torch.stack([held[i] for i in row]) for row in indices])
        yield batch, clips, [min(clip_length, num_frames - s) for s in batch]
        for i in [i for i in held if i < batch[-1] + stride]:
            del held[i]


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


def link_tubes(
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


class VideoStitcher:
    """Link clips into a video as they come; frames are handed out as soon as they are final.

    Clip i covers frames [i·stride, i·stride + T). After `add` of clip i, the frames before
    (i + 1)·stride are final (no later clip covers them) and are returned; `finish` returns the
    rest. Only the T − stride overlapping frames are kept, with provisional track ids; a track
    gets its video id (``semantic * video_label_divisor + track``) when a final frame shows it.
    ``num_frames``: the video's length, when its last clip is padded past the end; padding
    frames are dropped and spend no ids.
    """

    def __init__(
        self,
        clip_length: int,
        stride: int = 1,
        thing_classes=THING_CLASSES,
        label_divisor: int = LABEL_DIVISOR,
        video_label_divisor: int = VIDEO_LABEL_DIVISOR,
        min_iou: float = 0.0,
        num_frames: int | None = None,
    ):
        if not 1 <= stride <= clip_length:
            raise ValueError(
                f"stride must lie in 1..T={clip_length} (no gaps between clips), got {stride}"
            )
        if video_label_divisor < label_divisor:
            raise ValueError(f"video_label_divisor {video_label_divisor} < {label_divisor}")
        self.clip_length, self.stride, self.min_iou = clip_length, stride, min_iou
        self.thing_classes = tuple(thing_classes)
        self.label_divisor, self.video_label_divisor = label_divisor, video_label_divisor
        self.num_clips, self.num_final, self.shape, self.finished = 0, 0, None, False
        self.num_frames = num_frames
        self._pending = []  # (frame in provisional ids, {provisional id: score}) not yet final
        self._provisional = 0  # provisional track ids are counted over all classes
        self._video_id = {}  # provisional id -> video id, for tracks already shown
        self._next_track = dict.fromkeys(self.thing_classes, 1)
        self._score = {}  # video id -> [sum of frame scores, frames shown]

    def add(self, clip, scores: dict | None = None) -> list[tuple[int, np.ndarray]]:
        """Add the next clip ``(T, H, W)`` (numpy or torch) of panoptic ids in ``label_divisor``.

        ``scores``: {clip tube id: score} for every tube of the clip (omit when not needed).
        Returns the frames that became final: ``[(frame index, (H, W) int64 video ids)]``.
        """
        if self.finished:
            raise ValueError("add after finish: start a new VideoStitcher for the next video")
        clip = np.asarray(clip.detach().cpu() if isinstance(clip, torch.Tensor) else clip)
        if self.shape is None:
            self.shape = clip.shape
        if clip.ndim != 3 or clip.shape != self.shape or clip.shape[0] != self.clip_length:
            raise ValueError(
                f"every clip must be (T={self.clip_length}, H, W) with one shape: clip"
                f" {self.num_clips} is {clip.shape}, the first was {self.shape}"
            )
        semantic, instance = np.divmod(clip.astype(np.int64), self.label_divisor)
        clip = semantic * TRACK_SPACE + instance  # the clip's own ids, in the provisional space
        overlap = self.clip_length - self.stride if self.num_clips else 0
        shown = np.stack([frame for frame, _ in self._pending[:overlap]]) if overlap else clip[:0]
        links = link_tubes(shown, clip[:overlap], self.thing_classes, TRACK_SPACE, self.min_iou)
        clip_ids = tube_ids(clip, self.thing_classes, TRACK_SPACE)
        track_ids = np.empty_like(clip_ids)
        for k, clip_id in enumerate(clip_ids.tolist()):
            if clip_id not in links:  # a new track (§3.4: unmatched tubes start new ids)
                self._provisional += 1
                links[clip_id] = clip_id // TRACK_SPACE * TRACK_SPACE + self._provisional
            track_ids[k] = links[clip_id]
        frame_scores = {}
        if scores is not None:
            own = {int(k) // self.label_divisor * TRACK_SPACE + int(k) % self.label_divisor: v
                   for k, v in scores.items()}  # fmt: skip
            missing = [int(c // TRACK_SPACE * self.label_divisor + c % TRACK_SPACE)
                       for c in clip_ids.tolist() if c not in own]  # fmt: skip
            if missing:
                raise ValueError(f"clip {self.num_clips}: no score for tube ids {missing}")
            frame_scores = {links[c]: float(own[c]) for c in clip_ids.tolist()}
        index = _index_in(clip_ids, clip)  # −1 selects the appended 0, then ``clip`` is kept
        clip = np.where(index >= 0, np.append(track_ids, 0)[index], clip)
        start = self.num_clips * self.stride  # newest clip wins on the frames it shares
        self._pending = self._pending[: start - self.num_final]
        self._pending += [(frame, frame_scores) for frame in clip]
        self.num_clips += 1
        return self._emit(start + self.stride)

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """The frames still held (the end of the video)."""
        self.finished = True
        return self._emit(self.num_final + len(self._pending))

    def scores(self) -> dict[int, float]:
        """{video track id: mean score over the frames showing it} of the tracks shown so far."""
        return {track: total / count for track, (total, count) in self._score.items()}

    def _emit(self, end: int) -> list[tuple[int, np.ndarray]]:
        out = []
        while self.num_final < end and self._pending:
            frame, frame_scores = self._pending.pop(0)
            if self.num_frames is None or self.num_final < self.num_frames:  # else padding
                out.append((self.num_final, self._to_video_ids(frame, frame_scores)))
            self.num_final += 1
        return out

    def _to_video_ids(self, frame: np.ndarray, frame_scores: dict) -> np.ndarray:
        """Provisional ids -> video ids; a track shown for the first time gets the next id."""
        tracks = tube_ids(frame, self.thing_classes, TRACK_SPACE)
        video_ids = np.empty_like(tracks)
        for k, track in enumerate(tracks.tolist()):
            if track not in self._video_id:
                semantic = track // TRACK_SPACE
                number = self._next_track[semantic]
                if number >= self.video_label_divisor:
                    raise ValueError(
                        f"class {semantic} needs track id {number} at frame {self.num_final}, but"
                        f" video_label_divisor={self.video_label_divisor} holds ids up to"
                        f" {self.video_label_divisor - 1} (a KITTI-STEP PNG holds up to 65535):"
                        " stitch and write the sequence in shorter pieces"
                    )
                self._video_id[track] = semantic * self.video_label_divisor + number
                self._next_track[semantic] = number + 1
            video_ids[k] = self._video_id[track]
            if track in frame_scores:
                total = self._score.setdefault(int(video_ids[k]), [0.0, 0])
                total[0], total[1] = total[0] + frame_scores[track], total[1] + 1
        semantic, instance = np.divmod(frame, TRACK_SPACE)
        index = _index_in(tracks, frame)
        others = semantic * self.video_label_divisor + instance  # stuff, crowd, void
        return np.where(index >= 0, np.append(video_ids, 0)[index], others)


def stitch_clips(
    clip_panoptics,
    stride: int = 1,
    thing_classes=THING_CLASSES,
    label_divisor: int = LABEL_DIVISOR,
    min_iou: float = 0.0,
    video_label_divisor: int = VIDEO_LABEL_DIVISOR,
) -> np.ndarray:
    """Stitch clip panoptic maps into one video with track ids consistent over all frames.

    clip_panoptics: list of (T, H, W) int arrays (numpy or torch) in ``label_divisor``; clip i
    covers frames [i·stride, i·stride + T), with 1 ≤ stride ≤ T. Returns (F, H, W) int64 ids
    ``semantic * video_label_divisor + track``, F = (n−1)·stride + T.
    """
    clips = list(clip_panoptics)
    if not clips:
        raise ValueError("stitch_clips needs at least one clip")
    if len(clips[0].shape) != 3:  # the stitcher checks every other clip against this one
        raise ValueError(f"every clip must be (T, H, W) with one shape, got {clips[0].shape}")
    stitcher = VideoStitcher(
        clips[0].shape[0], stride, thing_classes, label_divisor, video_label_divisor, min_iou
    )
    frames = [frame for clip in clips for _, frame in stitcher.add(clip)]
    return np.stack(frames + [frame for _, frame in stitcher.finish()])
