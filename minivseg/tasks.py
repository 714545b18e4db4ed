"""Tasks: one place that knows, for each task, its model, its loss and its video inference.

``build_task(cfg)`` turns a `TrainConfig` into (model, loss) for ``cfg.task``: "tubeformer"
(TubeFormer-DeepLab: `minivseg.tubeformer` + `minivseg.tube_loss`), "stt" (the Sparse Temporal
Transformer segmenter, semantic cross-entropy on the last frame) or "vistr" (VisTR).
``predict_frames(model, cfg, frames, num_frames)`` streams any task's video predictions frame by
frame; ``load_model`` rebuilds a trained model from its checkpoint. Training (`minivseg.train`)
and evaluation (`minivseg.evaluate`) both import from here, so the imports run one way:
layers -> models -> losses -> tasks -> train / evaluate.

TubeFormer's video inference (TubeFormer-DeepLab §3.4, which numbers no equations): each
T-frame window, stride 1, is padded to 16k+1 (as deeplab2 pads KITTI to 385x1249), run through
the model once and turned into tubes by clip inference (`minivseg.inference`: per-pixel "argmax
twice", per-mask, and threshold-free semantic); `minivseg.stitching.VideoStitcher` links the
clips into video tracks as they come, and a frame is handed out as soon as no later clip can
change it. Predicting a folder of frames from Python::

    from pathlib import Path
    from minivseg.data import frame_tensor
    from minivseg.panoptic import frame_order
    from minivseg.tasks import load_model, predict_frames

    model, cfg = load_model("runs/demo/last.pt")
    paths = frame_order(Path("my_video").glob("*.png"))  # time order (numeric names as numbers)
    for pred in predict_frames(model, cfg, (frame_tensor(p) for p in paths), len(paths)):
        pred["panoptic"], pred["semantic"]  # (H, W) int64: ids semantic*65536 + track, classes

``predict_video(model, cfg, frames)`` does the same for a ``(F, 3, H, W)`` video in memory.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from minivseg.config import TrainConfig, apply_overrides
from minivseg.data import IMAGE_PAD_VALUE
from minivseg.panoptic import (
    IGNORE_LABEL,
    LABEL_DIVISOR,
    NUM_CLASSES,
    THING_CLASSES,
    VIDEO_LABEL_DIVISOR,
)
from minivseg.stitching import VideoStitcher, sliding_clips

VIDEO_VOID = IGNORE_LABEL * VIDEO_LABEL_DIVISOR  # void in predicted videos


def build_task(cfg: TrainConfig):
    """Model and loss for the task: ``--model.FIELD=value`` and ``--loss.FIELD=value`` on top
    of the presets. The loss takes its classes from the model's config, never from constants."""
    if cfg.task != "tubeformer" and cfg.loss_overrides:
        raise ValueError(f"--loss.* options apply to the tubeformer task, not {cfg.task!r}")
    if cfg.task == "tubeformer":
        from minivseg.tube_loss import TubeLoss, default_loss_config
        from minivseg.tubeformer import PRESETS as MODEL_PRESETS
        from minivseg.tubeformer import TubeFormerConfig, build_model

        overrides = apply_overrides(TubeFormerConfig(), cfg.model_overrides, "model.")
        changed = {k: getattr(overrides, k) for k in cfg.model_overrides}
        if "aux_heads" in changed:
            raise ValueError("set deep supervision with --loss.deep_supervision, not --model.")
        if cfg.grad_checkpointing:
            changed["gradient_checkpointing"] = True
        if cfg.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {cfg.model!r}: {', '.join(MODEL_PRESETS)}")
        memory_update = changed.get("memory_update", MODEL_PRESETS[cfg.model]().memory_update)
        loss_cfg = apply_overrides(default_loss_config(memory_update), cfg.loss_overrides, "loss.")
        model = build_model(cfg.model, aux_heads=loss_cfg.deep_supervision, **changed)
        argmax = memory_update == "clustering" and model.cfg.clustering_assignment == "argmax"
        if argmax and not loss_cfg.deep_supervision:  # its assignment would get no gradient
            raise ValueError("clustering_assignment=argmax learns its assignment only through "
                             "deep supervision: keep --loss.deep_supervision")  # fmt: skip
        criterion = TubeLoss(model.cfg.num_classes, model.cfg.thing_classes,
                             num_slots=model.cfg.num_slots, config=loss_cfg)  # fmt: skip
        if model.cfg.depth:  # DVPS: + depth loss x 100 (TubeFormer §3.2) on pixels with depth
            from minivseg.depth import DepthAwareLoss

            criterion = DepthAwareLoss(criterion, cfg.depth_loss_weight, model.cfg.max_depth)
        return model, criterion
    if cfg.task == "stt":
        from minivseg.stt_segmenter import STTConfig, build_stt

        overrides = apply_overrides(STTConfig(), cfg.model_overrides, "model.")
        changed = {k: getattr(overrides, k) for k in cfg.model_overrides}
        changed.setdefault("num_key_frames", cfg.clip_length - 1)  # clip = keys + current frame
        model = build_stt(cfg.model, **changed)
        return model, last_frame_semantic_loss
    if cfg.task == "vistr":
        from minivseg.vistr import VisTRConfig, build_vistr
        from minivseg.vistr_loss import VisTRLoss

        overrides = apply_overrides(VisTRConfig(), cfg.model_overrides, "model.")
        changed = {k: getattr(overrides, k) for k in cfg.model_overrides}
        changed.setdefault("num_frames", cfg.clip_length)  # queries are laid out per frame
        model = build_vistr(cfg.model, **changed)
        return model, VisTRLoss(model.cfg)
    raise ValueError(f"unknown task {cfg.task!r}: tubeformer, stt or vistr")


def with_dataset_classes(cfg: TrainConfig, split) -> TrainConfig:
    """``cfg`` with the model built for the classes of a layout that names its own (VSPW's 124
    semantic classes; YouTube-VIS's categories as things plus background), unless the flags
    set them. Stored in the checkpoint's config, so evaluation rebuilds the same model."""
    if not split.own_classes:
        return cfg
    fields = {"tubeformer": ("num_classes", "thing_classes"), "stt": ("num_classes",),
              "vistr": ("num_classes", "thing_classes")}.get(cfg.task, ())  # fmt: skip
    values = {"num_classes": str(split.num_classes),
              "thing_classes": ",".join(map(str, split.thing_classes))}  # fmt: skip
    found = {name: values[name] for name in fields if name not in cfg.model_overrides}
    return dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, **found})


def last_frame_semantic_loss(outputs, batch):
    """STT: cross-entropy of the last frame's semantic logits (void and unknown classes ignored)."""
    logits = outputs["semantic_logits"].float()  # (B, K, H, W)
    target = (batch["panoptic"][:, -1] // LABEL_DIVISOR).to(logits.device, non_blocking=True)
    target = torch.where(target < logits.shape[1], target, IGNORE_LABEL)
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL)
    return loss, {"semantic": loss.detach()}


def padded_size(length: int, stride: int = 16) -> int:
    """Smallest ``k * stride + 1`` that is at least ``length``."""
    return math.ceil((length - 1) / stride) * stride + 1


def pad_frames(frames: torch.Tensor) -> torch.Tensor:
    """Pad ``(..., 3, H, W)`` bottom/right with the image mean to the next 16k+1 size."""
    height, width = frames.shape[-2:]
    pad = (0, padded_size(width) - width, 0, padded_size(height) - height)
    return F.pad(frames, pad, value=IMAGE_PAD_VALUE)


@torch.no_grad()
def tubeformer_frames(model, frames, num_frames, clip_length, thresholds=None, fill_void=False,
                      masks=False, scores=None):  # fmt: skip
    """Stream TubeFormer predictions: yields one dict per frame, in order, as frames are final.

    ``panoptic`` (H, W) video ids of per-pixel inference; ``semantic`` (H, W) class ids (no
    thresholds, for mIoU); with ``masks``, ``mask`` (H, W) video ids of per-mask inference; with
    a depth branch, ``depth`` (H, W) metres. A frame's labels (and depth) come from the newest
    clip that covers it, like its track id. ``scores``: a
    dict that receives {mode: {track id: score}} once the stream is exhausted (video AP).
    """
    from minivseg.depth import upsample_depth
    from minivseg.inference import class_predictions, clip_inference

    class_ids, thing_classes = model.thing_stuff_class_ids, tuple(model.cfg.thing_classes)
    options = {**(thresholds or {}), "thing_classes": thing_classes}
    modes = ("pixel", "mask") if masks else ("pixel",)
    stitchers = {m: VideoStitcher(clip_length, 1, thing_classes, num_frames=num_frames)
                 for m in modes}  # fmt: skip
    semantic, depth = {}, {}  # frame -> class map / depth of the newest clip covering it

    def final(done):
        for i, (t, pan) in enumerate(done["pixel"]):
            sem = semantic.pop(t)
            if fill_void:  # a void prediction is always an error for STQ: give it a class
                pan = np.where(pan == VIDEO_VOID, sem * VIDEO_LABEL_DIVISOR, pan)
            yield (
                {"panoptic": pan, "semantic": sem}
                | ({"mask": done["mask"][i][1]} if masks else {})
                | ({"depth": depth.pop(t)} if t in depth else {})
            )

    for starts, clips, _ in sliding_clips(frames, num_frames, clip_length):
        height, width = clips.shape[-2:]
        outputs = model(pad_frames(clips))  # one model pass per window, for every use below
        size = (padded_size(height), padded_size(width))
        found = {
            m: clip_inference(outputs, size, class_ids, m, **(options if m != "semantic" else {}))
            for m in (*modes, "semantic")
        }
        found = {m: clip[0][..., :height, :width].cpu() for m, clip in found.items()}
        label, confidence = class_predictions(outputs["class_logits"][0])
        slot_ids = torch.as_tensor(class_ids)[label.cpu()] * LABEL_DIVISOR + 1
        slot_scores = dict(zip((slot_ids + torch.arange(len(label))).tolist(), confidence.tolist()))
        kept = num_frames - starts[0]  # padding frames (past the end) are not kept
        for t, frame in enumerate(found["semantic"].numpy()[:kept]):
            semantic[starts[0] + t] = frame
        if "depth" in outputs:  # DVPS: metres at stride 4, upsampled like the mask logits
            clip_depth = upsample_depth(outputs["depth"][:1], size)[0, :kept, :height, :width]
            depth.update(enumerate(clip_depth.float().cpu().numpy(), start=starts[0]))
        yield from final({m: stitchers[m].add(found[m], slot_scores) for m in modes})
    yield from final({m: stitchers[m].finish() for m in modes})
    if scores is not None:
        scores.update({mode: stitcher.scores() for mode, stitcher in stitchers.items()})


def predict_frames(model, cfg: TrainConfig, frames, num_frames, fill_void=False, thresholds=None,
                   masks=False, scores=None):  # fmt: skip
    """Stream any task's predictions: one dict per frame with ``panoptic`` (video ids) and
    ``semantic``; TubeFormer adds ``mask`` with ``masks``. ``scores`` receives the track scores
    ({mode: {track id: score}}, modes "pixel"/"mask" or "vistr") when the stream ends.

    ``thresholds``: TubeFormer's ``class_threshold`` / ``pixel_threshold`` (deeplab2: 0.7 / 0.4).
    """
    if cfg.task == "tubeformer":
        yield from tubeformer_frames(model, frames, num_frames, cfg.clip_length, thresholds,
                                     fill_void, masks, scores)  # fmt: skip
    elif cfg.task == "stt":
        for labels in model.semantic_frames(frames):
            labels = labels.cpu().numpy()
            yield {"panoptic": labels * VIDEO_LABEL_DIVISOR, "semantic": labels}
    else:
        from minivseg.vistr import instance_frames

        found = {}
        for panoptic in instance_frames(model, frames, num_frames, scores=found):
            yield {"panoptic": panoptic, "semantic": panoptic // VIDEO_LABEL_DIVISOR}
        if scores is not None:
            scores["vistr"] = found["vistr"]


def predict_video(model, cfg: TrainConfig, frames, fill_void=False, thresholds=None):
    """Panoptic ``(F, H, W)`` video ids and semantic ``(F, H, W)`` of a whole ``(F, 3, H, W)``
    video in memory (`predict_frames` for long videos)."""
    results = list(predict_frames(model, cfg, frames, len(frames), fill_void, thresholds))
    return tuple(np.stack([r[key] for r in results]) for key in ("panoptic", "semantic"))


def task_classes(model) -> tuple[int, tuple[int, ...]]:
    """(number of classes, thing classes) a model predicts, from its own config."""
    cfg = getattr(model, "cfg", None)
    num_classes = getattr(cfg, "num_classes", None) or getattr(model, "num_classes", NUM_CLASSES)
    return num_classes, tuple(getattr(cfg, "thing_classes", THING_CLASSES))


def load_model(checkpoint_path, device="cpu"):
    """Rebuild the model from the config stored in a training checkpoint; a file that is not one
    raises a ValueError naming the file and what is wrong with it."""
    from minivseg.checkpoint import MODEL_KEYS, load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path, MODEL_KEYS)
    stored, known = checkpoint["config"], {f.name for f in dataclasses.fields(TrainConfig)}
    if set(stored) - known:  # a checkpoint from another version: fields it no longer has
        print(f"warning: {checkpoint_path}: ignoring config fields {sorted(set(stored) - known)}")
    stored = {k: v for k, v in stored.items() if k in known}
    cfg = TrainConfig(**{**stored, "crop_size": tuple(stored["crop_size"])})
    model, _ = build_task(cfg)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), cfg
