# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 09 · Depth-aware tubes: a depth per pixel, its loss, and DSTQ
#
# Depth-aware video panoptic segmentation (DVPS, ViP-DeepLab; TubeFormer-DeepLab §2) asks for
# the video panoptic tubes *and* a depth in metres at every pixel. TubeFormer-DeepLab writes the
# prediction as class-labelled tubes that carry depth,
#
# $$\{\hat y_i\}_{i=1}^{N} = \{(\hat m_i,\ \hat p_i(c),\ \hat d_i)\}_{i=1}^{N}, \qquad
# \hat d_i \in [0, d_\text{max}]^{T\times H\times W},$$
#
# and gets it with one small addition (§3.2, "Depth prediction branch"): ASPP and a DeepLabv3+
# decoder on the CNN backbone features $x_v$, a sigmoid times $d_\text{max}$, and ViP-DeepLab's
# depth loss with weight 100. The depth is one map per frame, shared by all tubes: tube $i$'s
# depth is that map on the pixels of $\hat m_i$. On SemKITTI-DVPS this is enough for first
# place (Tab. 6: 67.00 DSTQ on the test set; ViP-DeepLab 63.36, the best challenge entry 63.63;
# the text says +3.4 DSTQ over ViP-DeepLab, the abstract +3.6, the table's difference is 3.64).
#
# This lesson rebuilds:
#
# 1. the depth label: metres per pixel, 0 = no depth, on a synthetic clip;
# 2. the depth branch (`minivseg.depth.DepthBranch`), from plain torch modules;
# 3. the depth loss (`minivseg.depth.depth_loss`): scale-invariant log error + relative squared
#    error, and why it takes both;
# 4. DSTQ by hand on a 3-frame, 4-pixel video, and the usual depth errors on it;
# 5. a few training steps of the tiny TubeFormer with depth on one clip;
#
# and ends (6) by loading the rebuilt branch into the package's `DepthBranch` and checking
# outputs, and the rebuilt loss against the package's (value and gradient).

# %%
import tempfile
import time
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from minivseg.axial_attention import BN_EPS, BN_MOMENTUM
from minivseg.backbone import activation_fn, conv_bn
from minivseg.depth_metrics import DepthMetrics
from minivseg.panoptic import (
    CLASS_NAMES,
    DEPTH_SCALE,
    LABEL_DIVISOR,
    MAX_DEPTH,
    NUM_CLASSES,
    THING_CLASSES,
    colorize,
    read_depth_png,
    write_depth_png,
)
from minivseg.stq import STQ
from minivseg.synthetic import generate_sequence
from minivseg.visualize import depth_picture, overlay

torch.manual_seed(0)
LESSON_START = time.perf_counter()

# %% [markdown]
# ## 1. The depth label
#
# A DVPS frame has two labels: the panoptic ids of lessons 00-06 and a depth map $d^*$ in
# metres. KITTI stores depth as a 16-bit grayscale PNG, and SemKITTI-DVPS (and `minivseg`) keep
# its convention:
#
# $$v = \operatorname{round}(256\, d^*), \qquad d^* = v / 256\ \text{m}, \qquad v = 0
# \ \Leftrightarrow\ \text{no depth},$$
#
# so depth is quantised to $1/256$ m and reaches $65535/256 \approx 256$ m. "No depth" is
# common: SemKITTI-DVPS projects LiDAR points, so most pixels have none, and the sky never has
# any. Depths beyond $d_\text{max}$ = `MAX_DEPTH` = 80 m (KITTI's evaluation cap, and the range
# of the model's sigmoid) are dropped too. A pixel without depth is simply left out of the loss
# and the metrics, whatever its panoptic label.
#
# The synthetic generator ray-casts every pixel, so its depth is dense except for the sky and
# for the far end of the street. Below: a 2-frame 129×417 clip (the one we train on in §5), its
# panoptic labels and its depth, coloured by inverse depth (near is bright, no depth is black).

# %%
frames_np, panoptic_np, depth_np = generate_sequence(
    seed=3, num_frames=2, height=129, width=417, depth=True
)
T, H, W = depth_np.shape
print(
    f"frames {frames_np.shape}, panoptic {panoptic_np.shape}, depth {depth_np.shape} "
    f"{depth_np.dtype}, DEPTH_SCALE = {DEPTH_SCALE}, MAX_DEPTH = {MAX_DEPTH} m"
)
has_depth = depth_np > 0
print(
    f"pixels with depth: {has_depth.mean():.1%}, "
    f"range {depth_np[has_depth].min():.2f} .. {depth_np.max():.2f} m"
)
semantic = panoptic_np // LABEL_DIVISOR
for c in np.unique(semantic[semantic < NUM_CLASSES]):
    in_class = semantic == c
    with_depth = in_class & has_depth
    median = f"{np.median(depth_np[with_depth]):5.1f} m" if with_depth.any() else "    -  "
    print(
        f"  {CLASS_NAMES[c]:<13} median depth {median}, {with_depth.sum() / in_class.sum():6.1%}"
        " with depth"
    )

fig, axes = plt.subplots(T, 3, figsize=(15, 3.4))
for t in range(T):
    axes[t, 0].imshow(frames_np[t])
    axes[t, 1].imshow(overlay(frames_np[t], panoptic_np[t], alpha=0.6))
    axes[t, 2].imshow(depth_picture(depth_np[t], MAX_DEPTH))
    axes[t, 0].set_ylabel(f"frame {t}")
for ax, title in zip(axes[0], ["frame", "panoptic (overlay)", "ground-truth depth (black: none)"]):
    ax.set_title(title)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# The tubes now carry depth: a tracked car's pixels give its distance in every frame. Between
# two frames the camera drives on, so the cars ahead change distance a little:

# %%
for track in np.unique(panoptic_np):
    if track // LABEL_DIVISOR in THING_CLASSES and track % LABEL_DIVISOR:
        per_frame = [
            f"{np.median(depth_np[t][panoptic_np[t] == track]):5.2f} m"
            if (panoptic_np[t] == track).any()
            else "   (absent)"
            for t in range(T)
        ]
        print(f"tube {track} ({CLASS_NAMES[track // LABEL_DIVISOR]}): median depth", per_frame)

# %% [markdown]
# The PNG codec (`minivseg.panoptic.write_depth_png` / `read_depth_png`) loses at most half a
# step, $1/512$ m, and keeps 0 as 0:

# %%
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "000000.png"
    write_depth_png(path, depth_np[0])
    decoded = read_depth_png(path)
assert np.array_equal(decoded > 0, depth_np[0] > 0)
print(
    f"PNG round trip: max error {np.abs(decoded - depth_np[0]).max():.5f} m "
    f"(bound {0.5 / DEPTH_SCALE:.5f} m)"
)
assert np.abs(decoded - depth_np[0]).max() <= 0.5 / DEPTH_SCALE + 1e-6

# %% [markdown]
# ## 2. The depth branch
#
# The paper puts the branch on the **backbone** features $x_v$, not on the decoded pixel
# features $x'_v$ that the tube logits use ("we found the performance slightly degrades if we
# add the depth prediction to the decoded video pixel features"): depth gets its own decoder.
# deeplab2's ViP-DeepLab depth head, which the package follows, reads three per-frame features:
# `res5` (stride 16, the end of stage 5, after the latent and global attention of lesson 02),
# `res3` (stride 8) and `res2` (stride 4), all taken *before* their activation, so the branch
# applies the backbone's activation first.
#
# **ASPP** (DeepLabv3 §3.3) looks at `res5` through five parallel branches and fuses them:
#
# $$a = \operatorname{proj}_{1\times1}\Big(\big[\,f_{1\times1}(x),\ f^{r=6}_{3\times3}(x),\
# f^{r=12}_{3\times3}(x),\ f^{r=18}_{3\times3}(x),\ \operatorname{bcast}\,
# f_{1\times1}(\bar x)\,\big]\Big), \qquad \bar x = \tfrac{1}{hw}\textstyle\sum_{h,w} x,$$
#
# where every $f$ is conv (no bias) + BatchNorm + ReLU, $f^{r}_{3\times3}$ is a 3×3 conv with
# dilation $r$, and the last branch is the frame's mean feature, broadcast back to every pixel.
# A dropout of 0.1 follows the projection.
#
# **Decoder** (DeepLabv3+), twice, first with `res3`, then with `res2`: project the low-level
# feature to $C/4$ (then $C/8$) channels, upsample the running feature to its size (bilinear,
# align corners), concatenate, and fuse with a 5×5 depthwise-separable conv (depthwise 5×5 + BN +
# ReLU, then pointwise 1×1 + BN + ReLU); $\sigma$ is the backbone's activation:
#
# $$x \leftarrow \operatorname{sep}_{5\times5}\big([\,\uparrow x,\ f_{1\times1}(\sigma(r_k))\,]\big),
# \quad k = 3, 2 .$$
#
# **Head**: one more separable conv to $C/4$ channels, a 1×1 conv to one channel, and
#
# $$\hat d = d_\text{max}\cdot\operatorname{sigmoid}(z) \in (0, d_\text{max}) .$$
#
# The last conv starts with weights of std 0.01 and bias 0, so $z \approx 0$ and every pixel
# starts at $d_\text{max}/2$ = 40 m. The output conv runs in float32 even under bf16 autocast:
# bf16 has 8 significant bits, which near 80 m are 0.5 m steps.
#
# Below we rebuild it from convs, BatchNorms and ReLUs, with the attribute names of the
# package's `DepthBranch` so that its state dict loads into the package module (§6). The
# `conv_bn` block (bias-free conv + BN with deeplab2's epsilon and momentum) and the activation
# lookup come from the backbone (`minivseg.backbone`, lesson 01).


# %%
def conv_bn_relu(in_channels, out_channels, kernel_size, dilation=1):
    return nn.Sequential(
        conv_bn(in_channels, out_channels, kernel_size, dilation=dilation), nn.ReLU()
    )


def separable(in_channels, out_channels, kernel_size=5):
    """Depthwise k×k + BN + ReLU, then pointwise 1×1 + BN + ReLU."""
    depthwise = nn.Conv2d(
        in_channels,
        in_channels,
        kernel_size,
        padding=kernel_size // 2,
        groups=in_channels,
        bias=False,
    )
    nn.init.kaiming_normal_(depthwise.weight, mode="fan_in", nonlinearity="relu")
    return nn.Sequential(
        OrderedDict(
            depthwise=depthwise,
            depthwise_bn=nn.BatchNorm2d(in_channels, BN_EPS, BN_MOMENTUM),
            depthwise_relu=nn.ReLU(),
            pointwise=conv_bn_relu(in_channels, out_channels, 1),
        )
    )


class LessonASPP(nn.Module):
    def __init__(self, in_channels, channels, rates=(6, 12, 18)):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 1)
        self.atrous = nn.ModuleList(conv_bn_relu(in_channels, channels, 3, r) for r in rates)
        self.pool = conv_bn_relu(in_channels, channels, 1)
        self.project = conv_bn_relu((len(rates) + 2) * channels, channels, 1)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        h, w = x.shape[-2:]
        image = self.pool(x.mean((2, 3), keepdim=True))  # (N, C, 1, 1): one value per frame
        branches = [
            self.conv(x),
            *(conv(x) for conv in self.atrous),
            repeat(image, "n c 1 1 -> n c h w", h=h, w=w),
        ]
        return self.dropout(self.project(torch.cat(branches, 1)))


class LessonDepthBranch(nn.Module):
    """res5 (N, C5, h16, w16), res3 (N, C3, h8, w8), res2 (N, C2, h4, w4) -> (N, h4, w4) metres."""

    def __init__(self, in_channels, channels, max_depth=MAX_DEPTH, activation="relu"):
        super().__init__()
        c5, c3, c2 = in_channels
        self.max_depth = max_depth
        self.act = activation_fn(activation)
        self.aspp = LessonASPP(c5, channels)
        low = (channels // 4, channels // 8)  # deeplab2: 64 and 32 at C = 256
        self.project = nn.ModuleList(conv_bn_relu(c, p, 1) for c, p in zip((c3, c2), low))
        self.fuse = nn.ModuleList(separable(channels + p, channels) for p in low)
        self.head = separable(channels, channels // 4)
        self.output = nn.Conv2d(channels // 4, 1, 1)
        nn.init.trunc_normal_(self.output.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(self.output.bias)

    def forward(self, res5, res3, res2):
        x = self.aspp(self.act(res5))
        for feature, project, fuse in zip((res3, res2), self.project, self.fuse):
            low = project(self.act(feature))
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
            x = fuse(torch.cat([x, low], 1))
        x = self.head(x)
        with torch.autocast(x.device.type, enabled=False):
            z = self.output(x.float())[:, 0]  # (N, h4, w4)
        return self.max_depth * torch.sigmoid(z)


# The tiny preset: res5 = 4 x 128 channels (stage 5's bottleneck width x 4), res3 128, res2 64;
# ASPP/decoder width C = 8 (deeplab2's ViP-DeepLab: C = 256 on 2048/512/256 channels).
TINY_FEATURES, TINY_CHANNELS = (512, 128, 64), 8
branch = LessonDepthBranch(TINY_FEATURES, TINY_CHANNELS)
print(f"rebuilt branch: {sum(p.numel() for p in branch.parameters()):,} parameters")
feature_sizes = [((H - 1) // s + 1, (W - 1) // s + 1) for s in (16, 8, 4)]
features = [torch.randn(2, c, *size) for c, size in zip(TINY_FEATURES, feature_sizes)]
with torch.no_grad():
    initial = branch.eval()(*features)
print(
    f"features at strides 16/8/4: {feature_sizes} -> depth {tuple(initial.shape)}, "
    f"{initial.min():.2f} .. {initial.max():.2f} m at initialisation"
)
assert initial.shape == (2, *feature_sizes[2]) and (initial - MAX_DEPTH / 2).abs().max() < 1

# %% [markdown]
# **Atrous rates on a small map.** The rates 6/12/18 are DeepLab's for output stride 16 on
# ~513-pixel crops. On our 129×417 clip the stride-16 map is only 9×27. A tap of a 3×3 conv at
# dilation $r$ that falls outside the map reads zero padding, so as $r$ approaches the map size
# the 3×3 conv degenerates into a 1×3 conv, then into a 1×1 (DeepLabv3 §3.3 makes this
# observation and adds the image-pool branch for the global context the large rates lose). Below,
# the number of the 9 taps that land inside the map, for every output position. At rate 18 on 9
# rows only the centre row is ever inside. KITTI's 385×1249 training crop gives a 25×79 map, and
# even there rate 18 keeps 4 of the 9 taps on average.


# %%
def taps_inside(shape, rate):
    rows, cols = np.arange(shape[0]), np.arange(shape[1])
    inside_rows = sum(((rows + k * rate >= 0) & (rows + k * rate < shape[0])) for k in (-1, 0, 1))
    inside_cols = sum(((cols + k * rate >= 0) & (cols + k * rate < shape[1])) for k in (-1, 0, 1))
    return inside_rows[:, None] * inside_cols[None, :]  # (h, w) counts in 1..9


fig, axes = plt.subplots(
    2, 3, figsize=(14, 3.6), layout="constrained", gridspec_kw={"height_ratios": [9, 25]}
)
for row, (name, shape) in enumerate([("129×417 clip", (9, 27)), ("385×1249 crop", (25, 79))]):
    for ax, rate in zip(axes[row], (6, 12, 18)):
        counts = taps_inside(shape, rate)
        image = ax.imshow(counts, vmin=1, vmax=9, cmap="viridis", aspect="auto")
        ax.set_title(f"{name}, rate {rate}: mean {counts.mean():.1f} of 9 taps inside", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
fig.colorbar(image, ax=axes, label="taps inside the map")
plt.show()

# %% [markdown]
# ## 3. The depth loss
#
# ViP-DeepLab trains depth with the sum of two terms (deeplab2's `SILogPlusRelativeSquaredLoss`),
# computed per frame over its $n$ pixels with depth ($d^*_i > 0$), then averaged over the frames
# that have any. With $e_i = \log d^*_i - \log \hat d_i$:
#
# $$\mathcal L_\text{SILog} = \frac1n\sum_i e_i^2 - \Big(\frac1n\sum_i e_i\Big)^2, \qquad
# \mathcal L_\text{RelSq} = \sqrt{\frac1n\sum_i\Big(\frac{d^*_i - \hat d_i}{d^*_i}\Big)^2},
# \qquad \mathcal L_\text{depth} = \mathcal L_\text{SILog} + \mathcal L_\text{RelSq} .$$
#
# **SILog** (Eigen et al. 2014) is the *variance* of the log error over the frame. Scaling the
# whole prediction by $s$ adds $-\log s$ to every $e_i$ and leaves the variance unchanged:
#
# $$e_i(s\hat d) = e_i(\hat d) - \log s \quad\Rightarrow\quad
# \mathcal L_\text{SILog}(s\,\hat d) = \mathcal L_\text{SILog}(\hat d) .$$
#
# So SILog only asks for the right *relative* depths (this car twice as far as that one), the
# part of monocular depth that the image shows well. It has no opinion on the global scale,
# which a single image gives only through priors (the size of a car, the height of the camera).
# **RelSq** (Uhrig et al. 2017) pins the scale: it is a root mean squared *relative* error, so
# a 1 m error counts ten times more at 10 m than at 100 m. deeplab2's SILog has Eigen's
# $\lambda = 1$ (fully scale invariant; Eigen trained with $\lambda = 0.5$), no square root and no
# ×100; the package computes it as $\frac1n\sum_i (e_i - \bar e)^2$, the same number without the
# cancellation of the two large sums. Predictions are floored at $10^{-6}$ before the log. The
# model predicts at stride 4, so the prediction is upsampled (bilinear, align corners) to the
# label size before the loss.
#
# A naive version, one frame at a time, indexing the pixels with depth:


# %%
def naive_depth_loss(pred, target):
    """pred, target (..., H, W) metres, target 0 = no depth -> (loss, terms)."""
    silogs, relsqs = [], []
    for p, t in zip(pred.flatten(0, -3), target.flatten(0, -3)):
        valid = t > 0
        if not valid.any():
            continue  # a frame without depth leaves the mean
        p, t = p[valid].clamp_min(1e-6), t[valid]
        e = t.log() - p.log()
        silogs.append((e**2).mean() - e.mean() ** 2)
        relsqs.append((((t - p) / t) ** 2).mean().sqrt())
    if not silogs:
        zero = pred.sum() * 0.0
        return zero, {"depth_silog": zero, "depth_relsq": zero}
    terms = {"depth_silog": torch.stack(silogs).mean(), "depth_relsq": torch.stack(relsqs).mean()}
    return terms["depth_silog"] + terms["depth_relsq"], terms


target = torch.from_numpy(depth_np)  # (T, H, W), the clip of §1
noise = torch.exp(0.2 * torch.randn(T, H, W, generator=torch.Generator().manual_seed(1)))
guess = torch.where(target > 0, target, 30.0) * noise  # right shape, 20% log noise per pixel
base = naive_depth_loss(guess, target)[1]
doubled = naive_depth_loss(2 * guess, target)[1]
print(f"prediction d:   SILog {base['depth_silog']:.5f}   RelSq {base['depth_relsq']:.4f}")
print(f"prediction 2·d: SILog {doubled['depth_silog']:.5f}   RelSq {doubled['depth_relsq']:.4f}")
torch.testing.assert_close(doubled["depth_silog"], base["depth_silog"], rtol=1e-4, atol=1e-6)
assert doubled["depth_relsq"] > 5 * base["depth_relsq"]

scales = torch.logspace(-1, 1, 41, base=4.0)  # s from 1/4 to 4
curves = [naive_depth_loss(s * guess, target)[1] for s in scales]
fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
ax.plot(scales, [c["depth_silog"] for c in curves], label="SILog")
ax.plot(scales, [c["depth_relsq"] for c in curves], label="RelSq")
ax.plot(scales, [c["depth_silog"] + c["depth_relsq"] for c in curves], "k--", label="sum")
ax.set_xscale("log", base=2)
ax.set_xticks([0.25, 0.5, 1, 2, 4], ["1/4", "1/2", "1", "2", "4"])
ax.minorticks_off()
ax.set_xlabel("global scale s of the prediction (s · d)")
ax.set_ylabel("loss")
ax.set_title("SILog ignores the scale, RelSq fixes it", fontsize=10)
ax.legend()
plt.show()

# %% [markdown]
# RelSq is smallest slightly below $s = 1$: a relative error punishes a factor too far more
# than the same factor too near ($\hat d = 2d^*$ costs 1, $\hat d = d^*/2$ costs 0.5, and no
# under-estimate costs more than 1), so with noise its minimum leans towards smaller depths
# (here $s = E[n]/E[n^2] = e^{-0.06} \approx 0.94$ for the log-normal noise $n$). The SILog of the
# noisy guess is $\approx 0.2^2 = 0.04$, the variance of the log noise we put in.
#
# ## 4. DSTQ by hand
#
# SemKITTI-DVPS ranks methods by DSTQ, STQ (lesson 06) with a depth term. With $d^*$ the
# ground truth and $\hat d$ the prediction, pooled over all pixels of all frames of a video:
#
# $$\mathrm{DQ}@\tau = \frac{\#\{\,d^* > 0,\ \hat d > 0,\ \max(\hat d/d^*,\ d^*/\hat d) \le
# \tau\,\}}{\#\{\,d^* > 0\,\}}, \qquad
# \mathrm{DSTQ} = \big(\mathrm{STQ}^2\cdot\mathrm{DQ}\big)^{1/3} =
# \big(\mathrm{AQ}\cdot\mathrm{SQ}\cdot\mathrm{DQ}\big)^{1/3} .$$
#
# The official scorer uses $\tau = 1.25$ alone; deeplab2's class defaults to $\tau \in \{1.25,
# 1.1\}$ and then DQ is the geometric mean $(\prod_\tau \mathrm{DQ}@\tau)^{1/n}$. Every pixel
# with ground-truth depth counts, whatever its panoptic label; the test is $\le \tau$.
#
# Our video has 3 frames of 4 pixels, `[sky, car, car, road]`: the car comes closer (12, 10,
# 8 m), the sky has no depth. The prediction
#
# * calls the sky pixel of frame 0 road (a semantic error),
# * switches the car's id in frame 2 (a tracking error),
# * predicts depth for the sky (ignored: no ground truth), is far off on two car pixels
#   (ratios 1.4 and 1.33), and gives road 5 m for 4 m in frame 2: a ratio of exactly 1.25.
#
# By hand. **AQ**: one GT track of 6 pixels, covered by id 13001 on 4 (IoU 4/6) and by 13002 on
# 2 (IoU 2/6): $\mathrm{AQ} = (4\cdot\frac46 + 2\cdot\frac26)/6 = \frac59$. **SQ** (class IoU,
# blind to ids): sky $\frac23$, car 1, road $\frac34$, so $\mathrm{SQ} = \frac{29}{36}$.
# **DQ@1.25**: 9 pixels with depth, 7 inliers (the 1.25 pixel counts), $\frac79$.


# %%
SKY, CAR, ROAD = 10 * LABEL_DIVISOR, 13 * LABEL_DIVISOR, 0
gt = np.array([[SKY, CAR + 1, CAR + 1, ROAD]] * 3)[:, None]  # (T, H, W) = (3, 1, 4)
pred = gt.copy()
pred[0, 0, 0] = ROAD  # sky called road
pred[2, 0, 1:3] = CAR + 2  # id switch
gt_depth = np.array([[0, 12, 12, 5], [0, 10, 10, 5], [0, 8, 8, 4]], np.float32)[:, None]
pred_depth = np.array([[80, 13, 11, 5.4], [80, 10.5, 14, 4.5], [80, 8, 6, 5]], np.float32)[:, None]


def depth_quality(gt_depth, pred_depth, tau):
    labelled = gt_depth > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(pred_depth / gt_depth, gt_depth / pred_depth)
    inliers = labelled & (pred_depth > 0) & (ratio <= tau)
    return Fraction(int(inliers.sum()), int(labelled.sum())), ratio


stq = STQ(NUM_CLASSES, THING_CLASSES)
for t in range(3):
    stq.update(gt[t], pred[t])
aq, sq = stq.result()["AQ"], stq.result()["SQ"]
assert np.isclose(aq, 5 / 9) and np.isclose(sq, 29 / 36)
dq, ratio = depth_quality(gt_depth, pred_depth, 1.25)
dq_tight, _ = depth_quality(gt_depth, pred_depth, 1.1)
dstq_hand = (aq * sq * float(dq)) ** (1 / 3)
dq_both = float(dq * dq_tight) ** 0.5  # geometric mean over the two thresholds
dstq_both_hand = (aq * sq * dq_both) ** (1 / 3)
print(
    f"AQ {aq:.4f} (5/9)  SQ {sq:.4f} (29/36)  DQ@1.25 {dq} = {float(dq):.4f}  "
    f"DQ@1.1 {dq_tight} = {float(dq_tight):.4f}"
)
print(
    f"by hand: DSTQ = (AQ·SQ·DQ@1.25)^(1/3) = {dstq_hand:.6f};  "
    f"with τ ∈ {{1.25, 1.1}}: DQ {dq_both:.4f}, DSTQ {dstq_both_hand:.6f}"
)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.4), layout="constrained")
for ax, labels, values, title in (
    (axes[0], gt, gt_depth, "ground truth: ids, depth d*"),
    (axes[1], pred, pred_depth, "prediction: ids, depth d̂"),
):
    ax.imshow(colorize(labels[:, 0]))
    for t in range(3):
        for x in range(4):
            text = f"{labels[t, 0, x]}\n{values[t, 0, x]:g} m"
            if ax is axes[1] and gt_depth[t, 0, x] > 0:
                text += f"\n{ratio[t, 0, x]:.2f} " + ("✓" if ratio[t, 0, x] <= 1.25 else "✗")
            ax.text(x, t, text, ha="center", va="center", fontsize=8, color="white")
    ax.set(title=title, xticks=range(4), yticks=range(3), ylabel="frame", xlabel="pixel")
axes[1].set_title("prediction: ids, depth d̂, ratio max(d̂/d*, d*/d̂) ≤ 1.25?")
plt.show()

# %% [markdown]
# The same video through `minivseg.dstq.DSTQ` (which adds the depth counts to `STQ`):

# %%
from minivseg.dstq import DSTQ

dstq = DSTQ(NUM_CLASSES, THING_CLASSES)  # depth_threshold=1.25, the official scorer's
dstq_both = DSTQ(NUM_CLASSES, THING_CLASSES, depth_threshold=(1.25, 1.1))  # deeplab2's default
for t in range(3):
    dstq.update(gt[t], pred[t], gt_depth[t], pred_depth[t])
    dstq_both.update(gt[t], pred[t], gt_depth[t], pred_depth[t])
package_dstq, package_both = dstq.result(), dstq_both.result()
print(
    f"package: DSTQ {package_dstq['DSTQ']:.6f}  DQ {package_dstq['DQ']:.4f}  "
    f"STQ {package_dstq['STQ']:.4f};  τ ∈ {{1.25, 1.1}}: DSTQ {package_both['DSTQ']:.6f}"
)
assert np.isclose(package_dstq["DSTQ"], dstq_hand) and np.isclose(package_dstq["DQ"], 7 / 9)
assert np.isclose(package_both["DSTQ"], dstq_both_hand) and np.isclose(package_both["DQ"], dq_both)
assert np.isclose(package_both["DQ@1.1"], 5 / 9)

# %% [markdown]
# **The usual depth errors** on the same video (`minivseg.depth_metrics.DepthMetrics`, deeplab2's
# numbers plus KITTI's RMSE), each per frame on its pixels with depth, then averaged over frames:
#
# $$\text{abs rel} = \frac1n\sum_i\frac{|\hat d_i - d^*_i|}{d^*_i}, \quad
# \text{sq rel} = \frac1n\sum_i\Big(\frac{\hat d_i - d^*_i}{d^*_i}\Big)^2, \quad
# \text{RMSE} = \sqrt{\frac1n\sum_i(\hat d_i - d^*_i)^2}, \quad
# \delta_{1.25} = \frac1n\#\{\max(\tfrac{\hat d_i}{d^*_i}, \tfrac{d^*_i}{\hat d_i}) < 1.25\} .$$
#
# $\delta_{1.25}$ looks like DQ@1.25 but differs twice: it is a *strict* $<$, and it is a mean of
# per-frame shares, not a share of pooled pixels. Here every frame has 3 pixels with depth, so
# only the first difference shows: the road pixel at exactly 1.25 is an inlier for DQ and an
# outlier for $\delta$, $\frac79$ against $\frac69$. (deeplab2's "sq rel" is the squared
# *relative* error, dimensionless, not Eigen's $\sum(\hat d - d^*)^2/d^*$ in metres.)

# %%
errors = DepthMetrics()
for t in range(3):
    errors.update(gt_depth[t], pred_depth[t])
errors = errors.result()
print(
    "  ".join(f"{k} {errors[k]:.4f}" for k in ("abs_rel", "sq_rel", "rmse", "delta_1.25", "silog"))
)
labelled = gt_depth > 0
relative = (pred_depth - gt_depth)[labelled].reshape(3, 3) / gt_depth[labelled].reshape(3, 3)
assert np.isclose(errors["abs_rel"], np.abs(relative).mean())
assert np.isclose(errors["delta_1.25"], 6 / 9) and float(dq) == 7 / 9

# %% [markdown]
# ## 5. Training the depth branch of the tiny TubeFormer
#
# `build_model("tiny", depth=True)` is the tiny TubeFormer of lesson 02 (2.0 M parameters) plus
# a depth branch of width 8 (+120,462 parameters), and its output dict gains `depth`
# (B, T, h, w) in metres at stride 4. We swap in our rebuilt branch, with the package branch's
# initial weights, so the training below trains *our* module inside the package model. The loss
# is `DepthAwareLoss`: the tube loss of lesson 04 plus $100\cdot\mathcal L_\text{depth}$ of the
# upsampled prediction (targets beyond `max_depth` count as unknown), as in §3.2 of the paper.
# Adam with lr $10^{-2}$, batch 1, on the clip of §1, as the package test does.

# %%
from minivseg.depth import DepthAwareLoss
from minivseg.tube_loss import TubeLoss
from minivseg.tubeformer import build_model

STEPS = 60
torch.manual_seed(0)
model = build_model("tiny", depth=True).train()
assert model.depth_branch.aspp.conv[0].conv.in_channels == TINY_FEATURES[0]
with torch.random.fork_rng():  # leave the random stream (dropout) as the package test has it
    ours = LessonDepthBranch(TINY_FEATURES, TINY_CHANNELS)
ours.load_state_dict(model.depth_branch.state_dict(), strict=True)
model.depth_branch = ours
cfg = model.cfg
criterion = DepthAwareLoss(TubeLoss(cfg.num_classes, cfg.thing_classes, cfg.num_slots), 100.0)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
batch = dict(
    frames=torch.from_numpy(frames_np).permute(0, 3, 1, 2)[None].float(),  # (1, T, 3, H, W)
    panoptic=torch.from_numpy(panoptic_np)[None],
    depth=target[None],  # (1, T, H, W) metres, 0 = none
)


def at_label_size(depth):
    """(B, T, h, w) at stride 4 -> (B, T, H, W), bilinear with aligned corners."""
    return F.interpolate(depth, size=(H, W), mode="bilinear", align_corners=True)


history, start = [], time.perf_counter()
for step in range(STEPS):
    outputs = model(batch["frames"])
    total, terms = criterion(outputs, batch)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    history.append({k: terms[k].item() for k in ("depth", "depth_silog", "depth_relsq")})
    if step == 0:
        first = at_label_size(outputs["depth"].detach())[0]
print(
    f"{STEPS} steps in {time.perf_counter() - start:.1f} s; depth loss "
    f"{history[0]['depth']:.3f} (step 0), {history[29]['depth']:.3f} (step 29), "
    f"{history[-1]['depth']:.3f} (step {STEPS - 1}) "
    f"(SILog {history[0]['depth_silog']:.3f} -> {history[-1]['depth_silog']:.3f}, "
    f"RelSq {history[0]['depth_relsq']:.3f} -> {history[-1]['depth_relsq']:.3f})"
)
assert history[-1]["depth"] < 0.5 * history[0]["depth"]

fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
for key, label in (("depth", "depth loss"), ("depth_silog", "SILog"), ("depth_relsq", "RelSq")):
    ax.plot([h[key] for h in history], label=label)
ax.set_xlabel("Adam step")
ax.set_ylabel("unweighted loss")
ax.set_yscale("log")
ax.legend()
plt.show()

# %% [markdown]
# Now the prediction, next to the truth. We run the model once more in training mode, so that
# BatchNorm normalises with this clip's statistics, as in the steps above. `depth_picture`
# scales each picture's colours by its own nearest depth, so the two colourings are comparable
# in shape, not in exact shade; the ratio map and the scatter plot compare the numbers.

# %%
captured = []  # the branch's inputs (res5, res3, res2): the check of §6 uses real features
hook = model.depth_branch.register_forward_pre_hook(lambda module, inputs: captured.append(inputs))
with torch.no_grad():
    trained = at_label_size(model(batch["frames"])["depth"])[0]  # (T, H, W)
hook.remove()


def depth_report(prediction):
    metrics = DepthMetrics()
    for t in range(T):
        metrics.update(depth_np[t], prediction[t].numpy())
    dq_value, _ = depth_quality(depth_np, prediction.numpy(), 1.25)
    return metrics.result() | {"DQ@1.25": float(dq_value)}


for name, prediction in (("step 0", first), (f"step {STEPS}", trained)):
    r = depth_report(prediction)
    print(
        f"{name:>8}: abs rel {r['abs_rel']:.3f}  RMSE {r['rmse']:5.2f} m  "
        f"δ<1.25 {r['delta_1.25']:.3f}  DQ@1.25 {r['DQ@1.25']:.3f}"
    )

ratio_map = torch.maximum(trained / target, target / trained).where(target > 0, torch.nan)
fig, axes = plt.subplots(2, 2, figsize=(14, 5), layout="constrained")
axes[0, 0].imshow(depth_picture(depth_np[0], MAX_DEPTH))
axes[0, 0].set_title("ground truth, frame 0")
axes[0, 1].imshow(depth_picture(trained[0].numpy(), MAX_DEPTH))
axes[0, 1].set_title(f"predicted after {STEPS} steps (step 0: {first.mean():.0f} m everywhere)")
image = axes[1, 0].imshow(ratio_map[0], vmin=1, vmax=2, cmap="magma_r")
axes[1, 0].set_title("max(d̂/d*, d*/d̂) (white: no depth; DQ@1.25 counts ≤ 1.25)")
fig.colorbar(image, ax=axes[1, 0])
for ax in axes.flat[:3]:
    ax.set_xticks([])
    ax.set_yticks([])
sample = target[0] > 0
axes[1, 1].scatter(target[0][sample][::23], trained[0][sample][::23], s=2, alpha=0.4)
axes[1, 1].plot([5, MAX_DEPTH], [5, MAX_DEPTH], "k--", linewidth=0.8)
axes[1, 1].set(
    xscale="log",
    yscale="log",
    xlabel="true depth (m)",
    ylabel="predicted depth (m)",
    title="every 23rd pixel with depth, frame 0",
)
for axis in (axes[1, 1].xaxis, axes[1, 1].yaxis):
    axis.set_ticks([5, 10, 20, 40, 80], ["5", "10", "20", "40", "80"])
    axis.set_minor_locator(plt.NullLocator())
plt.show()

# %% [markdown]
# With the package branch's initial weights, and the random stream of the ASPP dropout left as it
# was, our branch follows the package test's trajectory (`tests/test_depth.py`: 2.81 → 1.00 in
# 30 steps). Sixty steps learn the *layout* of this clip: the road comes nearer towards the
# bottom of the image, the facades recede, and about 80% of the pixels end within a ratio of
# 1.25 (DQ@1.25), where the untrained 40 m everywhere had 5%.
#
# They cannot teach monocular depth: the model has seen one street. And the tiny head shows its
# width. A quarter of the image sits at exactly one depth, the flat tail of the scatter plot:
# there both of the head's $C/4 = 2$ ReLU channels are zero, so the output is the bias alone,
# $d_\text{max}\,\operatorname{sigmoid}(b)$. That covers the far street and the vegetation, half
# of the car ahead, and the sky, which has no target to move it (deeplab2's head has 64
# channels). Sixty steps also leave BatchNorm's running statistics behind: with momentum 0.01
# they have moved only $1 - 0.99^{60} \approx 45\%$ of the way from their initial values, so the
# same weights in evaluation mode predict much worse.

# %%
plateau = ours.max_depth * torch.sigmoid(ours.output.bias).item()  # z = b where the head is 0
at_plateau = (trained - plateau).abs() < 1e-3
print(
    f"d_max·sigmoid(b) = {plateau:.2f} m on {at_plateau.float().mean():.0%} of the pixels "
    f"({at_plateau[target > 0].float().mean():.0%} of those with depth, "
    f"{at_plateau[torch.from_numpy(panoptic_np // LABEL_DIVISOR == 13)].float().mean():.0%} "
    "of the car pixels)"
)
with torch.no_grad():
    eval_loss, eval_terms = criterion(model.eval()(batch["frames"]), batch)
print(
    f"evaluation mode after {STEPS} steps: depth loss {eval_terms['depth']:.3f} "
    f"(training mode: {history[-1]['depth']:.3f})"
)
model.train()

# %% [markdown]
# ## 6. Check against the package
#
# **The branch.** The rebuilt branch, trained inside the model in §5, is loaded into a fresh
# `minivseg.depth.DepthBranch` with `strict=True`: every name and shape must agree, with no key
# left over on either side. Both must then give the same depth on the features the trained model
# produced for our clip, in evaluation mode and in training mode (BatchNorm on batch statistics;
# the ASPP dropout draws the same mask from the same seed), and on random inputs. The package
# branch also takes the GeLU activation (`--model.activation=gelu`), which we check at another
# width and depth range.

# %%
from minivseg.depth import DepthBranch, depth_loss

package = DepthBranch(TINY_FEATURES, TINY_CHANNELS, MAX_DEPTH)
package.load_state_dict(ours.state_dict(), strict=True)
real_features = captured[0]  # res5, res3, res2 of the two frames of the clip
for mode in ("eval", "train"):
    for inputs in (real_features, features):
        getattr(ours, mode)()
        getattr(package, mode)()
        with torch.no_grad():
            torch.manual_seed(7)
            expected = ours(*inputs)
            torch.manual_seed(7)
            torch.testing.assert_close(package(*inputs), expected)

gelu_ours = LessonDepthBranch(TINY_FEATURES, 16, max_depth=12.0, activation="gelu")
gelu_package = DepthBranch(TINY_FEATURES, 16, max_depth=12.0, activation="gelu")
gelu_package.load_state_dict(gelu_ours.state_dict(), strict=True)
with torch.no_grad():
    torch.testing.assert_close(gelu_package.eval()(*features), gelu_ours.eval()(*features))
print(
    f"DepthBranch: {len(ours.state_dict())} tensors loaded strictly, same depth "
    "(trained features and random ones, eval and train mode, relu and gelu)"
)

# %% [markdown]
# **The loss.** The naive loss of §3 against `depth_loss`, value and gradient: on random depths
# with a third of the pixels unlabelled and one frame with none, and on the trained model's
# prediction for our clip.

# %%
generator = torch.Generator().manual_seed(3)
random_pred = torch.rand(2, 3, 9, 13, generator=generator) * 70 + 1
random_target = (torch.rand(2, 3, 9, 13, generator=generator) * 70 + 1) * (
    torch.rand(2, 3, 9, 13, generator=generator) < 0.67
)
random_target[1, 2] = 0  # a frame without depth
for p, t in ((random_pred, random_target), (trained[None], target[None])):
    p_ours, p_package = p.clone().requires_grad_(), p.clone().requires_grad_()
    loss_ours, terms_ours = naive_depth_loss(p_ours, t)
    loss_package, terms_package = depth_loss(p_package, t)
    loss_ours.backward()
    loss_package.backward()
    torch.testing.assert_close(loss_package, loss_ours)
    for name in terms_ours:
        torch.testing.assert_close(terms_package[name], terms_ours[name])
    torch.testing.assert_close(p_package.grad, p_ours.grad, rtol=1e-4, atol=1e-9)
    print(f"depth_loss {loss_package.item():.6f} = naive {loss_ours.item():.6f}, gradients equal")
print(f"lesson ran in {time.perf_counter() - LESSON_START:.0f} s")
