"""Training loop: ``python -m minivseg.train --preset NAME [--field=value ...]``.

Presets (`minivseg.config`): ``demo`` (tiny TubeFormer, synthetic video, CPU), ``kitti``
(TubeFormer-DeepLab-B1 on KITTI-STEP, one GPU), ``stt_demo`` / ``stt_paper`` (STT segmenter),
``vistr_demo`` / ``vistr_official`` (VisTR). Every `TrainConfig` field is a flag; model and loss
fields are ``--model.FIELD`` / ``--loss.FIELD`` (`minivseg.config`). The task's model and loss come
from `minivseg.tasks`. Reads top to bottom: setup → data → model and loss → optimizer and
schedule → resume → loop with logging, checkpoints and evaluation, all inside ``main(cfg)`` so
tests can run two steps.

What a run writes to ``OUT_DIR``: ``last.pt`` every ``checkpoint_every`` steps and at the end
(atomic; ``--resume`` continues exactly from the newest complete checkpoint; a used folder needs
``--overwrite``: `minivseg.checkpoint`), ``log.jsonl`` and ``loss_curve.png`` (`minivseg.run_log`).
The data order is a pure function of (seed, step): the sampler yields keys ``epoch·n +
permutation[i]`` and each clip's augmentation is drawn from ``default_rng((seed, key))``, so a run
killed after a checkpoint and resumed ends with the same weights, bit for bit, as an uninterrupted
one (tests/test_train.py).

- **Non-finite steps.** A NaN or inf in the outputs, the loss or the gradient norm skips the step
  and counts it: weights, optimizer state and BatchNorm running statistics stay as before the step
  (a test compares them bit for bit with a run stopped one step earlier). After ``max_nonfinite``
  in a row (default 5) the run stops and names the last good checkpoint.
- **Optimisation.** Adam or AdamW; linear warm-up, then poly decay (power 0.9) or, with
  ``--lr_drop=F``, LR × 0.1 after the fraction F of ``max_steps`` (VisTR's StepLR); optional
  ``--grad_clip`` (1.0 in ``demo``, off in ``kitti`` as in deeplab2); ``--accumulate`` (effective
  batch = batch × accumulate × GPUs). With ``--init=FILE.pt`` (deeplab2 weights from
  `minivseg.convert_deeplab2`, loaded by name) or ``--pretrained=FILE`` (a torchvision ResNet-50
  state dict) exactly the backbone parameters they filled (stem, stages 2-5) learn at
  ``backbone_lr_multiplier`` × LR (deeplab2: 0.1); everything that starts random, the axial
  attention included, learns at the full LR (the start-up line prints the loaded parameter count).
  On CUDA the forward runs under bf16 autocast; losses are float32. ``--freeze_batchnorm`` keeps
  every BatchNorm in eval mode for the whole run, in-training evaluations included.
- **Threads.** ``--threads=N`` sets torch's threads (0: one per core); the CPU presets use 1, beside
  one loader worker. Measured on this project's 2-core machine, shared with other jobs, demo preset
  (CPU time of trainer and worker per step, single noisy runs): 2 threads 0.29–0.31 s idle but
  1.2–5.0 s under load (0.10–0.82 it/s), because torch's two OpenMP threads spin-wait for each
  other; 1 thread 0.20–0.24 s under every load tried (0.74–4.9 it/s); idle, 1 thread is about 20 %
  slower (4.7–5.2 vs 6.2–6.7 it/s). While a second ``make lessons`` ran, a 30-step demo run
  (start-up included) took 107.6 s wall / 107 s CPU with 2 threads and 11.0 s / 10.6 s with 1; on
  the idle machine right after, 8.9 s and 9.9 s. ``OMP_WAIT_POLICY=PASSIVE`` also stops the spinning
  but costs about 40 % idle.
- **The GPU does not wait for the host.** Labels stay on the host, where the loss builds its
  targets. A step waits for the device once per micro-batch (one transfer of the matching
  similarities of all its clips), once per step (loss and gradient norm, to decide whether to apply
  it) and once more on log steps: 9 syncs per ``kitti`` step (8 micro-batches), 10 on log steps, by
  reading the code. A CPU test checks that forward, loss and backward call no syncing operator;
  a CUDA test counts syncs with ``torch.cuda.set_sync_debug_mode`` (skipped without a GPU).
- **Several GPUs.** ``torchrun --nproc_per_node=K -m minivseg.train ...`` (``make train-kitti
  NGPUS=K``): DistributedDataParallel with SyncBatchNorm; each process takes every K-th sample, so
  K processes with batch b see the global batch of one process with batch K·b (a test runs 2 gloo
  processes on CPU against one process accumulating the same clips).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minivseg import checkpoint, data
from minivseg.config import TrainConfig, parse_args
from minivseg.data import KittiStepClips, ResumableSampler, collate_clips, worker_init_fn
from minivseg.dual_path import batch_norm_buffers
from minivseg.run_log import cut_log, log_line, plot_losses, progress
from minivseg.tasks import build_task, with_dataset_classes


def compute_loss(model, criterion, batch, cfg: TrainConfig):
    """Forward + loss; with temporal consistency, a (T+1)-frame clip gives two overlapping clips."""
    if cfg.temporal_consistency <= 0:
        return criterion(model(batch["frames"]), batch)
    from minivseg.tube_loss import temporal_consistency_loss

    per_frame = [key for key in ("frames", "panoptic", "depth") if key in batch]
    clips = [{**batch, **{key: batch[key][:, window] for key in per_frame}}
             for window in (slice(0, -1), slice(1, None))]  # fmt: skip
    outputs = [model(clip["frames"]) for clip in clips]
    if hasattr(criterion, "losses"):  # the tube loss matches both clips in one host transfer
        results = criterion.losses(list(zip(outputs, clips)))
    else:
        results = [criterion(out, clip) for out, clip in zip(outputs, clips)]
    total, terms = 0.0, {}
    for name, (loss, clip_terms) in zip("ab", results):
        total = total + 0.5 * loss
        terms.update({f"{name}_{k}": v for k, v in clip_terms.items()})
    overlap = cfg.clip_length - 1
    consistency = temporal_consistency_loss(
        outputs[0]["mask_logits"], outputs[1]["mask_logits"], overlap
    )
    terms["temporal_consistency"] = consistency.detach()
    return total + cfg.temporal_consistency * consistency, terms


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then poly decay to 0 at ``max_steps`` (or ×0.1 after ``lr_drop``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_drop > 0:  # step decay, as VisTR's StepLR
        return 0.1 if step >= round(cfg.lr_drop * cfg.max_steps) else 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return max(0.0, 1.0 - progress) ** cfg.poly_power


def param_groups(model, cfg: TrainConfig, pretrained: set[int] = frozenset()):
    """Parameters loaded from a checkpoint (``pretrained``: their ids) get the LR times
    ``backbone_lr_multiplier``, as deeplab2 does for the variables it restores; the rest, random
    at the start, the full LR."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in pretrained], "lr": cfg.lr}]
    loaded = [p for p in trainable if id(p) in pretrained]
    if loaded:
        groups.append({"params": loaded, "lr": cfg.lr * cfg.backbone_lr_multiplier})
    return groups


def backbone_view(model) -> nn.Module | None:
    """The ImageNet-pretrainable ResNet (stem, stages 2-5: deeplab2's backbone-LR variables) of
    TubeFormer and VisTR; None for a model without one (the STT segmenter)."""
    if hasattr(model, "resnet_view"):
        return model.resnet_view()
    return getattr(model, "backbone", None)


def report_init(model, backbone, source: str, loaded: list[str], tensors: dict, notes: str):
    """Print what an initialisation filled; the ids of the filled ``backbone`` parameters, which
    learn at ``backbone_lr_multiplier`` x LR (BN statistics are buffers, not parameters)."""
    backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    ids = {id(tensors[k]) for k in loaded if isinstance(tensors[k], nn.Parameter)}
    slow = ids & backbone
    count = sum(p.numel() for p in model.parameters() if id(p) in slow)
    total = sum(p.numel() for p in model.parameters() if id(p) in ids)
    print(f"{source}: loaded {len(loaded)} tensors ({total:,} parameters; {count:,} backbone "
          f"parameters at LR x backbone_lr_multiplier), {notes}")  # fmt: skip
    return slow


def load_pretrained_backbone(model, path: str) -> set[int]:
    """``--pretrained``: copy a torchvision ResNet-50 state dict into the backbone."""
    from minivseg.backbone import load_torchvision_resnet50

    view = backbone_view(model)
    if view is None:
        raise checkpoint.CheckpointError(f"--pretrained: a {type(model).__name__} has no ResNet")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    report = load_torchvision_resnet50(view, state_dict)
    notes = f"skipped {len(report['skipped'])} torchvision tensors"
    tensors = view.state_dict(keep_vars=True)
    return report_init(view, view, "pretrained", report["copied"], tensors, notes)


def load_init(model, path: str) -> set[int]:
    """``--init``: load a `minivseg.convert_deeplab2` file by name into ``model``.

    Every tensor of the file must exist in the model with its shape; model tensors the file
    lacks keep their initialisation ("new"). A file converted for another activation stops.
    """
    payload = checkpoint.load_checkpoint(path, ("state_dict", "report"))
    state, activation = payload["state_dict"], payload.get("activation", "relu")
    if activation != getattr(getattr(model, "cfg", None), "activation", "relu"):
        raise checkpoint.CheckpointError(f"{path} was converted for activation={activation}: "
                                         f"add --model.activation={activation}")  # fmt: skip
    tensors = model.state_dict(keep_vars=True)
    for key, value in state.items():
        if key not in tensors or tuple(tensors[key].shape) != tuple(value.shape):
            have = tuple(tensors[key].shape) if key in tensors else "no such tensor"
            raise checkpoint.CheckpointError(f"{path}: {key} {tuple(value.shape)} does not fit "
                                             f"the model ({have})")  # fmt: skip
    model.load_state_dict(state, strict=False)
    new = [k for k in tensors if k not in state and not k.endswith("num_batches_tracked")]
    unused = len(payload["report"].get("unused", {}))
    notes = f"{len(new)} model tensors new, {unused} checkpoint variables unused"
    return report_init(model, backbone_view(model), f"init {path}", list(state), tensors, notes)


def train_mode(model, freeze_batchnorm: bool) -> None:
    """``model.train()``, with every BatchNorm back in eval mode under ``--freeze_batchnorm``."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def main(cfg: TrainConfig) -> dict:
    # --- setup: processes, device, seeds, output folder --------------------------------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                              if torch.cuda.is_available() else "cpu")  # fmt: skip
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads > 0:  # fewer threads than cores: none of them spins waiting for a busy core
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, log_path = out_dir / "last.pt", out_dir / "log.jsonl"
    is_main = rank == 0
    if not cfg.resume and (note := checkpoint.start_fresh(out_dir, cfg.overwrite, remove=is_main)):
        print(note)

    # --- data ----------------------------------------------------------------------------------
    clip_length = cfg.clip_length + (1 if cfg.temporal_consistency > 0 else 0)
    dataset = KittiStepClips(cfg.data, cfg.train_split, clip_length, crop_size=cfg.crop_size,
                             scale_range=cfg.scale_range, flip=cfg.flip,
                             clip_paste=cfg.clip_paste, seed=cfg.seed,
                             data_format=cfg.data_format)  # fmt: skip
    cfg = with_dataset_classes(cfg, dataset.source)  # VSPW / YouTube-VIS: the dataset's classes

    # --- model, loss ---------------------------------------------------------------------------
    model, criterion = build_task(cfg)
    if getattr(getattr(model, "cfg", None), "depth", False) and not dataset.has_depth:
        raise data.DatasetError(f"{cfg.data}: --model.depth needs depth labels in "
                                f"{cfg.data}/depth/{cfg.train_split} (DVPS layout; the synthetic "
                                "generator writes them)")  # fmt: skip
    pretrained = load_init(model, cfg.init) if cfg.init else set()
    if cfg.pretrained:
        pretrained |= load_pretrained_backbone(model, cfg.pretrained)
    model.to(device)
    if distributed and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)  # fmt: skip
    if cfg.compile:
        train_model = torch.compile(train_model)
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"
    )

    # --- optimizer and schedule ----------------------------------------------------------------
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    optimizer = optimizer_class(
        param_groups(model, cfg, pretrained), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    # --- resume --------------------------------------------------------------------------------
    step, nonfinite_in_a_row, skipped_steps = 0, 0, 0
    if cfg.resume:
        found = checkpoint.find_resume(out_dir)  # the newest complete checkpoint, or none
        if distributed:
            dist.barrier()  # every process has read the files before rank 0 renames them
        if is_main:
            print(checkpoint.adopt(found))  # it is last.pt now; the next save moves it to prev.pt
            cut_log(log_path, found.step)
        step, skipped_steps = found.restore(model, optimizer, schedule, rank)

    samples_per_step = cfg.batch_size * cfg.accumulate * world
    sampler = ResumableSampler(len(dataset), cfg.seed, step * samples_per_step, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=collate_clips, worker_init_fn=worker_init_fn, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
        persistent_workers=cfg.num_workers > 0,
    )  # fmt: skip
    batches = iter(loader)

    # --- loop ----------------------------------------------------------------------------------
    if is_main:
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"training {cfg.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{len(dataset)} clips, device {device}, world {world}, out {out_dir}")  # fmt: skip
    train_mode(model, cfg.freeze_batchnorm)
    bn_buffers = batch_norm_buffers(model)  # restored when a step is skipped
    params = [p for p in model.parameters() if p.requires_grad]
    start_time, start_step, last = time.time(), step, {}
    saved_step = step if step > 0 else None  # the step of the newest checkpoint on disk
    while step < cfg.max_steps:
        optimizer.zero_grad(set_to_none=True)
        bn_before = [b.clone() for b in bn_buffers]
        loss_sum, terms_sum = 0.0, {}
        for _ in range(cfg.accumulate):
            batch = next(batches)  # labels stay on the host: the losses build their targets there
            batch["frames"] = batch["frames"].to(device, non_blocking=True)
            with autocast:
                loss, terms = compute_loss(train_model, criterion, batch, cfg)
            (loss / cfg.accumulate).backward()
            loss_sum = loss_sum + loss.detach() / cfg.accumulate
            for name, value in terms.items():  # device tensors; numbers only on log steps
                terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / cfg.accumulate
        if distributed:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # no host sync
        # The one host sync of a step: its loss and gradient norm, to decide whether to apply it.
        loss_value, grad_norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            nonfinite_in_a_row, skipped_steps = nonfinite_in_a_row + 1, skipped_steps + 1
            with torch.no_grad():
                for buffer, before in zip(bn_buffers, bn_before):
                    buffer.copy_(before)
            print(f"step {step}: non-finite loss {loss_value} or gradient norm "
                  f"{grad_norm_value}, step skipped", file=sys.stderr)  # fmt: skip
            if nonfinite_in_a_row >= cfg.max_nonfinite:
                good = (f"{checkpoint_path} (step {saved_step})" if saved_step is not None
                        else "none written by this run")  # fmt: skip
                raise RuntimeError(
                    f"{nonfinite_in_a_row} non-finite losses in a row (loss or gradient norm) "
                    f"at step {step}; stopping. "
                    f"Try a lower --lr, --grad_clip=1, or --bf16=false; last good checkpoint: "
                    f"{good}"
                )
            with warnings.catch_warnings():  # the schedule follows the step count, applied or not
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
                schedule.step()
            step += 1
            continue
        nonfinite_in_a_row = 0
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm, foreach=True)
        optimizer.step()
        schedule.step()
        step += 1
        if is_main:
            progress(step, cfg, loss_value, start_time, start_step)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                if terms_sum:
                    values = torch.stack([torch.as_tensor(v).float() for v in terms_sum.values()])
                    terms_sum = dict(zip(terms_sum, values.tolist()))
                last = {"step": step, "loss": loss_value, "lr": schedule.get_last_lr()[0],
                        "grad_norm": grad_norm_value, **terms_sum}  # fmt: skip
                with log_path.open("a") as log:
                    log.write(log_line({**last, "time": time.time() - start_time}))
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            states = [checkpoint.rng_state()]
            if distributed:
                states = [None] * world
                dist.all_gather_object(states, checkpoint.rng_state())
            if is_main:
                checkpoint.save_checkpoint(out_dir, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "step": step, "rng": states,
                    "config": dataclasses.asdict(cfg), "skipped_steps": skipped_steps,
                })  # fmt: skip
                saved_step = step
                plot_losses(log_path, out_dir / "loss_curve.png")
        if cfg.eval_every and step % cfg.eval_every == 0 and is_main:
            from minivseg.evaluate import evaluate_model

            try:  # a failed evaluation is logged; it does not end the training run
                row = {"eval": evaluate_model(model, cfg, cfg.data, cfg.eval_split, device=device,
                                              max_sequences=cfg.eval_sequences)}  # fmt: skip
            except Exception as error:  # noqa: BLE001
                print(f"warning: evaluation at step {step} failed: {error!r}", file=sys.stderr)
                row = {"eval_error": repr(error)}
            with log_path.open("a") as log:
                log.write(log_line({"step": step, **row}))
            train_mode(model, cfg.freeze_batchnorm)
    if is_main and sys.stderr.isatty():
        print(file=sys.stderr)
    if distributed:
        dist.barrier()
    return {**last, "skipped_steps": skipped_steps, "model": model}


if __name__ == "__main__":
    try:
        config = parse_args(sys.argv[1:])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        main(config)
    except (checkpoint.CheckpointError, data.DatasetError) as error:  # bad data, used out_dir
        print(f"error: {error}", file=sys.stderr)  # the message alone, exit status 2
        sys.exit(2)
