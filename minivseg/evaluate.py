"""Whole-video evaluation and prediction export (TubeFormer §3.4, §4.2).

``python -m minivseg.evaluate --checkpoint CKPT --data ROOT --split val [--out DIR]`` slides a
T-frame window with stride 1 over each sequence, turns each clip into panoptic tubes
(`minivseg.inference`), links the clips into video tracks (`minivseg.stitching`) and scores the
videos with STQ, VPQ and mIoU (`minivseg.metrics`). With ``--out`` it writes the predictions as
KITTI-STEP PNGs, one overlay GIF per sequence, and ``metrics.json``. ``--frames DIR`` runs on a
folder of frames without labels ("my own video"): predictions and overlays only.

Frames are padded (bottom/right, image mean) to the next 16k+1 size, as deeplab2 pads KITTI to
385x1249, and the predictions are cropped back. VIS numbers (video mask AP) are computed on
non-overlapping T-frame clips, the same way for every model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minivseg.config import TrainConfig
from minivseg.data import IMAGE_PAD_VALUE, index_split, read_image
from minivseg.panoptic import (
    LABEL_DIVISOR,
    NUM_CLASSES,
    THING_CLASSES,
    VOID_ID,
    read_kitti_step_png,
    semantic_of,
    write_kitti_step_png,
)


def padded_size(length: int, stride: int = 16) -> int:
    """Smallest ``k * stride + 1`` that is at least ``length``."""
    return math.ceil((length - 1) / stride) * stride + 1


def clip_windows(num_frames: int, clip_length: int) -> list[list[int]]:
    """Frame indices of the stride-1 windows; a video shorter than T repeats its first frame."""
    if num_frames < clip_length:
        return [[0] * (clip_length - num_frames) + list(range(num_frames))]
    return [list(range(s, s + clip_length)) for s in range(num_frames - clip_length + 1)]


def pad_frames(frames: torch.Tensor) -> torch.Tensor:
    """Pad ``(..., 3, H, W)`` bottom/right with the image mean to the next 16k+1 size."""
    height, width = frames.shape[-2:]
    pad = (0, padded_size(width) - width, 0, padded_size(height) - height)
    return F.pad(frames, pad, value=IMAGE_PAD_VALUE)


@torch.no_grad()
def predict_tubeformer(
    model, frames, clip_length: int, batch_size=4, fill_void=True, thresholds=None, vis_tubes=None
):
    """Stitched video panoptic ``(F, H, W)`` and semantic ``(F, H, W)`` of one sequence.

    ``vis_tubes``: an optional dict ``{mode: []}`` ("pixel" and/or "mask"); it is filled with
    ``(start, tubes)`` for the non-overlapping clips (starts 0, T, 2T, ...) from the same model
    outputs, for video mask AP (`thing_tubes`).

    Each frame's semantic label comes from the newest clip that covers it, like its tube id.
    With ``fill_void``, pixels the thresholds left void take the unthresholded semantic class
    (instance 0). deeplab2's STQ scores a void prediction on a labelled pixel as an extra class
    of IoU 0, while an instance-0 thing pixel can only add to AQ; VPQ may count it as a false
    positive. ``--keep-void`` evaluates deeplab2's MaX-DeepLab output unchanged.
    """
    from minivseg.inference import clip_inference
    from minivseg.stitching import stitch_clips

    height, width = frames.shape[-2:]
    padded = pad_frames(frames)
    size, class_ids = tuple(padded.shape[-2:]), model.thing_stuff_class_ids
    thing_classes = model.cfg.thing_classes
    windows = clip_windows(len(frames), clip_length)
    tube_options = {**(thresholds or {}), "thing_classes": thing_classes}
    options = {"pixel": tube_options, "semantic": {}}
    panoptic_clips, semantic_clips = [], []
    for k in range(0, len(windows), batch_size):
        outputs = model(torch.stack([padded[w] for w in windows[k : k + batch_size]]))
        for mode, store in (("pixel", panoptic_clips), ("semantic", semantic_clips)):
            store += [
                c[..., :height, :width].cpu()
                for c in clip_inference(outputs, size, class_ids, mode, **options[mode])
            ]
        for mode, found in (vis_tubes or {}).items():
            clips = clip_inference(outputs, size, class_ids, mode, **tube_options)
            for b, clip in enumerate(clips):
                start = k + b
                if len(frames) >= clip_length and start % clip_length == 0:
                    confidence = outputs["class_logits"][b].float().softmax(-1)[:, :-1].amax(-1)
                    tubes = thing_tubes(clip[:, :height, :width], confidence, thing_classes)
                    found.append((start, tubes))
    video = stitch_clips(panoptic_clips, stride=1, thing_classes=thing_classes)
    if len(frames) < clip_length:
        video, semantic = video[-len(frames) :], semantic_clips[0][-len(frames) :].numpy()
    else:
        last = len(windows) - 1
        semantic = [semantic_clips[min(f, last)][f - min(f, last)] for f in range(len(frames))]
        semantic = torch.stack(semantic).numpy()
    if fill_void:  # a void prediction is always an error for STQ: give every pixel a class
        video = np.where(video == VOID_ID, semantic * LABEL_DIVISOR, video)
    return video, semantic


def predict_video(model, cfg: TrainConfig, frames, fill_void: bool = True, thresholds=None):
    """Panoptic ``(F, H, W)`` and semantic ``(F, H, W)`` predictions for any task's model.

    ``thresholds``: TubeFormer's ``class_threshold`` / ``pixel_threshold`` (deeplab2: 0.7 / 0.4).
    """
    if cfg.task == "tubeformer":
        return predict_tubeformer(model, frames, cfg.clip_length, fill_void=fill_void,
                                  thresholds=thresholds)  # fmt: skip
    if cfg.task == "stt":
        semantic = model.predict_video(frames).cpu().numpy()
        return semantic * LABEL_DIVISOR, semantic
    from minivseg.vistr import predict_video as predict_vistr

    panoptic = predict_vistr(model, frames)
    return panoptic, semantic_of(panoptic)


def thing_tubes(panoptic: torch.Tensor, confidence: torch.Tensor, thing_classes=THING_CLASSES):
    """(mask (T,H,W), class, score) per thing tube of a clip; score = its slot's class confidence.

    Clip inference names a thing tube ``slot + 1`` in both per-pixel and per-mask modes.
    """
    panoptic = panoptic.cpu().numpy()
    tubes = []
    for pan_id in np.unique(panoptic):
        semantic, instance = divmod(int(pan_id), LABEL_DIVISOR)
        if semantic in thing_classes and instance > 0:
            tubes.append((panoptic == pan_id, semantic, float(confidence[instance - 1])))
    return tubes


def task_classes(model) -> tuple[int, tuple[int, ...]]:
    """(number of classes, thing classes) a model predicts, from its own config."""
    cfg = getattr(model, "cfg", None)
    num_classes = getattr(cfg, "num_classes", None) or getattr(model, "num_classes", NUM_CLASSES)
    return num_classes, tuple(getattr(cfg, "thing_classes", THING_CLASSES))


def read_sequence(root: Path, split: str, sequence: str, names: list[str], labels: bool):
    frames = np.stack([read_image(root / "images" / split / sequence / f"{n}.png") for n in names])
    frames = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if not labels:
        return frames, None
    label_dir = root / "panoptic_maps" / split / sequence
    return frames, np.stack([read_kitti_step_png(label_dir / f"{n}.png") for n in names])


def evaluate_model(
    model, cfg: TrainConfig, root, split="val", device="cpu", out_dir=None, max_sequences=0,
    labels=True, gifs=True, sequences=None, fill_void=True, thresholds=None,
) -> dict:  # fmt: skip
    """Predict every sequence of a split, score it, optionally write PNGs and GIFs."""
    from minivseg.metrics import STQ, VPQ, Flicker, MeanIoU, VideoAP

    root = Path(root)
    if sequences is None:
        sequences, _ = index_split(root, split, labels=labels)
    names = list(sequences)[: max_sequences or None]
    num_classes, thing_classes = task_classes(model)
    stq, vpq = STQ(num_classes, thing_classes), VPQ(num_classes, thing_classes)
    miou, flicker = MeanIoU(num_classes), Flicker()
    video_ap = {
        "tubeformer": {"pixel": VideoAP(), "mask": VideoAP()},
        "vistr": {"vistr": VideoAP()},
    }
    video_ap = video_ap.get(cfg.task, {})
    model.eval().to(device)
    for number, sequence in enumerate(names):
        frames, gt = read_sequence(root, split, sequence, sequences[sequence], labels)
        if gt is not None:  # classes the model does not know are void, as in training
            gt = np.where(semantic_of(gt) < num_classes, gt, VOID_ID)
        frames = frames.to(device)
        if cfg.task == "tubeformer":
            found = {mode: [] for mode in video_ap} if gt is not None else None
            panoptic, semantic = predict_tubeformer(
                model, frames, cfg.clip_length, fill_void=fill_void, thresholds=thresholds,
                vis_tubes=found,
            )  # fmt: skip
            for mode, clips in (found or {}).items():
                for start, tubes in clips:
                    video_ap[mode].update(gt[start : start + cfg.clip_length], tubes)
        else:
            panoptic, semantic = predict_video(model, cfg, frames, fill_void, thresholds)
        if gt is not None and cfg.task == "vistr":
            from minivseg.vistr import predict_tubes

            with torch.no_grad():
                T = model.cfg.num_frames
                for start in range(0, len(frames) - T + 1, T):
                    outputs = model(frames[None, start : start + T])
                    tubes = predict_tubes(outputs, frames.shape[-2:], model.cfg.thing_classes)[0]
                    video_ap["vistr"].update(gt[start : start + T], tubes)
        if gt is not None:
            for t in range(len(gt)):
                stq.update(gt[t], panoptic[t], sequence_id=sequence)
                miou.update(semantic_of(gt[t]), semantic[t])
            vpq.update(gt, panoptic)
            flicker.update(semantic_of(gt), semantic)
        if out_dir is not None:
            write_predictions(
                Path(out_dir), split, sequence, sequences[sequence], frames, panoptic, gifs
            )
        print(f"  [{number + 1}/{len(names)}] {sequence}: {len(frames)} frames", flush=True)
    if not labels:
        return {}
    results = {"mIoU": miou.result()["mIoU"], "flicker": flicker.result()["flicker"]}
    if cfg.task != "stt":  # a semantic model has no tracks: STQ and VPQ would not mean anything
        results.update({k: v for k, v in stq.result().items() if k in ("STQ", "AQ", "SQ")})
        results.update({k: v for k, v in vpq.result().items() if k.startswith("VPQ")})
    for name, metric in video_ap.items():
        results.update({f"{name}_{k}": v for k, v in metric.result().items()})
    return {k: float(v) for k, v in results.items() if np.isscalar(v)}


def write_predictions(out_dir: Path, split, sequence, names, frames, panoptic, gifs=True):
    from minivseg.visualize import overlay, save_gif

    for name, pan in zip(names, panoptic):
        write_kitti_step_png(out_dir / "panoptic_maps" / split / sequence / f"{name}.png", pan)
    if gifs:
        images = frames.permute(0, 2, 3, 1).clamp(0, 255).byte().cpu().numpy()
        save_gif(
            out_dir / "overlays" / f"{sequence}.gif",
            [overlay(i, p) for i, p in zip(images, panoptic)],
        )


def load_model(checkpoint_path, device="cpu"):
    """Rebuild the model from the config stored in a training checkpoint."""
    from minivseg.train import build_task

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    stored = checkpoint["config"]
    cfg = TrainConfig(**{**stored, "crop_size": tuple(stored["crop_size"])})
    model, _ = build_task(cfg)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), cfg


def print_table(metrics: dict) -> None:
    print(f"{'metric':>14s}  value")
    for name, value in metrics.items():
        print(f"{name:>14s}  {value:.4f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint on KITTI-STEP-layout video."
    )
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (last.pt)")
    parser.add_argument("--data", help="KITTI-STEP-layout root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--frames", help="folder of frames without labels (prediction only)")
    parser.add_argument("--out", help="write PNG predictions, overlay GIFs and metrics.json here")
    parser.add_argument("--max-sequences", type=int, default=0, help="first N sequences only")
    parser.add_argument("--class-threshold", type=float, default=0.7, help="deeplab2: 0.7")
    parser.add_argument("--pixel-threshold", type=float, default=0.4, help="deeplab2: 0.4")
    parser.add_argument(
        "--keep-void",
        action="store_true",
        help="keep pixels below the confidence thresholds void (deeplab2 MaX output)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"error: {args.checkpoint}: no such checkpoint")
    model, cfg = load_model(args.checkpoint, args.device)
    if cfg.threads > 0:  # the thread count the model was trained with (see TrainConfig.threads)
        torch.set_num_threads(cfg.threads)
    thresholds = {"class_threshold": args.class_threshold, "pixel_threshold": args.pixel_threshold}
    out = Path(args.out) if args.out else None
    if args.frames:
        folder = Path(args.frames)
        paths = sorted(folder.glob("*.png")) or sorted(folder.glob("*.jpg"))
        if not paths:
            raise SystemExit(f"error: {folder}: no .png or .jpg frames")
        try:
            frames = torch.stack(
                [torch.from_numpy(read_image(p)).permute(2, 0, 1).float() for p in paths]
            )
        except (ValueError, RuntimeError) as error:  # unreadable file, or frames of several sizes
            raise SystemExit(f"error: {error}") from None
        out = out or Path("outputs") / folder.name
        panoptic, _ = predict_video(model, cfg, frames.to(args.device), thresholds=thresholds)
        write_predictions(out, "frames", folder.name, [p.stem for p in paths], frames, panoptic)
        print(f"predictions and overlay GIF for {len(paths)} frames in {out}")
        return {}
    if not args.data:
        raise SystemExit("error: give --data ROOT (labelled split) or --frames DIR")
    try:
        has_labels = (Path(args.data) / "panoptic_maps" / args.split).is_dir()
        metrics = evaluate_model(model, cfg, args.data, args.split, args.device, out,
                                 args.max_sequences, labels=has_labels,
                                 fill_void=not args.keep_void, thresholds=thresholds)  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if metrics:
        print_table(metrics)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"predictions, overlays and metrics.json in {out}")
    return metrics


if __name__ == "__main__":
    main()
