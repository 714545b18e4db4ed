"""Panoptic ids, the KITTI-STEP class table, the panoptic and depth PNG codecs, and colours.

A panoptic id packs a pixel's class and its instance (track) into one integer (DeepLab2 paper §2,
"Image Panoptic Segmentation"; KITTI-STEP; no numbered equation):
``panoptic = semantic * LABEL_DIVISOR + instance``.

- ``semantic`` is a train id in ``0..18`` or ``IGNORE_LABEL = 255`` (void, ignored by losses and
  metrics). The 19 classes are the Cityscapes train ids and colours (`CLASS_NAMES`,
  `CLASS_COLORS`); only person (11) and car (13) are things, so rider, truck, bus, ... are stuff.
- ``instance`` is the track id for the thing classes, consistent over a whole sequence, and ``0``
  for stuff classes;
- a thing pixel with instance 0 is **crowd**: semantically labelled, but in no tube (`is_crowd`).

KITTI-STEP stores each label frame as an 8-bit RGB PNG with ``R = semantic`` and
``G * 256 + B = instance`` (deeplab2 ``data/utils/create_step_panoptic_maps.py`` writes it,
``data/build_step_data.py`` reads it); `read_kitti_step_png` and `write_kitti_step_png` are that
codec, and raise naming the file. Frame names must sort in time order: `frame_order` reads names
that are all numbers in numeric order (``2.png`` before ``10.png``) and anything else as text;
zero-padded names (``000010.png``, as KITTI-STEP ships them) are safest, since other tools sort
as text (`unpadded_names` finds the rest).

Depth labels (DVPS: ViP-DeepLab, Qiao et al. 2021; deeplab2 ``data/build_dvps_data.py``) are
16-bit grayscale PNGs of ``round(depth * DEPTH_SCALE)`` with depth in metres, ``DEPTH_SCALE = 256``
(KITTI's depth-map convention), and 0 = no depth; `read_depth_png` and `write_depth_png` are that
codec. ``MAX_DEPTH = 80`` m is KITTI's evaluation cap and the model's output range.

Ground truth and clips use ``LABEL_DIVISOR = 1000``. Stitched videos use
``VIDEO_LABEL_DIVISOR = 65536``: a long sequence can need more than 999 track ids per class, and a
PNG holds instance ids up to 65535. Every function here takes a ``label_divisor``.
Differences from deeplab2: none in the encoding; deeplab2 converts to TFRecords, we read PNGs.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

LABEL_DIVISOR = 1000
IGNORE_LABEL = 255
VOID_ID = IGNORE_LABEL * LABEL_DIVISOR  # panoptic id of a void pixel
VIDEO_LABEL_DIVISOR = 1 << 16  # stitched videos: track ids 1..65535, the most a PNG holds
DEPTH_SCALE = 256.0  # depth PNG value = metres * 256 (KITTI, DVPS); 0 = no depth
MAX_DEPTH = 80.0  # metres: KITTI's depth cap; the depth head predicts (0, MAX_DEPTH)

# The 19 KITTI-STEP classes (Cityscapes train ids) and their Cityscapes colours.
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CLASS_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
VOID_COLOR = (0, 0, 0)
NUM_CLASSES = len(CLASS_NAMES)
THING_CLASSES = (11, 13)  # person, car: the classes with track ids
STUFF_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in THING_CLASSES)


def thing_stuff_class_ids(
    num_classes: int = NUM_CLASSES, thing_classes=THING_CLASSES
) -> tuple[int, ...]:
    """Dataset class id of each class-head channel: things (given order), then stuff ascending.

    Mask-transformer class heads use this order, not the dataset order (deeplab2
    ``_thing_stuff_class_ids``); KITTI-STEP gives ``(11, 13, 0, 1, ..., 10, 12, 14, ..., 18)``.
    The void channel comes after these ``num_classes`` channels.
    """
    stuff = tuple(c for c in range(num_classes) if c not in thing_classes)
    return tuple(thing_classes) + stuff


def semantic_of(panoptic: np.ndarray, label_divisor: int = LABEL_DIVISOR) -> np.ndarray:
    """Class id of every pixel (255 for void)."""
    return panoptic // label_divisor


def instance_of(panoptic: np.ndarray, label_divisor: int = LABEL_DIVISOR) -> np.ndarray:
    """Instance (track) id of every pixel; 0 for stuff, void and crowd."""
    return panoptic % label_divisor


def relabel(panoptic: np.ndarray, label_divisor: int, new_divisor: int) -> np.ndarray:
    """The same ids written with another label divisor (instances must fit under both)."""
    semantic, instance = np.divmod(np.asarray(panoptic, dtype=np.int64), label_divisor)
    return semantic * new_divisor + instance


def is_crowd(panoptic, thing_classes=THING_CLASSES, label_divisor=LABEL_DIVISOR) -> np.ndarray:
    """Thing pixels without a track id: labelled semantically, but in no tube."""
    semantic, instance = np.divmod(panoptic, label_divisor)
    return np.isin(semantic, thing_classes) & (instance == 0)


def tube_ids(panoptic, thing_classes=THING_CLASSES, label_divisor=LABEL_DIVISOR) -> np.ndarray:
    """Sorted ids of the tubes (thing class, instance > 0) in ``panoptic``; no crowd, no void."""
    ids = np.unique(np.asarray(panoptic))
    return ids[np.isin(ids // label_divisor, thing_classes) & (ids % label_divisor > 0)]


def frame_order(names) -> list:
    """Names (or paths) in time order: by number when every stem is a number (``2`` before
    ``10``), else as text. Frame names must sort in time order."""
    names = list(names)
    stem = lambda name: Path(name).stem  # noqa: E731
    if names and all(stem(n).isdigit() for n in names):
        return sorted(names, key=lambda n: (int(stem(n)), stem(n)))
    return sorted(names)


def unpadded_names(names) -> bool:
    """True when numeric frame names differ in length (``9.png``, ``10.png``): other tools sort
    them as text, out of time order."""
    stems = [Path(n).stem for n in names]
    return all(s.isdigit() for s in stems) and len({len(s) for s in stems}) > 1


def read_kitti_step_png(path, label_divisor: int = LABEL_DIVISOR) -> np.ndarray:
    """Read a KITTI-STEP panoptic PNG into ``(H, W)`` int64 ids ``semantic*divisor + instance``.

    Raises ``ValueError`` naming the file when it is unreadable or not a 3-channel 8-bit PNG,
    or when an instance id does not fit under the label divisor.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode != "RGB":
                raise ValueError(f"expected an RGB panoptic PNG, got mode {image.mode!r}")
            rgb = np.asarray(image, dtype=np.int64)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read KITTI-STEP panoptic map: {error}") from error
    semantic = rgb[..., 0]
    instance = rgb[..., 1] * 256 + rgb[..., 2]
    if instance.max(initial=0) >= label_divisor:
        raise ValueError(
            f"{path}: instance id {instance.max()} >= label divisor {label_divisor} (stitched"
            f" predictions hold track ids up to 65535: read them with label_divisor=65536)"
        )
    return semantic * label_divisor + instance


def write_kitti_step_png(path, panoptic: np.ndarray, label_divisor: int = LABEL_DIVISOR) -> None:
    """Write ``(H, W)`` panoptic ids as a KITTI-STEP PNG (R = semantic, G*256+B = instance)."""
    panoptic = np.asarray(panoptic, dtype=np.int64)
    if panoptic.ndim != 2:
        raise ValueError(f"{path}: panoptic map must be 2-D, got shape {panoptic.shape}")
    semantic, instance = np.divmod(panoptic, label_divisor)
    if semantic.min(initial=0) < 0 or semantic.max(initial=0) > 255:
        raise ValueError(f"{path}: semantic ids must lie in 0..255")
    if instance.max(initial=0) > 65535:
        raise ValueError(f"{path}: instance id {instance.max()} does not fit in G*256+B (<= 65535)")
    rgb = np.stack([semantic, instance // 256, instance % 256], axis=-1).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode="RGB").save(path)


def read_depth_png(path) -> np.ndarray:
    """Read a depth PNG (16-bit grayscale, metres * 256) into ``(H, W)`` float32 metres, 0 = none.

    Raises ``ValueError`` naming the file when it is unreadable or not a 16-bit grayscale PNG
    (an 8-bit PNG cannot hold depth * 256).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"expected a 16-bit grayscale depth PNG, got mode {image.mode!r}")
            values = np.asarray(image, dtype=np.int64)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read depth map: {error}") from error
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ValueError(f"{path}: depth values outside 0..65535 (16 bits of metres * 256)")
    return (values / DEPTH_SCALE).astype(np.float32)


def write_depth_png(path, depth: np.ndarray) -> None:
    """Write ``(H, W)`` depth in metres as a 16-bit PNG of ``round(depth * 256)``.

    0 stays 0 (no depth) and a positive depth stays positive (at least 1/256 m); depths beyond
    65535 / 256 = 256 m are clipped. Negative or non-finite depths raise ``ValueError``.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth map must be 2-D, got shape {depth.shape}")
    if not np.isfinite(depth).all() or depth.min(initial=0) < 0:
        raise ValueError(f"{path}: depth must be finite and >= 0 (0 = no depth)")
    values = np.clip(np.round(depth * DEPTH_SCALE), 1, 65535)
    values = np.where(depth > 0, values, 0).astype(np.uint16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)  # uint16 -> mode I;16, a 16-bit grayscale PNG


def track_color(semantic: int, instance: int) -> tuple[int, int, int]:
    """A colour for one track that stays the same wherever the track appears.

    The class colour is shifted by a hash of the panoptic id, so cars stay bluish and people
    reddish while neighbouring tracks are still told apart.
    """
    base = np.array(CLASS_COLORS[semantic], dtype=np.int64)
    seed = zlib.crc32(f"{semantic}:{instance}".encode())
    jitter = np.random.default_rng(seed).integers(-90, 91, size=3)
    return tuple(int(v) for v in np.clip(base + jitter, 0, 255))


def colorize(
    panoptic: np.ndarray, thing_classes=THING_CLASSES, label_divisor: int = LABEL_DIVISOR
) -> np.ndarray:
    """``(..., H, W)`` panoptic ids -> ``(..., H, W, 3)`` uint8 colours.

    Stuff and crowd get their class colour, void is black, and every thing track gets its own
    stable colour (`track_color`), so one object keeps its colour across all frames.
    """
    panoptic = np.asarray(panoptic, dtype=np.int64)
    ids, inverse = np.unique(panoptic, return_inverse=True)
    palette = np.zeros((len(ids), 3), dtype=np.uint8)
    for k, pan_id in enumerate(ids):
        semantic, instance = divmod(int(pan_id), label_divisor)
        if semantic >= NUM_CLASSES:
            palette[k] = VOID_COLOR
        elif semantic in thing_classes and instance > 0:
            palette[k] = track_color(semantic, instance)
        else:
            palette[k] = CLASS_COLORS[semantic]
    return palette[inverse.reshape(panoptic.shape)]
