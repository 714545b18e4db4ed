r"""Video segmentation metrics in one place, and ``python -m minivseg.metrics`` for PNG folders.

Each metric lives in the file of its family; import them from here:

- `STQ` (`minivseg.stq`): Segmentation and Tracking Quality, ``STQ = sqrt(AQ · SQ)`` (STEP §4;
  KITTI-STEP in TubeFormer-DeepLab §4.1); reproduces deeplab2's numpy ``STQuality``
  (evaluation/numpy/segmentation_and_tracking_quality.py).
- `VPQ` (`minivseg.vpq`): Video Panoptic Quality over windows of 1-4 frames, x100 (VPSNet;
  TubeFormer-DeepLab §5); reproduces VPSNet's ``tools/eval_vpq.py`` (mcahny/vps, 72d59ab3 or
  later), not deeplab2's TF ``VideoPanopticQuality``, which is a different number.
- `MeanIoU`, `Flicker`, `flicker_rate` (`minivseg.semantic_metrics`): mean class IoU (STT
  §4.1.2) and the share of pixels whose predicted class changes while the GT class does not (a
  flow-free stand-in for STT's TC); no reference implementation.
- `minivseg.video_ap.VideoAP`: video mask AP/AR of whole-video tracks with sequence IoU (VisTR
  §4); reproduces YouTube-VIS ``ytvoseval.py``.
- `PairCounter`, `merge_counts`, `class_iou` (`minivseg.pair_counting`): the joint histogram of
  (GT id, predicted id) pixel pairs that STQ, VPQ and video AP reduce each frame to, so that no
  frame is kept and memory does not grow with the number of frames.

Usage::

    from minivseg.metrics import STQ, VPQ, MeanIoU
    from minivseg.panoptic import NUM_CLASSES, THING_CLASSES, semantic_of

    stq, vpq = STQ(NUM_CLASSES, THING_CLASSES), VPQ(NUM_CLASSES, THING_CLASSES)
    miou = MeanIoU(NUM_CLASSES)
    for name, (gt_video, pred_video) in videos.items():  # (T, H, W) ids semantic*1000 + instance
        for gt, pred in zip(gt_video, pred_video):
            stq.update(gt, pred, sequence_id=name)       # one frame at a time
            miou.update(semantic_of(gt), semantic_of(pred))
        vpq.update(gt_video, pred_video)                 # one whole video at a time
    stq.result(), vpq.result(), miou.result()

STQ, AQ, SQ and mIoU lie in [0, 1] (as deeplab2 prints them); VPQ is x100 (as VPSNet prints it).
Each module's docstring gives its exact conventions and differences from the reference code;
lesson 06 works examples (AQ versus SQ) and lists the measured agreement and speed.

Evaluating saved PNG predictions::

    python -m minivseg.metrics --gt /data/kitti-step --pred runs/kitti/predictions \
        --split val --json metrics.json

``--gt`` and ``--pred`` are resolved the same way: if ``DIR/panoptic_maps/SPLIT/`` exists (a
KITTI-STEP root, e.g. the dataset or ``python -m minivseg.evaluate --out DIR``), the sequences
are its sub-folders; otherwise ``DIR`` itself holds ``SEQ/FRAME.png``. Files are KITTI-STEP
panoptic PNGs (R = class, G·256 + B = instance), read with label divisor 65536 so that
stitched track ids up to 65535 survive. The frames evaluated are the GT frames; each needs a
prediction with the same ``SEQ/FRAME.png`` name (extra predicted frames are ignored). The
command stops with exit code 2 and a message naming the file when a prediction is missing,
unreadable, of another size than its GT, or holds an unknown class id. It prints per-sequence
STQ/AQ/SQ, PQ/SQ/RQ per window size, VPQ and mIoU, and with ``--json`` writes everything (NaN as
``null``). On two synthetic 10-frame 375×1242 sequences (0.95 s on this project's 2-core x86 CPU
machine, shared with other jobs)::

    sequence   frames tubes    STQ     AQ     SQ
    0002           10    20  0.886  0.832  0.943
    0006           10    20  0.891  0.852  0.932
    all            20    40  0.888  0.842  0.937

    window         PQ     SQ     RQ PQ_thing PQ_stuff
    1 frames    95.40  96.09  99.29    94.20    95.88
    2 frames    95.11  96.08  98.98    93.18    95.88
    3 frames    94.92  95.93  98.95    92.54    95.87
    4 frames    94.62  95.86  98.70    91.49    95.87
    VPQ 95.01 (thing 92.85, stuff 95.88)
    mIoU 0.9372
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from minivseg.pair_counting import PairCounter, class_iou, merge_counts
from minivseg.panoptic import (
    NUM_CLASSES,
    THING_CLASSES,
    VIDEO_LABEL_DIVISOR,
    frame_order,
    read_kitti_step_png,
)
from minivseg.semantic_metrics import Flicker, MeanIoU, flicker_rate
from minivseg.stq import STQ
from minivseg.vpq import VPQ

__all__ = [
    "STQ",
    "VPQ",
    "MeanIoU",
    "Flicker",
    "flicker_rate",
    "PairCounter",
    "merge_counts",
    "class_iou",
    "to_json",
    "evaluate_folders",
    "format_table",
    "main",
]


# ---- command line: python -m minivseg.metrics --gt DIR --pred DIR [--split val] [--json OUT] ----


def _sequence_root(root: Path, split: str) -> Path:
    """``ROOT/panoptic_maps/SPLIT`` for a KITTI-STEP root, else ``ROOT`` (``ROOT/SEQ/*.png``)."""
    kitti = root / "panoptic_maps" / split
    return kitti if kitti.is_dir() else root


def _list_frames(gt_root: Path, pred_root: Path):
    """``{sequence: [(gt_path, pred_path), ...]}``; raises naming the first missing prediction."""
    if not gt_root.is_dir():
        raise FileNotFoundError(f"ground-truth folder {gt_root} does not exist")
    frames = {}
    for sequence in sorted(p for p in gt_root.iterdir() if p.is_dir()):
        gt_paths = frame_order(sequence.glob("*.png"))  # time order: 2 before 10
        if gt_paths:
            frames[sequence.name] = [
                (path, pred_root / sequence.name / path.name) for path in gt_paths
            ]
    if not frames:
        raise FileNotFoundError(f"no SEQ/FRAME.png ground truth under {gt_root}")
    for pairs in frames.values():
        for _, pred_path in pairs:
            if not pred_path.is_file():
                raise FileNotFoundError(f"missing prediction {pred_path}")
    return frames


def evaluate_folders(gt_dir, pred_dir, split="val") -> dict:
    """STQ, VPQ and mIoU of KITTI-STEP panoptic PNGs (``DIR/SEQ/FRAME.png`` or a dataset root).

    Predicted instance ids may be up to 65535 (stitched videos); ids are read with divisor 65536.
    """
    gt_root = _sequence_root(Path(gt_dir), split)
    frames = _list_frames(gt_root, _sequence_root(Path(pred_dir), split))
    divisor = VIDEO_LABEL_DIVISOR
    stq, vpq = STQ(NUM_CLASSES, THING_CLASSES, divisor), VPQ(NUM_CLASSES, THING_CLASSES, divisor)
    miou = MeanIoU(NUM_CLASSES)
    for sequence, pairs in frames.items():
        vpq.start_video()
        for gt_path, pred_path in pairs:
            gt = read_kitti_step_png(gt_path, divisor)
            pred = read_kitti_step_png(pred_path, divisor)
            try:
                stq.update(gt, pred, sequence)
                vpq.update_frame(gt, pred)
                miou.update(gt // divisor, pred // divisor)
            except ValueError as error:
                raise ValueError(f"{pred_path} (ground truth {gt_path}): {error}") from error
    stq_result, vpq_result = stq.result(), vpq.result()
    summary = {key: stq_result[key] for key in ("STQ", "AQ", "SQ")}
    summary |= {key: vpq_result[key] for key in ("VPQ", "VPQ_thing", "VPQ_stuff")}
    details = {"per_sequence": stq_result["per_sequence"], "per_window": vpq_result["per_window"]}
    return summary | miou.result() | details


def format_table(result: dict) -> str:
    """A plain-text report of `evaluate_folders` output (STQ parts in [0, 1], VPQ x100)."""
    rows = [
        (str(sequence), seq["num_frames"], seq["num_tubes"], seq["STQ"], seq["AQ"], seq["SQ"])
        for sequence, seq in result["per_sequence"].items()
    ]
    frames, tubes = sum(row[1] for row in rows), sum(row[2] for row in rows)
    rows.append(("all", frames, tubes, result["STQ"], result["AQ"], result["SQ"]))
    lines = [f"{'sequence':<10} {'frames':>6} {'tubes':>5} {'STQ':>6} {'AQ':>6} {'SQ':>6}"]
    lines += ["{:<10} {:>6} {:>5} {:>6.3f} {:>6.3f} {:>6.3f}".format(*row) for row in rows]
    lines += ["", f"{'window':<10} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'PQ_thing':>8} {'PQ_stuff':>8}"]
    for size, window in result["per_window"].items():
        values = [window[key] for key in ("PQ", "SQ", "RQ", "PQ_thing", "PQ_stuff")]
        lines.append(
            "{:<10} {:>6.2f} {:>6.2f} {:>6.2f} {:>8.2f} {:>8.2f}".format(f"{size} frames", *values)
        )
    lines.append("VPQ {VPQ:.2f} (thing {VPQ_thing:.2f}, stuff {VPQ_stuff:.2f})".format(**result))
    lines.append(f"mIoU {result['mIoU']:.4f}")
    return "\n".join(lines)


def to_json(value):
    """Strict JSON values: NaN and infinities (which JSON lacks) become null, keys strings."""
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minivseg.metrics",
        description="STQ / VPQ / mIoU of KITTI-STEP-format panoptic PNG predictions.",
    )
    parser.add_argument("--gt", required=True, help="DIR/SEQ/FRAME.png or a KITTI-STEP root")
    parser.add_argument("--pred", required=True, help="same layout as --gt, same file names")
    parser.add_argument("--split", default="val", help="split under ROOT/panoptic_maps/")
    parser.add_argument("--json", help="also write the full result to this JSON file")
    args = parser.parse_args(argv)
    try:
        result = evaluate_folders(args.gt, args.pred, args.split)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
