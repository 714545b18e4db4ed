"""Whole-video evaluation and prediction export, streamed frame by frame (TubeFormer §3.4, §4.2).

``python -m minivseg.evaluate --checkpoint CKPT --data ROOT --split val [--out DIR]`` slides a
T-frame window with stride 1 over each sequence, turns each clip into panoptic tubes
(`minivseg.inference`: argmax twice, class confidence ≥ 0.7, pixel confidence > 0.4), links the
clips into video tracks (`minivseg.stitching`) and scores STQ, AQ, SQ, VPQ, mIoU, label flicker and
video mask AP (YouTube-VIS rules on the whole stitched sequence, per-pixel and per-mask inference
for TubeFormer, its own stitching for VisTR; `minivseg.metrics`, `minivseg.video_ap`). It prints a
table and, with ``--out``, writes ``metrics.json`` (undefined numbers as ``null``), KITTI-STEP PNG
predictions ``OUT/panoptic_maps/SPLIT/SEQ/FRAME.png`` (which ``python -m minivseg.metrics`` scores
again) and one overlay GIF per sequence. STQ, AQ, SQ, mIoU and AP are fractions; VPQ is ×100.
Other layouts (`minivseg.formats`, ``--format`` to force one): on VSPW it scores mIoU (mean
over the classes with GT pixels, VSPW's), mVC8, mVC16 and flicker and writes VSPW masks under
``OUT/masks/VIDEO/`` (its VC merges "others" and void, both 255 here; ``python -m minivseg.vspw
--score OUT/masks`` gives the tooling's exact VC, which differs only where a pixel changes between
the two); on YouTube-VIS it scores video mask AP/AR and writes ``OUT/results.json`` for the server
(TubeFormer: per-mask tracks; VisTR: its tracks). ``--frames DIR`` runs on a folder of frames
without labels (all of one size; it says what it is about to do first) and writes predictions and
the GIF. From Python, any task's checkpoint:
``model, cfg = minivseg.tasks.load_model(path)`` then ``minivseg.tasks.predict_frames``.

- **Streaming.** Frames are read as the windows need them, each window runs the model once (all
  three inferences use that output), each clip is folded into the stitched video as it comes, and
  each frame is scored and written as soon as no later clip can change it. Memory does not grow with
  the length of a sequence beyond the GIF's frames; each image and label is decoded once for model
  and metrics. Frames are decoded in the main thread: a reader thread let glibc's per-thread heaps
  grow without bound at 375×1242 (12.98 GB peak over 1000 frames) and gave no speed on the CPU.
  Measured on this project's 2-core machine (shared), the ``make demo`` model, one torch thread,
  375×1242, labels scored, PNGs and GIF written (`tests/benchmarks/bench_evaluate.py --checkpoint
  runs/demo/last.pt`, which writes the synthetic sequences, ~0.7 GB, under /tmp): 100 frames 217 s
  wall / 214 s CPU, 1.51 GB peak RSS; 1000 frames 2182 s / 2141 s, 1.72 GB; 2.14 CPU s per frame
  both. The 0.2 GB between them is about the GIF's extra frames (100 vs 200; 200 frames cost about
  0.2 GB measured on their own). Per window the model takes about 0.6 s and post-processing 1.3 s
  (per-pixel 0.5, per-mask 0.6, semantic 0.2).
- **Progress.** A progress bar per sequence shows frames/s and the time left (on a terminal); each
  finished sequence prints one line with its frame rate.
- **Track ids.** Predictions use label divisor 65536 (track ids up to 65535, the most a KITTI-STEP
  PNG holds in G·256+B): read them with ``read_kitti_step_png(path, label_divisor=65536)``, as
  ``python -m minivseg.metrics`` does. Ground truth is read with 1000 and relabelled.
- **Sizes.** Frames are padded (bottom/right, image mean) to the next 16k+1 size, as deeplab2 pads
  KITTI to 385×1249, and predictions are cropped back; a video shorter than T is padded by
  repeating its last frame. The GIF shows at most 200 frames, evenly spaced, at most 640 px wide.
- **Post-processing is deeplab2's:** pixels below the thresholds stay void, so STQ and VPQ mean
  what published numbers mean. ``--fill-void`` gives them the unthresholded semantic class: in
  deeplab2's STQ a void prediction on a labelled pixel is an extra class of IoU 0, while a
  filled-in thing pixel can only add to AQ; VPQ may count it as a false positive. On the ``make
  demo`` checkpoint's 12 held-out sequences it raised STQ 0.471 → 0.494 (SQ 0.631 → 0.694, AQ
  0.352) and lowered VPQ 57.9 → 56.2 (thing 37.3 → 28.5); mIoU, flicker and AP do not depend on
  it.
  ``--class-threshold`` / ``--pixel-threshold`` change 0.7 / 0.4: on two training sequences an
  8-sequence demo model (void filled) gave STQ 0.547 / 0.548 / 0.548 at class thresholds
  0.7 / 0.5 / 0.3.
- In-training evaluation (``--eval_every``) uses the same defaults; a failure is logged
  (``eval_error`` in log.jsonl, a warning) and training goes on. Labels are checked as read (an
  unknown class id stops with the file's name; classes the model lacks are void to it). A
  checkpoint with config fields this version does not know loads with a warning naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minivseg.config import TrainConfig
from minivseg.formats import FORMATS, open_split
from minivseg.panoptic import (
    LABEL_DIVISOR,
    VIDEO_LABEL_DIVISOR,
    VOID_ID,
    frame_order,
    read_depth_png,
    read_kitti_step_png,
    relabel,
)
from minivseg.predictions import PredictionWriter
from minivseg.splits import frame_tensor
from minivseg.tasks import load_model, predict_frames, task_classes


def read_sequence(root: Path, split: str, sequence: str, names: list[str], labels: bool):
    """A whole short sequence in memory: frames ``(F, 3, H, W)`` and GT ``(F, H, W)`` or None."""
    frames = torch.stack([frame_tensor(root / "images" / split / sequence / f"{n}.png")
                          for n in names])  # fmt: skip
    if not labels:
        return frames, None
    label_dir = root / "panoptic_maps" / split / sequence
    return frames, np.stack([read_kitti_step_png(label_dir / f"{n}.png") for n in names])


def evaluate_model(
    model, cfg: TrainConfig, root, split="val", device="cpu", out_dir=None, max_sequences=0,
    labels=True, gifs=True, sequences=None, fill_void=False, thresholds=None,
) -> dict:  # fmt: skip
    """Predict every sequence of a split (any layout, `minivseg.formats`), stream it into the
    metrics (and PNGs/GIFs, VSPW masks or YouTube-VIS results) frame by frame. Returns the
    metrics (empty without labels). ``sequences``: a subset {name: frame names} of the split."""
    from minivseg.depth_metrics import DepthMetrics
    from minivseg.dstq import DSTQ
    from minivseg.metrics import STQ, VPQ, Flicker, MeanIoU
    from minivseg.video_ap import VideoAP
    from minivseg.video_consistency import VideoConsistency

    source = open_split(root, split, cfg.data_format, labels=labels, decode=False)
    sequences = sequences or source.sequences
    names = list(sequences)[: max_sequences or None]
    num_classes, thing_classes = task_classes(model)
    classes = (num_classes, thing_classes, VIDEO_LABEL_DIVISOR)
    layout = source.format  # kitti-step: STQ/VPQ/AP; vspw: mIoU, mVC8/16; youtube-vis: AP
    stq, vpq, flicker = STQ(*classes), VPQ(*classes), Flicker()
    miou = MeanIoU(num_classes, mean_over="gt" if layout == "vspw" else "union")
    consistency = {n: VideoConsistency(n, ignore_label=None) for n in (8, 16)
                   if layout == "vspw"}  # VSPW's VC8 and VC16  # fmt: skip
    modes = {"tubeformer": ("pixel", "mask"), "vistr": ("vistr",)}.get(cfg.task, ())
    video_ap = {mode: VideoAP(*classes) for mode in modes} if labels and thing_classes else {}
    has_depth = getattr(getattr(model, "cfg", None), "depth", False)
    scored_depth = labels and has_depth and source.has_depth
    dstq, depth_metrics = DSTQ(*classes), DepthMetrics()  # DVPS: used when scored_depth
    results = None  # YouTube-VIS: the results file of per-mask (TubeFormer) or VisTR tracks
    if layout == "youtube-vis" and out_dir is not None and modes:
        from minivseg.youtube_vis_results import ResultsWriter

        results = ResultsWriter(source)
    model.eval().to(device)
    for number, sequence in enumerate(names):
        paths = [source.image_path(sequence, n) for n in sequences[sequence]]
        frames = (frame_tensor(path, device) for path in paths)  # read as the windows need them
        gts = itertools.repeat((None, None))
        if labels:
            gts = ((source.label_source(sequence, n), source.read_panoptic(sequence, n))
                   for n in sequences[sequence])  # fmt: skip
        writer = None
        if out_dir is not None:
            writer = PredictionWriter(out_dir, split, sequence, paths, gifs, layout)
        scores, previous, start_time = {}, None, time.time()
        vpq.start_video()
        for metric in video_ap.values():
            metric.start_video()
        for metric in consistency.values():
            metric.start_video(sequence)
        if results is not None:
            results.start_video(sequence)
        stream = predict_frames(model, cfg, frames, len(paths), fill_void, thresholds,
                                masks="mask" in modes, scores=scores)  # fmt: skip
        bar = tqdm(total=len(paths), desc=f"[{number + 1}/{len(names)}] {sequence}",
                   unit="frame", disable=None, leave=False)  # fmt: skip
        for t, pred in enumerate(stream):  # the stream fills `scores` when it ends
            label_path, gt = next(gts)
            if gt is not None:
                if gt.shape != pred["panoptic"].shape:
                    raise ValueError(f"{label_path}: label size {gt.shape} differs from image"
                                     f" size {pred['panoptic'].shape} of {paths[t]}")  # fmt: skip
                gt = np.where(gt // LABEL_DIVISOR < num_classes, gt, VOID_ID)  # unknown: void
                gt = relabel(gt, LABEL_DIVISOR, VIDEO_LABEL_DIVISOR)
                semantic = gt // VIDEO_LABEL_DIVISOR
                stq.update(gt, pred["panoptic"], sequence_id=sequence)
                vpq.update_frame(gt, pred["panoptic"])
                miou.update(semantic, pred["semantic"])
                if previous is not None:  # flicker counts consecutive pairs of frames
                    flicker.update(*map(np.stack, zip(previous, (semantic, pred["semantic"]))))
                previous = (semantic, pred["semantic"])
                for metric in consistency.values():
                    metric.update_frame(semantic, pred["semantic"])
                for mode, metric in video_ap.items():
                    metric.update_frame(gt, pred["mask" if mode == "mask" else "panoptic"])
                if scored_depth:
                    gt_depth = read_depth_png(source.depth_path(sequence, paths[t].stem))
                    dstq.update(gt, pred["panoptic"], gt_depth, pred["depth"], sequence)
                    depth_metrics.update(gt_depth, pred["depth"])
            if writer is not None:
                writer.add(t, pred, gt)  # gt: video ids, or None without labels
            if results is not None:
                results.add_frame(pred["mask" if "mask" in modes else "panoptic"])
            bar.update()
        bar.close()
        for mode, metric in video_ap.items():
            metric.end_video(scores[mode])
        for metric in consistency.values():
            metric.end_video()
        if results is not None:
            results.end_video(scores[modes[-1]])
        if writer is not None:
            writer.close()
        seconds = time.time() - start_time
        print(f"  [{number + 1}/{len(names)}] {sequence}: {len(paths)} frames in {seconds:.1f} s"
              f" ({len(paths) / max(seconds, 1e-9):.2f} frames/s)", flush=True)  # fmt: skip
    if results is not None:
        results.write(Path(out_dir) / "results.json")
        print(f"YouTube-VIS results ({len(results.results)} tracks): {out_dir}/results.json")
    if not labels:
        return {}
    scores = {}
    if layout != "youtube-vis":
        scores = {"mIoU": miou.result()["mIoU"], "flicker": flicker.result()["flicker"]}
    if layout == "vspw":
        scores.update({f"m{k}": v for n in consistency.values() for k, v in n.result().items()
                       if k.startswith("VC")})  # fmt: skip
    if cfg.task != "stt" and layout == "kitti-step":  # panoptic tracks: STQ and VPQ
        scores.update({k: v for k, v in stq.result().items() if k in ("STQ", "AQ", "SQ")})
        scores.update({k: v for k, v in vpq.result().items() if k.startswith("VPQ")})
    for name, metric in video_ap.items():
        scores.update({f"{name}_{k}": v for k, v in metric.result().items()})
    if scored_depth:  # DVPS: DSTQ and the depth errors
        scores.update({k: v for k, v in dstq.result().items() if k.startswith(("DSTQ", "DQ"))})
        depth_errors = depth_metrics.result().items()
        scores.update({f"depth_{k}": v for k, v in depth_errors if k != "num_frames"})
    return {k: float(v) for k, v in scores.items() if np.isscalar(v)}


def predict_folder(model, cfg: TrainConfig, folder: Path, out: Path, device, thresholds=None,
                   fill_void=False):  # fmt: skip
    """``--frames DIR``: predictions and an overlay GIF for a folder of frames without labels."""
    from PIL import Image

    paths = frame_order(folder.glob("*.png")) or frame_order(folder.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"error: {folder}: no .png or .jpg frames")
    sizes = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.setdefault(image.size, path)
        except OSError as error:
            raise SystemExit(f"error: {path}: cannot read image: {error}") from None
    if len(sizes) > 1:
        (a, first), (b, other) = list(sizes.items())[:2]
        raise SystemExit(f"error: frames of several sizes: {first} is {a[0]}x{a[1]}, "
                         f"{other} is {b[0]}x{b[1]}")  # fmt: skip
    ((width, height),) = sizes
    print(f"predicting {len(paths)} frames of {folder} ({width}x{height}) with the {cfg.task}"
          f" model on {device}; writing PNGs and an overlay GIF to {out}", flush=True)  # fmt: skip
    frames = (frame_tensor(path, device) for path in paths)
    writer = PredictionWriter(out, "frames", folder.name, paths)
    stream = predict_frames(model, cfg, frames, len(paths), fill_void, thresholds)
    for t, pred in enumerate(tqdm(stream, total=len(paths), unit="frame", disable=None)):
        writer.add(t, pred)
    writer.close()
    print(f"predictions and overlay GIF for {len(paths)} frames in {out}")


def print_table(metrics: dict) -> None:
    print(f"{'metric':>14s}  value")
    for name, value in metrics.items():
        print(f"{name:>14s}  {value:.4f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint on video (KITTI-STEP, VSPW or YouTube-VIS layout)."
    )
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (last.pt)")
    parser.add_argument("--data", help="dataset root (KITTI-STEP, VSPW or YouTube-VIS layout)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--format", choices=FORMATS, help="dataset layout (default: from files)")
    parser.add_argument("--frames", help="folder of frames without labels (prediction only)")
    parser.add_argument("--out", help="write PNG predictions, overlay GIFs and metrics.json here")
    parser.add_argument("--max-sequences", type=int, default=0, help="first N sequences only")
    parser.add_argument("--class-threshold", type=float, default=0.7, help="deeplab2: 0.7")
    parser.add_argument("--pixel-threshold", type=float, default=0.4, help="deeplab2: 0.4")
    parser.add_argument(
        "--fill-void",
        action="store_true",
        help="give pixels below the confidence thresholds their unthresholded semantic class"
        " (default: keep them void, as deeplab2's MaX-DeepLab post-processor does)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"error: {args.checkpoint}: no such checkpoint")
    try:
        model, cfg = load_model(args.checkpoint, args.device)
    except ValueError as error:  # not a checkpoint, or one with a config this version rejects
        raise SystemExit(f"error: {error}") from None
    if cfg.threads > 0:  # the thread count the model was trained with (see TrainConfig.threads)
        torch.set_num_threads(cfg.threads)
    thresholds = {"class_threshold": args.class_threshold, "pixel_threshold": args.pixel_threshold}
    out = Path(args.out) if args.out else None
    try:
        if args.frames:
            folder = Path(args.frames)
            predict_folder(model, cfg, folder, out or Path("outputs") / folder.name, args.device,
                           thresholds, args.fill_void)  # fmt: skip
            return {}
        if not args.data:
            raise SystemExit("error: give --data ROOT (labelled split) or --frames DIR")
        if args.format:
            cfg = dataclasses.replace(cfg, data_format=args.format)
        has_labels = open_split(args.data, args.split, cfg.data_format, decode=False).labels
        metrics = evaluate_model(model, cfg, args.data, args.split, args.device, out,
                                 args.max_sequences, labels=has_labels,
                                 fill_void=args.fill_void, thresholds=thresholds)  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if not has_labels:
        print(f"no labels to score in split {args.split!r} of {args.data}: predictions only")
    if metrics:
        print_table(metrics)
    if out is not None and metrics:
        out.mkdir(parents=True, exist_ok=True)
        from minivseg.metrics import to_json

        (out / "metrics.json").write_text(json.dumps(to_json(metrics), indent=2))  # NaN: null
    if out is not None:
        print(f"predictions and overlays{' and metrics.json' if metrics else ''} in {out}")
    return metrics


if __name__ == "__main__":
    main()
