"""One split of a video dataset behind one interface, whatever the dataset's layout.

Training (`minivseg.data.KittiStepClips`) and evaluation (`minivseg.evaluate`) read every
dataset through a `VideoSplit`: its sequences and their frame names in time order, an image path
per frame, and a panoptic label per frame in the package's one convention (`minivseg.panoptic`:
``semantic * 1000 + instance``, void 255, crowd = thing class with instance 0). Each layout
implements it in its own file: `minivseg.kitti_step` (KITTI-STEP, DVPS), `minivseg.vspw` (VSPW,
video semantic) and `minivseg.youtube_vis` (YouTube-VIS, video instances). `minivseg.formats`
finds the layout of a root and opens a split. A layout that names its own classes (VSPW's 124,
YouTube-VIS's 40 categories plus background) gives them as ``num_classes``, ``thing_classes`` and
``class_names``, and training builds the model with them.

Errors: every problem with a file raises `DatasetError` naming the file (and, for a JSON file,
the entry) and what is wrong with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class DatasetError(ValueError):
    """A dataset file or folder that cannot be read in its layout; the message names it."""


def read_image(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; `DatasetError` naming the file if it cannot be decoded.

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


def write_text_atomically(path, text: str) -> Path:
    """Write ``text`` to ``path`` (folders created) through a temporary file and a rename, so a
    reader never sees half a file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def frame_tensor(path, device="cpu") -> torch.Tensor:
    """One image file as a ``(3, H, W)`` float tensor in [0, 255]."""
    return torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float().to(device)


class VideoSplit:
    """A split's sequences, classes and per-frame files; subclasses implement one layout.

    Attributes: ``format`` (layout name), ``root``, ``split``, ``sequences`` (name -> frame
    names in time order), ``labels`` (whether frames have labels), ``has_depth``,
    ``num_classes`` (K), ``thing_classes`` (class ids with instances) and ``class_names``.
    ``own_classes`` is True when the layout defines its class set (the model is then built with
    it); False for KITTI-STEP, whose 19 classes are the package default.
    """

    format = "?"
    own_classes = False

    def __init__(self, root, split, sequences, labels, num_classes, thing_classes, class_names,
                 has_depth=False):  # fmt: skip
        self.root, self.split, self.sequences = Path(root), split, sequences
        self.labels, self.has_depth = labels, has_depth
        self.num_classes, self.thing_classes = num_classes, tuple(thing_classes)
        self.class_names = tuple(class_names)

    def image_path(self, sequence: str, frame: str) -> Path:
        """The frame's image file."""
        raise NotImplementedError

    def label_source(self, sequence: str, frame: str) -> str:
        """Where the frame's label comes from, for messages (a file, or a file and entry)."""
        raise NotImplementedError

    def read_panoptic(self, sequence: str, frame: str) -> np.ndarray:
        """``(H, W)`` int64 ids ``semantic * 1000 + instance`` (void ``255 * 1000``); class ids
        are checked against ``num_classes``; a problem raises `DatasetError` naming the file."""
        raise NotImplementedError

    def depth_path(self, sequence: str, frame: str) -> Path:
        """The frame's 16-bit depth PNG (only when ``has_depth``)."""
        raise DatasetError(f"{self.root}: the {self.format} layout has no depth maps")

    def check(self) -> np.ndarray:
        """Decode every frame and label; return ``num_classes + 1`` pixel counts (last: void).
        The first problem raises `DatasetError` naming the file."""
        raise NotImplementedError

    def num_frames(self) -> int:
        return sum(len(frames) for frames in self.sequences.values())
