"""VSPW's layout as a `minivseg.splits.VideoSplit`, its mask codec, a writer, and its scores.

VSPW (Miao et al., "VSPW: A Large-scale Dataset for Video Scene Parsing in the Wild", CVPR 2021)
labels every frame with one of 124 classes; methods train on VSPW_480p (frames resized to 480 px
height). Download: https://www.vspwdataset.com/ and
https://github.com/sssdddwww2/vspw_dataset_download.
Layout (as distributed, and as `write_split` writes it)::

    ROOT/{train,val,test}.txt          one video name per line
    ROOT/label_num_dic_final.json      {"others": 0, "wall": 1, ...}: class name -> mask value
    ROOT/data/VIDEO/origin/FRAME.jpg   frames (.png accepted; one suffix per video)
    ROOT/data/VIDEO/mask/FRAME.png     8-bit palette PNG of mask values (test videos: none)

Labels follow the reimplementation's training and evaluation (sssdddwww2/CVPR2021_VSPW_Implement,
``dataset2.py`` ``segm_transform``): mask value v in 1..K is class v - 1, "others" (0) and 255
are ignored; K = the JSON entries other than "others". `read_panoptic` gives ``class * 1000``
(instance 0: no things) and `VOID_ID` for both. The official ``evaluator_test.py``
(VSPW-dataset/VSPW_code) runs ``Evaluator(124)`` on raw values instead: it scores "others" as a
class and never value 124, the last class (a predicted 124 is counted as "others" of the next GT
row). We do not reproduce that quirk.

Predictions: class maps written by `write_mask` in the masks' value convention (class + 1, void
255) at `prediction_path` = ``OUT/VIDEO/FRAME.png``, where VSPW's tooling reads them (the
reimplementation's ``test.py`` saves classes without the + 1). `score_predictions` gives:

- ``mIoU``: `MeanIoU` with ``mean_over="gt"``: one confusion matrix over all frames, IoU averaged
  over the classes with GT pixels (the tooling's ``isval``); GT others/void pixels not counted.
- ``mVC8`` / ``mVC16``: `VideoConsistency` (``drop_last_window=True``, ``ignore_label=None``) on
  the raw mask values of GT and prediction: exactly ``VC_perclip.py``, the script VSPW gives for
  mVC, where every value, "others" and void included, is a label (mapping both to 255 would make
  an others <-> void change look stable).

Opening a split reads the two lists and lists the folders, decoding nothing (VSPW has about 250k
frames); `VSPWSplit.check` decodes every frame and mask. Problems raise `DatasetError` naming the
file. ``python -m minivseg.vspw --check ROOT`` checks every split; ``--score PRED_DIR --data ROOT
--split val`` prints the scores. TubeFormer-DeepLab's VSPW numbers are in the README.

Deliberate differences from the tooling: split lists are read with whitespace stripped (it cuts
the last character of every line, newline or not); frames are read in `frame_order` (the same as
text order for VSPW's 8-digit names).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from minivseg.panoptic import IGNORE_LABEL, LABEL_DIVISOR, VOID_ID, frame_order, semantic_of
from minivseg.semantic_metrics import MeanIoU
from minivseg.splits import DatasetError, VideoSplit, read_image, write_text_atomically
from minivseg.video_consistency import VideoConsistency

CLASS_FILE = "label_num_dic_final.json"
OTHERS = "others"  # mask value 0: labelled "none of the classes"; ignored like void
MASK_VOID = 255  # mask value of unlabelled pixels
FRAME_SUFFIXES = (".jpg", ".png")
VC_WINDOWS = (8, 16)
PALETTE = np.random.default_rng(0).integers(0, 256, size=(256, 3), dtype=np.uint8)
PALETTE[0], PALETTE[MASK_VOID] = 0, 255  # others black, void white


def read_class_names(root) -> tuple[str, ...]:
    """Class names in mask-value order, "others" left out; the JSON's values (ints or digit
    strings) must be 0 ("others") .. K, each once."""
    path = Path(root) / CLASS_FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the class list: {error}") from error
    if not isinstance(table, dict) or OTHERS not in table:
        raise DatasetError(f'{path}: expected an object {{class name: mask value}} with "others"')
    values = {}
    for name, value in table.items():
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"{path}: entry {name!r}: mask value {value!r} is not an integer")
        values[name] = value
    num_classes = len(values) - 1
    if values[OTHERS] != 0:
        raise DatasetError(f'{path}: entry "others" has mask value {values[OTHERS]}, expected 0')
    if not 1 <= num_classes < MASK_VOID:
        raise DatasetError(f"{path}: {num_classes} classes; masks hold 1..{MASK_VOID - 1}")
    if sorted(values.values()) != list(range(num_classes + 1)):
        repeated = sorted(v for v, count in Counter(values.values()).items() if count > 1)
        outside = sorted(v for v in values.values() if not 0 <= v <= num_classes)
        raise DatasetError(f"{path}: mask values must be 0..{num_classes} once each; repeated: "
                           f"{repeated}, outside 0..{num_classes}: {outside}")  # fmt: skip
    return tuple(sorted((name for name in values if name != OTHERS), key=values.get))


def read_video_list(root, split: str) -> list[str]:
    """The video names of ``ROOT/SPLIT.txt``, one a line (blank lines skipped)."""
    path = Path(root) / f"{split}.txt"
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the list of split {split!r}: {error}") from error
    names = [name for name in names if name]
    if not names:
        raise DatasetError(f"{path}: lists no videos")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DatasetError(f"{path}: video {repeated[0]!r} is listed more than once")
    return names


def list_files(folder: Path, suffixes) -> dict[str, str]:
    """``stem -> file name`` of the files in ``folder`` ending in one of ``suffixes``."""
    files = {}
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        if suffix in suffixes:
            if stem in files:
                raise DatasetError(f"{folder / name}: a second file for frame {stem!r}")
            files[stem] = name
    return files


def read_mask_values(path, num_classes: int | None = None) -> np.ndarray:
    """Raw ``(H, W)`` uint8 values of an 8-bit palette (or grayscale) mask PNG. With
    ``num_classes`` K, values other than 0..K and 255 raise `DatasetError` naming them."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"expected an 8-bit palette PNG, got mode {image.mode!r}")
            values = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"{path}: cannot read mask: {error}") from error
    if num_classes is not None:
        bad = np.unique(values[(values > num_classes) & (values != MASK_VOID)])
        if bad.size:
            raise DatasetError(f"{path}: mask values {bad[:8].tolist()} are neither "
                               f"0..{num_classes} nor {MASK_VOID} (void)")  # fmt: skip
    return values


def classes_of(values: np.ndarray) -> np.ndarray:
    """Mask values -> int64 classes: v in 1..K is class v - 1; others (0) and 255 -> 255."""
    values = np.asarray(values, dtype=np.int64)
    return np.where((values == 0) | (values == MASK_VOID), IGNORE_LABEL, values - 1)


def read_mask_classes(path, num_classes: int | None = None) -> np.ndarray:
    """``(H, W)`` int64 class map of a mask or prediction PNG (void and others: 255)."""
    return classes_of(read_mask_values(path, num_classes))


def write_mask(path, semantic) -> None:
    """Write an ``(H, W)`` class map (0..253, void 255) as an 8-bit palette PNG of VSPW mask
    values (class + 1, void 255), creating folders."""
    semantic = np.asarray(semantic, dtype=np.int64)
    if semantic.ndim != 2:
        raise ValueError(f"{path}: class map must be 2-D, got shape {semantic.shape}")
    labelled = semantic != IGNORE_LABEL
    if semantic[labelled].min(initial=0) < 0 or semantic[labelled].max(initial=0) > 253:
        raise ValueError(f"{path}: classes must lie in 0..253 (mask values 1..254) or be void 255")
    image = Image.fromarray(np.where(labelled, semantic + 1, MASK_VOID).astype(np.uint8))
    image.putpalette(PALETTE.ravel().tolist())  # mode L -> P, values kept
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def prediction_path(out, sequence: str, frame: str) -> Path:
    """Where a frame's prediction goes: ``OUT/VIDEO/FRAME.png`` (VSPW's tooling reads it there)."""
    return Path(out) / sequence / f"{frame}.png"


class VSPWSplit(VideoSplit):
    """A split of a VSPW root: ``SPLIT.txt``, the class JSON, ``data/VIDEO/{origin,mask}``."""

    format = "vspw"
    own_classes = True
    thing_classes = ()  # semantic labels only: no instances

    def __init__(self, root, split, labels=None):
        root = Path(root)
        class_names, videos = read_class_names(root), read_video_list(root, split)
        sequences, self._suffix, has_masks = {}, {}, {}
        for video in videos:
            origin = root / "data" / video / "origin"
            if not origin.is_dir():
                raise DatasetError(f"{origin}: no frame folder for video {video!r} of {split}.txt")
            files = list_files(origin, FRAME_SUFFIXES)
            suffixes = {Path(name).suffix for name in files.values()}
            if not suffixes:
                raise DatasetError(f"{origin}: no frames (*.jpg or *.png)")
            if len(suffixes) > 1:
                raise DatasetError(f"{origin}: mixes *.jpg and *.png frames")
            sequences[video], self._suffix[video] = frame_order(files), suffixes.pop()
            has_masks[video] = (root / "data" / video / "mask").is_dir()
        with_masks = [video for video in videos if has_masks[video]]
        if labels is None and 0 < len(with_masks) < len(videos):
            without = next(video for video in videos if not has_masks[video])
            raise DatasetError(f"{root / f'{split}.txt'}: some videos have masks and some not: "
                               f"{root / 'data' / with_masks[0] / 'mask'} exists, "
                               f"{root / 'data' / without / 'mask'} does not")  # fmt: skip
        labels = bool(with_masks) if labels is None else labels
        super().__init__(root, split, sequences, labels, len(class_names), (), class_names)
        if labels:
            for video, frames in sequences.items():
                self._match_masks(video, frames)

    def _match_masks(self, video: str, frames: list[str]) -> None:
        mask_dir = self.root / "data" / video / "mask"
        if not mask_dir.is_dir():
            raise DatasetError(f"{mask_dir}: no mask folder (split {self.split!r} read labelled)")
        masks = list_files(mask_dir, (".png",))
        for frame in frames:
            if frame not in masks:
                raise DatasetError(f"{self.image_path(video, frame)}: no mask at "
                                   f"{self.mask_path(video, frame)}")  # fmt: skip
        known = set(frames)
        for stem, name in masks.items():
            if stem not in known:
                raise DatasetError(f"{mask_dir / name}: mask without a frame in {mask_dir.parent}")

    def image_path(self, sequence: str, frame: str) -> Path:
        return self.root / "data" / sequence / "origin" / f"{frame}{self._suffix[sequence]}"

    def mask_path(self, sequence: str, frame: str) -> Path:
        return self.root / "data" / sequence / "mask" / f"{frame}.png"

    def label_source(self, sequence: str, frame: str) -> str:
        return str(self.mask_path(sequence, frame))

    def read_panoptic(self, sequence: str, frame: str) -> np.ndarray:
        semantic = read_mask_classes(self.mask_path(sequence, frame), self.num_classes)
        return np.where(semantic == IGNORE_LABEL, VOID_ID, semantic * LABEL_DIVISOR)

    def _check_frame(self, job) -> np.ndarray:
        image_path = self.image_path(*job)
        size = read_image(image_path).shape[:2]
        if not self.labels:
            return np.zeros(self.num_classes + 1, dtype=np.int64)
        semantic = read_mask_classes(self.mask_path(*job), self.num_classes)
        if semantic.shape != size:
            raise DatasetError(f"{self.mask_path(*job)}: mask size {semantic.shape} differs from "
                               f"image size {size} of {image_path}")  # fmt: skip
        semantic = np.where(semantic == IGNORE_LABEL, self.num_classes, semantic)
        return np.bincount(semantic.ravel(), minlength=self.num_classes + 1)

    def check(self) -> np.ndarray:
        jobs = [(video, frame) for video, frames in self.sequences.items() for frame in frames]
        with ThreadPoolExecutor(max_workers=4) as pool:
            return sum(pool.map(self._check_frame, jobs), np.zeros(self.num_classes + 1, np.int64))


def write_split(root, split: str, videos, class_names) -> None:
    """Write ``videos`` — ``(name, frames (F, H, W, 3) uint8, panoptic (F, H, W) int64 or None)``
    — as a VSPW split: JPEG frames (quality 95) and masks named ``00000001`` ..., ``SPLIT.txt``
    and the class JSON; an existing JSON must hold the same classes. ``panoptic=None``: no masks
    (a test split)."""
    root, class_names = Path(root), tuple(class_names)
    table = {OTHERS: 0, **{name: k + 1 for k, name in enumerate(class_names)}}
    if len(table) != len(class_names) + 1 or not 1 <= len(class_names) < MASK_VOID:
        raise ValueError(f"need 1..254 distinct class names other than {OTHERS!r}")
    if (root / CLASS_FILE).exists():
        if read_class_names(root) != class_names:
            raise DatasetError(f"{root / CLASS_FILE}: holds other classes than {class_names}")
    else:
        write_text_atomically(root / CLASS_FILE, json.dumps(table, indent=1) + "\n")
    names = []
    for name, frames, panoptic in videos:
        if not name or name != name.strip() or "/" in name or "\n" in name or name in names:
            raise ValueError(f"{root / f'{split}.txt'}: bad or repeated video name {name!r}")
        write_video(root / "data" / name, frames, panoptic, len(class_names))
        names.append(name)
    write_text_atomically(root / f"{split}.txt", "".join(f"{name}\n" for name in names))


def write_video(folder: Path, frames, panoptic, num_classes: int) -> None:
    """One video's ``origin/`` frames and (unless ``panoptic`` is None) ``mask/`` PNGs."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{folder}: frames must be (F, H, W, 3) uint8, got {frames.shape}"
                         f" {frames.dtype}")  # fmt: skip
    stems = [f"{t + 1:08d}" for t in range(len(frames))]  # VSPW's names start at 1
    stale = [path for path in folder.glob("*/*") if path.stem not in set(stems)]
    if stale or (panoptic is None and (folder / "mask").exists()):
        raise DatasetError(f"{folder}: holds files this write would not replace; remove it first")
    if panoptic is not None:
        semantic = semantic_of(np.asarray(panoptic, dtype=np.int64))
        if semantic.shape != frames.shape[:3]:
            raise ValueError(f"{folder}: panoptic {semantic.shape} != frames {frames.shape[:3]}")
        bad = np.unique(semantic[(semantic >= num_classes) & (semantic != IGNORE_LABEL)])
        if bad.size or semantic.min(initial=0) < 0:
            raise ValueError(f"{folder}: semantic ids {bad[:8].tolist()} are neither a class "
                             f"(0..{num_classes - 1}) nor void")  # fmt: skip
    (folder / "origin").mkdir(parents=True, exist_ok=True)
    for t, stem in enumerate(stems):
        Image.fromarray(frames[t]).save(folder / "origin" / f"{stem}.jpg", quality=95)
        if panoptic is not None:
            write_mask(folder / "mask" / f"{stem}.png", semantic[t])


def score_predictions(pred_dir, split: VSPWSplit) -> dict:
    """``mIoU`` (classes with GT pixels), ``mVC8``, ``mVC16`` (raw values, nothing ignored) and
    ``IoU_per_class`` of the predictions at ``prediction_path(pred_dir, ...)``."""
    if not split.labels:
        raise DatasetError(f"{split.root}: split {split.split!r} has no masks to score against")
    miou = MeanIoU(split.num_classes, mean_over="gt")
    consistency = [VideoConsistency(window, ignore_label=None) for window in VC_WINDOWS]
    for video, frames in split.sequences.items():
        for vc in consistency:
            vc.start_video(video)
        for frame in frames:
            gt_path, path = split.mask_path(video, frame), prediction_path(pred_dir, video, frame)
            if not path.is_file():
                raise DatasetError(f"{path}: no prediction for {gt_path}")
            gt = read_mask_values(gt_path, split.num_classes)
            pred = read_mask_values(path, split.num_classes)
            if pred.shape != gt.shape:
                raise DatasetError(f"{path}: size {pred.shape} != {gt.shape} of {gt_path}")
            miou.update(classes_of(gt), classes_of(pred))
            for vc in consistency:
                vc.update_frame(gt, pred)
        for vc in consistency:
            vc.end_video()
    result = miou.result()
    scores = {f"mVC{vc.window}": vc.result()[f"VC{vc.window}"] for vc in consistency}
    return {"mIoU": result["mIoU"], **scores, "IoU_per_class": result["IoU_per_class"]}


def check_main(root: Path, splits=None) -> None:
    """Check every split (default: those with a list), printing videos, frames, class shares."""
    splits = splits or [s for s in ("train", "val", "test") if (root / f"{s}.txt").is_file()]
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if not splits:
        raise DatasetError(f"{root}: no split list (train.txt, val.txt, test.txt)")
    for name in splits:
        split = VSPWSplit(root, name)
        counts = split.check()
        print(f"{name}: {len(split.sequences)} videos, {split.num_frames()} frames, "
              f"labels: {split.labels}")  # fmt: skip
        if split.labels:
            shares = counts / max(counts.sum(), 1)
            for class_name, share in zip((*split.class_names, "others/void"), shares):
                if share > 0:
                    print(f"  {class_name:>24s} {100 * share:6.2f} %")
            print(f"  classes without pixels: {int((counts[:-1] == 0).sum())}")
    print(f"{root}: OK")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minivseg.vspw", description="Check a VSPW root, or score predictions."
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", metavar="ROOT", help="decode and check a VSPW root")
    mode.add_argument("--score", metavar="PRED_DIR", help="score PRED_DIR/VIDEO/FRAME.png")
    parser.add_argument("--data", metavar="ROOT", help="the VSPW root to score against")
    parser.add_argument("--split", default="val", help="split scored by --score")
    parser.add_argument("--splits", nargs="+", help="splits checked by --check (default: all)")
    args = parser.parse_args(argv)
    if args.score and not args.data:
        parser.error("--score needs --data ROOT")
    try:
        if args.check:
            return check_main(Path(args.check), args.splits)
        result = score_predictions(args.score, VSPWSplit(args.data, args.split))
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{'split':>8s} {'mIoU':>7s} {'mVC8':>7s} {'mVC16':>7s}")
    scores = (100 * result[key] for key in ("mIoU", "mVC8", "mVC16"))
    print(f"{args.split:>8s} " + " ".join(f"{score:7.2f}" for score in scores))


if __name__ == "__main__":
    main()
