"""Video clips: T consecutive frames of any dataset layout with identical augmentation.

`KittiStepClips` reads a split through `minivseg.formats.open_split`: KITTI-STEP (and DVPS, with
depth; `minivseg.kitti_step`), VSPW (`minivseg.vspw`) or YouTube-VIS (`minivseg.youtube_vis`),
found from the files (``data_format="auto"``). Whatever the layout, a clip's labels are panoptic
ids ``semantic * 1000 + instance`` with void 255 (`minivseg.panoptic`); the split says which
classes it has (``split.num_classes``, ``split.thing_classes``).

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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minivseg.clip_paste import clip_paste as paste_clips
from minivseg.formats import FORMATS, detect_format, open_split
from minivseg.kitti_step import (  # noqa: F401  (the readers' public names, kept importable here)
    check_frame,
    check_main,
    index_depth,
    index_split,
    read_label,
)
from minivseg.panoptic import VOID_ID, read_depth_png
from minivseg.splits import DatasetError, frame_tensor, read_image  # noqa: F401

IMAGE_PAD_VALUE = 127.5  # deeplab2 pads images with the mean, which normalises to 0


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
        root: dataset root (any layout of `minivseg.formats`).
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
        data_format: "auto" (from the files), "kitti-step", "vspw" or "youtube-vis".
    ``source`` is the split (`minivseg.splits.VideoSplit`), with its classes. Items are dicts:
    ``frames (T,3,H,W) float32`` in [0, 255], ``panoptic (T,H,W) int64``, ``sequence`` (str),
    ``frame_ids`` (list of T frame names), and ``depth (T,H,W) float32`` metres (0 = unknown)
    when the split has depth (KITTI-STEP/DVPS ``ROOT/depth/SPLIT``: ``has_depth``).
    """

    def __init__(self, root, split, clip_length, crop_size=None, scale_range=None, flip=False,
                 clip_paste=0.0, random_crop=True, labels=True, seed=0,
                 data_format="auto"):  # fmt: skip
        if clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {clip_length}")
        if clip_paste > 0 and crop_size is None:
            raise ValueError("clip_paste needs a crop_size (pasted clips must share one shape)")
        self.root, self.split, self.clip_length = Path(root), split, clip_length
        self.crop_size, self.scale_range, self.flip = crop_size, scale_range, flip
        self.clip_paste, self.random_crop = clip_paste, random_crop
        self.labels, self.seed = labels, seed
        self.source = open_split(root, split, data_format, labels)  # checks files (VideoSplit)
        self.sequences, self.has_depth = self.source.sequences, self.source.has_depth
        self.class_counts = getattr(self.source, "class_counts", None)
        self.clips = [(seq, i) for seq, names in self.sequences.items() for i in range(len(names))]

    def __len__(self) -> int:
        return len(self.clips)

    def load_clip(self, index: int):
        """Unaugmented frames ``(T,3,H,W)`` float32, panoptic ``(T,H,W)`` int64 and depth
        ``(T,H,W)`` float32 (``None`` without depth) of a clip, its sequence and frame names."""
        sequence, end = self.clips[index]
        names, source = self.sequences[sequence], self.source
        frame_ids = [names[max(0, end - self.clip_length + 1 + k)] for k in range(self.clip_length)]
        frames = np.stack([read_image(source.image_path(sequence, n)) for n in frame_ids])
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        if self.labels:
            panoptic = np.stack([source.read_panoptic(sequence, n) for n in frame_ids])
        else:
            panoptic = np.full((self.clip_length, *frames.shape[-2:]), VOID_ID, dtype=np.int64)
        if panoptic.shape[-2:] != frames.shape[-2:]:
            raise DatasetError(f"{source.label_source(sequence, frame_ids[0])}: label size "
                               f"{panoptic.shape[-2:]} differs from image size "
                               f"{tuple(frames.shape[-2:])}")  # fmt: skip
        depths = [read_depth_png(source.depth_path(sequence, n)) for n in frame_ids
                  if self.has_depth]  # fmt: skip
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
            frames, panoptic = paste_clips(frames, panoptic, source_frames, source_panoptic, rng,
                                           thing_classes=self.source.thing_classes)  # fmt: skip
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
    parser = argparse.ArgumentParser(description="Validate a dataset directory (any layout).")
    parser.add_argument("--check", metavar="ROOT", required=True, help="dataset root to validate")
    parser.add_argument("--splits", nargs="+", default=None, help="splits (default: all found)")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    args = parser.parse_args(argv)
    root = Path(args.check)
    if not root.exists():
        raise SystemExit(f"error: {root}: no such file or directory")
    try:
        data_format = detect_format(root) if args.format == "auto" else args.format
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    if data_format == "kitti-step":
        return check_main(root, args.splits)
    module = {"vspw": "minivseg.vspw", "youtube-vis": "minivseg.youtube_vis"}[data_format]
    import importlib

    splits = ["--splits", *args.splits] if args.splits else []
    importlib.import_module(module).main(["--check", str(root), *splits])


if __name__ == "__main__":
    main()
