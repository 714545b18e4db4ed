"""KITTI-STEP's layout as a `minivseg.splits.VideoSplit`: PNG frames and panoptic PNGs per sequence.

Directory layout (KITTI-STEP as distributed for deeplab2, and what `minivseg.synthetic` writes)::

    ROOT/images/{train,val,test}/SSSS/FFFFFF.png      RGB frames
    ROOT/panoptic_maps/{train,val}/SSSS/FFFFFF.png    labels: R = semantic, G*256+B = instance
    ROOT/depth/{train,val}/SSSS/FFFFFF.png            optional: 16-bit depth * 256, 0 = none

Label ids are ``semantic * 1000 + instance`` with void 255 and crowd = thing class with
instance 0 (`minivseg.panoptic`). Frames are read in `minivseg.panoptic.frame_order` (all-numeric
names numerically, else as text; zero-padded names are safest). Images may be 8-bit RGB or
grayscale; 16-bit grayscale frames are scaled to 8 bits. A split without ``panoptic_maps`` is read
unlabelled (``labels=False``, e.g. the test split). A split with a ``depth`` folder (DVPS; the
codec is `minivseg.panoptic.read_depth_png`) has depth maps (``has_depth``).

Validation: opening a split decodes every image and checks that it has a label of the same size
whose class ids are 0..18 or 255, and a depth map (16-bit grayscale, the frame's size) when the
split has depth; the first problem raises `DatasetError` naming the file.
``python -m minivseg.data --check ROOT`` runs the same checks on every split and prints its
sequences, frames, class pixel shares and share of pixels with depth, and warns when numeric frame
names are not zero-padded (the real KITTI-STEP gives train 5027 frames, val 2981 frames).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from minivseg.panoptic import (
    CLASS_NAMES,
    IGNORE_LABEL,
    MAX_DEPTH,
    NUM_CLASSES,
    THING_CLASSES,
    frame_order,
    read_depth_png,
    read_kitti_step_png,
    semantic_of,
    unpadded_names,
)
from minivseg.splits import DatasetError, VideoSplit, read_image


def read_label(path, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """GT panoptic ``(H, W)``; raises naming the file for a class neither in 0..K-1 nor void."""
    try:
        panoptic = read_kitti_step_png(path)
    except ValueError as error:
        raise DatasetError(str(error)) from error
    semantic = semantic_of(panoptic)
    bad = np.unique(semantic[(semantic >= num_classes) & (semantic != IGNORE_LABEL)])
    if bad.size:
        raise DatasetError(f"{path}: semantic ids {bad[:5].tolist()} are neither a class"
                         f" (0..{num_classes - 1}) nor void ({IGNORE_LABEL})")  # fmt: skip
    return panoptic


def check_frame(image_path: Path, label_path: Path | None, num_classes: int = NUM_CLASSES):
    """Decode one frame (and its label); return per-class pixel counts. Raises naming the file."""
    image = read_image(image_path)
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    if label_path is None:
        return counts
    panoptic = read_label(label_path, num_classes)
    if panoptic.shape != image.shape[:2]:
        raise DatasetError(f"{label_path}: label size {panoptic.shape} differs from image size "
                           f"{image.shape[:2]} of {image_path}")  # fmt: skip
    semantic = semantic_of(panoptic)
    semantic = np.where(semantic == IGNORE_LABEL, num_classes, semantic)
    return np.bincount(semantic.ravel(), minlength=num_classes + 1)


def index_depth(root, split: str, sequences: dict) -> np.ndarray:
    """Check ``ROOT/depth/SPLIT``: one readable 16-bit depth map of the frame's size per frame of
    ``sequences``, none without a frame. Returns pixel counts ``(with depth, all, beyond
    MAX_DEPTH)``; the first problem raises `DatasetError` naming the file."""
    depth_dir, image_dir = Path(root) / "depth" / split, Path(root) / "images" / split
    known = {sequence: set(frames) for sequence, frames in sequences.items()}
    for path in sorted(depth_dir.glob("*/*.png")):
        if path.stem not in known.get(path.parent.name, ()):
            raise DatasetError(f"{path}: depth map without an image in {image_dir}")

    def check(job) -> np.ndarray:
        image, path = image_dir / job[0] / f"{job[1]}.png", depth_dir / job[0] / f"{job[1]}.png"
        if not path.is_file():
            raise DatasetError(f"{image}: no depth map at {path}")
        try:
            depth = read_depth_png(path)
            with Image.open(image) as frame:
                size = frame.size[::-1]
        except (OSError, ValueError) as error:
            raise DatasetError(str(error)) from error
        if depth.shape != size:
            raise DatasetError(f"{path}: depth size {depth.shape} differs from image size {size}")
        return np.array([np.count_nonzero(depth), depth.size, np.count_nonzero(depth > MAX_DEPTH)])

    jobs = [(sequence, frame) for sequence, frames in sequences.items() for frame in frames]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return sum(pool.map(check, jobs))


def index_split(root, split: str, labels: bool = True, num_classes: int = NUM_CLASSES,
                decode: bool = True):  # fmt: skip
    """List and validate a split. Returns ``(sequences, class_counts)``.

    ``sequences`` maps a sequence name to its sorted frame names. Every image is decoded and every
    label checked (existence, readability, size, class ids); the first problem raises a
    ``ValueError`` that names the file. ``class_counts``: ``num_classes + 1`` pixel counts (last:
    void). ``decode=False`` only lists and checks that files exist (counts are None): evaluation
    decodes each frame once, when it reads it.
    """
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "panoptic_maps" / split
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: split {split!r} not found (expected SEQ/*.png frames)")
    sequences = {}
    jobs = []
    for seq_dir in sorted(p for p in image_dir.iterdir() if p.is_dir()):
        frames = frame_order(p.stem for p in seq_dir.glob("*.png"))
        if not frames:
            continue
        sequences[seq_dir.name] = frames
        for frame in frames:
            label = label_dir / seq_dir.name / f"{frame}.png" if labels else None
            if label is not None and not label.is_file():
                raise DatasetError(f"{seq_dir / (frame + '.png')}: no panoptic map at {label}")
            jobs.append((seq_dir / f"{frame}.png", label))
    if not sequences:
        raise DatasetError(f"{image_dir}: split {split!r} is empty (no SEQ/*.png frames)")
    if labels:
        for seq_dir in sorted(p for p in label_dir.iterdir() if p.is_dir()):
            for label in sorted(seq_dir.glob("*.png")):
                if label.stem not in set(sequences.get(seq_dir.name, ())):
                    raise DatasetError(f"{label}: panoptic map without an image in {image_dir}")
    if not decode:
        return sequences, None
    with ThreadPoolExecutor(max_workers=4) as pool:
        counts = sum(pool.map(lambda job: check_frame(*job, num_classes), jobs))
    return sequences, counts


class KittiStepSplit(VideoSplit):
    """A KITTI-STEP-layout split (`index_split`; ``decode=False`` only checks that files exist)."""

    format = "kitti-step"

    def __init__(self, root, split, labels=None, decode=True, num_classes=NUM_CLASSES):
        root = Path(root)
        labels = (root / "panoptic_maps" / split).is_dir() if labels is None else labels
        sequences, self.class_counts = index_split(root, split, labels, num_classes, decode)
        has_depth = (root / "depth" / split).is_dir()
        if has_depth and decode:
            index_depth(root, split, sequences)
        super().__init__(root, split, sequences, labels, num_classes, THING_CLASSES,
                         CLASS_NAMES, has_depth)  # fmt: skip

    def image_path(self, sequence: str, frame: str) -> Path:
        return self.root / "images" / self.split / sequence / f"{frame}.png"

    def label_source(self, sequence: str, frame: str) -> str:
        return str(self.root / "panoptic_maps" / self.split / sequence / f"{frame}.png")

    def read_panoptic(self, sequence: str, frame: str) -> np.ndarray:
        return read_label(self.label_source(sequence, frame), self.num_classes)

    def depth_path(self, sequence: str, frame: str) -> Path:
        return self.root / "depth" / self.split / sequence / f"{frame}.png"

    def check(self) -> np.ndarray:
        sequences, counts = index_split(self.root, self.split, self.labels, self.num_classes)
        if self.has_depth:
            index_depth(self.root, self.split, sequences)
        return counts


def check_main(root: Path, splits=None) -> None:
    """``python -m minivseg.data --check ROOT`` on a KITTI-STEP root: every split (or ``splits``)
    decoded and checked, with its sequences, frames, class shares and depth coverage printed."""
    if not (root / "images").is_dir():
        raise SystemExit(f"{root}: not a KITTI-STEP root (no images/ folder)")
    splits = splits or sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    for split in splits:
        has_labels = (root / "panoptic_maps" / split).is_dir()
        has_depth = (root / "depth" / split).is_dir()
        try:
            sequences, counts = index_split(root, split, labels=has_labels)
            depth = index_depth(root, split, sequences) if has_depth else None
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        frames = sum(len(v) for v in sequences.values())
        print(f"{split}: {len(sequences)} sequences, {frames} frames, labels: {has_labels}")
        for name, frame_names in sequences.items():
            if unpadded_names(frame_names):
                print(f"  warning: {split}/{name}: frame names are numbers of different lengths"
                      f" ({frame_names[0]} ... {frame_names[-1]}); they are read in numeric order,"
                      " but tools that sort names as text will not: zero-pad them")  # fmt: skip
        if has_labels:
            shares = counts / max(counts.sum(), 1)
            for name, share in zip((*CLASS_NAMES, "void"), shares):
                print(f"  {name:>14s} {100 * share:6.2f} %")
        if depth is not None:
            with_depth, beyond = 100 * depth[0] / depth[1], 100 * depth[2] / depth[1]
            print(f"  depth: {with_depth:.2f} % of pixels, {beyond:.2f} % beyond {MAX_DEPTH:g} m")
    print(f"{root}: OK")
