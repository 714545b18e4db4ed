"""VSPW's video consistency VC_n: how often a prediction stays constant where the GT does.

VSPW (Miao et al., CVPR 2021) scores video scene parsing by mIoU and by VC_n (n = 8, 16; the
"mVC8 / mVC16" columns of TubeFormer-DeepLab Tab. 2-3). For a window of n consecutive frames
i..i+n-1 with GT maps S and predicted maps S':

    stable_i    = {pixels p : S_i(p) = S_{i+1}(p) = ... = S_{i+n-1}(p)}
    VC_n(i)     = |{p in stable_i : S'_i(p) = ... = S'_{i+n-1}(p)}| / |stable_i|
    mVC_n       = nanmean of VC_n(i) over all windows of all videos (pooled, not per video)

This follows VSPW's evaluation tooling, ``VC_perclip.py`` (``get_common``) in
github.com/VSPW-dataset/VSPW_code at f86be0c9001237755c3b208014bb5aef0511da34 (the same function
is in sssdddwww2/CVPR2021_VSPW_Implement at 9fcb2bcb662fdb3caac8ee802b0e5f387bcde5db):

- The prediction only has to be constant over the window; it need not equal the GT. A model that
  is consistently wrong on a stable region scores 1 there.
- Windows step by one frame, but the tooling loops ``range(T - n)``, so a video of T frames gives
  T - n windows and the last full window (starting at T - n) is never scored; videos with
  T <= n are skipped. ``drop_last_window=True`` (default) reproduces this; ``False`` scores all
  T - n + 1 windows.
- A window without stable pixels gives 0/0 = NaN, which ``np.nanmean`` skips; so do we.
- Every label counts, "others" (0) included: the tooling has no ignore label.

Deliberate differences:

- ``ignore_label`` (default 255, the package's void) removes pixels that are void throughout the
  window from ``stable_i``; the tooling counts them. ``ignore_label=None`` reproduces the tooling.
- ``per_video`` reports the nanmean of each video's windows (the tooling prints a plain mean,
  NaN as soon as one window is NaN); a video without windows is NaN there and adds nothing to
  the pooled mean.
- Streaming keeps per-pixel run lengths (how many frames the GT / prediction has been constant)
  instead of n frames: a pixel is stable over the window ending at frame t iff its run at t is
  >= n. This holds one previous frame and is O(1) per frame in n; `video_consistency` computes
  the same number from the windows directly and the tests check the two against each other.

Usage::

    vc = VideoConsistency(window=8)
    for name, video in videos:
        vc.start_video(name)
        for gt, pred in video:           # (H, W) class maps
            vc.update_frame(gt, pred)
        vc.end_video()
    vc.result()  # {"VC8": ..., "per_video": {name: ...}, "num_windows": ...}
"""

from __future__ import annotations

import math

import numpy as np
from einops import rearrange

from minivseg.pair_counting import nanmean
from minivseg.panoptic import IGNORE_LABEL


class VideoConsistency:
    """Streaming VC_n over videos fed frame by frame; holds one previous frame per video."""

    def __init__(self, window=8, ignore_label=IGNORE_LABEL, drop_last_window=True):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.ignore_label = window, ignore_label
        self.drop_last_window = drop_last_window
        self.window_scores: dict[str, list[float]] = {}
        self._name = None

    def start_video(self, name=None) -> None:
        if self._name is not None:
            raise RuntimeError(f"video {self._name!r} was not ended")
        name = f"video{len(self.window_scores)}" if name is None else str(name)
        if name in self.window_scores:
            raise ValueError(f"video {name!r} was already scored")
        self._name, self._num_frames, self._previous = name, 0, None
        self.window_scores[name] = []

    def update_frame(self, gt_semantic, pred_semantic) -> None:
        """Add one frame: ``(H, W)`` GT and predicted class maps."""
        if self._name is None:
            raise RuntimeError("call start_video() before update_frame()")
        gt, pred = np.asarray(gt_semantic), np.asarray(pred_semantic)
        if gt.shape != pred.shape or gt.ndim != 2:
            raise ValueError(f"need two equal (H, W) maps, got {gt.shape} and {pred.shape}")
        if self._previous is None:
            self._gt_run = np.ones(gt.shape, dtype=np.int64)
            self._pred_run = np.ones(gt.shape, dtype=np.int64)
        else:
            if gt.shape != self._previous[0].shape:
                raise ValueError(f"frame shape {gt.shape} != {self._previous[0].shape}")
            if self.drop_last_window:
                # The tooling scores a window only once the frame after it exists.
                self._score_window_ending_at_previous()
            previous_gt, previous_pred = self._previous
            # Capped at n: only "constant for at least n frames" matters.
            self._gt_run = np.where(gt == previous_gt, np.minimum(self._gt_run + 1, self.window), 1)
            self._pred_run = np.where(
                pred == previous_pred, np.minimum(self._pred_run + 1, self.window), 1
            )
        self._previous, self._num_frames = (gt, pred), self._num_frames + 1
        if not self.drop_last_window:
            self._score_window_ending_at_previous()

    def _score_window_ending_at_previous(self) -> None:
        if self._num_frames < self.window:
            return
        stable = self._gt_run >= self.window
        if self.ignore_label is not None:
            stable &= self._previous[0] != self.ignore_label
        consistent = stable & (self._pred_run >= self.window)
        num_stable = int(stable.sum())
        score = int(consistent.sum()) / num_stable if num_stable else math.nan
        self.window_scores[self._name].append(score)

    def end_video(self) -> None:
        if self._name is None:
            raise RuntimeError("end_video() without start_video()")
        self._name = self._previous = None

    def result(self) -> dict:
        """``{"VC<n>": pooled nanmean over windows, "per_video": {name: VC}, "num_windows"}``."""
        if self._name is not None:
            raise RuntimeError(f"video {self._name!r} was not ended")
        pooled = [score for scores in self.window_scores.values() for score in scores]
        return {
            f"VC{self.window}": nanmean(pooled),
            "per_video": {name: nanmean(scores) for name, scores in self.window_scores.items()},
            "num_windows": len(pooled),
        }


def video_consistency(
    gt_video, pred_video, window=8, ignore_label=IGNORE_LABEL, drop_last_window=True
) -> float:
    """VC_n of one video from its ``(T, H, W)`` GT and predicted maps; NaN without windows."""
    gt, pred = np.asarray(gt_video), np.asarray(pred_video)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"need two equal (T, H, W) videos, got {gt.shape} and {pred.shape}")
    num_windows = gt.shape[0] - window + (0 if drop_last_window else 1)
    if num_windows <= 0:
        return math.nan
    gt_windows = np.lib.stride_tricks.sliding_window_view(gt, window, axis=0)[:num_windows]
    pred_windows = np.lib.stride_tricks.sliding_window_view(pred, window, axis=0)[:num_windows]
    # Constant over the window = equal to the window's first frame everywhere.
    stable = (gt_windows == gt_windows[..., :1]).all(-1)  # (N, H, W)
    if ignore_label is not None:
        stable &= gt_windows[..., 0] != ignore_label
    consistent = stable & (pred_windows == pred_windows[..., :1]).all(-1)
    num_stable = rearrange(stable, "n h w -> n (h w)").sum(1)
    num_consistent = rearrange(consistent, "n h w -> n (h w)").sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return nanmean(num_consistent / num_stable)
