# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 00 · Video segmentation as tubes, and the data we learn from
#
# Before any model, we fix the *target*. TubeFormer-DeepLab (§3.1) observes that video semantic,
# instance and panoptic segmentation all ask for the same kind of object: a set of
# **class-labelled tubes**, where a tube is a segmentation mask linked along time. Its labels
# decide which task we are solving.
#
# This lesson
# 1. states the tube formulation and the three tasks in it,
# 2. rebuilds the panoptic id `semantic * 1000 + instance` that KITTI-STEP and deeplab2 use to
#    store tubes in ordinary label images,
# 3. takes a tour of a clip from minivseg's synthetic street-scene generator (our embedded
#    dataset),
# 4. cuts that clip into tubes (their lifetimes, one tube's masks, a 3-D plot of all of them) and
#    relabels one frame for each of the three tasks, and
# 5. rebuilds the KITTI-STEP PNG codec in numpy and checks it against `minivseg.panoptic`.
#
# The generator's speed, dataset size, class shares and track statistics are in the "Measured"
# section at the end.

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

import minivseg
from minivseg.panoptic import CLASS_NAMES
from minivseg.synthetic import generate_sequence
from minivseg.visualize import overlay, plot_tubes, strip

# %% [markdown]
# ## 1. One formulation for three tasks
#
# A clip is $v \in \mathbb{R}^{T \times H \times W \times 3}$. Its annotation is a set of $K$
# class-labelled tubes
#
# $$\{y_i\}_{i=1}^{K} = \{(m_i, c_i)\}_{i=1}^{K}, \qquad m_i \in \{0, 1\}^{T \times H \times W},
# \qquad \sum_i m_i \le 1 \text{ at every pixel},$$
#
# so the tubes do not overlap, and $c_i$ is the class of tube $i$. What changes between tasks is
# which tubes exist:
#
# * **VSS** (video semantic segmentation): one tube per *class*. The model predicts
#   $\hat p \in \Delta^{D}$ at each of the $T \cdot H \cdot W$ pixels and the answer is
#   $\hat y = \arg\max_c \hat p(c)$.
# * **VIS** (video instance segmentation): one tube per *object* of a thing class (car, person).
#   Stuff is ignored. Benchmarks that use track mAP allow predicted tubes to overlap.
# * **VPS** (video panoptic segmentation): one tube per object for things, one per class for
#   stuff, and no overlaps. Every pixel is labelled.
#
# TubeFormer-DeepLab predicts $N$ tubes $\{(\hat m_i, \hat p_i(c))\}_{i=1}^N$ directly, whatever the
# task. The rest of this course builds that model.

# %% [markdown]
# ## 2. Panoptic ids: a whole tube set in one integer map
#
# A non-overlapping tube set fits in one integer per pixel: the id of the tube that covers it.
# KITTI-STEP (and deeplab2) build the id from the class $s$ and the instance (track) number $i$:
#
# $$\mathrm{id} = s \cdot 1000 + i, \qquad s = \lfloor \mathrm{id} / 1000 \rfloor, \qquad
# i = \mathrm{id} \bmod 1000.$$
#
# * Stuff pixels have $i = 0$, so all road pixels share the id $0 \cdot 1000 + 0 = 0$: one tube
#   per stuff class.
# * Thing pixels (person $s=11$, car $s=13$) have $i \ge 1$. The track id is the same in every
#   frame, so an object's pixels in all frames form one tube.
# * $s = 255$ is **void**, ignored by losses and metrics.
# * A thing pixel with $i = 0$ is **crowd**. It has a class, but it belongs to no tube, so it
#   counts for semantics and is ignored for tracking.

# %%
LABEL_DIVISOR, IGNORE_LABEL, THINGS = 1000, 255, (11, 13)


def encode_id(semantic, instance):
    return np.asarray(semantic, np.int64) * LABEL_DIVISOR + np.asarray(instance, np.int64)


def decode_id(pan_id):
    pan_id = np.asarray(pan_id, np.int64)
    return pan_id // LABEL_DIVISOR, pan_id % LABEL_DIVISOR


examples = {"road": (0, 0), "car, track 7": (13, 7), "person, crowd": (11, 0), "void": (255, 0)}
for name, (s, i) in examples.items():
    pan_id = int(encode_id(s, i))
    assert tuple(int(v) for v in decode_id(pan_id)) == (s, i)
    print(f"{name:<14} semantic {s:>3}, instance {i}  ->  id {pan_id}")

# %% [markdown]
# ## 3. A tour of a generated clip
#
# `minivseg.synthetic.generate_sequence(seed, num_frames)` renders a street seen from a car, at
# KITTI's aspect (128×416 by default). Each pixel is ray-cast onto the road plane, onto two facade
# planes or into the sky. Cars and people are upright sprites, painted far to near, so nearer
# objects are lower in the image, larger, and hide farther ones. A camera at height $h_c$ and
# focal length $f$ sees the ground at depth $z$ on the row
#
# $$y(z) = y_{\text{horizon}} + \frac{f\,h_c}{z},$$
#
# so an object $H_o$ metres tall standing at depth $z$ is $f H_o / z$ pixels tall. Below are frames
# 0, 8, 16 and 23 of one clip, with their panoptic labels overlaid. Track colours come from the
# id, so a car keeps its colour in every frame; stuff has its class colour. Look for
#
# * parked cars along the left curb, growing and sliding out of the left edge as we pass them;
# * the car ahead in our lane, and an oncoming car entering and passing;
# * a crowd of three people in the plain person colour, while tracked people keep their own;
# * void boxes (black) on the right sidewalk.

# %%
T = 24
frames, panoptic = generate_sequence(seed=0, num_frames=T)
print("frames", frames.shape, frames.dtype, "| panoptic", panoptic.shape, panoptic.dtype)
shown = [0, 8, 16, 23]
fig, axes = plt.subplots(len(shown), 2, figsize=(12, 8))
for row, t in zip(axes, shown):
    row[0].imshow(frames[t])
    row[1].imshow(overlay(frames[t], panoptic[t], alpha=0.6))
    row[0].set_ylabel(f"t = {t}")
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_title("frame")
axes[0, 1].set_title("panoptic label (overlay)")
plt.tight_layout()
plt.show()

# %% [markdown]
# Which classes cover how much of the clip? Stuff dominates, as it does in KITTI-STEP. The
# generator uses 10 of the 19 classes.

# %%
semantic, instance = decode_id(panoptic)
counts = np.bincount(np.minimum(semantic, 19).ravel(), minlength=20)
present = np.flatnonzero(counts)
names = [CLASS_NAMES[c] if c < 19 else "void" for c in present]
plt.figure(figsize=(9, 2.5))
plt.bar(names, 100 * counts[present] / counts.sum())
plt.ylabel("% of pixels")
plt.xticks(rotation=30)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. From a panoptic video to a set of tubes
#
# Each distinct id (except void and crowd) is one tube:
# $m_{\mathrm{id}}(t,h,w) = \mathbb{1}[\mathrm{id}(t,h,w) = \mathrm{id}]$. Two checks follow from
# the formulation. The tubes partition every pixel that is neither void nor crowd, and no pixel is
# in two tubes.


# %%
def video_to_tubes(panoptic):
    """``(T, H, W)`` ids -> list of ``(mask (T, H, W) bool, class, id)``, void and crowd left out."""
    tubes = []
    for pan_id in np.unique(panoptic):
        s, i = decode_id(pan_id)
        if s == IGNORE_LABEL or (s in THINGS and i == 0):
            continue
        tubes.append((panoptic == pan_id, int(s), int(pan_id)))
    return tubes


tubes = video_to_tubes(panoptic)
coverage = np.sum([m for m, _, _ in tubes], axis=0)  # (T, H, W) number of tubes per pixel
ignored = (semantic == IGNORE_LABEL) | (np.isin(semantic, THINGS) & (instance == 0))
assert coverage.max() == 1 and np.array_equal(coverage == 1, ~ignored)
things = [(m, c, i) for m, c, i in tubes if c in THINGS]
print(f"{len(tubes)} tubes: {len(tubes) - len(things)} stuff, {len(things)} things")

# %% [markdown]
# Objects enter and leave. A tube need not cover every frame: a car that overtakes us appears
# halfway through the clip, and a parked car leaves at the edge of the image. Below is each thing
# tube's lifetime (the frames where it has pixels), and its size in pixels.

# %%
fig, ax = plt.subplots(figsize=(9, 3))
for k, (mask, c, _) in enumerate(things):
    area = mask.sum(axis=(1, 2))
    alive = np.flatnonzero(area)
    ax.scatter(alive, np.full(len(alive), k), s=area[alive] / 40, color="C0" if c == 13 else "C3")
ax.set_yticks(range(len(things)), [f"{'car' if c == 13 else 'person'} {i}" for _, c, i in things])
ax.set_xlabel("frame t (dot area ~ tube area in that frame)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. What one tube looks like
#
# Take the largest car tube. Its per-frame masks $m_i(t, \cdot, \cdot)$ move down and outwards
# and grow as the car gets closer. Stacked along time, they form a solid in $(x, t, y)$: the
# "tube" that a single TubeFormer-DeepLab mask embedding has to predict for the whole clip at once.

# %%
mask, c, pan_id = max(things, key=lambda tube: tube[0].sum() * (tube[1] == 13))
rows, cols = np.nonzero(mask.any(axis=0))  # the tube's bounding box over the whole clip
box = np.s_[max(rows.min() - 8, 0) : rows.max() + 8, max(cols.min() - 8, 0) : cols.max() + 8]
fig, axes = plt.subplots(1, 6, figsize=(14, 2.2))
for ax, t in zip(axes, np.linspace(0, T - 1, 6).astype(int)):
    tinted = np.where(mask[t][..., None], (255, 40, 40), frames[t]).astype(np.uint8)
    ax.imshow(tinted[box])
    ax.set_title(f"t = {t}, {mask[t].sum()} px")
    ax.axis("off")
plt.suptitle(f"per-frame masks of tube {pan_id} (car, track {pan_id % LABEL_DIVISOR})")
plt.tight_layout()
plt.show()

ax = plot_tubes(panoptic, stride=4, ax=plt.figure(figsize=(11, 6)).add_subplot(projection="3d"))
ax.view_init(elev=18, azim=-65)
ax.set_title("every thing tube of the clip, one colour per track")
plt.show()

# %% [markdown]
# ## 6. Same clip, three tasks
#
# With the tube list in hand, the three tasks of §1 are three ways of relabelling it:
#
# * VSS keeps only $s$, which merges every car into one "car" tube.
# * VIS keeps only the thing tubes.
# * VPS keeps everything.

# %%
t = 16
vss = semantic[t]
vis = np.where(np.isin(semantic[t], THINGS) & (instance[t] > 0), panoptic[t], IGNORE_LABEL * 1000)
vps = panoptic[t]
fig, axes = plt.subplots(1, 3, figsize=(15, 2.2))
for ax, (title, labels) in zip(
    axes,
    [("VSS: classes", vss * LABEL_DIVISOR), ("VIS: thing tubes", vis), ("VPS: all tubes", vps)],
):
    ax.imshow(overlay(frames[t], labels, alpha=0.7))
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# The strip below shows four consecutive frames. Each track keeps its colour, which is the
# temporal consistency that STQ's association term (AQ) and VPQ's multi-frame matching reward.

# %%
plt.figure(figsize=(14, 2.2))
plt.imshow(strip(frames[8:12], panoptic[8:12], alpha=0.6))
plt.axis("off")
plt.show()

# %% [markdown]
# ## 7. Rebuilding the KITTI-STEP PNG codec
#
# Panoptic ids are larger than 255, so KITTI-STEP stores each label frame as an 8-bit **RGB** PNG:
#
# $$R = s, \qquad G = \lfloor i / 256 \rfloor, \qquad B = i \bmod 256
# \qquad\Longleftrightarrow\qquad \mathrm{id} = 1000\,R + 256\,G + B.$$
#
# $G$ and $B$ together hold instance ids up to 65535. Because of the label divisor, only ids below
# 1000 are valid. We rebuild both directions in numpy. Pillow only moves the bytes in and out of
# the PNG container.


# %%
def encode_rgb(panoptic):
    """``(H, W)`` ids -> ``(H, W, 3)`` uint8 KITTI-STEP colours."""
    s, i = decode_id(panoptic)
    assert s.min() >= 0 and s.max() <= 255 and i.max() < LABEL_DIVISOR
    return np.stack([s, i // 256, i % 256], axis=-1).astype(np.uint8)


def decode_rgb(rgb):
    """``(H, W, 3)`` uint8 KITTI-STEP colours -> ``(H, W)`` int64 ids."""
    rgb = rgb.astype(np.int64)
    return encode_id(rgb[..., 0], rgb[..., 1] * 256 + rgb[..., 2])


for t in range(T):  # round trip on the clip
    assert np.array_equal(decode_rgb(encode_rgb(panoptic[t])), panoptic[t])

DATA_SAMPLES = Path(minivseg.__file__).resolve().parents[1] / "data_samples"  # from any directory
label_path = DATA_SAMPLES / "panoptic_maps" / "val" / "0002" / "000005.png"
with Image.open(label_path) as png:
    assert png.mode == "RGB"
    file_rgb = np.asarray(png)
ours = decode_rgb(file_rgb)
assert np.array_equal(encode_rgb(ours), file_rgb)  # encoding gives back the stored bytes
print(label_path.relative_to(DATA_SAMPLES.parent), "ids:", np.unique(ours))

# %% [markdown]
# Finally, compare our decoder with the package reader, `minivseg.panoptic.read_kitti_step_png`,
# on every label file in `data_samples`. The lesson ends only if they agree on every pixel.

# %%
from minivseg.panoptic import read_kitti_step_png, write_kitti_step_png

label_files = sorted((DATA_SAMPLES / "panoptic_maps").rglob("*.png"))
for path in label_files:
    with Image.open(path) as png:
        np.testing.assert_array_equal(decode_rgb(np.asarray(png)), read_kitti_step_png(path))
with tempfile.TemporaryDirectory() as tmp:  # and the writer stores exactly our encoding
    write_kitti_step_png(Path(tmp) / "frame.png", panoptic[0])
    with Image.open(Path(tmp) / "frame.png") as png:
        np.testing.assert_array_equal(np.asarray(png), encode_rgb(panoptic[0]))
print(f"our codec matches minivseg.panoptic on {len(label_files)} label files")

# %% [markdown]
# ## Measured
#
# The generator on this project's 2-core x86 CPU machine, shared with other jobs (so wall-clock
# numbers are pessimistic), at the default 128×416:
#
# | what | number | command |
# |---|---|---|
# | generation, 1 thread | 154–163 frames/s CPU time (54 frames/s wall at load average 6.3) | `OMP_NUM_THREADS=1 python -c "import time; from minivseg.synthetic import generate_sequence as g; c=time.process_time(); g(0, 200); print(200/(time.process_time()-c))"` |
# | generation + PNG writing | 38 frames/s CPU time | `write_dataset(dir, 2, 1, 50)` timed with `time.process_time` |
# | dataset size | 49 MB for 500 frames (≈98 KB per frame) | the dataset command below |
# | depth maps (DVPS), written by default | 193–195 frames/s CPU time with or without `depth=True` (a later run, same machine); depth PNGs add ≈3.2 KB per frame (1.72 MB for 540 frames) | `generate_sequence(0, 200, depth=True)`; `make demo`'s dataset |
# | tracks visible per frame | mean 5.3, 10th–90th percentile 3–7 | seeds 0–9 × 50 frames |
# | motion of a track's centroid | median 1.5 px per frame, 90th percentile 5.3 px | same |
# | visible height (median) | car 34 px, person 23 px | same |
# | `z_far=20` (`--z-far 20`, `make demo`'s data) against the default 30 m | median height car 44 vs 36 px, person 33 vs 23 px; 10th percentile car 24 vs 16 px, person 7 vs 5 px; 5.1 vs 5.9 tracks per sequence | `generate_sequence(sequence_seed(0, i), 30, z_far=z)`, i = 0–15 |
#
# The dataset command is
# `python -m minivseg.synthetic --out data/synthetic --train-seqs 8 --val-seqs 2 --frames 50 --seed 0`
# (8 + 2 sequences × 50 frames). Its class pixel shares: road 23.2 %, sidewalk 7.5 %, building
# 38.1 %, pole 1.2 %, traffic sign 0.1 %, vegetation 9.9 %, terrain 1.1 %, sky 6.4 %, person
# 1.6 %, car 10.5 %, void 0.6 %. About 0.35 % of pixels are crowd (seeds 0–9).
