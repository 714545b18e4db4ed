# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 08 · Training: from random slots to tubes
#
# Lessons 00-07 built every part of TubeFormer-DeepLab: the data, the model, the tube loss, the
# inference and the metrics. This lesson puts them together and trains. We rebuild the training
# loop of `minivseg.train` in about thirty lines:
#
# 1. the configuration and the command line that gives the same run,
# 2. the data order: a pure function of (seed, position), so that resuming is exact,
# 3. the learning-rate schedule: linear warm-up, then poly decay,
# 4. the loop: data → model → tube loss → AdamW (with accumulation and gradient clipping),
# 5. watching the tubes form on a held-out clip,
# 6. evaluating the briefly trained model with STQ and VPQ,
# 7. scaling up to KITTI-STEP on one GPU, and what each memory knob trades,
#
# and it ends by checking that our loop and `minivseg.train.main` produce the same weights.
#
# **Runtime.** By default the lesson trains for `STEPS = 60` steps on 65×209 crops of the two
# training sequences in `data_samples/` and evaluates on the third. The whole lesson takes well
# under a minute on one CPU core, which is short enough for it to run in CI. Set the environment
# variable `MINIVSEG_LESSON_STEPS` (for example `MINIVSEG_LESSON_STEPS=600`, about two minutes)
# to train longer and watch the thing tubes appear. On a machine with CUDA the loop runs on the
# GPU with bf16 autocast. No GPU is needed.

# %%
import dataclasses
import itertools
import json
import os
import random
import re
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from scipy import ndimage

import minivseg
from minivseg.config import apply_overrides, demo, kitti, parse_args
from minivseg.data import KittiStepClips, collate_clips
from minivseg.evaluate import evaluate_model, print_table, read_sequence
from minivseg.inference import clip_inference
from minivseg.panoptic import (
    CLASS_COLORS,
    CLASS_NAMES,
    NUM_CLASSES,
    THING_CLASSES,
    VIDEO_LABEL_DIVISOR,
    relabel,
    thing_stuff_class_ids,
)
from minivseg.tasks import pad_frames, predict_video
from minivseg.train import load_pretrained_backbone
from minivseg.tube_loss import TubeLoss, default_loss_config
from minivseg.tubeformer import PRESETS as MODEL_PRESETS
from minivseg.tubeformer import build_model
from minivseg.visualize import compare, overlay

DATA_SAMPLES = Path(minivseg.__file__).resolve().parents[1] / "data_samples"  # from any directory
STEPS = int(os.environ.get("MINIVSEG_LESSON_STEPS", 60))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CLASS_IDS = thing_stuff_class_ids()  # class-head channel k predicts dataset class CLASS_IDS[k]

# %% [markdown]
# ## 1. One configuration, one command line
#
# A run is described by a single `TrainConfig` dataclass. Named presets (`demo`, `kitti`, ...)
# are plain functions that return one. Every field is also a `--field=value` flag of
# `python -m minivseg.train`. The lesson starts from the `demo` preset and changes only what a
# one-minute run needs: the embedded data, a small crop, the number of steps and a warm-up
# that fits inside them. With $S$ steps of $B$ clips of $T$ frames, the model sees
# $S \cdot B \cdot T$ frames:
#
# $$60 \text{ steps} \times 2 \text{ clips} \times 2 \text{ frames} = 240 \text{ frames at }
# 65 \times 209 .$$

# %%
cfg = dataclasses.replace(
    demo(),
    data=str(DATA_SAMPLES),
    crop_size=(65, 209),
    max_steps=STEPS,
    warmup_steps=max(1, STEPS // 6),
    num_workers=0,
    device=DEVICE,
)
command = [
    "--preset=demo",
    f"--data={DATA_SAMPLES}",
    "--crop_size=65,209",
    f"--max_steps={STEPS}",
    f"--warmup_steps={cfg.warmup_steps}",
    "--num_workers=0",
    f"--device={DEVICE}",
]
assert parse_args(command) == cfg
print("python -m minivseg.train " + " ".join(command))
print({k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(demo(), k)})

# %% [markdown]
# ## 2. The data order is a function of the position
#
# A training run is a stream of clips. We number the positions in the stream
# $q = 0, 1, 2, \dots$. For a dataset of $n$ clips, position $q$ lies in epoch $e$ at index $i$:
#
# $$e = \lfloor q / n \rfloor, \qquad i = q \bmod n, \qquad
# \text{key}(q) = e \cdot n + \pi_e(i),$$
#
# where $\pi_e$ is a random permutation drawn from a generator seeded with $(\text{seed}, e)$.
# The dataset reads clip $\text{key} \bmod n$. It also seeds that clip's augmentation
# (scale, crop and flip) with $(\text{seed}, \text{key})$. As a result, every epoch sees the clips
# in a new order with new augmentation, and the stream depends on nothing but the seed. After a
# crash at step $s$, the run restarts at position $q = s \cdot B \cdot A$ ($A$ micro-batches per
# step) and sees exactly the clips it would have seen. `minivseg.data.ResumableSampler` does
# this. We check our generator against it, from the start and from the middle of epoch 2.

# %%
from minivseg.data import ResumableSampler


def data_keys(num_items, seed, start=0):
    """Endless keys e * n + permutation_e[i]; position q = start, start + 1, ..."""
    stream = (
        epoch * num_items + int(i)
        for epoch in itertools.count()
        for i in np.random.default_rng((seed, epoch)).permutation(num_items)
    )
    return itertools.islice(stream, start, None)


dataset = KittiStepClips(cfg.data, cfg.train_split, cfg.clip_length, crop_size=cfg.crop_size,
                         scale_range=cfg.scale_range, flip=cfg.flip, seed=cfg.seed)  # fmt: skip
n = len(dataset)
for start in (0, 2 * n + 5):
    ours = list(itertools.islice(data_keys(n, cfg.seed, start), 3 * n))
    theirs = list(itertools.islice(iter(ResumableSampler(n, cfg.seed, start)), 3 * n))
    assert ours == theirs
print(f"{n} clips; first keys: {list(itertools.islice(data_keys(n, cfg.seed), 2 * n))}")

# %% [markdown]
# ## 3. Warm-up, then poly decay
#
# A mask transformer starts from random slots. Large steps at the beginning can push all slots
# onto one large region, so the learning rate ramps up linearly over the first $W$ steps. It then
# decays polynomially to zero at the last step $S$, as in deeplab2's MaX-DeepLab configs (poly
# power $p = 0.9$):
#
# $$\eta(s) = \eta_0 \cdot \begin{cases} \dfrac{s + 1}{W} & s < W \\[6pt]
# \left(1 - \dfrac{s - W}{S - W}\right)^{p} & s \ge W \end{cases}$$
#
# We rebuild the factor $\eta(s)/\eta_0$ and check it against `minivseg.train.lr_factor` at
# every step of our run and of the 50,000-step `kitti` preset.

# %%
from minivseg.train import lr_factor


def warmup_poly(step, cfg):
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return max(0.0, 1 - (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)) ** (
        cfg.poly_power
    )


for config in (cfg, kitti()):
    assert all(warmup_poly(s, config) == lr_factor(s, config) for s in range(config.max_steps + 1))

fig, axes = plt.subplots(1, 2, figsize=(11, 2.8), layout="constrained")
for ax, config in zip(axes, (cfg, kitti())):
    steps = np.arange(config.max_steps)
    ax.plot(steps, [config.lr * warmup_poly(s, config) for s in steps])
    ax.set(xlabel="step", ylabel="learning rate", title=f"{config.preset} schedule")
axes[0].set_title(f"this lesson ({STEPS} steps, warm-up {cfg.warmup_steps})")
plt.show()

# %% [markdown]
# ## 4. The loop
#
# A training step has five parts:
#
# - **Data.** Draw $A$ micro-batches of $B$ clips each from the key stream.
# - **Loss.** Run the model, then the tube loss of lesson 04 (TubeFormer §3.3). The total is
#   $\mathcal L = \sum_k w_k \mathcal L_k$: PQ-style class and Dice terms (weight 3 each),
#   tube-ID cross-entropy (0.3), instance discrimination (1) and video semantic cross-entropy (1).
#   The loss takes its classes from the model's config and its options from the run's config
#   (`--loss.FIELD=value` on top of `default_loss_config`). Deep supervision, the PQ-style and
#   tube-ID terms again on every earlier layer through its own heads, is one of these options
#   (`--loss.deep_supervision`). It is off by default, as in deeplab2's MaX-DeepLab recipe, and the
#   model builds the extra heads only when it is on. The labels stay on the host, where the loss
#   builds its targets; only the frames go to the device.
# - **Accumulation.** Backpropagate $\mathcal L_a / A$ for each micro-batch $a$. The gradients add
#   up to $\nabla \tfrac1A \sum_a \mathcal L_a$, the gradient of one batch of $A \cdot B$ clips.
#   (BatchNorm still sees only $B$ clips at a time.)
# - **Clipping.** Compute the global norm $\lVert g \rVert = (\sum_i \lVert g_i \rVert^2)^{1/2}$
#   once (`get_total_norm`; the package logs it as `grad_norm` and skips a step whose loss or
#   norm is not finite). If $c > 0$, rescale the gradient to a norm of at most $c$ with that norm
#   (`clip_grads_with_norm_`): $g \leftarrow g \cdot \min(1, c / \lVert g \rVert)$, the same
#   numbers as `clip_grad_norm_`. `demo` clips at $c = 1$; `kitti` does not clip ($c = 0$),
#   because deeplab2 trains MaX-DeepLab without clipping.
# - **Update.** Take an AdamW step (`demo`; `kitti` uses Adam, as deeplab2 does) with the
#   scheduled rate $\eta(s)$:
#   $\theta \leftarrow \theta - \eta(s)\,(\hat m / (\sqrt{\hat v} + \epsilon) + \lambda\theta)$,
#   where $\hat m$ and $\hat v$ are the bias-corrected running moments of $g$.
#   `foreach=True` updates all tensors with a few batched operations instead of a Python loop
#   over parameters: much faster on the CPU, same numbers.
#
# On CUDA the forward pass runs under bf16 autocast. The loss itself always runs in float32
# (`TubeLoss` disables autocast), because its softmaxes over slots need the precision.
#
# The parameters loaded from a pretrained checkpoint get their own parameter group with a lower
# learning rate (`--pretrained`, §7). Seeding happens before the model is built, so the seed
# fixes the initial weights as well as the data. The package version adds logging, checkpoints,
# resuming, skipping of non-finite steps (BatchNorm statistics restored), frozen BatchNorm,
# periodic evaluation and multi-GPU training.
# `callback(step, model)` lets us look at the model during training.


# %%
def parameter_groups(model, cfg, pretrained=frozenset()):
    """Full LR, except the parameters loaded from a checkpoint (`pretrained`: their ids), which
    get LR x backbone_lr_multiplier."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in pretrained], "lr": cfg.lr}]
    loaded = [p for p in trainable if id(p) in pretrained]
    if loaded:
        groups.append({"params": loaded, "lr": cfg.lr * cfg.backbone_lr_multiplier})
    return groups


def train(cfg, callback=None):
    device = torch.device(cfg.device)
    if cfg.threads > 0:  # the CPU presets use one thread (see the package's TrainConfig.threads)
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    dataset = KittiStepClips(cfg.data, cfg.train_split, cfg.clip_length, crop_size=cfg.crop_size,
                             scale_range=cfg.scale_range, flip=cfg.flip, clip_paste=cfg.clip_paste,
                             seed=cfg.seed)  # fmt: skip
    # The loss options of the model's layer type, then --loss.FIELD=value (no --model. overrides).
    memory_update = MODEL_PRESETS[cfg.model]().memory_update
    loss_cfg = apply_overrides(default_loss_config(memory_update), cfg.loss_overrides, "loss.")
    model = build_model(cfg.model, aux_heads=loss_cfg.deep_supervision)
    criterion = TubeLoss(model.cfg.num_classes, model.cfg.thing_classes,
                         num_slots=model.cfg.num_slots, config=loss_cfg)  # fmt: skip
    pretrained = load_pretrained_backbone(model, cfg.pretrained) if cfg.pretrained else set()  # §7
    model.to(device)
    groups = parameter_groups(model, cfg, pretrained)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    optimizer = optimizer_class(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    base_lrs = [group["lr"] for group in groups]
    keys = data_keys(len(dataset), cfg.seed)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    history = []
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for step in range(cfg.max_steps):
        if callback is not None:
            callback(step, model)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * warmup_poly(step, cfg)  # η(s)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, terms_sum = 0.0, {}
        for _ in range(cfg.accumulate):
            batch = collate_clips([dataset[next(keys)] for _ in range(cfg.batch_size)])
            batch["frames"] = batch["frames"].to(device)  # the labels stay on the host
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, terms = criterion(model(batch["frames"]), batch)
            (loss / cfg.accumulate).backward()  # gradients add up over the A micro-batches
            loss_sum = loss_sum + loss.detach() / cfg.accumulate
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / cfg.accumulate
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm, foreach=True)
        optimizer.step()
        values = torch.stack([loss_sum, grad_norm, *terms_sum.values()]).tolist()
        history.append(dict(zip(["total", "grad_norm", *terms_sum], values)))
    if callback is not None:
        callback(cfg.max_steps, model)
    return model, history


# %% [markdown]
# ## 5. Watching the tubes form
#
# While training, we take snapshots of one held-out clip: the last two frames of validation
# sequence `0002`. The clip is padded to 129×417, since deeplab2 pads inputs to a
# $16k + 1$ size. At every pixel of both frames we draw the slot that wins the softmax over the
# $N = 32$ slots of $\hat m = \operatorname{softmax}_N(x_v \cdot w)$ (TubeFormer Eq. (1)). This is
# the per-pixel tube ID of clip-level inference (§3.4):
#
# $$\hat z_{t,h,w} = \arg\max_{i} \; \hat m_{i,t,h,w} .$$
#
# A slot keeps its colour in both frames, so one colour spanning both frames is one *tube*. A
# stuff slot is drawn in the colour of the class reserved for it (as in the ground truth); thing
# slots get bright hues. Each large slot is labelled with its predicted class
# $\hat c_i = \arg\max_c \hat p_i(c)$ (§3.4). The last
# $|C_\text{stuff}| = 17$ slots (15-31) are reserved for the stuff classes in head order, so the
# stuff slots need no matching. This is why they usually settle first. The thing slots (0-14)
# have to win the Hungarian matching against each other before they can specialise. The right
# column shows what inference (lesson 06) makes of the slots: tubes with class confidence below
# 0.7 become void (black).
#
# The snapshots use evaluation mode, so BatchNorm uses its running statistics. With deeplab2's
# momentum 0.01, after 60 steps those statistics are only $1 - 0.99^{60} \approx 45\%$ of the way
# from their initial values to the data's. This is one reason a short run looks worse in
# evaluation than its training loss suggests.

# %%
val = KittiStepClips(cfg.data, cfg.eval_split, cfg.clip_length)
watch_clip = val[len(val) - 1]
watch_frames = pad_frames(watch_clip["frames"])[None]  # (1, T, 3, 129, 417)
WATCH = sorted({int(s) for s in np.linspace(0, STEPS, 4).round()})
snapshots = {}


@torch.no_grad()
def snapshot(step, model):
    if step not in WATCH:
        return
    model.eval()
    outputs = model(watch_frames.to(cfg.device))
    probs = outputs["class_logits"][0].float().softmax(-1)  # (N, K + 1)
    snapshots[step] = dict(
        slot=outputs["mask_logits"][0].float().argmax(0).cpu(),  # (T, h, w)
        head_class=probs.argmax(-1).cpu(),  # (N,), K = void
        confidence=probs.max(-1).values.cpu(),
        panoptic=clip_inference(outputs, watch_frames.shape[-2:], CLASS_IDS)[0].cpu(),
    )
    model.train()


model, history = train(cfg, callback=snapshot)
print(f"trained {STEPS} steps: loss {history[0]['total']:.3f} -> {history[-1]['total']:.3f}")

# %% [markdown]
# ### The loss terms
#
# Curves are smoothed over 5 steps. (With `--loss.deep_supervision=true` there would also be
# auxiliary-head terms, `aux0_...`; we would leave them out.) In the first 60 steps the total
# falls from about 7 to about 5. The class term and instance discrimination fall fastest. The PQ-style Dice term *rises* at first, and that is expected:
# MaX-DeepLab weights each matched slot's Dice loss by that slot's (stop-gradient) probability of
# the correct class, $\hat p_j(c_i)$. Because of the void prior, that probability starts near
# $0.1 / 19 \approx 0.005$, so the Dice term switches on as the classifier learns. With
# `MINIVSEG_LESSON_STEPS=600` the total keeps falling, to below 1.

# %%
names = ["total", "pq_class", "pq_dice", "tube_id", "instance_disc", "semantic"]
fig, ax = plt.subplots(figsize=(9, 3.5), layout="constrained")
width = min(5, STEPS)
for name in names:
    curve = np.array([row[name] for row in history])
    smooth = np.convolve(curve, np.ones(width) / width, mode="valid")
    ax.plot(np.arange(len(smooth)) + width - 1, smooth, label=name)
ax.set(yscale="log", xlabel="step", ylabel="unweighted term", title="tube loss while training")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% [markdown]
# ### Slots becoming tubes
#
# The top row shows the clip and its ground truth. The rows below show the snapshots. In the
# first column, white text gives the slot number and predicted class of every slot that covers at
# least 3% of the frame. The snapshot at step 0 is the untrained model: its pixels are scattered
# over a few random slots, all of which predict void. After 60 steps the picture is still rough.
# Around step 20 a single slot covers almost the whole frame. By step 60 the reserved building,
# road and sky slots have begun to claim regions, though not always the right ones, and a thing
# slot may still cover most of the road. Inference still voids almost every pixel: it keeps a
# pixel only when its winning tube has probability above 0.4, and the early slot maps are soft,
# with many slots at similar logits (the median winning probability is near $1/N$). Longer runs
# show the order in which tubes form. With `MINIVSEG_LESSON_STEPS=200` (about 30 s more on one
# core), road, building and sky each get their own stuff tube and a first car tube appears. With
# 600 steps the sidewalk, vegetation, terrain and pole slots follow, along with small tubes for
# cars and people.

# %%
N = model.cfg.num_slots
S = NUM_CLASSES - len(THING_CLASSES)  # 17 stuff classes, one reserved slot each
hue = np.arange(N - S) / (N - S)
thing_colours = hsv_to_rgb(np.stack([hue, np.ones(N - S), np.ones(N - S)], 1))
stuff_colours = np.array([CLASS_COLORS[c] for c in CLASS_IDS[len(THING_CLASSES) :]]) / 255
palette = np.concatenate([thing_colours, stuff_colours])  # (N, 3) one colour per slot
images = watch_clip["frames"].permute(0, 2, 3, 1).byte().numpy()  # (T, H, W, 3)
T, H, W = watch_clip["panoptic"].shape


def slot_label(slot, snap):
    k = int(snap["head_class"][slot])
    name = "void" if k == NUM_CLASSES else CLASS_NAMES[CLASS_IDS[k]]
    return f"{slot}: {name}"


fig, axes = plt.subplots(len(WATCH) + 1, T + 1, figsize=(15, 1.9 * (len(WATCH) + 1)))
for t in range(T):
    axes[0, t].imshow(images[t])
    axes[0, t].set_title(f"frame {watch_clip['frame_ids'][t]}", fontsize=9)
axes[0, T].imshow(overlay(images[-1], watch_clip["panoptic"][-1].numpy()))
axes[0, T].set_title("ground truth (last frame)", fontsize=9)
for row, step in enumerate(WATCH, start=1):
    snap = snapshots[step]
    h, w = snap["slot"].shape[-2:]
    for t in range(T):
        # stride-4 pixel (i, j) sits at input pixel (4i, 4j)
        axes[row, t].imshow(palette[snap["slot"][t]], extent=(-2, 4 * w - 2, 4 * h - 2, -2))
        axes[row, t].set(xlim=(0, W), ylim=(H, 0))
        axes[row, t].set_title(f"step {step}: argmax over slots, frame {t}", fontsize=9)
    slots, counts = snap["slot"][0].unique(return_counts=True)
    for slot in slots[counts >= 0.03 * h * w].tolist():
        inside = ndimage.distance_transform_edt(np.pad(snap["slot"][0].numpy() == slot, 1))
        y, x = np.unravel_index(inside.argmax(), inside.shape)  # deepest pixel of the slot
        y, x = y - 1, x - 1  # undo the padding
        axes[row, 0].text(4 * x, 4 * y, slot_label(slot, snap),
                          fontsize=7, color="white", ha="center", va="center")  # fmt: skip
    axes[row, T].imshow(overlay(images[-1], snap["panoptic"][-1, :H, :W].numpy()))
    axes[row, T].set_title(f"step {step}: panoptic inference", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()

final = snapshots[STEPS]
slots, counts = final["slot"].unique(return_counts=True)
print(f"after {STEPS} steps, slots covering the clip (share of its stride-4 pixels):")
for slot, count in sorted(zip(slots.tolist(), counts.tolist()), key=lambda pair: -pair[1]):
    kind = "stuff" if slot >= N - S else "thing"
    print(f"  slot {slot:2d} ({kind} slot) {count / final['slot'].numel():6.1%}  "
          f"{slot_label(slot, final):24s} p = {final['confidence'][slot]:.2f}")  # fmt: skip

# %% [markdown]
# ## 6. Evaluation
#
# `minivseg.evaluate.evaluate_model` runs the whole validation sequence the way
# `python -m minivseg.evaluate` does. It slides a $T$-frame window with stride 1, runs clip
# inference on each window, stitches the clips into video tracks (lesson 06), and scores the
# video. STQ is $\sqrt{\text{AQ} \cdot \text{SQ}}$, where AQ scores the association of tracks and
# SQ the semantic segmentation; VPQ is the video panoptic quality (printed in percent, the others
# as fractions). After 60 steps on two short training sequences the numbers are close to zero,
# and that is expected. Stuff improves first, while AQ and VPQ-thing stay near 0 until the thing
# tubes exist: in our 600-step run of this lesson, mIoU reached about 0.5 and VPQ-stuff about 60,
# while AQ stayed below 0.01 and VPQ-thing at 0. `make demo` trains the same tiny model with the
# `demo` preset (printed below: many more steps, larger crops, about ten minutes on two CPU
# cores) on sixteen 30-frame synthetic sequences with things up to 20 m away, and scores it on
# 12 held-out sequences of another generator seed; the README's demo-results section shows the
# scores it reaches and the command that reproduces them.

# %%
metrics = evaluate_model(model, cfg, cfg.data, cfg.eval_split, device=cfg.device)
print_table({k: metrics[k] for k in ("STQ", "AQ", "SQ", "VPQ", "VPQ_thing", "VPQ_stuff", "mIoU")})
print(f"make demo: {demo().max_steps} steps of {demo().batch_size} clips, crop {demo().crop_size}")

sequence = watch_clip["sequence"]
sequence_frames, video_gt = read_sequence(
    val.root, cfg.eval_split, sequence, val.sequences[sequence], labels=True
)  # (F, 3, H, W) float, (F, H, W) ids
video, _ = predict_video(model, cfg, sequence_frames.to(cfg.device))  # stitched (F, H, W)
video_gt = relabel(video_gt, 1000, VIDEO_LABEL_DIVISOR)  # videos use label divisor 65536
frames_np = sequence_frames.permute(0, 2, 3, 1).byte().numpy()
fig, axes = plt.subplots(3, 1, figsize=(9, 6.5))
for ax, f in zip(axes, (0, len(video) // 2, len(video) - 1)):
    ax.imshow(compare(frames_np[f], video_gt[f], video[f], label_divisor=VIDEO_LABEL_DIVISOR))
    ax.set_title(f"frame {f}: ground truth (left), prediction after {STEPS} steps (right)")
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7. Scaling to KITTI-STEP on one GPU
#
# The `kitti` preset is the full TubeFormer-DeepLab-B1 (MaX-DeepLab-S-sized Axial-ResNet-50,
# $N = 128$ global slots, $L = 16$ latent slots, $T = 2$). TubeFormer §4.2 trains with a batch of
# 16 clips. The preset puts 2 clips of KITTI's full 385×1249 crop on the GPU at a time and
# accumulates 8 such micro-batches per step: effective batch $2 \times 8 = 16$. (With
# `NGPUS=k`, the effective batch is $16k$.) Further settings:
#
# - **bf16 autocast** on CUDA runs matrix products and convolutions in bfloat16, which also
#   stores their activations in 16 bits instead of 32.
# - **Gradient checkpointing** recomputes the axial and dual-path blocks during the backward pass
#   instead of storing their activations.
# - **Pretrained backbone.** `--pretrained=resnet50.pth` loads a torchvision ResNet-50 state dict
#   (download it yourself; nothing downloads at run time) into the backbone. The weights it
#   loaded get learning rate × 0.1 (`backbone_lr_multiplier`); everything else trains at the full
#   rate (see below).
# - **Temporal consistency.** Each sample is a clip of $T + 1$ frames, split into two
#   overlapping $T$-frame clips with an L1 loss on their $T - 1$ shared frames (lesson 04 §8).
#   This needs `minivseg.train.compute_loss`; our loop above calls the tube loss directly.
# - **Clip-paste** augmentation (TubeFormer §3.3): a dataset option, so our loop has it too.
#
# ```bash
# make train-kitti DATA=/path/to/kitti-step            # one GPU
# make train-kitti DATA=/path/to/kitti-step NGPUS=4    # torchrun, DistributedDataParallel
# make train-kitti DATA=/path/to/kitti-step ARGS="--resume --pretrained=resnet50.pth"
# ```
#
# `--resume` continues from `runs/kitti/last.pt`, restoring the weights, optimiser, schedule,
# step and RNG states. Combined with the data order of §2, the resumed run sees exactly the
# batches it would have seen without the interruption.

# %%
print(kitti())
print(f"effective batch {kitti().batch_size * kitti().accumulate} clips per GPU, "
      f"kitti model: {sum(p.numel() for p in build_model('kitti').parameters()) / 1e6:.1f} M "
      "parameters")  # fmt: skip

# %% [markdown]
# ### Which parameters get the lower learning rate
#
# deeplab2 applies its backbone multiplier to the variables it *restores* from the checkpoint:
# they already hold useful ImageNet features, and a full-rate start would wash them out. A
# parameter that starts random has nothing to protect, so it must learn at the full rate, even
# when it sits inside the backbone. A torchvision ResNet-50 fills only what our Axial-ResNet
# shares with it: the convolutions of the non-axial bottleneck blocks, with their BatchNorms. It
# has no axial attention, so an axial block (its attention and the 1×1 convs around it) stays
# random. So do our 3×3 inception stem (torchvision's stem is one 7×7 conv) and stage 2's first
# conv1 and shortcut, which see 128 stem channels instead of 64. For the `kitti` backbone that is
# about 5 M loaded of its 41 M parameters (README). So the multiplier goes to exactly the loaded
# parameters $\Theta_\text{loaded}$:
#
# $$\eta_\theta = \begin{cases} m\,\eta(s) & \theta \in \Theta_\text{loaded} \\
# \eta(s) & \text{otherwise}, \end{cases} \qquad m = \texttt{backbone\_lr\_multiplier} .$$
#
# The loader copies a tensor only when our counterpart has the same shape, and a BatchNorm only
# when its conv was copied. We rebuild that rule by name: our key, mapped to its torchvision
# name, must be in the checkpoint with our shape, and so must the conv of its conv+BN unit. We
# test it on a fake checkpoint with torchvision names and the tiny backbone's shapes, except for a
# 7×7 stem, and compare our groups with `minivseg.train.param_groups` after
# `minivseg.train.load_pretrained_backbone` loaded the same file.

# %%
from minivseg.train import param_groups


def torchvision_name(key):
    """Our backbone key -> its torchvision ResNet-50 key, or None (the stem's later convs and the
    axial attention have no counterpart)."""
    stem = re.fullmatch(r"stem\.0\.(conv|bn)\.(.+)", key)
    if stem:
        return f"{stem[1]}1.{stem[2]}"  # conv1.weight, bn1.weight, ...
    unit = re.fullmatch(r"stage(\d)\.(\d+)\.(conv(\d)|shortcut)\.(conv|bn)\.(.+)", key)
    if unit is None:
        return None
    stage, index, name, number, part, param = unit.groups()
    name = f"downsample.{int(part == 'bn')}" if name == "shortcut" else f"{part}{number}"
    return f"layer{int(stage) - 1}.{index}.{name}.{param}"


def loaded_parameter_ids(model, state_dict):
    """ids of the backbone parameters that a torchvision ResNet-50 state dict fills."""
    view = model.resnet_view()  # stem + stages 2-5, sharing the model's parameters
    ours = view.state_dict()

    def fits(key):  # the checkpoint has this tensor, under its torchvision name, in our shape
        name = torchvision_name(key)
        return name in state_dict and state_dict[name].shape == ours[key].shape

    # A BN only with its conv: stage2.0.conv1.bn.weight needs stage2.0.conv1.conv.weight to fit.
    return {
        id(p)
        for key, p in view.named_parameters()
        if fits(key) and fits(key.rsplit(".", 2)[0] + ".conv.weight")
    }


tiny = build_model("tiny")
backbone = tiny.resnet_view().state_dict()
fake = {torchvision_name(k): torch.randn(v.shape) for k, v in backbone.items()
        if torchvision_name(k) and v.is_floating_point()}  # fmt: skip
fake["conv1.weight"] = torch.randn(16, 3, 7, 7)  # torchvision's 7x7 stem: no 3x3 counterpart
with tempfile.TemporaryDirectory() as folder:
    torch.save(fake, f"{folder}/resnet50.pth")
    pretrained_cfg = dataclasses.replace(kitti(), pretrained=f"{folder}/resnet50.pth")
    ours_loaded = loaded_parameter_ids(tiny, fake)
    package_loaded = load_pretrained_backbone(tiny, pretrained_cfg.pretrained)
assert ours_loaded == package_loaded
ours_groups = parameter_groups(tiny, pretrained_cfg, ours_loaded)
package_groups = param_groups(tiny, pretrained_cfg, package_loaded)
assert len(ours_groups) == len(package_groups) == 2
for ours, theirs in zip(ours_groups, package_groups):
    assert ours["lr"] == theirs["lr"] and list(map(id, ours["params"])) == list(
        map(id, theirs["params"])
    )
    print(f"group: {sum(p.numel() for p in ours['params']):>9,} parameters, lr {ours['lr']:.2e}")
random_backbone = sum(
    p.numel() for p in tiny.resnet_view().parameters() if id(p) not in ours_loaded
)
print(f"backbone parameters left random (stem, axial attention): {random_backbone:,}")
assert len(parameter_groups(tiny, pretrained_cfg)) == 1  # nothing loaded: one group

# %% [markdown]
# ### What each memory knob trades
#
# A GPU's memory goes to the weights and optimiser state, which are fixed, and to the
# activations that autograd keeps from the forward pass for the backward pass, which grow with
# the input. We measure the second part directly: a `saved_tensors_hooks` context sees every
# tensor that autograd stores, and we add up their sizes (each storage counted once, weights
# excluded). We use one forward and backward pass of the tiny model, changing one knob at a time:
#
# - **Crop.** Activations grow with $H \cdot W$. Doubling both sides gives nearly 4× the memory.
#   A smaller crop also gives the model less context per clip.
# - **T** (frames per clip). Activations grow linearly with $T$, and the global attention is over
#   $T \cdot h \cdot w$ pixels. Longer clips give longer tubes and fewer clip boundaries to stitch.
# - **N** (slots). $N$ appears in the tube logits $(B, N, T, h, w)$ and in the attention between
#   memory and pixels; the cost is modest at these sizes. There must be enough slots for all
#   tubes in a clip.
# - **Checkpointing.** It saves memory and leaves the results unchanged (same values and
#   gradients), at the cost of about one extra forward pass of the checkpointed blocks.

# %%


def saved_activation_mib(crop, clip_length, num_slots, checkpointing):
    torch.manual_seed(0)
    net = build_model("tiny", num_slots=num_slots, gradient_checkpointing=checkpointing)
    loss_fn = TubeLoss(net.cfg.num_classes, net.cfg.thing_classes, num_slots=num_slots)
    clip = KittiStepClips(cfg.data, "train", clip_length, crop_size=crop)[3]
    weights = {p.data_ptr() for p in net.parameters()}
    stored = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            stored[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = loss_fn(net(clip["frames"][None]), {"panoptic": clip["panoptic"][None]})
    loss.backward()
    return sum(stored.values()) / 2**20


knobs = {
    "base: 65x209, T=2, N=32": ((65, 209), 2, 32, False),
    "crop 129x417": ((129, 417), 2, 32, False),
    "T=3": ((65, 209), 3, 32, False),
    "N=64": ((65, 209), 2, 64, False),
    "gradient checkpointing": ((65, 209), 2, 32, True),
}
memory = {name: saved_activation_mib(*args) for name, args in knobs.items()}
for name, mib in memory.items():
    print(
        f"{name:>26s}: {mib:6.1f} MiB saved for backward ({mib / memory[next(iter(memory))]:.2f}x)"
    )

# %% [markdown]
# ## 8. Check: our loop equals `minivseg.train.main`
#
# Finally we run three steps of our loop and three steps of the package's training script from
# the same configuration: the same seed, data, crop and augmentation, on the CPU, with
# `num_workers=0`. The package draws its batches with `ResumableSampler` through a `DataLoader`;
# our loop draws the same keys (§2). The warm-up is 1 step, so the poly decay is used too. The
# two runs must give identical losses, loss terms and gradient norms at every step (the package
# logs them to `log.jsonl`) and identical weights, with tolerance 0. We then load the checkpoint
# the package wrote, `last.pt`, into a freshly built model with `load_state_dict(strict=True)`
# and check that it gives the same outputs as our model.

# %%
from minivseg.tasks import load_model
from minivseg.train import main as package_main

with tempfile.TemporaryDirectory() as out_dir:
    check_cfg = dataclasses.replace(
        cfg, max_steps=3, warmup_steps=1, log_every=1, device="cpu", out_dir=out_dir
    )
    our_model, our_history = train(check_cfg)
    result = package_main(check_cfg)
    with open(f"{out_dir}/log.jsonl") as log:
        logged = [json.loads(line) for line in log]
    assert [row["step"] for row in logged] == [1, 2, 3]
    for ours, row in zip(our_history, logged):  # every loss term of every step, exactly
        assert row["loss"] == ours["total"]
        assert all(row[name] == value for name, value in ours.items() if name != "total")
    theirs = result["model"].state_dict()
    for name, value in our_model.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)

    checkpoint = torch.load(f"{out_dir}/last.pt", map_location="cpu", weights_only=True)
    fresh = build_model("tiny", aux_heads=our_model.cfg.aux_heads)  # as the loss options say
    fresh.load_state_dict(checkpoint["model"], strict=True)
    loaded, _ = load_model(f"{out_dir}/last.pt")
with torch.no_grad():
    expected = our_model.eval()(watch_frames)
    for package_model in (fresh.eval(), loaded):
        got = package_model(watch_frames)
        for key in ("class_logits", "mask_logits", "semantic_logits", "pixel_embedding"):
            torch.testing.assert_close(got[key], expected[key])
print("3 steps of our loop == minivseg.train.main: same losses, same weights, same outputs")
