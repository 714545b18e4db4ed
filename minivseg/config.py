"""Training configuration: one dataclass, named presets, and type-checked ``--field=value`` flags.

Every field of `TrainConfig` is a command-line flag: ``--field=value`` (booleans also as a bare
``--flag`` / ``--no-flag``; tuples as ``--crop_size=129,417``; ``none`` for optional fields).
Model fields are set with ``--model.FIELD=value`` and loss fields with ``--loss.FIELD=value``;
both are checked against the model's / loss's own config dataclass when the task is built
(`minivseg.tasks`), and an unknown or misspelt flag stops with a "did you mean" message. The whole
config is stored in every checkpoint, and evaluation rebuilds model and classes from it. The loss,
inference, stitching and metrics take the class set from the model's config, so
``--model.num_classes=12 --model.thing_classes=11`` trains and evaluates on those classes (label
classes the model does not have are void to it). Most used: ``--data``, ``--out_dir``,
``--max_steps``, ``--batch_size``, ``--accumulate``, ``--lr``, ``--eval_every``, ``--resume``,
``--overwrite``, ``--device``, ``--num_workers``, ``--seed``, ``--clip_paste=0.5``,
``--temporal_consistency=1.0``, ``--grad_checkpointing``, ``--compile``, ``--bf16``,
``--pretrained=FILE``, ``--freeze_batchnorm``, ``--threads``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    preset: str = "demo"  # name of the preset these values started from
    task: str = "tubeformer"  # "tubeformer" (panoptic tubes), "stt" (semantic), "vistr" (instances)
    model: str = "tiny"  # model preset passed to the task's builder
    model_overrides: dict = field(default_factory=dict)  # --model.FIELD=value pairs
    loss_overrides: dict = field(default_factory=dict)  # --loss.FIELD=value pairs
    # data
    data: str = "data/synthetic"  # dataset root (KITTI-STEP, VSPW or YouTube-VIS layout)
    data_format: str = "auto"  # "auto" (from the files), "kitti-step", "vspw", "youtube-vis"
    train_split: str = "train"
    eval_split: str = "val"
    clip_length: int = 2  # T, frames per clip
    crop_size: tuple[int, int] = (129, 417)  # training crop (H, W); 16k+1 keeps strides exact
    scale_range: tuple[float, float] | None = (0.75, 1.5)  # random scale (deeplab2: 0.5-2.0)
    flip: bool = True  # random horizontal flip
    clip_paste: float = 0.0  # clip-paste probability (TubeFormer §3.3 uses 0.5)
    temporal_consistency: float = 0.0  # weight of the overlapping-clip L1 loss (0: off)
    num_workers: int = 2  # DataLoader worker processes (each runs with one torch thread)
    threads: int = 0  # torch threads of the training process (0: torch's default, all cores)
    # optimisation
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 2  # clips per micro-batch per process
    accumulate: int = 1  # micro-batches per step (effective batch = batch*accumulate*GPUs)
    optimizer: str = "adamw"  # "adam" or "adamw"
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    backbone_lr_multiplier: float = 1.0  # LR factor for pretrained backbone weights (deeplab2 0.1)
    warmup_steps: int = 50  # linear warm-up steps
    poly_power: float = 0.9  # poly decay to 0 at max_steps
    lr_drop: float = 0.0  # > 0: step decay instead, LR x0.1 after this fraction of max_steps
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)
    freeze_batchnorm: bool = False  # use running BN statistics while training
    grad_checkpointing: bool = False  # recompute activations in backward (saves memory)
    compile: bool = False  # torch.compile the model
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    pretrained: str = ""  # torchvision ResNet-50 state dict file for the backbone
    init: str = ""  # .pt from python -m minivseg.convert_deeplab2: tensors loaded by name
    depth_loss_weight: float = 100.0  # with --model.depth: weight of the depth loss (§3.2)
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    # bookkeeping
    out_dir: str = "runs/demo"  # checkpoints, logs, curves
    resume: bool = False  # continue from the newest complete checkpoint in OUT_DIR
    overwrite: bool = False  # a run without --resume deletes OUT_DIR's checkpoints and log first
    log_every: int = 10  # steps between JSONL log lines
    checkpoint_every: int = 100  # steps between checkpoints
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_sequences: int = 0  # evaluate on the first N sequences (0: all)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    seed: int = 0  # seeds model init, data order and augmentation


def demo() -> TrainConfig:
    """Tiny TubeFormer on the synthetic street video, CPU, about 10 minutes on 2 cores.

    Crops of 81x257 (a quarter of a 128x416 frame, 16k+1) make a step ~4x cheaper than full
    frames; evaluation still runs on whole frames. One torch thread beside one loader worker:
    about 20% slower than two threads on an idle 2-core machine, but 5-40x faster when other
    jobs share the cores, where OpenMP threads spin-wait for partners that are not running.

    Measured on this project's 2-core machine (README, "Results"), on ``make demo``'s data (things
    up to 20 m away): held-out STQ 0.471 / 0.498 for training seeds 0 / 1 on 12 sequences of
    another generator seed (0.494 / 0.524 with void filled). With perfect association the same
    predictions would score 0.531 / 0.548 (``tests/benchmarks/stq_gap.py``): a 2 M-parameter
    network trained from scratch for a few CPU minutes. At this budget deep supervision, the
    clustering update, 32 training sequences and LRs of 2e-3 / 5e-3 did not beat this recipe by
    more than the seed spread. The two val sequences are a noisy benchmark (0.36-0.48 across runs
    and data); read the held-out numbers.
    """
    return TrainConfig(preset="demo", crop_size=(81, 257), max_steps=2000, lr=3e-3,
                       warmup_steps=50, batch_size=2, checkpoint_every=250, log_every=25,
                       num_workers=1, threads=1)  # fmt: skip


def kitti() -> TrainConfig:
    """Full TubeFormer-DeepLab-B1 on KITTI-STEP on one GPU (see README for memory and time).

    deeplab2 trains MaX-DeepLab with Adam, LR 1e-3 at batch 64 with a 0.1 multiplier on restored
    weights, poly decay and no gradient clipping; TubeFormer uses batch 16 clips. We keep the
    effective batch 16 on one GPU as 2 clips x 8 accumulated micro-batches, so BatchNorm sees 2
    clips (4 frames) at a time; a GPU that holds 16 clips should run ``--batch_size=16
    --accumulate=1``. The LR is scaled linearly to 2.5e-4; KITTI's scale range is 0.5-2.0. The
    README lists every difference from the paper and from deeplab2.
    """
    return TrainConfig(
        preset="kitti", model="kitti", data="", crop_size=(385, 1249), scale_range=(0.5, 2.0),
        batch_size=2, accumulate=8, max_steps=50_000, lr=2.5e-4, optimizer="adam",
        warmup_steps=5000, backbone_lr_multiplier=0.1, clip_paste=0.5, temporal_consistency=1.0,
        num_workers=8, out_dir="runs/kitti", checkpoint_every=1000, log_every=50,
        eval_every=5000, grad_checkpointing=True, grad_clip=0.0,
    )  # fmt: skip


def stt_demo() -> TrainConfig:
    """Sparse Temporal Transformer segmenter (semantic labels) on the synthetic video, CPU."""
    return TrainConfig(preset="stt_demo", task="stt", model="tiny", clip_length=3, max_steps=800,
                       lr=2e-3, out_dir="runs/stt_demo", checkpoint_every=200, log_every=20,
                       num_workers=1, threads=1)  # fmt: skip


def stt_paper() -> TrainConfig:
    """STT at the paper's setting (`build_stt("paper")`: T = 7, d_t 512 -> 128, 527 keys), one GPU.

    Clips of T + 1 = 8 frames from KITTI-STEP-layout data (``--data``). The paper trains 80k
    iterations on Cityscapes and prints no batch, crop or optimiser; we take ``kitti``'s crop and
    scales and an effective batch of 8 clips (TDNet's) as 2 clips x 4 accumulated micro-batches.
    """
    return TrainConfig(preset="stt_paper", task="stt", model="paper", data="", clip_length=8,
                       crop_size=(385, 1249), scale_range=(0.5, 2.0), batch_size=2, accumulate=4,
                       max_steps=80_000, lr=1e-3, warmup_steps=1000, num_workers=8,
                       out_dir="runs/stt_paper", checkpoint_every=1000, log_every=50,
                       eval_every=5000)  # fmt: skip


def vistr_demo() -> TrainConfig:
    """Compact VisTR (thing tracks of the synthetic video, VIS task), CPU.

    Same clips (T=2), crop and number of steps as ``demo``, so the two models can be compared on
    video mask AP at one budget.
    """
    return TrainConfig(preset="vistr_demo", task="vistr", model="tiny", crop_size=(81, 257),
                       max_steps=2000, lr=5e-4, out_dir="runs/vistr_demo", checkpoint_every=250,
                       log_every=25, num_workers=1, threads=1)  # fmt: skip


def vistr_official() -> TrainConfig:
    """VisTR's published optimisation recipe at ``vistr_demo``'s model, data and step budget.

    VisTR trains AdamW at LR 1e-4 with the backbone at 1e-5, weight decay 1e-4, gradient-norm
    clip 0.1, no warm-up, and StepLR x0.1 after 12 of 18 epochs (here: after 2/3 of max_steps).
    The backbone factor (``backbone_lr_multiplier`` 0.1) applies to the weights ``--pretrained``
    loads, as in every preset; VisTR's backbone starts from DETR's COCO weights.
    """
    return dataclasses.replace(
        vistr_demo(), preset="vistr_official", lr=1e-4, optimizer="adamw", weight_decay=1e-4,
        backbone_lr_multiplier=0.1, grad_clip=0.1, warmup_steps=0, lr_drop=2 / 3,
        out_dir="runs/vistr_official",
    )  # fmt: skip


def dvps_demo() -> TrainConfig:
    """``demo`` with TubeFormer's depth branch (DVPS, §3.2) on the synthetic video with depth."""
    return dataclasses.replace(demo(), preset="dvps_demo", model_overrides={"depth": "true"},
                               out_dir="runs/dvps_demo")  # fmt: skip


def vspw_demo() -> TrainConfig:
    """``demo`` on the synthetic video in VSPW's layout (video semantic segmentation, VSS).

    The model is built with the dataset's classes and no thing class (`minivseg.tasks
    .with_dataset_classes`), so every class is a stuff tube: one tube per class present in the
    clip, matched by the same loss; inference is per-pixel and scored by mIoU, mVC8 and mVC16.
    """
    return dataclasses.replace(demo(), preset="vspw_demo", data="data/synthetic_vspw",
                               out_dir="runs/vspw_demo")  # fmt: skip


def vspw() -> TrainConfig:
    """TubeFormer-DeepLab on VSPW (VSS, Tab. 2-3) on one GPU: ``kitti``'s recipe at T = 2.

    VSPW_480p frames are 480 px high; we crop 481x641 (16k+1) at scales 0.5-2.0. The paper
    trains from COCO-pretrained weights (``--init``) with batch 16, as here (2 x 8 accumulated).
    """
    return dataclasses.replace(kitti(), preset="vspw", crop_size=(481, 641), clip_paste=0.0,
                               out_dir="runs/vspw")  # fmt: skip


def youtube_vis_demo() -> TrainConfig:
    """TubeFormer on the synthetic video in YouTube-VIS's layout, clips of T = 5 (the paper's
    VIS setting): person and car are the categories, everything else one background stuff class
    (TubeFormer-DeepLab §4.3); scored by video mask AP with per-pixel and per-mask inference."""
    return dataclasses.replace(demo(), preset="youtube_vis_demo", data="data/synthetic_ytvis",
                               eval_split="valid", clip_length=5, max_steps=800,
                               checkpoint_every=200, out_dir="runs/youtube_vis_demo")  # fmt: skip


def youtube_vis() -> TrainConfig:
    """TubeFormer-DeepLab on YouTube-VIS 2019/2021 (Tab. 4-5) on one GPU: T = 5, batch 16.

    Frames are mostly 720x1280; we crop 385x641 at scales 0.5-2.0 (5 frames of it hold about
    the pixels of 2.5 KITTI crops). Start from COCO-pretrained weights (``--init``). The valid
    split's labels are withheld: ``python -m minivseg.evaluate`` writes its ``results.json``.
    """
    return dataclasses.replace(kitti(), preset="youtube_vis", crop_size=(385, 641),
                               clip_length=5, eval_split="valid", eval_every=0,
                               out_dir="runs/youtube_vis")  # fmt: skip


PRESETS = {"demo": demo, "kitti": kitti, "stt_demo": stt_demo, "stt_paper": stt_paper,
           "vistr_demo": vistr_demo, "vistr_official": vistr_official,
           "dvps_demo": dvps_demo, "vspw_demo": vspw_demo, "vspw": vspw,
           "youtube_vis_demo": youtube_vis_demo, "youtube_vis": youtube_vis}  # fmt: skip


def parse_value(text: str, annotation, name: str):
    """Convert a flag's text to the field's type, or raise a ValueError naming the flag."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if annotation is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if origin is tuple:
            parts = [p for p in text.replace("x", ",").split(",") if p]
            if args[-1] is not Ellipsis and len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            kinds = [args[0]] * len(parts) if args[-1] is Ellipsis else list(args)
            return tuple(kind(p) for kind, p in zip(kinds, parts))
        if annotation in (int, float, str):
            return annotation(text)
    except ValueError as error:
        raise ValueError(f"--{name}={text}: not a valid {annotation}: {error}") from None
    raise ValueError(f"--{name}: unsupported field type {annotation}")


def apply_overrides(obj, overrides: dict[str, str], label: str = ""):
    """Return a copy of dataclass ``obj`` with text values converted to each field's type."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    types_ = typing.get_type_hints(type(obj))  # resolves `from __future__` string annotations
    changes = {}
    for name, text in overrides.items():
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f" (did you mean {', '.join('--' + label + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown option --{label}{name}{hint}")
        value = text if not isinstance(text, str) else parse_value(text, types_[name], name)
        changes[name] = value
    return dataclasses.replace(obj, **changes)


def parse_args(argv: list[str]) -> TrainConfig:
    """``--preset NAME`` (default demo), then ``--field=value`` / ``--flag`` / ``--model.f=v`` /
    ``--loss.f=v``."""
    argv = list(argv)
    preset = "demo"
    overrides, model_overrides, loss_overrides = {}, {}, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are written --field=value")
        name, has_value, value = arg[2:].partition("=")
        if not has_value and name in ("preset", "data", "out_dir") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        elif not has_value:
            value = "false" if name.startswith("no-") else "true"
            name = name.removeprefix("no-")
        if name == "preset":
            preset = value
        elif name.startswith("model."):
            model_overrides[name.removeprefix("model.")] = value
        elif name.startswith("loss."):
            loss_overrides[name.removeprefix("loss.")] = value
        else:
            overrides[name.replace("-", "_")] = value
        i += 1
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = apply_overrides(PRESETS[preset](), overrides)
    return dataclasses.replace(
        cfg,
        model_overrides={**cfg.model_overrides, **model_overrides},
        loss_overrides={**cfg.loss_overrides, **loss_overrides},
    )
