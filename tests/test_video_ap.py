"""Tests for minivseg.video_ap: hand-computed videos for each YouTube-VIS rule (whole-video tracks,
crowd, area ranges, maxDets), a literal ytvoseval-style reference on dense masks for random videos,
streaming against whole videos, large track ids and bounded memory."""

import math
from pathlib import Path

import numpy as np
import pytest

from minivseg.video_ap import VideoAP

ROAD, PERSON, CAR = 0, 11000, 13000
KITTI = dict(num_classes=19, thing_classes=(11, 13))


def scored(metric_factory, videos) -> dict:
    """Result of a fresh metric fed ``[(gt_video, tubes)]``."""
    metric = metric_factory()
    for gt, tubes in videos:
        metric.update(gt, tubes)
    return metric.result()


# ---------------------------------------------------------------- naive ytvoseval reference


def naive_video_ap(
    videos,
    num_classes,
    thing_classes,
    divisor=1000,
    max_detections=100,
    area_limits=(128**2, 256**2),
):
    """Literal YouTube-VIS evaluation of ``[(gt (F, H, W), [(mask (F, H, W), class, score)])]``:
    one dense mask per track, ytvoseval's computeIoU / evaluateVid / accumulate / summarize."""
    thresholds, recall_points = np.linspace(0.5, 0.95, 10), np.linspace(0.0, 1.0, 101)
    max_dets = [1, 10, max_detections]
    small, large = area_limits
    area_ranges = [[0, 1e10], [0, small], [small, large], [large, 1e10]]

    def avg_area(mask):
        areas = [a for a in mask.sum(axis=(1, 2)).tolist() if a]
        return float(np.mean(areas)) if areas else 0.0

    def sequence_iou(d, g):
        i = u = 0
        for d_t, g_t in zip(d, g):
            if d_t.any() and g_t.any():
                i, u = i + (d_t & g_t).sum(), u + (d_t | g_t).sum()
            elif g_t.any():
                u += g_t.sum()
            elif d_t.any():
                u += d_t.sum()
        return i / u if u > 0 else 0.0

    def evaluate_video(gts, dts, ious, low, high):
        ignore = [int(g["crowd"] or g["area"] < low or g["area"] > high) for g in gts]
        gt_order = np.argsort(ignore, kind="mergesort")
        gts, gt_ig = [gts[i] for i in gt_order], np.array([ignore[i] for i in gt_order])
        ious = ious[:, gt_order]
        gtm, dtm = np.zeros((10, len(gts))), np.zeros((10, len(dts)))
        dt_ig = np.zeros((10, len(dts)))
        for t_index, t in enumerate(thresholds):
            for d_index in range(len(dts)):
                iou, m = min(t, 1 - 1e-10), -1
                for g_index, g in enumerate(gts):
                    if gtm[t_index, g_index] > 0 and not g["crowd"]:
                        continue
                    if m > -1 and gt_ig[m] == 0 and gt_ig[g_index] == 1:
                        break
                    if ious[d_index, g_index] < iou:
                        continue
                    iou, m = ious[d_index, g_index], g_index
                if m == -1:
                    continue
                dt_ig[t_index, d_index] = gt_ig[m]
                dtm[t_index, d_index], gtm[t_index, m] = m + 1, d_index + 1
        outside = np.array([d["area"] < low or d["area"] > high for d in dts]).reshape(1, -1)
        dt_ig = np.logical_or(dt_ig, np.logical_and(dtm == 0, np.repeat(outside, 10, 0)))
        scores = np.array([d["score"] for d in dts], dtype=np.float64)
        return {"scores": scores, "dtm": dtm, "dt_ig": dt_ig, "gt_ig": gt_ig}

    evaluated = {}  # (class, area range, video) -> evaluate_video output
    for v, (gt, dets) in enumerate(videos):
        gts = [
            {"mask": gt == i, "class": i // divisor, "crowd": i % divisor == 0}
            for i in np.unique(gt).tolist()
            if i // divisor in thing_classes
        ]
        for g in gts:
            g["area"] = avg_area(g["mask"])
        for c in range(num_classes):
            gts_c = [g for g in gts if g["class"] == c]
            dts_c = [{"mask": m, "score": s, "area": avg_area(m)} for m, k, s in dets if k == c]
            if not gts_c and not dts_c:
                continue
            order = np.argsort([-d["score"] for d in dts_c], kind="mergesort")
            dts_c = [dts_c[i] for i in order][:max_detections]
            ious = np.zeros((len(dts_c), len(gts_c)))
            for i, j in np.ndindex(ious.shape):
                ious[i, j] = sequence_iou(dts_c[i]["mask"], gts_c[j]["mask"])
            for a, (low, high) in enumerate(area_ranges):
                evaluated[c, a, v] = evaluate_video(gts_c, dts_c, ious, low, high)

    precision = -np.ones((10, 101, num_classes, 4, 3))
    recall = -np.ones((10, num_classes, 4, 3))
    cells = [(k, a, m) for k in range(num_classes) for a in range(4) for m in enumerate(max_dets)]
    for k, a, (m, max_det) in cells:
        runs = [evaluated[k, a, v] for v in range(len(videos)) if (k, a, v) in evaluated]
        if not runs:
            continue
        scores = np.concatenate([e["scores"][:max_det] for e in runs])
        order = np.argsort(-scores, kind="mergesort")
        dtm = np.concatenate([e["dtm"][:, :max_det] for e in runs], axis=1)[:, order]
        dt_ig = np.concatenate([e["dt_ig"][:, :max_det] for e in runs], axis=1)[:, order]
        num_gt = np.count_nonzero(np.concatenate([e["gt_ig"] for e in runs]) == 0)
        if num_gt == 0:
            continue
        tp_sum = np.cumsum(np.logical_and(dtm, np.logical_not(dt_ig)), axis=1).astype(float)
        fp_sum = np.cumsum(np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig)), axis=1)
        for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum)):
            rc, pr = tp / num_gt, (tp / (fp + tp + np.spacing(1))).tolist()
            recall[t, k, a, m] = rc[-1] if len(tp) else 0
            for i in range(len(tp) - 1, 0, -1):
                if pr[i] > pr[i - 1]:
                    pr[i - 1] = pr[i]
            q = np.zeros(101)
            for r, p in enumerate(np.searchsorted(rc, recall_points, side="left")):
                if p >= len(tp):
                    break
                q[r] = pr[p]
            precision[t, :, k, a, m] = q

    def summary(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else math.nan

    return {
        "AP": summary(precision[:, :, :, 0, 2]),
        "AP50": summary(precision[0, :, :, 0, 2]),
        "AP75": summary(precision[5, :, :, 0, 2]),
        "APs": summary(precision[:, :, :, 1, 2]),
        "APm": summary(precision[:, :, :, 2, 2]),
        "APl": summary(precision[:, :, :, 3, 2]),
        "AR1": summary(recall[:, :, 0, 0]),
        "AR10": summary(recall[:, :, 0, 1]),
        f"AR{max_detections}": summary(recall[:, :, 0, 2]),
    }


# ---------------------------------------------------------------- random videos

THINGS = (1, 2, 4)  # of 5 classes; 0 and 3 are stuff


def random_video(rng, divisor=1000):
    """``(F, H, W)`` GT: stuff, void, moving boxes of thing tracks that appear late or leave early,
    some with instance 0 (crowd)."""
    num_frames, height, width = rng.integers(2, 7), rng.integers(4, 9), rng.integers(4, 9)
    gt = rng.choice([0, 3], size=(num_frames, height, width)) * divisor
    gt[rng.random(gt.shape) < 0.05] = 255 * divisor
    for _ in range(rng.integers(0, 6)):
        track = rng.choice(THINGS) * divisor + rng.integers(0, 4)  # instance 0: crowd
        first, last = np.sort(rng.integers(0, num_frames, 2))
        h, w = rng.integers(1, height // 2 + 2), rng.integers(1, width // 2 + 2)
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        for t in range(first, last + 1):
            y = int(np.clip(y + rng.integers(-1, 2), 0, height - h))
            x = int(np.clip(x + rng.integers(-1, 2), 0, width - w))
            gt[t, y : y + h, x : x + w] = track
    return gt


def random_prediction(rng, gt, divisor=1000):
    """Panoptic prediction from ``gt``: tracks renamed, merged, switched mid-video, given a wrong
    class or eroded, plus spurious tracks; and a score per track (ties included)."""
    pred = np.where(np.isin(gt // divisor, THINGS), 0, gt)
    frame = np.arange(len(gt))[:, None, None]
    for track in np.unique(gt[np.isin(gt // divisor, THINGS)]):
        semantic = rng.choice(THINGS) if rng.random() < 0.2 else track // divisor
        pred[gt == track] = semantic * divisor + rng.integers(1, 6)
        if rng.random() < 0.3:  # identity switch from a random frame on
            later = (gt == track) & (frame >= rng.integers(0, len(gt)))
            pred[later] = semantic * divisor + rng.integers(1, 6)
    pred[rng.random(gt.shape) < 0.1] = 3 * divisor
    for _ in range(rng.integers(0, 3)):
        t, y, x = (rng.integers(0, n) for n in gt.shape)
        pred[t : t + 2, y : y + 2, x : x + 3] = rng.choice(THINGS) * divisor + rng.integers(1, 6)
    tracks = np.unique(pred[np.isin(pred // divisor, THINGS) & (pred % divisor > 0)])
    return pred, {int(track): rng.integers(1, 10) / 10 for track in tracks}


def random_tubes(rng, gt, divisor=1000):
    """Overlapping tubes ``(mask, class, score)``: GT tracks and crowd (exact, shrunk or grown,
    some twice), unions of two GT tracks (IoU 0.5 with both when equal in size), boxes over a few
    frames, of any class, and now and then an empty mask."""
    tubes = []
    tracks = np.unique(gt[np.isin(gt // divisor, THINGS)])
    for track in tracks:
        mask = gt == track
        if rng.random() < 0.5:
            mask = mask & (rng.random(gt.shape) < 0.8) | (rng.random(gt.shape) < 0.05)
        for _ in range(1 + (rng.random() < 0.3)):
            tubes.append((mask, int(track // divisor), rng.integers(1, 10) / 10))
    for first, second in zip(tracks[:-1], tracks[1:]):
        if first // divisor == second // divisor:
            tubes.append((np.isin(gt, [first, second]), int(first // divisor), 0.5))
    for _ in range(rng.integers(0, 4)):
        mask = np.zeros(gt.shape, dtype=bool)
        if rng.random() < 0.9:
            t, y, x = (rng.integers(0, n) for n in gt.shape)
            mask[t : t + 3, y : y + 3, x : x + 3] = True
        tubes.append((mask, int(rng.integers(0, 5)), rng.integers(1, 10) / 10))
    return [tubes[i] for i in rng.permutation(len(tubes))]


def track_tubes(pred, scores, divisor=1000):
    """The predicted tracks of a panoptic video as tubes, in track-id order."""
    return [(pred == track, track // divisor, scores[track]) for track in sorted(scores)]


def test_video_ap_matches_the_naive_ytvoseval_on_random_videos():
    rng = np.random.default_rng(0)
    partial, ranges = 0, np.zeros(3, int)
    for trial in range(40):
        limits = (4, 10) if trial % 2 else (128**2, 256**2)  # small boxes populate every range
        videos = [random_video(rng) for _ in range(rng.integers(1, 4))]
        streamed = VideoAP(5, THINGS, area_limits=limits)
        tubes = VideoAP(5, THINGS, area_limits=limits)
        stream_videos, tube_videos = [], []
        for gt in videos:
            pred, scores = random_prediction(rng, gt)
            streamed.start_video()
            for gt_frame, pred_frame in zip(gt, pred):
                streamed.update_frame(gt_frame, pred_frame)
            streamed.end_video(scores)
            stream_videos.append((gt, track_tubes(pred, scores)))
            tube_videos.append((gt, random_tubes(rng, gt)))
            tubes.update(*tube_videos[-1])
        for metric, naive_videos in ((streamed, stream_videos), (tubes, tube_videos)):
            result = metric.result()
            expected = naive_video_ap(naive_videos, 5, THINGS, area_limits=limits)
            assert result.keys() == expected.keys()
            for key, value in expected.items():
                assert math.isnan(result[key]) == math.isnan(value), key
                assert result[key] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), key
            partial += 0 < result["AP"] < 1
            ranges += [not math.isnan(result[key]) for key in ("APs", "APm", "APl")]
    assert partial >= 30 and ranges.min() >= 10  # the cases are not trivial


# ---------------------------------------------------------------- hand-computed videos


def test_video_ap_perfect_wrong_class_and_two_predictions():
    gt = np.full((2, 1, 8), ROAD)
    gt[:, 0, :4] = CAR + 1  # one car track of 8 pixels (4 per frame): avg_area 4, "small"
    gt[1, 0, 6:] = PERSON  # person crowd
    car = gt == CAR + 1
    perfect = VideoAP()  # KITTI-STEP classes by default
    perfect.update(gt, [(car, 13, 0.9)])
    ones = dict.fromkeys(("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100"), 1.0)
    np.testing.assert_equal(perfect.result(), ones | {"APm": math.nan, "APl": math.nan})
    wrong = VideoAP(**KITTI)
    wrong.update(gt, [(car, 11, 0.9)])  # a person detection: no person GT except crowd
    zeros = dict.fromkeys(ones, 0.0)
    np.testing.assert_equal(wrong.result(), zeros | {"APm": math.nan, "APl": math.nan})
    # A (score 0.9) covers 5 of the 8 car pixels: IoU 0.625; B (score 0.8) is exact.
    partial = car.copy()
    partial[1, 0, 1:4] = False
    metric = VideoAP(**KITTI)
    metric.update(gt, [(car, 13, 0.8), (partial, 13, 0.9)])
    result = metric.result()
    # IoU >= t for t in {0.5, 0.55, 0.6}: A is TP, B a duplicate -> AP 1.
    # t >= 0.65: A is FP, B TP -> precision 1/2 at every recall -> AP 0.5.
    assert result["AP"] == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)
    assert result["APs"] == result["AP"]
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP75"] == pytest.approx(0.5)
    assert result["AR1"] == pytest.approx(0.3)  # the top detection alone: recall 1 at 3 of 10 t
    assert result["AR10"] == result["AR100"] == pytest.approx(1.0)


def test_identity_swap_across_the_middle_lowers_ap_where_clips_would_not():
    gt = np.full((4, 1, 8), ROAD)
    gt[:, 0, :3], gt[:, 0, 5:] = CAR + 1, CAR + 2  # two cars, 3 pixels each, in all 4 frames
    swapped = np.full_like(gt, ROAD)
    swapped[:2, 0, :3], swapped[:2, 0, 5:] = CAR + 7, CAR + 8
    swapped[2:, 0, :3], swapped[2:, 0, 5:] = CAR + 8, CAR + 7  # ids swap after frame 1
    scores = {CAR + 7: 0.9, CAR + 8: 0.8}
    whole = VideoAP()
    whole.update_video(gt, swapped, scores)
    clips = VideoAP()  # the same two halves scored as two videos each of 2 frames
    for half in (slice(0, 2), slice(2, 4)):
        clips.update_video(gt[half], swapped[half], scores)
    kept = VideoAP()
    same = np.where(gt == CAR + 1, CAR + 7, np.where(gt == CAR + 2, CAR + 8, ROAD))
    kept.update_video(gt, same, scores)
    # sequence IoU of track 7 with car 1: Σ_t|p∩g| / Σ_t|p∪g| = 6 / (12 + 12 - 6) = 1/3 < 0.5
    assert whole.result()["AP"] == 0.0 and whole.result()["AR100"] == 0.0
    assert clips.result()["AP"] == pytest.approx(1.0)
    assert kept.result()["AP"] == pytest.approx(1.0)


def _crowd_video():
    """Cars 1 (all 4 frames) and 2 (frames 0-1), a person, a car crowd region, and road."""
    gt = np.full((4, 1, 16), ROAD)
    gt[:, 0, 0:3], gt[:2, 0, 3:6], gt[:, 0, 6:8] = CAR + 1, CAR + 2, PERSON + 1
    gt[:, 0, 8:11] = CAR  # car crowd (instance 0)
    background = np.zeros(gt.shape, bool)
    background[:, 0, 12:14] = True
    base = [
        (background, 13, 0.8),  # a false positive
        (gt == CAR + 2, 13, 0.7),
        (gt == CAR + 1, 13, 0.6),
        (gt == PERSON + 1, 11, 0.5),
    ]
    return gt, base, background


def test_detections_on_a_crowd_region_leave_ap_unchanged():
    gt, base, background = _crowd_video()
    baseline = scored(VideoAP, [(gt, base)])
    # car: FP, TP, TP over 2 GT (the crowd is no false negative): precision 2/3 up to recall 1;
    # person: 1 -> AP (2/3 + 1) / 2
    assert baseline["AP"] == pytest.approx(5 / 6)
    crowd = gt == CAR
    on_crowd = scored(VideoAP, [(gt, [(crowd, 13, 0.95), (crowd, 13, 0.9)] + base)])
    assert on_crowd == pytest.approx(baseline, rel=1e-12, nan_ok=True)  # two matches, both ignored
    # the crowd is per class: a person detection there is a false positive of the person class
    other_class = scored(VideoAP, [(gt, [(crowd, 11, 0.95)] + base)])
    assert other_class["AP"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    moved = background.copy()  # the same detection on road: a false positive
    moved[:, 0, 12:15] = True
    on_road = scored(VideoAP, [(gt, [(moved, 13, 0.95)] + base)])
    assert on_road["AP"] == pytest.approx((1 / 2 + 1) / 2)
    only_crowd = np.where(gt == CAR, CAR, ROAD)
    assert math.isnan(scored(VideoAP, [(only_crowd, [(crowd, 13, 0.9)])])["AP"])


def test_a_gt_that_is_not_ignored_wins_and_ties_go_to_the_later_gt():
    # Two cars of 2 pixels in one frame; A covers both: IoU 1/2 with each, a tie at t = 0.5.
    gt = np.array([[[CAR + 1, CAR + 1, CAR + 2, CAR + 2]]])
    union = np.isin(gt, [CAR + 1, CAR + 2])
    result = scored(VideoAP, [(gt, [(union, 13, 0.9), (gt == CAR + 1, 13, 0.8)])])
    # t = 0.5: A takes car 2 (the later GT), B car 1 -> AP 1; t >= 0.55: A FP, B TP at recall 1/2
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP"] == pytest.approx((1 + 9 * 0.5 * 51 / 101) / 10)
    # Car 1: 2 pixels in each of 2 frames (avg_area 2), car 2: 4 pixels in frame 0 (avg_area 4);
    # with small = [0, 3], car 2 is ignored. A (both cars, avg_area 4) has IoU 1/2 with both.
    gt = np.full((2, 1, 6), ROAD)
    gt[:, 0, :2], gt[0, 0, 2:] = CAR + 1, CAR + 2
    union = np.isin(gt, [CAR + 1, CAR + 2])
    result = scored(lambda: VideoAP(area_limits=(3, 9)), [(gt, [(union, 13, 0.9)])])
    # t = 0.5: A matches car 1 though car 2 comes later -> TP; t >= 0.55: unmatched, and
    # outside "small" -> ignored -> AP 0
    assert result["APs"] == pytest.approx(0.1)


def test_area_ranges_use_the_mean_area_over_the_frames_where_a_track_is_present():
    gt = np.full((2, 1, 90000), ROAD)
    gt[:, 0, :100] = CAR + 1  # avg_area 100: small
    gt[0, 0, 1000:21000] = CAR + 2  # frame 0 only: avg_area 20000 (medium), not 10000
    gt[:, 0, 22000:89000] = CAR + 3  # 67000 > 256²: large
    spurious = np.zeros(gt.shape, bool)
    spurious[:, 0, 200:300] = True  # avg_area 100
    tubes = [(spurious, 13, 0.95), (gt == CAR + 1, 13, 0.9), (gt == CAR + 3, 13, 0.8)]
    result = scored(VideoAP, [(gt, tubes)])
    # small: GT car 1; FP (small), TP, then the car-3 detection matched to ignored GT is ignored
    assert result["APs"] == pytest.approx(0.5)
    # medium: GT car 2 only; every detection is ignored (unmatched outside, or on ignored GT)
    assert result["APm"] == 0.0
    assert result["APl"] == pytest.approx(1.0)
    # all: FP, TP, TP over 3 GT -> precision 2/3 up to recall 2/3 (67 of 101 recall points)
    assert result["AP"] == pytest.approx(2 / 3 * 67 / 101)
    assert result["AR100"] == pytest.approx(2 / 3)
    coco = scored(lambda: VideoAP(area_limits=(32**2, 96**2)), [(gt, tubes)])
    assert coco["APs"] == pytest.approx(0.5) and math.isnan(coco["APm"])
    assert coco["APl"] == pytest.approx(51 / 101)  # cars 2 and 3 large, one found


def test_max_detections_count_per_video_and_class():
    gt = np.full((1, 1, 24), ROAD)
    gt[0, 0, :2] = CAR + 1
    tubes = []
    for i in range(10):  # ten false positives score above the one true positive
        mask = np.zeros(gt.shape, bool)
        mask[0, 0, 2 + 2 * i : 4 + 2 * i] = True
        tubes.append((mask, 13, 0.9 - 0.04 * i))
    tubes.append((gt == CAR + 1, 13, 0.1))
    result = scored(VideoAP, [(gt, tubes)])
    assert result["AR1"] == result["AR10"] == 0.0 and result["AR100"] == 1.0
    assert result["AP"] == pytest.approx(1 / 11)
    persons = [(tube[0], 11, 0.95) for tube in tubes]  # another class: its own budget
    assert scored(VideoAP, [(gt, persons + tubes)]) == pytest.approx(result, nan_ok=True)
    truncated = scored(lambda: VideoAP(max_detections=10), [(gt, tubes)])
    assert truncated["AP"] == 0.0 and truncated["AR10"] == 0.0
    per_video = scored(lambda: VideoAP(max_detections=11), [(gt, tubes), (gt, tubes)])
    assert per_video["AR11"] == 1.0 and per_video["AP"] == pytest.approx(1 / 11)


# ---------------------------------------------------------------- API, ids and memory


def test_streaming_equals_whole_video_and_tubes():
    rng = np.random.default_rng(1)
    for _ in range(5):
        gt = random_video(rng)
        pred, scores = random_prediction(rng, gt)
        streamed, whole, tubes = (VideoAP(5, THINGS, area_limits=(4, 10)) for _ in range(3))
        streamed.start_video()
        for gt_frame, pred_frame in zip(gt, pred):
            streamed.update_frame(gt_frame, pred_frame)
        streamed.end_video(scores)
        whole.update_video(gt, pred, scores)
        tubes.update(gt, track_tubes(pred, scores))
        np.testing.assert_equal(streamed.result(), whole.result())
        np.testing.assert_equal(tubes.result(), whole.result())


def test_label_divisor_65536_with_large_track_ids():
    divisor = 65536
    gt = np.full((3, 4, 6), 255 * divisor)
    gt[:, :2, :3], gt[:2, 2:, :3] = 13 * divisor + 40000, 11 * divisor + 65535
    gt[:, :, 4:] = 13 * divisor  # car crowd
    pred = np.where(gt == 13 * divisor + 40000, 13 * divisor + 1234, 0)
    pred[:2, 2:, :3] = 11 * divisor + 1001
    pred[2, 2:, :3] = 11 * divisor + 2002  # a short second person track: a false positive
    scores = {13 * divisor + 1234: 0.9, 11 * divisor + 1001: 0.8, 11 * divisor + 2002: 0.7}
    metric = VideoAP(label_divisor=divisor)
    metric.update_video(gt, pred, scores)
    result = metric.result()
    assert result["AP"] == pytest.approx(1.0) and result["AR1"] == pytest.approx(1.0)
    expected = naive_video_ap([(gt, track_tubes(pred, scores, divisor))], 19, (11, 13), divisor)
    assert result == pytest.approx(expected, rel=1e-12, nan_ok=True)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_does_not_grow_with_frames_or_label_divisor():
    import tracemalloc

    divisor = 65536
    frame = np.zeros((32, 48), np.int64)
    rss = _rss_bytes()
    metric = VideoAP(label_divisor=divisor)
    tracemalloc.start()
    try:
        used = []
        for t in range(60):  # 60 frames of the same 12 tracks, moving
            gt, pred = frame.copy(), frame.copy()
            for k in range(12):
                gt[2 * k : 2 * k + 2, t % 40 : t % 40 + 8] = 13 * divisor + 5000 * k + 1
                pred[2 * k : 2 * k + 2, t % 40 : t % 40 + 7] = 13 * divisor + 4000 * k + 9
            metric.update_frame(gt, pred)
            used.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert abs(used[-1] - used[9]) < 4096  # statistics after 10 frames and after 60: same size
    # PairCounter's id tables span (255 + 1) * 65536 ids (2 x 134 MB) but only touched pages count
    assert _rss_bytes() - rss < 64 << 20
    metric.end_video({13 * divisor + 4000 * k + 9: 0.5 for k in range(12)})
    assert 0.0 < metric.result()["AP"] < 1.0


def test_errors_name_the_problem():
    gt = np.full((2, 1, 4), ROAD)
    gt[:, 0, :2] = CAR + 1
    car = gt == CAR + 1
    metric = VideoAP(**KITTI)
    with pytest.raises(ValueError, match="class ids \\[19\\] outside 0..18"):
        metric.update(gt, [(car, 19, 0.5)])
    with pytest.raises(ValueError, match="mask shape"):
        metric.update(gt, [(car[:1], 13, 0.5)])
    with pytest.raises(ValueError, match="shape"):
        metric.update_frame(gt[0], gt[0, :, :3])
    with pytest.raises(ValueError, match="shape"):
        metric.update_video(gt, gt[:1], {})
    with pytest.raises(ValueError, match="prediction has class ids \\[19\\]"):
        metric.update_frame(gt[0], np.full_like(gt[0], 19001))
    with pytest.raises(ValueError, match="ground truth has class ids \\[20\\]"):
        metric.update_frame(np.full_like(gt[0], 20000), gt[0])
    metric.start_video()
    metric.update_frame(gt[0], np.where(car[0], CAR + 7, PERSON + 3))
    with pytest.raises(ValueError, match="no score for predicted track ids \\[11003, 13007\\]"):
        metric.end_video({})
    metric.end_video({CAR + 7: 0.9, PERSON + 3: 0.1, CAR + 99: 0.5})  # unseen ids are not used
    assert metric.result()["AP"] == pytest.approx(1.0)
    assert all(math.isnan(value) for value in VideoAP().result().values())
    with pytest.raises(ValueError, match="max_detections"):
        VideoAP(max_detections=5)
