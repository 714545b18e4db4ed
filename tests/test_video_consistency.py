"""Tests for minivseg.video_consistency (VSPW's VC_n).

Hand-computed videos for each rule (prediction only has to be constant, the dropped last window,
videos shorter than the window, void, NaN windows, pooling over windows), then a naive
per-window per-pixel reference written from VSPW's definition on random videos, against both
the streaming class and the whole-video function."""

import math

import numpy as np
import pytest

from minivseg.video_consistency import VideoConsistency, video_consistency

VOID = 255


def naive_vc_windows(gt, pred, window, ignore_label, drop_last_window):
    """Per-window VC from Python loops over windows, pixels and frames."""
    num_frames, height, width = gt.shape
    last_start = num_frames - window - (1 if drop_last_window else 0)
    scores = []
    for start in range(last_start + 1):
        stable = consistent = 0
        for y in range(height):
            for x in range(width):
                labels = [gt[start + k, y, x] for k in range(window)]
                preds = [pred[start + k, y, x] for k in range(window)]
                if len(set(labels)) != 1 or labels[0] == ignore_label:
                    continue
                stable += 1
                consistent += len(set(preds)) == 1
        scores.append(consistent / stable if stable else math.nan)
    return scores


def stream(videos, **kwargs):
    vc = VideoConsistency(**kwargs)
    for name, (gt, pred) in videos.items():
        vc.start_video(name)
        for gt_frame, pred_frame in zip(gt, pred):
            vc.update_frame(gt_frame, pred_frame)
        vc.end_video()
    return vc


# A 1x3 video of 4 frames. Pixel 0: GT 1 throughout, prediction 2 throughout (wrong but
# constant). Pixel 1: GT 1 throughout, prediction 1,1,3,3. Pixel 2: GT 0,0,5,5 (changes at
# frame 2), prediction 0 throughout.
GT = np.array([[[1, 1, 0]], [[1, 1, 0]], [[1, 1, 5]], [[1, 1, 5]]])
PRED = np.array([[[2, 1, 0]], [[2, 1, 0]], [[2, 3, 0]], [[2, 3, 0]]])


def test_hand_computed_window_2():
    # n = 2, windows starting at 0, 1, 2:
    #   [0,1]: stable {0,1,2}, prediction constant at all three        -> 3/3 = 1
    #   [1,2]: stable {0,1} (pixel 2's GT changes), pixel 1 changes    -> 1/2
    #   [2,3]: stable {0,1,2}, prediction constant at all three        -> 3/3 = 1
    # Tooling (range(T - n) = range(2)): windows 0, 1 -> (1 + 1/2) / 2 = 0.75.
    # All windows: (1 + 1/2 + 1) / 3 = 5/6.
    assert video_consistency(GT, PRED, window=2) == pytest.approx(0.75)
    assert video_consistency(GT, PRED, window=2, drop_last_window=False) == pytest.approx(5 / 6)
    vc = stream({"a": (GT, PRED)}, window=2)
    assert vc.window_scores["a"] == pytest.approx([1.0, 0.5])
    assert vc.result()["VC2"] == pytest.approx(0.75)
    assert vc.result()["num_windows"] == 2


def test_hand_computed_window_3_and_constant_wrong_prediction():
    # n = 3 over all windows: [0..2] stable {0,1}, pixel 1 changes -> 1/2; [1..3] same -> 1/2.
    # Pixel 0 is wrong in every frame yet counts as consistent: VC only asks for constancy.
    vc = stream({"a": (GT, PRED)}, window=3, drop_last_window=False)
    assert vc.window_scores["a"] == pytest.approx([0.5, 0.5])
    # Tooling: only window [0..2] -> 0.5.
    assert video_consistency(GT, PRED, window=3) == pytest.approx(0.5)
    # A prediction equal to the GT everywhere is perfectly consistent, so is the constant 2.
    assert video_consistency(GT, GT, window=2) == 1.0
    assert video_consistency(GT, np.full_like(GT, 2), window=2) == 1.0


def test_window_longer_than_video():
    # T = 4. Tooling: videos with T <= n are skipped; here they have no windows, NaN per video,
    # and add nothing to the pooled mean (the 2-frame-window video decides it alone).
    for window in (4, 5, 16):
        assert math.isnan(video_consistency(GT, PRED, window=window))
        vc = stream({"short": (GT, PRED)}, window=window)
        assert vc.result()["num_windows"] == 0 and math.isnan(vc.result()[f"VC{window}"])
    # Without dropping the last window, T == n gives exactly one window: stable {0,1}, 1/2.
    assert video_consistency(GT, PRED, window=4, drop_last_window=False) == pytest.approx(0.5)
    assert math.isnan(video_consistency(GT, PRED, window=5, drop_last_window=False))
    long_gt, long_pred = np.repeat(GT, 2, axis=0), np.repeat(PRED, 2, axis=0)
    vc = stream({"short": (GT, PRED), "long": (long_gt, long_pred)}, window=5)
    result = vc.result()
    assert math.isnan(result["per_video"]["short"])
    assert result["VC5"] == result["per_video"]["long"]


def test_ignore_label():
    # 1x2 video, 3 frames: pixel 0 is void throughout with a constant prediction, pixel 1 is
    # GT 1 throughout with prediction 1,1,4.
    gt = np.array([[[VOID, 1]]] * 3)
    pred = np.array([[[7, 1]], [[7, 1]], [[7, 4]]])
    # n = 3, one window (all windows): with void ignored, stable {1}, inconsistent -> 0.
    # Tooling (no ignore label): stable {0, 1}, pixel 0 consistent -> 1/2.
    assert video_consistency(gt, pred, window=3, drop_last_window=False) == 0.0
    got = video_consistency(gt, pred, window=3, ignore_label=None, drop_last_window=False)
    assert got == pytest.approx(0.5)
    # "others" (0) is an ordinary class, not ignored.
    assert video_consistency(np.where(gt == VOID, 0, gt), pred, 3, drop_last_window=False) == 0.5


def test_window_without_stable_pixels_is_skipped():
    # GT changes everywhere between frames 1 and 2: with n = 2 the windows [0,1], [1,2], [2,3]
    # have stable sets {all}, {}, {all}. The middle one is 0/0 = NaN and nanmean skips it.
    gt = np.array([[[1, 1]], [[1, 1]], [[2, 2]], [[2, 2]]])
    pred = np.array([[[1, 1]], [[1, 3]], [[1, 3]], [[1, 3]]])
    # [0,1]: pixel 1 changes -> 1/2; [2,3]: constant -> 1. Mean 3/4.
    vc = stream({"a": (gt, pred)}, window=2, drop_last_window=False)
    assert vc.window_scores["a"][:1] + vc.window_scores["a"][2:] == [0.5, 1.0]
    assert math.isnan(vc.window_scores["a"][1])
    assert vc.result()["VC2"] == pytest.approx(0.75)
    assert video_consistency(gt, pred, 2, drop_last_window=False) == pytest.approx(0.75)


def test_pooled_over_windows_not_videos():
    # Video "a" (hand case, n = 2, tooling): windows 1, 1/2. Video "b": 6 frames, all constant
    # -> 4 windows of 1. Pooled: (1 + 0.5 + 4) / 6 = 11/12; mean of video means would be 7/8.
    constant = np.zeros((6, 1, 3), dtype=np.int64)
    result = stream({"a": (GT, PRED), "b": (constant, constant)}, window=2).result()
    assert result["VC2"] == pytest.approx(11 / 12)
    assert result["per_video"] == pytest.approx({"a": 0.75, "b": 1.0})
    assert result["num_windows"] == 6


@pytest.mark.parametrize("window", [1, 2, 3, 8])
@pytest.mark.parametrize("drop_last_window", [True, False])
@pytest.mark.parametrize("ignore_label", [VOID, None])
def test_against_naive_reference(window, drop_last_window, ignore_label):
    rng = np.random.default_rng(window)
    videos, reference = {}, {}
    for index, num_frames in enumerate([1, window, window + 1, 12, 20]):
        # Few labels and rare changes, so that windows have stable and consistent pixels.
        gt = rng.integers(0, 3, size=(1, 5, 6)).repeat(num_frames, axis=0)
        gt = np.where(rng.random(gt.shape) < 0.08, rng.choice([0, 1, VOID], gt.shape), gt)
        pred = np.where(rng.random(gt.shape) < 0.05, rng.integers(0, 3, gt.shape), gt)
        name = f"v{index}"
        videos[name] = (gt, pred)
        reference[name] = naive_vc_windows(gt, pred, window, ignore_label, drop_last_window)
    kwargs = dict(window=window, ignore_label=ignore_label, drop_last_window=drop_last_window)
    vc = stream(videos, **kwargs)
    result = vc.result()
    pooled = [s for scores in reference.values() for s in scores]
    assert result["num_windows"] == len(pooled) > 0
    assert result[f"VC{window}"] == pytest.approx(np.nanmean(pooled))
    for name, (gt, pred) in videos.items():
        np.testing.assert_allclose(vc.window_scores[name], reference[name])
        expected = np.nanmean(reference[name]) if reference[name] else math.nan
        whole = video_consistency(gt, pred, **kwargs)
        np.testing.assert_allclose([result["per_video"][name], whole], [expected] * 2)
    if window > 1:
        assert 0 < result[f"VC{window}"] < 1  # the random case is not degenerate


def test_contract_errors():
    vc = VideoConsistency(window=2)
    with pytest.raises(RuntimeError):
        vc.update_frame(GT[0], PRED[0])
    vc.start_video("a")
    with pytest.raises(ValueError):
        vc.update_frame(GT[0], PRED[0, :, :2])
    vc.update_frame(GT[0], PRED[0])
    with pytest.raises(ValueError):
        vc.update_frame(GT[0, :, :2], PRED[0, :, :2])
    with pytest.raises(RuntimeError):
        vc.result()
    vc.end_video()
    with pytest.raises(ValueError):
        vc.start_video("a")
    with pytest.raises(ValueError):
        VideoConsistency(window=0)
    with pytest.raises(ValueError):
        video_consistency(GT, PRED[:3])
