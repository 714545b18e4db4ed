"""YouTube-VIS (2019, 2021) as a `minivseg.splits.VideoSplit`, and a writer of its layout.

YouTube-VIS (Yang, Fan, Xu, "Video Instance Segmentation", ICCV 2019) labels tracks of 40
categories in short videos (data: https://youtube-vos.org/dataset/vis/; CodaLab servers score
valid and test, 2019: https://competitions.codalab.org/competitions/20128, 2021: linked there).
Layouts, as Detectron2 and Mask2Former register them::

    ROOT/{train,valid,test}/JPEGImages/VIDEO/00000.jpg   frames (both years)
    ROOT/{train,valid,test}/instances.json              2021 annotations (looked for first)
    ROOT/{train,valid,test}.json                        2019 annotations

The JSON (COCO's, per video) has ``videos`` ``{id, width, height, length, file_names}``,
``categories`` ``{id, name, supercategory}`` and, in train only (the servers keep valid's and
test's), ``annotations`` ``{id, video_id, category_id, iscrowd, segmentations, areas, bboxes}``
with, per frame, an RLE ``{"size": [h, w], "counts": str or list}`` or null (object absent).

**Labels** (`minivseg.panoptic`, ``class * 1000 + instance``): the categories sorted by id are
thing classes ``0..C-1``; a stuff class ``C``, "background", takes every pixel no annotation
covers (nothing is void). A non-crowd annotation is a track whose instance id is its 1-based rank
among its video's non-crowd annotations; an ``iscrowd`` one is its class with instance 0.
Annotations may overlap, panoptic maps cannot: a frame paints background, then its annotations by
decreasing area (ties in file order), so a small object in front of a large one stays visible.
Sequences are the folders of ``file_names``, frames their stems, in the JSON's (time) order.

**Results** (the server wants ``results.json`` zipped without folders): a list of ``{video_id,
category_id, score, segmentations}``, one per predicted track, with a compressed RLE (``counts``
a str) per frame or null where the track is absent. `minivseg.youtube_vis_results` builds it
while predictions stream and scores it with `minivseg.video_ap.VideoAP` (equal to ytvoseval's
numbers to 3.3e-16 on 1000 random datasets); `write_split` writes a dataset (2021 layout).

Deliberate differences from youtubevos/cocoapi (``ytvos.py``, ``ytvoseval.py``): overlapping GT is
painted, for training and for our scoring (the official evaluation keeps each annotation's whole
mask), and GT ``avg_area`` is the painted one, not the JSON's ``areas``; a video's crowd
annotations of one class are one region; polygons are not read; a decoded mask must have its
RLE's area (pycocotools leaves the pixels after a short compressed RLE uninitialised).
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from minivseg.panoptic import LABEL_DIVISOR
from minivseg.splits import DatasetError, VideoSplit, read_image, write_text_atomically

VIDEO_KEYS = ("id", "file_names", "height", "width")  # the JSON entries' keys that we read
ANNOTATION_KEYS = ("video_id", "category_id", "segmentations")  # "iscrowd": 0 if absent


def annotations_path(root, split: str) -> Path:
    """``ROOT/SPLIT/instances.json`` (2021) if it exists, else ``ROOT/SPLIT.json`` (2019)."""
    tried = (Path(root) / split / "instances.json", Path(root) / f"{split}.json")
    for path in tried:
        if path.is_file():
            return path
    raise DatasetError(f"{tried[0]}: no annotations of split {split!r} (tried it and {tried[1]})")


def load_json(path):
    """The parsed file; `DatasetError` naming it when it cannot be read."""
    try:
        with open(path, "rb") as file:
            return json.load(file)
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{path}: cannot read JSON: {error}") from error


def fields(entry, keys, where: str) -> tuple:
    """``entry[key]`` for each key; `DatasetError` naming ``where`` (file and entry) if missing."""
    missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
    if missing:
        raise DatasetError(f"{where}: missing key {missing[0]!r}")
    return tuple(entry[key] for key in keys)


def to_rle(segmentation, height: int, width: int, where: str) -> bytes | None:
    """One frame's RLE (compressed or not) as compressed counts, None where absent;
    `DatasetError` naming ``where`` for a size other than the video's or bad counts."""
    if segmentation is None:
        return None
    size, counts = fields(segmentation, ("size", "counts"), where)
    if list(size) != [height, width]:
        raise DatasetError(f"{where}: RLE size {size} differs from the video's [{height}, {width}]")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            raise DatasetError(f"{where}: uncompressed RLE counts do not sum to {height}*{width}")
        return coco_mask.frPyObjects(segmentation, height, width)["counts"]
    return counts.encode("ascii", "replace") if isinstance(counts, str) else counts


def decode(counts: list, height: int, width: int, where: str) -> np.ndarray:
    """``(H, W, N)`` bool masks of compressed RLE counts; `DatasetError` naming ``where`` if one
    is malformed (pycocotools leaves the pixels after a short RLE's runs uninitialised)."""
    rles = [{"size": [height, width], "counts": c} for c in counts]
    try:
        masks, areas = coco_mask.decode(rles), coco_mask.area(rles)  # (H, W, N), (N,)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{where}: invalid RLE counts: {error}") from error
    if (np.count_nonzero(masks, axis=(0, 1)) != areas).any():
        raise DatasetError(f"{where}: invalid RLE: its runs do not cover the frame")
    return masks > 0


def encode_mask(mask: np.ndarray) -> dict:
    """``(H, W)`` bool mask -> compressed RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_json(path, data) -> Path:
    """Write ``data`` as compact JSON atomically (`minivseg.splits.write_text_atomically`)."""
    return write_text_atomically(path, json.dumps(data, separators=(",", ":")))


class YouTubeVISSplit(VideoSplit):
    """A YouTube-VIS split. Opening it parses and checks the JSON and that every frame's image
    exists; `check` decodes everything. Extra attributes: ``json_path``, ``category_ids`` (class ->
    category id), ``video_ids`` (sequence -> video id), ``video_sizes`` (sequence -> (H, W))."""

    format = "youtube-vis"
    own_classes = True

    def __init__(self, root, split: str, labels=None):
        root, path = Path(root), annotations_path(root, split)
        data = load_json(path)
        categories, videos = fields(data, ("categories", "videos"), str(path))
        ids = [fields(c, ("id", "name"), f"{path}: categories[{k}]")
               for k, c in enumerate(categories)]  # fmt: skip
        if not 0 < len(ids) < 255 or len({i for i, _ in ids}) < len(ids):
            raise DatasetError(f"{path}: expected 1..254 categories with distinct ids")
        ids.sort(key=lambda category: category[0])
        self.json_path, self.category_ids = path, tuple(i for i, _ in ids)
        self.video_ids, self.video_sizes, self._frames, self._annotations = {}, {}, {}, {}
        sequences, by_id = {}, {}
        for k, video in enumerate(videos):
            where = f"{path}: videos[{k}]"
            video_id, files, height, width = fields(video, VIDEO_KEYS, where)
            parts = [PurePosixPath(name).parts for name in files] if isinstance(files, list) else []
            if not parts or any(len(p) != 2 for p in parts) or len({p[0] for p in parts}) > 1:
                raise DatasetError(f"{where}: file_names are not all FOLDER/FILE in one folder")
            sequence, stems = parts[0][0], [PurePosixPath(p[1]).stem for p in parts]
            if video.get("length", len(files)) != len(files) or len(set(stems)) < len(stems):
                raise DatasetError(f"{where}: length {video.get('length')} is not the number of"
                                   f" file_names ({len(files)}), or two share a name")  # fmt: skip
            if sequence in sequences or video_id in by_id:
                raise DatasetError(f"{where}: video folder {sequence} or id {video_id} repeats")
            sequences[sequence], by_id[video_id] = stems, sequence
            self.video_ids[sequence], self.video_sizes[sequence] = video_id, (height, width)
            self._frames[sequence] = {stem: (t, files[t]) for t, stem in enumerate(stems)}
            self._annotations[sequence] = []  # (class, instance, RLE counts per frame)
        annotations = data.get("annotations") or []
        labels = bool(annotations) if labels is None else labels
        if labels and not annotations:
            raise DatasetError(f"{path}: no annotations, so split {split!r} has no labels")
        class_of = {category: c for c, category in enumerate(self.category_ids)}
        for k, annotation in enumerate(annotations if labels else ()):
            self._add_annotation(annotation, f"{path}: annotations[{k}]", by_id, class_of)
        names = (*(str(name) for _, name in ids), "background")
        super().__init__(root, split, sequences, labels, len(names), range(len(ids)), names)
        for sequence, frames in self._frames.items():
            folder = self.image_path(sequence, sequences[sequence][0]).parent
            found = set(os.listdir(folder)) if folder.is_dir() else set()
            missing = [name for _, name in frames.values() if PurePosixPath(name).name not in found]
            if missing:
                raise DatasetError(f"{folder.parent / missing[0]}: no such image (video"
                                   f" {self.video_ids[sequence]} of {path})")  # fmt: skip

    def _add_annotation(self, annotation, where: str, by_id: dict, class_of: dict) -> None:
        """Check one annotation; add it to its video with compressed RLE counts per frame."""
        video_id, category, segmentations = fields(annotation, ANNOTATION_KEYS, where)
        if video_id not in by_id or category not in class_of:
            raise DatasetError(f"{where}: unknown video_id {video_id} or category_id {category}")
        sequence = by_id[video_id]
        (height, width), length = self.video_sizes[sequence], len(self._frames[sequence])
        if not isinstance(segmentations, list) or len(segmentations) != length:
            raise DatasetError(f"{where}: segmentations must be a list of {length} entries, one "
                               f"per frame of video {video_id}")  # fmt: skip
        counts = [to_rle(s, height, width, f"{where} frame {t}")
                  for t, s in enumerate(segmentations)]  # fmt: skip
        video = self._annotations[sequence]
        instance = 0 if annotation.get("iscrowd", 0) else 1 + sum(a[1] > 0 for a in video)
        if instance >= LABEL_DIVISOR:
            raise DatasetError(f"{where}: video {video_id} has more than {LABEL_DIVISOR - 1} "
                               "instances (ids are class * 1000 + instance)")  # fmt: skip
        video.append((class_of[category], instance, counts))

    def image_path(self, sequence: str, frame: str) -> Path:
        return self.root / self.split / "JPEGImages" / self._frames[sequence][frame][1]

    def label_source(self, sequence: str, frame: str) -> str:
        t, name = self._frames[sequence][frame]
        return f"{self.json_path} (video {self.video_ids[sequence]}, frame {t}: {name})"

    def read_panoptic(self, sequence: str, frame: str) -> np.ndarray:
        """``(H, W)`` int64 ids: background, then the frame's annotations by decreasing area."""
        if not self.labels:
            raise DatasetError(f"{self.json_path}: split {self.split!r} has no labels")
        t, (height, width) = self._frames[sequence][frame][0], self.video_sizes[sequence]
        present = [a for a in self._annotations[sequence] if a[2][t] is not None]
        panoptic = np.full((height, width), (self.num_classes - 1) * LABEL_DIVISOR, np.int64)
        if present:
            source = self.label_source(sequence, frame)
            masks = decode([a[2][t] for a in present], height, width, source)  # (H, W, N)
            for k in np.argsort(-masks.sum(axis=(0, 1)), kind="stable"):  # ties: file order
                panoptic[masks[..., k]] = present[k][0] * LABEL_DIVISOR + present[k][1]
        return panoptic

    def check(self) -> np.ndarray:
        def check_video(sequence: str) -> np.ndarray:
            counts = np.zeros(self.num_classes + 1, dtype=np.int64)  # last: void, none here
            for frame in self.sequences[sequence]:
                path, size = self.image_path(sequence, frame), self.video_sizes[sequence]
                if read_image(path).shape[:2] != tuple(size):
                    raise DatasetError(f"{path}: image size differs from (height, width)"
                                       f" {size} in {self.json_path}")  # fmt: skip
                if self.labels:
                    semantic = self.read_panoptic(sequence, frame) // LABEL_DIVISOR
                    counts += np.bincount(semantic.ravel(), minlength=self.num_classes + 1)
            return counts

        with ThreadPoolExecutor(max_workers=4) as pool:  # JPEG decoding releases the GIL
            return sum(pool.map(check_video, self.sequences), np.zeros(self.num_classes + 1, int))


def write_split(root, split: str, videos, categories: dict) -> Path:
    """Write a split in the 2021 layout; returns the JSON's path. ``videos``: ``(name, frames
    (F, H, W, 3) uint8, panoptic (F, H, W) int64 ids class * 1000 + instance)``; ``categories``:
    class id -> name, category ids 1, 2, ... in dict order. Each track (a category's class with
    instance > 0) becomes an annotation, a category's instance-0 pixels one ``iscrowd``
    annotation per video, other classes background; a video's annotations are in id order."""
    root, classes = Path(root), list(categories)
    data = {"info": {"description": "minivseg.youtube_vis.write_split"}, "videos": [],
            "annotations": [], "categories": [{"id": k + 1, "name": str(categories[c]),
            "supercategory": "object"} for k, c in enumerate(classes)]}  # fmt: skip
    for video_id, (name, frames, panoptic) in enumerate(videos, 1):
        frames, panoptic = np.asarray(frames), np.asarray(panoptic, dtype=np.int64)
        if frames.dtype != np.uint8 or frames.shape != (*panoptic.shape, 3) or panoptic.ndim != 3:
            raise ValueError(f"video {name}: expected (F, H, W, 3) uint8 frames, (F, H, W) ids")
        length, height, width = panoptic.shape
        file_names = [f"{name}/{t:05d}.jpg" for t in range(length)]
        (root / split / "JPEGImages" / name).mkdir(parents=True, exist_ok=True)
        for file_name, frame in zip(file_names, frames):
            Image.fromarray(frame).save(root / split / "JPEGImages" / file_name, quality=95)
        data["videos"].append({"id": video_id, "width": width, "height": height,
                               "length": length, "file_names": file_names})  # fmt: skip
        ids = np.unique(panoptic)
        for pan_id in ids[np.isin(ids // LABEL_DIVISOR, classes)].tolist():  # crowd first
            masks = panoptic == pan_id  # (F, H, W)
            rles = [encode_mask(mask) if mask.any() else None for mask in masks]
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "video_id": video_id,
                "category_id": classes.index(pan_id // LABEL_DIVISOR) + 1,
                "iscrowd": int(pan_id % LABEL_DIVISOR == 0), "segmentations": rles,
                "areas": [int(m.sum()) if r else None for m, r in zip(masks, rles)],
                "bboxes": [coco_mask.toBbox(r).tolist() if r else None for r in rles],
            })  # fmt: skip
    return write_json(root / split / "instances.json", data)


def main(argv=None) -> int:
    """``--check ROOT [--splits ...]``: decode and check every split (scoring a results file:
    ``python -m minivseg.youtube_vis_results``)."""
    parser = argparse.ArgumentParser(description="Check a YouTube-VIS dataset (2019 or 2021).")
    parser.add_argument("--check", metavar="ROOT", required=True, help="the dataset root")
    parser.add_argument("--splits", nargs="+", default=None, help="default: all found")
    args = parser.parse_args(argv)
    try:
        root = Path(args.check)
        splits = args.splits or sorted(path.parent.name for path in root.glob("*/JPEGImages"))
        if not splits:
            raise DatasetError(f"{root}: no SPLIT/JPEGImages folder")
        for name in splits:
            split = YouTubeVISSplit(root, name)
            split.check()
            found = [a for video in split._annotations.values() for a in video]
            crowd = sum(a[1] == 0 for a in found)
            print(f"{name}: {len(split.sequences)} videos, {split.num_frames()} frames, "
                  f"{len(found)} annotations ({crowd} crowd), labels: {split.labels}")  # fmt: skip
            tracks = np.bincount([a[0] for a in found if a[1] > 0], minlength=split.num_classes - 1)
            print("  instances:", ", ".join(f"{n} {c}" for n, c in zip(split.class_names, tracks)))
    except (DatasetError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{root}: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
