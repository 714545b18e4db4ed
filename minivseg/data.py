"""KITTI-STEP clips: a video dataset of T consecutive frames with identical augmentation.

Directory layout (KITTI-STEP as distributed for deeplab2, and what `minivseg.synthetic` writes)::

    ROOT/images/{train,val,test}/SSSS/FFFFFF.png      RGB frames
    ROOT/panoptic_maps/{train,val}/SSSS/FFFFFF.png    labels: R = semantic, G*256+B = instance
    ROOT/depth/{train,val}/SSSS/FFFFFF.png            optional: 16-bit depth * 256, 0 = none

Label ids are ``semantic * 1000 + instance`` with void 255 and crowd = thing class with
instance 0 (`minivseg.panoptic`). Frames are read in `minivseg.panoptic.frame_order` (all-numeric
names numerically, else as text; zero-padded names are safest). Images may be 8-bit RGB or
grayscale; 16-bit grayscale frames are scaled to 8 bits. A split without ``panoptic_maps`` is read
unlabelled (``labels=False``, e.g. the test split). A split with a ``depth`` folder (DVPS; the
codec is `minivseg.panoptic.read_depth_png`) gives its clips ``depth`` in metres, 0 = unknown.

Validation: building `KittiStepClips` decodes every image and checks that it has a label of the
same size whose class ids are 0..18 or 255, and a depth map (16-bit grayscale, the frame's size)
when the split has depth; the first problem raises `DatasetError` naming the file.
``python -m minivseg.data --check ROOT`` runs the same checks on every split and prints its
sequences, frames, class pixel shares and share of pixels with depth, and warns when numeric frame
names are not zero-padded (the real KITTI-STEP gives train 5027 frames, val 2981 frames).

Every frame ``i`` of a sequence ends one clip ``[i-T+1, ..., i]``; at the start of a sequence the
first frame is repeated (deeplab2 ``data/build_step_data.py`` duplicates the first frame for its
two-frame models). Augmentation follows deeplab2's KITTI configs
(``data/preprocessing/input_preprocessing.py``, ``preprocess_utils.py``): one scale from
``linspace(min, max, step 0.1)``, bilinear (align_corners) resize of frames and nearest of
labels, pad with void to the crop size, random crop, horizontal flip — drawn once per clip and
applied to all T frames. Frames stay in [0, 255]; the model normalises. KITTI frames are about
375x1242; the ``kitti`` preset crops 385x1249 (= 24*16+1 x 78*16+1, as deeplab2), and evaluation
pads to 16k+1 and crops the prediction back (`minivseg.tasks.pad_frames`).

Depth takes the frames' scale, crop and flip with nearest-neighbour resampling (as deeplab2 does
its integer depth labels): no depth is averaged across an object's edge, 0 = unknown stays
unknown, padding is 0. As in deeplab2 (``input_preprocessing.py``: "the larger, the closer",
``depth / scale``) the values are divided by the scale: resizing does not move the camera, but the
network sees only pixels and must assume one camera, and an image magnified ``s`` times is what
that camera sees from ``s`` times closer (sizes ``f h / z`` and ground rows ``f CAM_HEIGHT / z``
grow ``s`` times), so ``z / s`` is the label that agrees with the picture. Unlike deeplab2, depth
stays float (it truncates ``256 z / s``); as there, it is not capped (at ``s < 1`` labels can
exceed ``MAX_DEPTH``). Clip-paste pastes the source's depth with its pixels.

Reproducibility: augmentation randomness comes from ``default_rng((seed, key))`` where ``key`` is
what the sampler passes to ``__getitem__``; ``key % len(dataset)`` is the clip index, so a sampler
that yields ``epoch * len + index`` gets fresh augmentation every epoch and exact replays on resume.
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minivseg.clip_paste import clip_paste as paste_clips
from minivseg.panoptic import (
    CLASS_NAMES,
    IGNORE_LABEL,
    MAX_DEPTH,
    NUM_CLASSES,
    VOID_ID,
    frame_order,
    read_depth_png,
    read_kitti_step_png,
    semantic_of,
    unpadded_names,
)

IMAGE_PAD_VALUE = 127.5  # deeplab2 pads images with the mean, which normalises to 0


class DatasetError(ValueError):
    """A dataset file or folder that cannot be read as KITTI-STEP; the message names it."""


def read_image(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; ``ValueError`` naming the file if it cannot be decoded.

    16-bit grayscale PNGs are scaled to 8 bits (PIL's own conversion would clip them white).
    """
    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                gray = np.asarray(image, dtype=np.int64)
                if gray.min(initial=0) < 0 or gray.max(initial=0) > 65535:
                    raise ValueError(f"{image.mode} values outside 0..65535")
                return np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=-1)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"{path}: cannot read image: {error}") from error


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


def frame_tensor(path, device="cpu") -> torch.Tensor:
    """One image file as a ``(3, H, W)`` float tensor in [0, 255]."""
    return torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float().to(device)


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


def resize_clip(frames: torch.Tensor, panoptic: torch.Tensor, scale: float, depth=None):
    """Bilinear (align_corners) frames, nearest labels and depth (divided by ``scale``, as
    deeplab2); sizes follow (L-1)*scale+1. Returns ``(frames, panoptic, depth or None)``."""
    height, width = panoptic.shape[-2:]
    new_h, new_w = int((height - 1) * scale + 1), int((width - 1) * scale + 1)
    frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=True)
    rows = torch.round(torch.linspace(0, height - 1, new_h)).long()
    cols = torch.round(torch.linspace(0, width - 1, new_w)).long()
    if depth is not None:
        depth = depth[:, rows][:, :, cols] / scale  # nearer-looking image, nearer depth; 0 stays 0
    return frames, panoptic[:, rows][:, :, cols], depth


def pad_and_crop(frames, panoptic, crop_size, rng: np.random.Generator | None, depth=None):
    """Pad with void (depth: 0) to at least ``crop_size``, then crop (random offsets with ``rng``,
    else 0). Returns ``(frames, panoptic, depth or None)``."""
    crop_h, crop_w = crop_size
    height, width = panoptic.shape[-2:]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    top = int(rng.integers(pad_h + 1)) if rng is not None else 0
    left = int(rng.integers(pad_w + 1)) if rng is not None else 0
    if pad_h or pad_w:
        padding = (left, pad_w - left, top, pad_h - top)
        frames = F.pad(frames, padding, value=IMAGE_PAD_VALUE)
        panoptic = F.pad(panoptic, padding, value=VOID_ID)
        depth = F.pad(depth, padding, value=0.0) if depth is not None else None
    height, width = panoptic.shape[-2:]
    y = int(rng.integers(height - crop_h + 1)) if rng is not None else 0
    x = int(rng.integers(width - crop_w + 1)) if rng is not None else 0
    window = (..., slice(y, y + crop_h), slice(x, x + crop_w))
    return frames[window], panoptic[window], depth[window] if depth is not None else None


class KittiStepClips(torch.utils.data.Dataset):
    """Clips of ``clip_length`` consecutive frames from a KITTI-STEP-layout directory.

    Args:
        root: dataset root with ``images/`` and ``panoptic_maps/``.
        split: "train", "val" or "test" (or any folder name).
        clip_length: T, frames per clip.
        crop_size: ``(H, W)`` to pad (void) and crop to; ``None`` keeps full frames.
        scale_range: ``(min, max)`` random scale, step 0.1 (deeplab2: (0.5, 2.0)); ``None``: off.
        flip: random horizontal flip with p = 0.5.
        clip_paste: probability of pasting tubes of another random clip (TubeFormer §3.3);
            needs ``crop_size`` so that clips share one shape.
        random_crop: crop at random offsets (training); ``False`` pads bottom/right (evaluation).
        labels: read panoptic maps (``False`` for unlabelled frames, e.g. the test split).
        seed: base seed of the augmentation randomness.
    Items are dicts: ``frames (T,3,H,W) float32`` in [0, 255], ``panoptic (T,H,W) int64``,
    ``sequence`` (str), ``frame_ids`` (list of T frame names), and ``depth (T,H,W) float32``
    metres (0 = unknown) when ``ROOT/depth/SPLIT`` exists (``has_depth``).
    """

    def __init__(self, root, split, clip_length, crop_size=None, scale_range=None, flip=False,
                 clip_paste=0.0, random_crop=True, labels=True, seed=0):  # fmt: skip
        if clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {clip_length}")
        if clip_paste > 0 and crop_size is None:
            raise ValueError("clip_paste needs a crop_size (pasted clips must share one shape)")
        self.root, self.split, self.clip_length = Path(root), split, clip_length
        self.crop_size, self.scale_range, self.flip = crop_size, scale_range, flip
        self.clip_paste, self.random_crop = clip_paste, random_crop
        self.labels, self.seed = labels, seed
        self.sequences, self.class_counts = index_split(root, split, labels)
        self.has_depth = (self.root / "depth" / split).is_dir()
        if self.has_depth:
            index_depth(root, split, self.sequences)
        self.clips = [(seq, i) for seq, names in self.sequences.items() for i in range(len(names))]

    def __len__(self) -> int:
        return len(self.clips)

    def load_clip(self, index: int):
        """Unaugmented frames ``(T,3,H,W)`` float32, panoptic ``(T,H,W)`` int64 and depth
        ``(T,H,W)`` float32 (``None`` without depth) of a clip, its sequence and frame names."""
        sequence, end = self.clips[index]
        names = self.sequences[sequence]
        frame_ids = [names[max(0, end - self.clip_length + 1 + k)] for k in range(self.clip_length)]
        image_dir = self.root / "images" / self.split / sequence
        frames = np.stack([read_image(image_dir / f"{name}.png") for name in frame_ids])
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        if self.labels:
            label_dir = self.root / "panoptic_maps" / self.split / sequence
            panoptic = np.stack([read_kitti_step_png(label_dir / f"{n}.png") for n in frame_ids])
        else:
            panoptic = np.full((self.clip_length, *frames.shape[-2:]), VOID_ID, dtype=np.int64)
        depth_dir = self.root / "depth" / self.split / sequence
        depths = [read_depth_png(depth_dir / f"{n}.png") for n in frame_ids if self.has_depth]
        depth = torch.from_numpy(np.stack(depths)) if depths else None
        return frames, torch.from_numpy(panoptic), depth, sequence, frame_ids

    def augment(self, frames, panoptic, depth, rng: np.random.Generator):
        """One scale, crop and flip for the whole clip (depth: ``None`` or ``(T, H, W)``)."""
        if self.scale_range is not None:
            low, high = self.scale_range
            scales = np.linspace(low, high, int(round((high - low) / 0.1)) + 1)
            scale = float(rng.choice(scales))
            frames, panoptic, depth = resize_clip(frames, panoptic, scale, depth)
        if self.crop_size is not None:
            crop = self.crop_size, rng if self.random_crop else None
            frames, panoptic, depth = pad_and_crop(frames, panoptic, *crop, depth)
        if self.flip and rng.random() < 0.5:
            frames, panoptic = frames.flip(-1), panoptic.flip(-1)
            depth = depth.flip(-1) if depth is not None else None
        return frames, panoptic, depth

    def __getitem__(self, key: int):
        index = key % len(self)
        rng = np.random.default_rng((self.seed, key))
        frames, panoptic, depth, sequence, frame_ids = self.load_clip(index)
        frames, panoptic, depth = self.augment(frames, panoptic, depth, rng)
        if self.clip_paste > 0 and rng.random() < self.clip_paste:
            source = self.load_clip(int(rng.integers(len(self))))
            source_frames, source_panoptic, source_depth = self.augment(*source[:3], rng)
            if depth is not None:  # depth rides along as a 4th channel: pasted where pixels are
                frames = torch.cat([frames, depth[:, None]], dim=1)
                source_frames = torch.cat([source_frames, source_depth[:, None]], dim=1)
            frames, panoptic = paste_clips(frames, panoptic, source_frames, source_panoptic, rng)
            frames, depth = (frames[:, :3], frames[:, 3]) if depth is not None else (frames, None)
        extra = {"depth": depth.contiguous()} if depth is not None else {}
        return {"frames": frames.contiguous(), "panoptic": panoptic.contiguous(),
                "sequence": sequence, "frame_ids": frame_ids, **extra}  # fmt: skip


class ResumableSampler(torch.utils.data.Sampler):
    """Endless keys ``epoch * n + index`` (fresh permutation per epoch), from a global position.

    Process ``rank`` of ``world`` takes every ``world``-th sample, so K processes with batch b see
    the same global batch as one process with batch K*b.
    """

    def __init__(self, num_items: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.num_items, self.seed, self.start = num_items, seed, start
        self.rank, self.world = rank, world

    def __iter__(self):
        position = self.start + self.rank
        while True:
            epoch, index = divmod(position, self.num_items)
            permutation = np.random.default_rng((self.seed, epoch)).permutation(self.num_items)
            yield epoch * self.num_items + int(permutation[index])
            position += self.world


def collate_clips(items: list[dict]) -> dict:
    """Stack clips into ``frames (B,T,3,H,W)``, ``panoptic (B,T,H,W)`` and, when the clips have
    it, ``depth (B,T,H,W)``; keep names as lists."""
    stacked = [key for key in ("frames", "panoptic", "depth") if key in items[0]]
    batch = {key: torch.stack([item[key] for item in items]) for key in stacked}
    return {**batch, **{key: [item[key] for item in items] for key in ("sequence", "frame_ids")}}


def worker_init_fn(worker_id: int) -> None:
    """One torch thread (torch's worker loop sets it too; the augmentation gains nothing from
    more) and numpy / random seeded from torch's per-worker seed, in each DataLoader worker."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Validate a KITTI-STEP-layout dataset directory.")
    parser.add_argument("--check", metavar="ROOT", required=True, help="dataset root to validate")
    parser.add_argument("--splits", nargs="+", default=None, help="splits (default: all found)")
    args = parser.parse_args(argv)
    root = Path(args.check)
    if not root.exists():
        raise SystemExit(f"error: {root}: no such file or directory")
    if not (root / "images").is_dir():
        raise SystemExit(f"{root}: not a KITTI-STEP root (no images/ folder)")
    splits = args.splits or sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
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


if __name__ == "__main__":
    main()
