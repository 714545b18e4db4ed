"""Stitching (minivseg.stitching): GT tracks recovered from clips with randomly permuted ids for
T = 2..4 and every stride 1..T−1 (and STQ AQ = 1); T = 1 and stride = T link nothing; ids are
not reused after a track ends; Hungarian equals a brute-force best assignment; the newest clip
wins on shared frames; the streaming stitcher hands out each frame as soon as it is final; ids go
only to shown tubes; track scores; and a flickering car over 2000 frames (1000 tracks) stitches,
scores and round-trips through PNGs."""

import itertools

import numpy as np
import pytest
import torch

from minivseg.metrics import STQ, VPQ
from minivseg.panoptic import (
    NUM_CLASSES,
    THING_CLASSES,
    VIDEO_LABEL_DIVISOR,
    VOID_ID,
    read_kitti_step_png,
    relabel,
    tube_ids,
    write_kitti_step_png,
)
from minivseg.stitching import (
    VideoStitcher,
    link_tubes,
    sliding_clips,
    stitch_clips,
    tube_iou,
)


def stitch(clips, stride=1, **options):
    """`stitch_clips` writing the video with divisor 1000, so ids read like the clips' ids."""
    return stitch_clips(clips, stride, video_label_divisor=1000, **options)


# (class, track id, first frame, last frame, row, start column, column speed)
TRACKS = [
    (13, 1, 0, 99, 2, 0, 1),  # car across the whole video
    (13, 2, 0, 3, 5, 12, -1),  # car that leaves after frame 3 ...
    (13, 7, 5, 99, 5, 10, -1),  # ... and a new car on the same row later
    (11, 1, 2, 6, 8, 3, 1),  # person that comes and goes
    (11, 4, 0, 99, 11, 14, 0),  # static person
]


def make_video(num_frames, height=14, width=20):
    """GT video: sky, building, road, a void patch, a crowd car, and the tracks above (3x3)."""
    video = np.full((num_frames, height, width), 2000)
    video[:, :2] = 10000
    video[:, 9:] = 0
    video[:, 0, :3] = VOID_ID
    video[:, 13, :2] = 13000  # crowd: car without a track id
    for semantic, track, first, last, row, column, speed in TRACKS:
        for t in range(first, min(last, num_frames - 1) + 1):
            col = (column + speed * t) % (width - 3)
            video[t, row : row + 3, col : col + 3] = semantic * 1000 + track
    return video


def permuted_clips(video, clip_length, stride, rng):
    """Clip i = frames [i*stride, i*stride+T) with every tube renamed at random, per clip."""
    clips = []
    for start in range(0, len(video) - clip_length + 1, stride):
        clip = video[start : start + clip_length].copy()
        ids = tube_ids(clip)
        new = rng.choice(np.arange(1, 1000), size=len(ids), replace=False)
        out = clip.copy()
        for pan_id, instance in zip(ids, new):
            out[clip == pan_id] = pan_id // 1000 * 1000 + instance
        clips.append(out)
    return clips


def assert_same_tracks(gt, out):
    """Non-tube pixels are unchanged; GT tracks and output tracks correspond one to one."""
    tube = np.isin(gt // 1000, (11, 13)) & (gt % 1000 > 0)
    np.testing.assert_array_equal(out[~tube], gt[~tube])
    pairs = set(zip(gt[tube].tolist(), out[tube].tolist()))
    assert len(pairs) == len({g for g, _ in pairs}) == len({o for _, o in pairs})
    assert all(g // 1000 == o // 1000 and o % 1000 > 0 for g, o in pairs)


@pytest.mark.parametrize(
    "clip_length, stride",
    [(t, s) for t in range(2, 5) for s in range(1, t)],
)
def test_recovers_tracks_from_permuted_clips(clip_length, stride):
    rng = np.random.default_rng(clip_length * 10 + stride)
    video = make_video(6 * stride + clip_length)
    clips = permuted_clips(video, clip_length, stride, rng)
    out = stitch(clips, stride=stride)
    assert out.shape == video.shape and out.dtype == np.int64
    assert_same_tracks(video, out)
    # The ids come from a per-class counter: 1, 2, ... in order of first appearance.
    assert set(tube_ids(out).tolist()) == {13001, 13002, 13003, 11001, 11002}


def test_single_frame_clips_link_nothing():
    video = make_video(4)
    out = stitch(list(video[:, None]), stride=1)  # T = 1: no overlap
    cars = [sorted({v for v in tube_ids(frame).tolist() if v // 1000 == 13}) for frame in out]
    assert cars == [[13001, 13002], [13003, 13004], [13005, 13006], [13007, 13008]]
    tube = np.isin(video // 1000, (11, 13)) & (video % 1000 > 0)
    np.testing.assert_array_equal(out[~tube], video[~tube])


def test_no_overlap_links_nothing_and_ids_are_never_reused():
    clip = np.zeros((2, 1, 4), dtype=np.int64)
    clip[:, 0, :2] = 13001  # the same car, labelled 1 in every clip
    out = stitch([clip, clip, clip], stride=2)
    assert out[:, 0, 0].tolist() == [13001, 13001, 13002, 13002, 13003, 13003]


def test_new_track_after_an_old_one_ends_gets_a_fresh_id():
    # T=2, stride 1. Car X lives in frames 0-1, car Y in frames 3-4 elsewhere. Every clip
    # calls its first car 13001, so clip ids repeat; X's video id must not be handed to Y.
    frames = np.zeros((5, 1, 6), dtype=np.int64)
    frames[0:2, 0, 0:2] = 1  # X
    frames[3:5, 0, 4:6] = 2  # Y
    clips = [np.where(frames[s : s + 2] > 0, 13001, 0) for s in range(4)]
    out = stitch(clips, stride=1)
    assert out[:, 0, 0].tolist() == [13001, 13001, 0, 0, 0]
    assert out[:, 0, 5].tolist() == [0, 0, 0, 13002, 13002]


def test_hungarian_maximises_total_iou():
    # Overlap frame: video tracks A = [0, 3), B = [3, 4); new tubes x = [1, 4), y = [0, 1).
    # IoU(x, A) = 0.5, IoU(x, B) = 1/3, IoU(y, A) = 1/3, IoU(y, B) = 0: mutual-best matching
    # would link x-A and leave y alone; the best total (2/3 > 1/2) links x-B and y-A.
    shown = np.array([[[13005, 13005, 13005, 13009]]])
    clip = np.array([[[13002, 13001, 13001, 13001]]])  # y = 13002, x = 13001
    iou = tube_iou(tube_ids(clip), clip, tube_ids(shown), shown)
    np.testing.assert_allclose(iou, [[0.5, 1 / 3], [1 / 3, 0.0]])
    assert link_tubes(shown, clip) == {13001: 13009, 13002: 13005}
    # Through stitch_clips: frame 1 of clip 0 is `shown`, frame 0 of clip 1 is `clip`.
    first = np.concatenate([shown, shown])
    second = np.concatenate([clip, clip])
    # Clip 0 names A 13001 and B 13002, so y takes 13001 and x 13002.
    assert stitch([first, second], stride=1)[2].tolist() == [[13001, 13002, 13002, 13002]]


def test_matching_is_same_class_and_respects_min_iou():
    shown = np.array([[[11001, 11001, 13002, 13002]]])
    clip = np.array([[[13007, 13007, 13008, 0]]])
    # 13007 overlaps only the person: no link across classes. 13008 has IoU 1/2 with car 13002.
    assert link_tubes(shown, clip) == {13008: 13002}
    assert link_tubes(shown, clip, min_iou=0.5) == {}


def brute_force_matching(shown, clip):
    """Best total-IoU one-to-one same-class matching by trying every injection."""
    a, b = tube_ids(clip), tube_ids(shown)
    iou = tube_iou(a, clip, b, shown) * (a[:, None] // 1000 == b[None] // 1000)
    best, best_total = {}, 0.0
    for k in range(1, min(len(a), len(b)) + 1):
        for rows in itertools.combinations(range(len(a)), k):
            for cols in itertools.permutations(range(len(b)), k):
                total = sum(iou[r, c] for r, c in zip(rows, cols))
                if total > best_total + 1e-12:
                    best_total = total
                    best = {int(a[r]): int(b[c]) for r, c in zip(rows, cols) if iou[r, c] > 0}
    return best


def test_matching_equals_brute_force_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(5):
        shown = rng.choice([13001, 13002, 13003, 11001, 0], size=(2, 3, 4))
        clip = rng.choice([13004, 13005, 11006, 11007, 7000], size=(2, 3, 4))
        assert link_tubes(shown, clip) == brute_force_matching(shown, clip)


def test_newest_clip_wins_on_shared_frames_and_stuff_passes_through():
    clips = [np.full((3, 2, 2), stuff * 1000) for stuff in (0, 1, 2, 8)]  # stride 1
    out = stitch(clips, stride=1)
    assert out[:, 0, 0].tolist() == [0, 1000, 2000, 8000, 8000, 8000]


def test_torch_input_equals_numpy_input():
    rng = np.random.default_rng(5)
    clips = permuted_clips(make_video(7), 3, 2, rng)
    expected = stitch(clips, stride=2)
    np.testing.assert_array_equal(stitch([torch.from_numpy(c) for c in clips], 2), expected)


def test_track_id_overflow_raises_only_past_the_video_divisor():
    clips = [np.full((1, 1, 1), 11)] * 10  # class 1, instance 1; T = 1, so a new track per frame
    small = dict(thing_classes=(1,), label_divisor=10)
    assert stitch_clips(clips[:9], **small, video_label_divisor=10).max() == 19
    with pytest.raises(ValueError, match="video_label_divisor=10 holds ids up to 9"):
        stitch_clips(clips, **small, video_label_divisor=10)
    # The default video divisor (65536) holds far more tracks than the clips' divisor.
    assert stitch_clips(clips * 200, **small).max() == VIDEO_LABEL_DIVISOR + 2000


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="at least one clip"):
        stitch([])
    with pytest.raises(ValueError, match="stride"):
        stitch([np.zeros((2, 1, 1))] * 2, stride=3)
    with pytest.raises(ValueError, match="one shape"):
        stitch([np.zeros((2, 1, 1)), np.zeros((2, 1, 2))])


def test_stitched_video_has_perfect_association_quality():
    rng = np.random.default_rng(7)
    video = make_video(10)
    clips = permuted_clips(video, 2, 1, rng)

    def score(pred):
        stq = STQ(NUM_CLASSES, THING_CLASSES)
        for gt_frame, pred_frame in zip(video, pred):
            stq.update(gt_frame, pred_frame, sequence_id=0)
        return stq.result()

    result = score(stitch(clips, stride=1))
    assert result["AQ"] == pytest.approx(1.0) and result["SQ"] == pytest.approx(1.0)
    # Without stitching (each frame keeps the ids of its newest clip) the tracks break up.
    unstitched = np.concatenate([clip[:1] for clip in clips] + [clips[-1][1:]])
    assert score(unstitched)["AQ"] < 0.5


def test_streaming_hands_out_each_frame_once_it_is_final():
    rng = np.random.default_rng(3)
    video = make_video(9)
    for clip_length, stride in ((3, 1), (3, 2), (2, 2)):
        clips = permuted_clips(video, clip_length, stride, rng)
        stitcher = VideoStitcher(clip_length, stride, video_label_divisor=1000)
        frames = []
        for i, clip in enumerate(clips):
            out = stitcher.add(clip)
            assert [t for t, _ in out] == list(range(i * stride, (i + 1) * stride))
            assert len(stitcher._pending) <= clip_length  # memory: at most one clip of frames
            frames += [frame for _, frame in out]
        frames += [frame for _, frame in stitcher.finish()]
        np.testing.assert_array_equal(np.stack(frames), stitch(clips, stride))


def test_ids_go_only_to_tubes_that_are_shown():
    # T = 2, stride 1: a person seen only in the last frame of clips 0 and 1 is replaced by the
    # next clip there and never shown; in the final clip it is shown and gets the first id.
    clips = [np.zeros((2, 1, 3), dtype=np.int64) for _ in range(3)]
    for clip in clips:
        clip[1, 0, 2] = 11005
    out = stitch(clips)
    assert out[:, 0, 2].tolist() == [0, 0, 0, 11001]


def test_track_scores_average_the_frames_that_show_the_track():
    clip = np.full((2, 1, 2), 13001)
    stitcher = VideoStitcher(2, 1)
    stitcher.add(clip, scores={13001: 0.8})
    stitcher.add(clip, scores={13001: 0.4})  # shows frames 1 and 2
    stitcher.finish()
    assert stitcher.scores() == {13 * VIDEO_LABEL_DIVISOR + 1: pytest.approx((0.8 + 0.4 + 0.4) / 3)}
    with pytest.raises(ValueError, match=r"no score for tube ids \[13001\]"):
        VideoStitcher(2, 1).add(clip, scores={13002: 0.5})


def test_a_flickering_tube_over_2000_frames_stitches_scores_and_is_written(tmp_path):
    # The car is detected in every other clip only (its confidence flickers around the
    # threshold), so every detection starts a new track: 1000 tracks in 2000 frames. A person
    # seen only in each clip's last frame is shown once, at the very end.
    num_frames, car, person = 2000, 13001, 11002
    clips = []
    for start in range(num_frames - 1):
        clip = np.zeros((2, 1, 6), dtype=np.int64)
        clip[:, 0, :2] = car if start % 2 == 0 else VOID_ID
        clip[1, 0, 4] = person
        clips.append(clip)
    video = stitch_clips(clips)
    semantic, track = np.divmod(video, VIDEO_LABEL_DIVISOR)
    assert sorted(set(track[semantic == 13].tolist())) == list(range(1, 1001))
    assert set(track[semantic == 11].tolist()) == {1}  # only the person that is shown has an id
    gt = np.zeros((num_frames, 1, 6), dtype=np.int64)
    gt[:, 0, :2] = car
    gt = relabel(gt, 1000, VIDEO_LABEL_DIVISOR)
    stq = STQ(NUM_CLASSES, THING_CLASSES, label_divisor=VIDEO_LABEL_DIVISOR)
    vpq = VPQ(NUM_CLASSES, THING_CLASSES, label_divisor=VIDEO_LABEL_DIVISOR)
    for gt_frame, frame in zip(gt, video):
        stq.update(gt_frame, frame)
        vpq.update_frame(gt_frame, frame)
    assert 0 < stq.result()["AQ"] < 0.01 and 0 < vpq.result()["VPQ_thing"] < 100
    write_kitti_step_png(tmp_path / "last.png", video[-1], VIDEO_LABEL_DIVISOR)
    read = read_kitti_step_png(tmp_path / "last.png", VIDEO_LABEL_DIVISOR)
    np.testing.assert_array_equal(read, video[-1])
    with pytest.raises(ValueError, match="label_divisor=65536"):
        read_kitti_step_png(tmp_path / "last.png")  # track 1000 does not fit under 1000


def test_padding_frames_are_dropped_and_spend_no_ids():
    clip = np.zeros((3, 1, 2), dtype=np.int64)
    clip[2, 0, 0] = 13005  # seen only on the padded third frame of a two-frame video
    stitcher = VideoStitcher(3, 1, num_frames=2)
    frames = stitcher.add(clip, scores={13005: 0.7}) + stitcher.finish()
    assert [t for t, _ in frames] == [0, 1] and stitcher.scores() == {}
    with pytest.raises(ValueError, match="add after finish"):
        stitcher.add(clip)
    with pytest.raises(ValueError, match="at least one frame"):
        next(sliding_clips(iter([]), 0, 2))
