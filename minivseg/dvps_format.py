"""SemKITTI-DVPS / Cityscapes-DVPS folders -> minivseg's layout (images, panoptic maps, depth).

DVPS, depth-aware video panoptic segmentation (ViP-DeepLab, Qiao et al. CVPR 2021; the task of
TubeFormer-DeepLab §2 "DVPS" and Tab. 6), labels every frame with a panoptic map and a metric
depth map. Its two datasets ship as one flat folder per split, every file named
``{sequence}_{frame}_...`` (deeplab2 ``data/build_dvps_data.py`` reads the sequence and frame id
from the first two ``_``-separated fields; frames are zero-padded 6-digit numbers)::

    SRC/{train,val,test}/{sequence}_{frame}_leftImg8bit.png          RGB frame
    SRC/{train,val}/{sequence}_{frame}_gtFine_instanceTrainIds.png   panoptic label (deeplab2)
    SRC/{train,val}/{sequence}_{frame}_gtFine_class.png + _gtFine_instance.png   (ViP-DeepLab)
    SRC/{train,val}/{sequence}_{frame}_depth.png                     depth * 256, uint16, 0 = none

ViP-DeepLab's SemKITTI-DVPS release (``video_sequence/``, github.com/joe-siyuan-qiao/ViP-DeepLab)
stores the class and the instance id in two PNGs and names depth ``..._depth_{focal}.png`` (the
focal length in pixels, which we drop); deeplab2's converter expects ``_gtFine_instanceTrainIds``
and ``_depth.png``. A ``_gtFine_instanceTrainIds.png`` is read as deeplab2 reads it: 3-channel,
``R = semantic, G * 256 + B = instance``; or single-channel ``semantic * divisor + instance``
(build_dvps_data's docstring; ``--label-divisor``, 1000), where a value below the divisor is a
class without instance (Cityscapes' instanceIds style, as Cityscapes-VPS writes stuff) unless
class 0 is a thing class.

**Class sets** (deeplab2 ``data/dataset.py``): SemKITTI-DVPS has SemanticKITTI's 19 learning
classes (`SEMKITTI_DVPS_CLASSES`; deeplab2 gives ids only), things 0-7 (car, bicycle, motorcycle,
truck, other-vehicle, person, bicyclist, motorcyclist), void 255, labels and depth from projected
LiDAR points (sparse); KITTI odometry sequences 00-10 are train except 08 = val (deeplab2 counts
19,120 / 4,070 frame pairs: 19,130 / 4,071 frames), and a test split without labels.
Cityscapes-DVPS has the 19 Cityscapes train ids (`minivseg.panoptic.CLASS_NAMES`), things 11-18,
void 32 (deeplab2's ``ignore_label``), 6-frame sequences. Class ids are kept; the model is told
the class set (KITTI-STEP's default has things 11 and 13).

**What the conversion writes** (`convert`): ``OUT/images/SPLIT/SEQ/FRAME.png`` and
``OUT/depth/SPLIT/SEQ/FRAME.png`` as symlinks to the source files (``--copy``: copies; depth PNGs
are already our codec, `minivseg.panoptic.read_depth_png`), and ``OUT/panoptic_maps/...`` re-encoded
with `minivseg.panoptic.write_kitti_step_png`. Void (255 or the dataset's void id) becomes 255.
Stuff pixels lose their instance id. Thing tracks are renumbered per sequence and class, 1, 2, ...
in order of first appearance (SemKITTI's ids go up to 65535; minivseg's label divisor is 1000), so
a track keeps one id over its sequence; a sequence with more than 999 tracks of one class stops
the conversion naming it (``--chunk N`` splits sequences into ``SEQ_0000, SEQ_0001, ...`` of N
frames). A split with labels (or depth) needs them for every frame; depth files are linked as
they are, so check them (and everything else) with ``--check``::

    python -m minivseg.dvps_format --src /data/semkitti-dvps/video_sequence \\
        --out /data/semkitti-dvps-minivseg [--dataset semkitti-dvps] [--copy] [--chunk N]
    python -m minivseg.data --check /data/semkitti-dvps-minivseg
    python -m minivseg.train --preset=kitti --data=/data/semkitti-dvps-minivseg \\
        --model.num_classes=19 --model.thing_classes=0,1,2,3,4,5,6,7 --model.depth=true \\
        --clip_paste=0

(``--check`` prints KITTI-STEP class names for the ids; `SEMKITTI_DVPS_CLASSES` names them.
Clip-paste is off because `minivseg.data` pastes KITTI-STEP's things, 11 and 13.)
Differences from deeplab2: we keep PNG files and a folder per sequence instead of TFRecords of
frame pairs; track ids are renumbered (STQ and DSTQ do not depend on the id values).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from minivseg.panoptic import (
    CLASS_NAMES,
    IGNORE_LABEL,
    LABEL_DIVISOR,
    frame_order,
    write_kitti_step_png,
)

SEMKITTI_DVPS_CLASSES = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic-sign",
)  # fmt: skip
DATASETS = {  # deeplab2 data/dataset.py: classes, class_has_instances_list, ignore_label
    "semkitti-dvps": dict(classes=SEMKITTI_DVPS_CLASSES, things=tuple(range(8)), void=255),
    "cityscapes-dvps": dict(classes=CLASS_NAMES, things=tuple(range(11, 19)), void=32),
}
# File kinds by name: {prefix}{suffix}.png, prefix = {sequence}_{frame}[_...]
KINDS = re.compile(r"^(?P<prefix>.+?)(?P<kind>_leftImg8bit|_gtFine_instanceTrainIds|_gtFine_class"
                   r"|_gtFine_instance|_depth(_[0-9.]+)?)\.png$")  # fmt: skip
KIND_NAMES = {"_leftImg8bit": "image", "_gtFine_instanceTrainIds": "label",
              "_gtFine_class": "class", "_gtFine_instance": "instance"}  # fmt: skip


def list_split(split_dir: Path) -> dict[str, list[tuple[str, dict]]]:
    """``{sequence: [(frame, {kind: path}), ...]}`` for the frames (``*_leftImg8bit.png``) of a
    split folder, in time order; kinds: image, label, class, instance, depth."""
    files: dict[str, dict] = {}
    for entry in os.scandir(split_dir):  # one listing: SemKITTI-DVPS has ~100k files per split
        match = KINDS.match(entry.name)
        if match:
            kind = KIND_NAMES.get(match["kind"], "depth")
            found = files.setdefault(match["prefix"], {})
            if kind in found:
                raise ValueError(f"{split_dir}: two {kind} files for {match['prefix']}: "
                                 f"{found[kind].name}, {entry.name}")  # fmt: skip
            found[kind] = Path(entry.path)
    sequences: dict[str, dict] = {}
    for prefix, found in files.items():
        fields = prefix.split("_")
        if "image" not in found:
            raise ValueError(f"{next(iter(found.values()))}: no frame {prefix}_leftImg8bit.png")
        if len(fields) < 2 or not fields[1].isdigit():
            raise ValueError(f"{found['image']}: expected {{sequence}}_{{frame}}_..., as deeplab2")
        sequences.setdefault(fields[0], {})[fields[1]] = found
    return {seq: [(f, frames[f]) for f in frame_order(frames)]
            for seq, frames in sorted(sequences.items())}  # fmt: skip


def read_int_png(path: Path) -> np.ndarray:
    """A PNG's values as int64 (``ValueError`` naming the file if unreadable)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image, dtype=np.int64)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read: {error}") from error


def read_dvps_label(found: dict, things, label_divisor: int = 1000):
    """``(semantic, instance, path)`` of one frame's label files ``found`` (`list_split`), or
    ``None`` when it has none."""
    if "label" in found:
        values = read_int_png(found["label"])
        if values.ndim == 3:  # deeplab2: R = semantic, G * 256 + B = instance
            return values[..., 0], values[..., 1] * 256 + values[..., 2], found["label"]
        semantic, instance = np.divmod(values, label_divisor)
        if 0 not in things:  # below the divisor: a class id alone (Cityscapes instanceIds style)
            small = values < label_divisor
            semantic, instance = np.where(small, values, semantic), np.where(small, 0, instance)
        return semantic, instance, found["label"]
    if "class" in found:
        if "instance" not in found:
            raise ValueError(f"{found['class']}: no _gtFine_instance.png next to it")
        semantic, instance = read_int_png(found["class"]), read_int_png(found["instance"])
        if semantic.ndim != 2 or semantic.shape != instance.shape:
            raise ValueError(f"{found['class']}: class and instance maps must be 2-D, one size")
        return semantic, instance, found["class"]
    return None


def encode_panoptic(semantic, instance, path: Path, spec: dict, ids: dict) -> np.ndarray:
    """Our ``semantic * 1000 + track`` ids for one frame. ``ids`` maps a source track
    ``(class, instance)`` to its new id and is extended in order of first appearance."""
    num_classes, things = len(spec["classes"]), spec["things"]
    void = (semantic == IGNORE_LABEL) | (semantic == spec["void"])
    bad = np.unique(semantic[~void & ((semantic < 0) | (semantic >= num_classes))])
    if bad.size:
        raise ValueError(f"{path}: class ids {bad[:5].tolist()} are neither a class "
                         f"(0..{num_classes - 1}) nor void ({spec['void']}, 255)")  # fmt: skip
    tracked = np.isin(semantic, things) & (instance > 0) & ~void  # stuff drops its instance
    keys, inverse = np.unique(semantic[tracked] * 65536 + instance[tracked], return_inverse=True)
    for key in map(int, keys):  # a frame's new tracks: in ascending source id
        if key not in ids:
            cls = key // 65536
            ids[key] = 1 + sum(k // 65536 == cls for k in ids)
            if ids[key] >= LABEL_DIVISOR:
                raise ValueError(f"{path}: more than {LABEL_DIVISOR - 1} tracks of class {cls}"
                                 " in this sequence; convert with --chunk N (frames)")  # fmt: skip
    out = np.where(void, IGNORE_LABEL * LABEL_DIVISOR, semantic * LABEL_DIVISOR)
    new = np.array([ids[int(k)] for k in keys], dtype=np.int64)
    out[tracked] += new[inverse.reshape(-1)]
    return out


def place(source: Path, target: Path, copy: bool) -> None:
    """Symlink (or copy) ``source`` to ``target``, replacing what is there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    if copy:
        shutil.copyfile(source, target)
    else:
        target.symlink_to(source.resolve())


def convert(src, out, dataset: str = "semkitti-dvps", splits=None, copy: bool = False,
            label_divisor: int = 1000, chunk: int = 0) -> dict:  # fmt: skip
    """Convert a DVPS folder (``SRC/SPLIT/*_leftImg8bit.png``, or ``SRC/video_sequence/...``)
    into ``OUT/{images,panoptic_maps,depth}/SPLIT/SEQ/FRAME.png``. Returns per split the counts
    of sequences, frames and tracks and whether it has labels and depth; raises ``ValueError``
    naming the file for an unreadable label, an unknown class id or a missing label/depth."""
    src, out, spec = Path(src), Path(out), DATASETS[dataset]
    src = src / "video_sequence" if (src / "video_sequence").is_dir() else src
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder")
    splits = splits or sorted(p.name for p in src.iterdir() if p.is_dir())
    summary = {}
    for split in splits:
        sequences = list_split(src / split)
        if not sequences:
            raise ValueError(f"{src / split}: no {{sequence}}_{{frame}}_leftImg8bit.png frames")
        found = [files for frames in sequences.values() for _, files in frames]
        labels = any("label" in f or "class" in f for f in found)
        depth = any("depth" in f for f in found)
        stats = dict(sequences=0, frames=len(found), tracks=0, labels=labels, depth=depth)
        for sequence, frames in sequences.items():
            for index, (frame, files) in enumerate(frames):
                piece = f"{sequence}_{index // chunk:04d}" if chunk > 0 else sequence
                if index == 0 or (chunk > 0 and index % chunk == 0):  # a new sequence
                    ids, stats["sequences"] = {}, stats["sequences"] + 1
                target = Path(split) / piece / f"{frame}.png"
                place(files["image"], out / "images" / target, copy)
                if labels:
                    label = read_dvps_label(files, spec["things"], label_divisor)
                    if label is None:
                        raise ValueError(f"{files['image']}: no label (_gtFine_instanceTrainIds "
                                         "or _gtFine_class + _gtFine_instance)")  # fmt: skip
                    before = len(ids)
                    write_kitti_step_png(
                        out / "panoptic_maps" / target, encode_panoptic(*label, spec, ids)
                    )
                    stats["tracks"] += len(ids) - before
                if depth:
                    if "depth" not in files:
                        raise ValueError(f"{files['image']}: no depth map (_depth.png)")
                    place(files["depth"], out / "depth" / target, copy)
        summary[split] = stats
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="DVPS root: SPLIT/*_leftImg8bit.png ...")
    parser.add_argument("--out", required=True, help="minivseg dataset root to write")
    parser.add_argument("--dataset", default="semkitti-dvps", choices=sorted(DATASETS))
    parser.add_argument("--splits", nargs="+", default=None, help="default: every folder in SRC")
    parser.add_argument("--copy", action="store_true", help="copy images and depth, not symlink")
    parser.add_argument("--label-divisor", type=int, default=1000,
                        help="of single-channel _gtFine_instanceTrainIds PNGs")  # fmt: skip
    parser.add_argument("--chunk", type=int, default=0, help="split sequences every N frames")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.out, args.dataset, args.splits, args.copy,
                          args.label_divisor, args.chunk)  # fmt: skip
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for split, stats in summary.items():
        counts = f"{stats['sequences']} sequences, {stats['frames']} frames, {stats['tracks']}"
        print(f"{split}: {counts} tracks, labels: {stats['labels']}, depth: {stats['depth']}")
    spec = DATASETS[args.dataset]
    things = ",".join(map(str, spec["things"]))
    print(f"wrote {args.out}; classes ({args.dataset}, things {things}):")
    print("  " + ", ".join(f"{k} {name}" for k, name in enumerate(spec["classes"])))
    print(f"train with: python -m minivseg.train --preset=kitti --data={args.out} "
          f"--model.num_classes={len(spec['classes'])} --model.thing_classes={things} "
          "--model.depth=true --clip_paste=0")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
