"""Tests for minivseg.vspw: the VSPW layout, its mask codec, the writer and the scores.

Round trips through `write_split`, hand-computed and naive (VC_perclip.py's definition and
evaluator's ``isval`` mean, written out below) mIoU / VC on raw mask values with "others" and
void, every `DatasetError` naming its file, and the command line."""

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from minivseg.formats import detect_format, open_split
from minivseg.panoptic import VOID_ID
from minivseg.splits import DatasetError, read_image
from minivseg.vspw import (
    CLASS_FILE,
    VSPWSplit,
    main,
    prediction_path,
    read_mask_classes,
    read_mask_values,
    score_predictions,
    write_mask,
    write_split,
)

CLASSES = ("wall", "floor", "sky")  # mask values 1, 2, 3


def make_video(rng, num_frames, height=16, width=24):
    """Frames, and panoptic ids whose classes persist over time (so VC has stable pixels), with
    instance ids (dropped by VSPW) and a little void."""
    frames = rng.integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)
    blocks = rng.integers(0, 3, size=(height // 4, width // 4)).repeat(4, 0).repeat(4, 1)
    semantic = np.repeat(blocks[None], num_frames, axis=0)
    semantic[num_frames // 2 :, :4, :4] = (semantic[0, 0, 0] + 1) % 3  # one block changes
    semantic[rng.random(semantic.shape) < 0.1] = 255
    panoptic = np.where(semantic == 255, VOID_ID, semantic * 1000 + 7)
    return frames, panoptic


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    videos = [("v1", *make_video(rng, 5)), ("v2", *make_video(rng, 18))]
    write_split(tmp_path, "val", videos, CLASSES)
    return tmp_path, videos


def write_values(path, values):
    """A raw 8-bit palette mask, as VSPW ships them (0 = others, 255 = void)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(values, dtype=np.uint8))
    image.putpalette([0] * 768)
    image.save(path)


def write_predictions(out, split, predict):
    for video, frames in split.sequences.items():
        for frame in frames:
            write_mask(prediction_path(out, video, frame), predict(split.mask_path(video, frame)))


def test_write_split_round_trip(dataset):
    root, videos = dataset
    split = VSPWSplit(root, "val")
    assert isinstance(open_split(root, "val"), VSPWSplit) and detect_format(root) == "vspw"
    assert split.labels and split.format == "vspw" and split.own_classes
    assert (split.num_classes, split.class_names, split.thing_classes) == (3, CLASSES, ())
    assert split.sequences == {
        "v1": [f"{t:08d}" for t in range(1, 6)],
        "v2": [f"{t:08d}" for t in range(1, 19)],
    }
    assert (root / "val.txt").read_text() == "v1\nv2\n"
    table = json.loads((root / CLASS_FILE).read_text())
    assert table == {"others": 0, "wall": 1, "floor": 2, "sky": 3}
    expected_counts = np.zeros(4, dtype=np.int64)
    for name, frames, panoptic in videos:
        expected = np.where(panoptic == VOID_ID, VOID_ID, panoptic // 1000 * 1000)
        for t, frame in enumerate(split.sequences[name]):
            read = split.read_panoptic(name, frame)
            assert read.dtype == np.int64 and np.array_equal(read, expected[t])
            path = split.image_path(name, frame)
            with Image.open(path) as image:
                assert (path.suffix, image.format) == (".jpg", "JPEG")
            assert read_image(path).shape == frames.shape[1:]
        semantic = np.where(panoptic == VOID_ID, 3, panoptic // 1000)
        expected_counts += np.bincount(semantic.ravel(), minlength=4)
    assert (expected_counts[3] > 0) and np.array_equal(split.check(), expected_counts)


def test_class_json_values_may_be_strings(dataset):
    root, _ = dataset
    (root / CLASS_FILE).write_text('{"sky": "3", "others": "0", "wall": 1, "floor": "2"}')
    assert VSPWSplit(root, "val").class_names == CLASSES


def test_mask_codec_round_trip(tmp_path):
    semantic = np.array([[0, 5, 253], [255, 1, 0]])
    path = tmp_path / "a" / "b" / "mask.png"
    write_mask(path, semantic)
    with Image.open(path) as image:
        assert image.mode == "P"
    assert np.array_equal(read_mask_values(path), [[1, 6, 254], [255, 2, 1]])
    assert np.array_equal(read_mask_classes(path), semantic)
    write_values(path, [[0, 1, 255]])  # others reads as void
    assert np.array_equal(read_mask_classes(path, num_classes=3), [[255, 0, 255]])
    write_values(path, [[0, 4, 200]])
    with pytest.raises(DatasetError, match=re.escape(f"{path}: mask values [4, 200]")):
        read_mask_classes(path, num_classes=3)
    for bad in (254, -1):
        with pytest.raises(ValueError, match="0..253"):
            write_mask(path, [[bad]])


def test_unlabelled_split(dataset):
    root, videos = dataset
    write_split(root, "test", [("t1", videos[0][1], None)], CLASSES)
    split = VSPWSplit(root, "test")
    assert not split.labels and split.num_frames() == 5
    assert np.array_equal(split.check(), np.zeros(4))
    with pytest.raises(DatasetError, match="no masks"):
        score_predictions(root / "pred", split)
    with pytest.raises(DatasetError, match=re.escape(str(root / "data" / "t1" / "mask"))):
        VSPWSplit(root, "test", labels=True)


def test_perfect_predictions_score_one(dataset, tmp_path):
    split = VSPWSplit(dataset[0], "val")
    write_predictions(tmp_path / "pred", split, read_mask_classes)
    result = score_predictions(tmp_path / "pred", split)
    assert (result["mIoU"], result["mVC8"], result["mVC16"]) == (1.0, 1.0, 1.0)
    assert prediction_path(tmp_path / "pred", "v2", "00000018").is_file()


def test_scores_hand_computed(tmp_path):
    # 9 frames of 1x4 pixels: p0 stays 1, p1 stays 2, p2 stays 0 ("others"), p3 is 1 then 2.
    gt = np.array([[[1, 2, 0, 1 if t < 3 else 2]] for t in range(9)])
    # prediction: p0 stays 1, p1 is 2 then 1, p2 predicts 3 on "others", p3 stays 3
    pred = np.array([[[1, 2 if t < 5 else 1, 3, 3]] for t in range(9)])
    write_split(tmp_path, "val", [("a", np.zeros((9, 1, 4, 3), np.uint8), None)], CLASSES)
    for t in range(9):
        write_values(tmp_path / "data" / "a" / "mask" / f"{t + 1:08d}.png", gt[t])
        write_values(tmp_path / "pred" / "a" / f"{t + 1:08d}.png", pred[t])
    result = score_predictions(tmp_path / "pred", VSPWSplit(tmp_path, "val"))
    # class 0 (value 1): GT 12 px, predicted 13 px, hits 9: IoU 9 / 16
    # class 1 (value 2): GT 15 px, predicted 5 px, hits 5: IoU 5 / 15
    # class 2 (value 3): predicted on p3 (9 px; p2 is "others": not counted), never in the GT:
    # IoU 0, left out of VSPW's mean (the union mean would be (9/16 + 1/3 + 0) / 3)
    assert result["mIoU"] == pytest.approx((9 / 16 + 5 / 15) / 2)
    assert result["IoU_per_class"] == pytest.approx([9 / 16, 1 / 3, 0.0])
    # one VC8 window (frames 0..7; the tooling drops the last): GT stable on p0, p1, p2
    # ("others" counts), prediction constant on p0, p2
    assert result["mVC8"] == pytest.approx(2 / 3)
    assert math.isnan(result["mVC16"])  # 9 frames <= 16: no window


def naive_scores(gt_videos, pred_videos, num_classes):
    """VC_perclip.py's windows and evaluator's mean over classes with GT pixels, on raw values."""
    scores = {}
    for n in (8, 16):
        windows = []
        for gt, pred in zip(gt_videos, pred_videos):
            for i in range(len(gt) - n):
                stable = (gt[i : i + n] == gt[i]).all(0)
                consistent = stable & (pred[i : i + n] == pred[i]).all(0)
                windows.append(consistent.sum() / stable.sum() if stable.sum() else math.nan)
        scores[f"mVC{n}"] = np.nanmean(windows)
    gt, pred = np.concatenate(gt_videos), np.concatenate(pred_videos)
    labelled = (gt > 0) & (gt < 255)
    ious = []
    for value in range(1, num_classes + 1):
        in_gt, in_pred = gt == value, labelled & (pred == value)
        if in_gt.any():
            ious.append((in_gt & in_pred).sum() / (in_gt | in_pred).sum())
    scores["mIoU"] = np.mean(ious)
    return scores


def test_scores_match_naive_computation(tmp_path):
    rng = np.random.default_rng(1)
    gt_videos, pred_videos, videos = [], [], []
    for name, num_frames in (("x", 20), ("y", 11)):
        gt = np.empty((num_frames, 3, 5), np.int64)
        gt[0] = rng.choice([0, 1, 2, 3, 255], size=(3, 5))
        for t in range(1, num_frames):
            gt[t] = np.where(rng.random((3, 5)) < 0.05, rng.choice([0, 1, 2, 3, 255]), gt[t - 1])
        pred = np.where(rng.random(gt.shape) < 0.1, rng.integers(1, 4, gt.shape), gt)
        pred[pred == 0] = 2
        gt_videos.append(gt), pred_videos.append(pred)
        videos.append((name, np.zeros((num_frames, 3, 5, 3), np.uint8), None))
    write_split(tmp_path, "val", videos, CLASSES)
    for (name, *_), gt, pred in zip(videos, gt_videos, pred_videos):
        for t in range(len(gt)):
            write_values(tmp_path / "data" / name / "mask" / f"{t + 1:08d}.png", gt[t])
            classes = np.where(pred[t] == 255, 255, pred[t] - 1)
            write_mask(tmp_path / "pred" / name / f"{t + 1:08d}.png", classes)
    result = score_predictions(tmp_path / "pred", VSPWSplit(tmp_path, "val"))
    expected = naive_scores(gt_videos, pred_videos, 3)
    assert 0 < expected["mVC16"] < 1 and 0 < expected["mIoU"] < 1
    for key in ("mIoU", "mVC8", "mVC16"):
        assert result[key] == pytest.approx(expected[key])


def remove(path):
    path.unlink()
    return path


def test_dataset_errors_name_the_file(dataset):
    root, _ = dataset
    data, json_path, list_path = root / "data", root / CLASS_FILE, root / "val.txt"
    mask, frame = data / "v2" / "mask" / "00000003.png", data / "v2" / "origin" / "00000004.jpg"
    write = lambda path, text: lambda: path.write_text(text)  # noqa: E731
    cases = [  # (break something, split to open, file the error must name)
        (lambda: None, "train", root / "train.txt"),
        (json_path.unlink, "val", json_path),
        (write(json_path, "{"), "val", json_path),
        (write(json_path, '{"wall": 1}'), "val", json_path),
        (write(json_path, '{"others": 0, "a": 1, "b": 1}'), "val", json_path),
        (write(json_path, '{"others": 0, "a": 2}'), "val", json_path),
        (write(json_path, '{"others": 0, "a": 1.5}'), "val", json_path),
        (write(json_path, '{"others": 1, "a": 0}'), "val", json_path),
        (write(list_path, "v1\nghost\n"), "val", data / "ghost" / "origin"),
        (write(list_path, "\n"), "val", list_path),
        (mask.unlink, "val", mask),  # a frame without a mask
        (frame.unlink, "val", data / "v2" / "mask" / "00000004.png"),  # a mask without a frame
    ]
    backup = {path: path.read_bytes() for path in (json_path, list_path, mask, frame)}
    for breaks, split, named in cases:
        breaks()
        with pytest.raises(DatasetError, match=re.escape(str(named))):
            VSPWSplit(root, split)
        for path, content in backup.items():
            path.write_bytes(content)
    assert VSPWSplit(root, "val").num_frames() == 23
    (data / "empty" / "origin").mkdir(parents=True)
    (root / "empty.txt").write_text("empty\n")
    with pytest.raises(DatasetError, match=re.escape(f"{data / 'empty' / 'origin'}: no frames")):
        VSPWSplit(root, "empty")


def test_masks_in_some_videos_only_is_an_error(dataset):
    root, _ = dataset
    for path in (root / "data" / "v1" / "mask").iterdir():
        path.unlink()
    (root / "data" / "v1" / "mask").rmdir()
    with pytest.raises(DatasetError, match="some videos have masks") as error:
        VSPWSplit(root, "val")
    assert str(root / "data" / "v1" / "mask") in str(error.value)
    assert not VSPWSplit(root, "val", labels=False).labels


def test_check_decodes_masks_and_names_bad_ones(dataset, tmp_path):
    root, _ = dataset
    split = VSPWSplit(root, "val")
    mask = split.mask_path("v2", "00000002")
    write_values(mask, np.full((16, 24), 9))
    for read in (split.check, lambda: split.read_panoptic("v2", "00000002")):
        with pytest.raises(DatasetError, match=re.escape(f"{mask}: mask values [9]")):
            read()
    write_values(mask, np.ones((16, 20)))
    with pytest.raises(DatasetError, match=re.escape(f"{mask}: mask size (16, 20)")):
        split.check()
    write_values(mask, np.ones((16, 24)))
    write_predictions(tmp_path / "pred", split, read_mask_classes)
    missing = remove(prediction_path(tmp_path / "pred", "v1", "00000003"))
    with pytest.raises(DatasetError, match=re.escape(f"{missing}: no prediction")):
        score_predictions(tmp_path / "pred", split)


def test_write_split_refuses_other_classes_and_stale_frames(dataset):
    root, videos = dataset
    with pytest.raises(DatasetError, match=re.escape(str(root / CLASS_FILE))):
        write_split(root, "train", videos[:1], ("wall", "floor", "sea"))
    with pytest.raises(DatasetError, match=re.escape(str(root / "data" / "v2"))):
        write_split(root, "train", [("v2", *videos[0][1:])], CLASSES)  # 5 frames over 18


def test_command_line(dataset, tmp_path, capsys):
    root, _ = dataset
    main(["--check", str(root)])
    out = capsys.readouterr().out
    assert "val: 2 videos, 23 frames, labels: True" in out and f"{root}: OK" in out
    assert "others/void" in out
    write_predictions(tmp_path / "pred", VSPWSplit(root, "val"), read_mask_classes)
    main(["--score", str(tmp_path / "pred"), "--data", str(root), "--split", "val"])
    assert capsys.readouterr().out.splitlines()[-1].split() == ["val", "100.00", "100.00", "100.00"]
    remove(root / "data" / "v1" / "mask" / "00000002.png")
    with pytest.raises(SystemExit, match="^error: .*00000002"):
        main(["--check", str(root), "--splits", "val"])
