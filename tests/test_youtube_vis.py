"""`minivseg.youtube_vis` on tiny YouTube-VIS datasets that the tests write themselves.

`write_split` -> `YouTubeVISSplit` -> `read_panoptic` gives back the panoptic videos with tracks
renumbered by their rank in the video (crowd, background, absent frames kept), in the 2021 and the
2019 layout; hand-written JSON (uncompressed RLEs, categories out of order, overlapping
annotations) reads as the painting rule says; every malformed file raises naming the file and the
entry; `ResultsWriter` output survives JSON; `score_results` of the GT itself is AP = AR = 1 and of
a worse track the AP computed by hand.
"""

import copy
import json
import math
import pickle
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from minivseg import youtube_vis as Y
from minivseg import youtube_vis_results as R
from minivseg.splits import DatasetError

F, H, W = 3, 24, 32
CATEGORIES = {0: "person", 1: "car"}  # package classes 0, 1 -> category ids 1, 2; background 2


def tiny_video(offset=0):
    """Two person tracks (3 is absent in frame 2), a car crowd region, car track 7 (void in frame
    1, so absent there), a class-5 region (not a category: background) and void pixels."""
    panoptic = np.full((F, H, W), 2000, dtype=np.int64)
    for t in range(F):
        panoptic[t, 2:10, 3 + t + offset : 12 + t + offset] = 1
    panoptic[:2, 12:20, 5:15] = 3
    panoptic[:, 0:4, 20:30] = 1000
    panoptic[:, 15:22, 20:30] = 1007
    panoptic[1, 15:22, 20:30] = 255000
    panoptic[:, 22:, :4] = 5000
    panoptic[:, 0, 0] = 255000
    ramp = np.arange(H)[:, None, None] * 4 + np.arange(W)[None, :, None] * 3 + [0, 40, 80]
    frames = np.stack([ramp + 10 * t + offset for t in range(F)]).astype(np.uint8)  # smooth
    return frames, panoptic


def expected_labels(panoptic, classes=(0, 1)):
    """Naive reading rule: tracks renumbered 1, 2, ... in id order, crowd kept, rest background."""
    out = np.full_like(panoptic, len(classes) * 1000)
    tracks = sorted(v for v in np.unique(panoptic).tolist() if v // 1000 in classes and v % 1000)
    for rank, value in enumerate(tracks, 1):
        out[panoptic == value] = value // 1000 * 1000 + rank
    for c in classes:
        out[panoptic == c * 1000] = c * 1000
    return out


@pytest.fixture
def dataset(tmp_path):
    videos = [("catdog", *tiny_video(0)), ("street", *tiny_video(2))]
    Y.write_split(tmp_path, "train", videos, CATEGORIES)
    return tmp_path, {name: panoptic for name, _, panoptic in videos}


def read_video(split, name):
    return np.stack([split.read_panoptic(name, frame) for frame in split.sequences[name]])


def test_write_split_round_trip(dataset):
    root, videos = dataset
    split = Y.YouTubeVISSplit(root, "train")
    assert split.labels and split.format == "youtube-vis" and split.own_classes
    assert list(split.sequences) == ["catdog", "street"]
    assert split.sequences["street"] == ["00000", "00001", "00002"]
    assert (split.num_classes, split.thing_classes) == (3, (0, 1))
    assert split.class_names == ("person", "car", "background")
    assert split.category_ids == (1, 2) and split.video_ids == {"catdog": 1, "street": 2}
    for name, panoptic in videos.items():
        labels = read_video(split, name)
        np.testing.assert_array_equal(labels, expected_labels(panoptic))
        assert set(np.unique(labels).tolist()) == {1, 2, 1000, 1003, 2000}  # 1007 -> rank 3
    image = np.asarray(Image.open(split.image_path("catdog", "00001")), dtype=float)
    assert image.shape == (H, W, 3) and np.abs(image - tiny_video(0)[0][1]).mean() < 3  # JPEG 95
    counts = split.check()
    naive = [
        np.bincount((expected_labels(p) // 1000).ravel(), minlength=4) for p in videos.values()
    ]
    np.testing.assert_array_equal(counts, sum(naive))
    again = pickle.loads(pickle.dumps(split))  # DataLoader workers
    np.testing.assert_array_equal(again.read_panoptic("street", "00002"), labels[2])


def test_written_json_is_youtube_vis(dataset):
    root, videos = dataset
    data = json.loads((root / "train" / "instances.json").read_text())
    assert data["videos"][0]["file_names"] == [f"catdog/{t:05d}.jpg" for t in range(F)]
    assert {(v["id"], v["height"], v["width"], v["length"]) for v in data["videos"]} == {
        (1, H, W, F), (2, H, W, F)}  # fmt: skip
    assert data["categories"][1] == {"id": 2, "name": "car", "supercategory": "object"}
    first = [a for a in data["annotations"] if a["video_id"] == 1]
    assert [(a["category_id"], a["iscrowd"]) for a in first] == [(1, 0), (1, 0), (2, 1), (2, 0)]
    panoptic = videos["catdog"]
    for annotation, value in zip(first, (1, 3, 1000, 1007)):
        for t in range(F):
            mask = panoptic[t] == value
            if not mask.any():
                assert annotation["segmentations"][t] is None and annotation["areas"][t] is None
                assert annotation["bboxes"][t] is None
                continue
            rle = annotation["segmentations"][t]
            assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
            np.testing.assert_array_equal(coco_mask.decode(rle), mask)
            rows, cols = np.nonzero(mask)
            box = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert annotation["areas"][t] == mask.sum() and annotation["bboxes"][t] == box
    assert first[1]["segmentations"][2] is None and first[3]["segmentations"][1] is None


def test_2019_layout_reads_the_same(dataset):
    root, videos = dataset
    new = Y.YouTubeVISSplit(root, "train")
    (root / "train" / "instances.json").rename(root / "train.json")
    assert Y.annotations_path(root, "train") == root / "train.json"
    old = Y.YouTubeVISSplit(root, "train")
    assert old.sequences == new.sequences
    np.testing.assert_array_equal(read_video(old, "street"), read_video(new, "street"))
    (root / "train" / "instances.json").write_text("{}")  # both: the 2021 file wins
    assert Y.annotations_path(root, "train") == root / "train" / "instances.json"


def naive_rle(mask):
    """Uncompressed COCO RLE (as YouTube-VIS ships it): column-major runs, zeros first."""
    counts, value, run = [], 0, 0
    for pixel in mask.T.ravel().tolist():
        if pixel != value:
            counts, value, run = counts + [run], pixel, 0
        run += 1
    return {"size": list(mask.shape), "counts": counts + [run]}


def box(top, left, height, width, size=(6, 8)):
    mask = np.zeros(size, dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def hand_data():
    """One video of 2 frames (6x8, listed out of name order), categories 9 and 4 listed in that
    order; a small annotation listed before a large one that it overlaps; a crowd region."""
    video = {"id": 3, "width": 8, "height": 6, "length": 2,
             "file_names": ["v/00005.jpg", "v/00000.jpg"]}  # fmt: skip
    small = [naive_rle(box(1, 1, 2, 2)), naive_rle(box(0, 0, 5, 6))]  # grows over `large`
    large = [naive_rle(box(0, 0, 4, 4)), naive_rle(box(1, 1, 2, 2))]
    crowd = [None, naive_rle(box(5, 6, 1, 2))]
    annotation = lambda i, c, s, crowd=0: {"id": i, "video_id": 3, "category_id": c,  # noqa: E731
                                           "iscrowd": crowd, "segmentations": s}  # fmt: skip
    annotations = [annotation(1, 9, small), annotation(2, 4, large), annotation(3, 4, crowd, 1)]
    categories = [{"id": 9, "name": "zebra"}, {"id": 4, "name": "ape"}]
    return {"videos": [video], "categories": categories, "annotations": annotations}


def write_dataset(root, data, split="train"):
    """``data`` (a dict, or text) as ``SPLIT/instances.json`` with black JPEGs for its videos."""
    for video in data.get("videos", []) if isinstance(data, dict) else []:
        for image in (root / split / "JPEGImages" / name for name in video.get("file_names", [])):
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (video["width"], video["height"])).save(image)
    path = root / split / "instances.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_hand_written_json_and_painting_order(tmp_path):
    write_dataset(tmp_path, hand_data())
    split = Y.YouTubeVISSplit(tmp_path, "train")
    assert split.sequences == {"v": ["00005", "00000"]}  # the JSON's order is time order
    assert split.category_ids == (4, 9) and split.class_names == ("ape", "zebra", "background")
    zebra, ape, background = 1001, 2, 2000  # tracks ranked in file order: zebra 1, ape 2
    expected = np.full((2, 6, 8), background)
    expected[0][box(0, 0, 4, 4)] = ape  # larger first, then the small zebra on top
    expected[0][box(1, 1, 2, 2)] = zebra
    expected[1][box(0, 0, 5, 6)] = zebra  # the zebra grew: now the ape is painted over it
    expected[1][box(1, 1, 2, 2)] = ape
    expected[1][box(5, 6, 1, 2)] = 0  # crowd: class ape, instance 0
    np.testing.assert_array_equal(read_video(split, "v"), expected)
    data = hand_data()  # equal areas: the later annotation wins where they overlap
    data["annotations"][1]["segmentations"][0] = naive_rle(box(2, 2, 2, 2))
    write_dataset(tmp_path, data)
    frame = Y.YouTubeVISSplit(tmp_path, "train").read_panoptic("v", "00005")
    assert frame[2, 2] == ape and frame[1, 1] == zebra


def mutated(change):
    data = hand_data()
    change(data)
    return data


def many_instances(data):
    data["annotations"] = [{"video_id": 3, "category_id": 4, "segmentations": [None, None]}] * 1000


ERRORS = [
    (lambda d: d["videos"][0].pop("file_names"), "videos[0]: missing key 'file_names'"),
    (lambda d: d.pop("categories"), "missing key 'categories'"),
    (lambda d: d["annotations"][1].pop("segmentations"), "annotations[1]: missing key"),
    (lambda d: d["videos"][0].update(file_names=["v/0.jpg", "w/1.jpg"]), "videos[0]: file_names"),
    (lambda d: d["videos"][0].update(file_names=["0.jpg", "1.jpg"]), "videos[0]: file_names"),
    (lambda d: d["videos"][0].update(length=3), "videos[0]: length 3"),
    (lambda d: d["videos"].append(dict(d["videos"][0], id=4)), "videos[1]: video folder v"),
    (lambda d: d["annotations"][2].update(video_id=99), "annotations[2]: unknown video_id 99"),
    (
        lambda d: d["annotations"][0].update(category_id=5),
        "annotations[0]: unknown video_id 3 or category_id 5",
    ),
    (lambda d: d["annotations"][0]["segmentations"].append(None), "annotations[0]: segmentations"),
    (
        lambda d: d["annotations"][1]["segmentations"][1].update(size=[6, 9]),
        "annotations[1] frame 1: RLE size",
    ),
    (
        lambda d: d["annotations"][0]["segmentations"][0]["counts"].append(1),
        "annotations[0] frame 0: uncompressed",
    ),
    (
        lambda d: d["annotations"][0]["segmentations"][1].pop("counts"),
        "frame 1: missing key 'counts'",
    ),
    (many_instances, "annotations[999]: video 3 has more than 999 instances"),
]


@pytest.mark.parametrize("change, message", ERRORS)
def test_malformed_json_names_file_and_entry(tmp_path, change, message):
    path = write_dataset(tmp_path, mutated(change))
    with pytest.raises(DatasetError) as error:
        Y.YouTubeVISSplit(tmp_path, "train")
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_missing_files_and_invalid_json(tmp_path):
    with pytest.raises(DatasetError, match="instances.json.*tried it and.*train.json"):
        Y.YouTubeVISSplit(tmp_path, "train")
    path = write_dataset(tmp_path, '{"videos": [')
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}: cannot read JSON"):
        Y.YouTubeVISSplit(tmp_path, "train")
    write_dataset(tmp_path, hand_data())
    (tmp_path / "train" / "JPEGImages" / "v" / "00000.jpg").unlink()
    with pytest.raises(DatasetError, match=f"v/00000.jpg: no such image .*{re.escape(str(path))}"):
        Y.YouTubeVISSplit(tmp_path, "train")


def test_labels_and_errors_found_when_decoding(tmp_path):
    data = hand_data()
    del data["annotations"]
    path = write_dataset(tmp_path, data, "valid")
    split = Y.YouTubeVISSplit(tmp_path, "valid")
    assert split.labels is False and split.check().sum() == 0
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}: split 'valid' has no labels"):
        split.read_panoptic("v", "00000")
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}: no annotations"):
        Y.YouTubeVISSplit(tmp_path, "valid", labels=True)
    assert Y.YouTubeVISSplit(tmp_path, "valid", labels=None).labels is False
    data = hand_data()  # compressed counts of a larger mask: only decoding sees it
    data["annotations"][0]["segmentations"][1] = dict(
        Y.encode_mask(box(0, 0, 9, 8, (9, 8))), size=[6, 8]
    )
    path = write_dataset(tmp_path, data)
    split = Y.YouTubeVISSplit(tmp_path, "train")
    assert not Y.YouTubeVISSplit(tmp_path, "train", labels=False).labels
    source = re.escape(f"{path} (video 3, frame 1: v/00000.jpg): invalid RLE")
    with pytest.raises(DatasetError, match=f"^{source}"):
        split.check()
    Image.new("RGB", (8, 5)).save(tmp_path / "train" / "JPEGImages" / "v" / "00005.jpg")
    with pytest.raises(DatasetError, match="v/00005.jpg: image size differs"):
        split.check()


def test_uninitialised_pixels_from_pycocotools_raise(tmp_path, monkeypatch):
    write_dataset(tmp_path, hand_data())
    split, decode = Y.YouTubeVISSplit(tmp_path, "train"), coco_mask.decode

    def uninitialised(rles):  # what pycocotools returns for a too short compressed RLE
        masks = decode(rles).copy()
        masks[-1, -1] = 7  # a pixel after the runs
        return masks

    monkeypatch.setattr(Y.coco_mask, "decode", uninitialised)
    with pytest.raises(DatasetError, match="frame 0: v/00005.jpg.*runs do not cover the frame"):
        split.read_panoptic("v", "00005")


def predicted_video(split_panoptic):
    """GT with the 65536 divisor (what stitching emits), plus a stuff id with a track number."""
    pred = split_panoptic // 1000 * 65536 + split_panoptic % 1000
    pred[:, 23, 31] = 2 * 65536 + 4  # background class: never a track
    return pred


def write_results(split):
    """Results of every video of ``split`` from its own GT tracks, each with score 1."""
    writer = R.ResultsWriter(split)
    for name in split.sequences:
        writer.start_video(name)
        pred = predicted_video(read_video(split, name))
        for frame in pred:
            writer.add_frame(frame)
        tracks = {int(v) for v in np.unique(pred) if v // 65536 < 2 and v % 65536}
        writer.end_video({track: 1.0 for track in tracks})
    return writer


def test_results_writer_json_round_trip(dataset, tmp_path):
    root, _ = dataset
    split = Y.YouTubeVISSplit(root, "train")
    writer = write_results(split)
    results = writer.results
    assert json.loads(json.dumps(results)) == results
    assert json.loads(writer.write(tmp_path / "out" / "results.json").read_text()) == results
    first = [r for r in results if r["video_id"] == 1]
    assert [r["category_id"] for r in first] == [1, 1, 2] and len(results) == 6
    assert first[1]["segmentations"][2] is None and first[2]["segmentations"][1] is None
    labels = read_video(split, "catdog")
    for result, track in zip(first, (1, 2, 1003)):
        for t, rle in enumerate(result["segmentations"]):
            if rle is not None:
                np.testing.assert_array_equal(coco_mask.decode(rle) > 0, labels[t] == track)
    pred = predicted_video(labels)
    writer.start_video("catdog")
    for frame in pred:
        writer.add_frame(frame)
    with pytest.raises(
        ValueError, match=r"3 of 3 frames added; tracks without a score: \[2, 65539"
    ):
        writer.end_video({1: 0.5})
    writer.start_video("catdog")
    writer.add_frame(pred[0])
    with pytest.raises(ValueError, match="catdog: 1 of 3 frames added"):
        writer.end_video({1: 0.5, 2: 0.5, 65539: 0.5})
    with pytest.raises(ValueError, match=r"catdog: frame 1 has shape \(24, 33\)"):
        writer.add_frame(np.zeros((H, W + 1), dtype=np.int64))


def test_score_results_perfect_and_worse(dataset, tmp_path):
    root, _ = dataset
    split = Y.YouTubeVISSplit(root, "train")
    results = write_results(split).results
    perfect = R.score_results(results, split)
    assert all(perfect[k] == 1 for k in ("AP", "AP50", "AP75", "APs", "AR10", "AR100"))
    assert perfect["AR1"] == (2 / 4 + 2 / 2) / 2  # one detection per video: 1 of 2 persons each
    assert math.isnan(perfect["APm"]) and math.isnan(perfect["APl"])  # every track is small
    worse = copy.deepcopy(results)  # video 1, person track 1: drop frame 2, score it lowest
    worse[0]["segmentations"][2], worse[0]["score"] = None, 0.5
    gt = read_video(split, "catdog") == 1  # matched at IoU 0.50..0.65: 4 of 10 thresholds
    assert gt[:2].sum() / gt.sum() == pytest.approx(2 / 3)
    # person, above 0.65: the other 3 person tracks come first, then this false positive:
    # precision 1 up to recall 3/4 (recall points 0..0.75: 76 of 101), then 0
    person = (4 + 6 * 76 / 101) / 10
    scores = R.score_results(worse, split)
    assert scores["AP"] == pytest.approx((person + 1) / 2)
    assert scores["AP75"] == pytest.approx((76 / 101 + 1) / 2) and scores["AP50"] == 1
    assert scores["AR100"] == pytest.approx(((4 + 6 * 3 / 4) / 10 + 1) / 2)


def test_score_results_errors_name_the_file(dataset, tmp_path):
    root, _ = dataset
    split = Y.YouTubeVISSplit(root, "train")
    results = write_results(split).results
    wide = Y.encode_mask(np.ones((H, W + 1), bool))
    bad = [
        (dict(results[0], video_id=42), "results[0]: video_id 42"),
        (dict(results[1], category_id=3), "results[1]: video_id 1 or category_id 3"),
        (dict(results[0], segmentations=[None]), "results[0]: segmentations must be a list of 3"),
        (dict(results[0], segmentations=[wide] * 3), "results[0] frame 0: RLE size"),
    ]
    for k, (result, message) in enumerate(bad):
        path = tmp_path / f"results{k}.json"
        path.write_text(json.dumps([results[0], result] if k == 1 else [result]))
        with pytest.raises(DatasetError) as error:
            R.score_results(path, split)
        assert str(error.value).startswith(f"{path}: {message}")


def test_command_line(dataset, tmp_path, capsys):
    root, _ = dataset
    assert Y.main(["--check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 2 videos, 6 frames, 8 annotations (2 crowd), labels: True" in out
    assert "instances: person 4, car 2" in out and out.strip().endswith(f"{root}: OK")
    results = write_results(Y.YouTubeVISSplit(root, "train")).write(tmp_path / "res.json")
    assert R.main([str(results), "--data", str(root), "--split", "train"]) == 0
    assert "    AP 100.00" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^error: .*valid/instances.json"):
        Y.main(["--check", str(root), "--splits", "valid"])
