# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 02 · Dual-path transformers: a memory of tube queries, latent and global
#
# TubeFormer-DeepLab predicts a video as a **set of N tubes**. Each tube is one slot of a learned
# *global memory* $x_m \in \mathbb{R}^{N\times C}$. The memory reads the video, and each slot
# becomes a class and a tube embedding $w$. The tube is the dot product of $w$ with the video
# pixel embedding $x'_v$ (TubeFormer Eq. (1)):
#
# $$\hat m = \operatorname{softmax}_N\!\left(x'_v \cdot w\right) \in \mathbb{R}^{N\times T\times H\times W}.$$
#
# The memory and the pixels talk through **dual-path transformer** layers (MaX-DeepLab's
# architecture; TubeFormer §3.2, Fig. 3). This lesson rebuilds them from scratch:
#
# 1. a toy clip with three tubes,
# 2. attention with BatchNorm instead of $1/\sqrt{d}$,
# 3. the dual-path layer: M2V + M2M in one softmax, an FFN, then V2M,
# 4. the latent memory: the same layer, one frame at a time,
# 5. the hierarchical block: axial block → latent dual-path → global dual-path,
# 6. a tiny model trained on the toy clip, and its attention maps drawn,
#
# then loads the weights into `minivseg.dual_path.GlobalDualPath` and `LatentDualPath` and checks
# that they give the same outputs. It ends with the assembled model, `minivseg.tubeformer`, and
# its measured size and cost.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivseg.backbone import BottleneckBlock  # lesson 01: the axial block

torch.manual_seed(0)
start = time.time()

# %% [markdown]
# ## 1. A toy clip
#
# Take $T=3$ frames of $24\times 32$ pixels. A red square moves right and a blue square moves
# down, on a grey background. The ground truth has three **tubes**: background, red and blue.
# A tube is one mask over all $T\cdot H\cdot W$ pixels. The red square is one object in every
# frame, so it is one tube.

# %%
T, H, W = 3, 24, 32


def toy_clip():
    """frames (T, 3, H, W) in [0, 1] and tube ids (T, H, W): 0 background, 1 red, 2 blue."""
    frames = torch.full((T, 3, H, W), 0.5)
    tubes = torch.zeros(T, H, W, dtype=torch.long)
    for t in range(T):
        r0, c0 = 4, 3 + 7 * t  # red moves right
        b0, d0 = 2 + 6 * t, 20  # blue moves down
        tubes[t, r0 : r0 + 8, c0 : c0 + 8] = 1
        tubes[t, b0 : b0 + 7, d0 : d0 + 7] = 2
    colors = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.1, 0.1], [0.1, 0.2, 0.9]])
    frames = colors[tubes].permute(0, 3, 1, 2) + 0.05 * torch.randn(T, 3, H, W)
    return frames.clamp(0, 1), tubes


frames, tubes = toy_clip()
fig, axes = plt.subplots(2, T, figsize=(9, 4))
for t in range(T):
    axes[0, t].imshow(frames[t].permute(1, 2, 0))
    axes[0, t].set_title(f"frame {t}")
    axes[1, t].imshow(tubes[t], cmap="tab10", vmin=0, vmax=9)
    axes[1, t].set_title(f"tube ids, frame {t}")
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Attention with BatchNorm instead of $1/\sqrt{d}$
#
# deeplab2 never scales the logits by $1/\sqrt{d}$. A BatchNorm on the logits (one channel per
# head) sets their scale, and a second BatchNorm plus a ReLU follows the retrieved values:
#
# $$y_a = \operatorname{ReLU}\Big(\mathrm{BN}\Big(\sum_n \operatorname{softmax}_n
# \big(\mathrm{BN}_h(q_a \cdot k_n)\big)\, v_n\Big)\Big).$$
#
# Every "linear" layer is a bias-free projection followed by BatchNorm (deeplab2's `Conv1D`).
# The q/k/v projections use the standard transformer init, std $=C_\text{in}^{-1/2}$. The
# last BN of each residual branch starts at $\gamma=0$, so each branch starts switched off.

# %%
BN = dict(eps=1e-3, momentum=0.01)  # deeplab2's TF momentum 0.99


class LinearBN(nn.Module):
    def __init__(self, c_in, c_out, gamma=1.0, std=None):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out, **BN)
        nn.init.constant_(self.bn.weight, gamma)
        if std is None:
            nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        else:
            nn.init.trunc_normal_(self.linear.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x):  # (..., C_in) -> (..., C_out); BN statistics over all leading axes
        y = self.linear(x)
        return self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)


class Attention(nn.Module):
    def __init__(self, heads, value_channels):
        super().__init__()
        self.heads = heads
        self.logits_bn = nn.BatchNorm2d(heads, **BN)
        self.values_bn = nn.BatchNorm1d(value_channels, **BN)
        self.last_weights = None  # kept for the figures below

    def forward(self, q, k, v):  # (B, Q, kd), (B, K, kd), (B, K, vd) -> (B, Q, vd)
        q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=self.heads) for x in (q, k, v))
        logits = self.logits_bn(torch.einsum("bhqd,bhkd->bhqk", q, k))  # no 1/sqrt(d)
        self.last_weights = logits.softmax(-1)
        out = rearrange(
            torch.einsum("bhqk,bhkd->bhqd", self.last_weights, v), "b h q d -> b q (h d)"
        )
        return F.relu(self.values_bn(out.reshape(-1, out.shape[-1])).view_as(out))


# %% [markdown]
# ## 3. The dual-path layer
#
# Two paths: pixels $x_v \in \mathbb{R}^{P\times C_p}$ (for the global layer, all $P = T\cdot h\cdot w$
# pixels of the clip) and memory $x_m\in\mathbb{R}^{N\times C_m}$. Both are projected to q, k, v.
# Then:
#
# **M2V + M2M in one softmax.** A memory query attends to the pixels and to the other memory
# slots *together*:
#
# $$y^m_a = \sum_{n=1}^{P+N}\operatorname{softmax}_n\!\left(q^m_a\cdot k^{vm}_n\right) v^{vm}_n,
# \qquad k^{vm} = \begin{bmatrix}k^v\\ k^m\end{bmatrix},\; v^{vm} = \begin{bmatrix}v^v\\ v^m\end{bmatrix}.$$
#
# This is followed by a projection, the residual add with ReLU, and an FFN (2048 wide in MaX-S)
# with residual add and ReLU.
#
# **V2M.** Each pixel reads the memory, $y^v_a = \sum_{n=1}^{N}\operatorname{softmax}_n(q^v_a\cdot
# k^m_n)\,v^m_n$. It uses the k/v of the layer's **input** memory, so it does not see this
# layer's memory update. It is added to the pixels with no activation after the add.
#
# The attribute names below are those of `minivseg.dual_path`, so the state dicts match.


# %%
class DualPath(nn.Module):
    def __init__(self, c_pixel, c_memory, bottleneck=32, key=16, value=32, heads=2, ffn=64):
        super().__init__()
        self.split = (key, key, value)
        std = bottleneck**-0.5
        self.memory_conv1 = LinearBN(c_memory, bottleneck)
        self.pixel_conv1 = LinearBN(c_pixel, bottleneck)
        self.memory_qkv = LinearBN(bottleneck, 2 * key + value, std=std)
        self.pixel_qkv = LinearBN(bottleneck, 2 * key + value, std=std)
        self.pixel_attention = Attention(heads, value)
        self.pixel_conv3 = LinearBN(value, c_pixel, gamma=0.0)
        self.memory_attention = Attention(heads, value)
        self.memory_conv3 = LinearBN(value, c_memory, gamma=0.0)
        self.memory_ffn1 = LinearBN(c_memory, ffn)
        self.memory_ffn2 = LinearBN(ffn, c_memory, gamma=0.0)

    def forward(self, pixels, memory):  # (B, P, Cp) non-activated, (B, N, Cm)
        q_m, k_m, v_m = self.memory_qkv(F.relu(self.memory_conv1(memory))).split(self.split, -1)
        p = F.relu(self.pixel_conv1(F.relu(pixels)))
        q_p, k_p, v_p = self.pixel_qkv(p).split(self.split, -1)
        # V2M with the input memory's keys and values
        pixels = pixels + self.pixel_conv3(self.pixel_attention(q_p, k_m, v_m))
        # M2V + M2M: ONE softmax over [pixels; memory]
        y = self.memory_attention(q_m, torch.cat([k_p, k_m], 1), torch.cat([v_p, v_m], 1))
        memory = F.relu(memory + self.memory_conv3(y))
        memory = F.relu(memory + self.memory_ffn2(F.relu(self.memory_ffn1(memory))))
        return pixels, memory


layer = DualPath(c_pixel=24, c_memory=32)
pixels, memory = torch.randn(2, 50, 24), torch.randn(2, 6, 32)
p_out, m_out = layer(pixels, memory)
print("pixels", tuple(p_out.shape), "memory", tuple(m_out.shape))
print("gamma-0 init: pixels unchanged?", torch.allclose(p_out, pixels),
      "| memory = ReLU(input)?", torch.allclose(m_out, F.relu(memory)))  # fmt: skip

# %% [markdown]
# **Why one softmax matters.** With one softmax, a memory slot *divides* its attention between
# pixels and slots: $\sum_{n\le P} w_n + \sum_{n>P} w_n = 1$. Two separate softmaxes, summed,
# would give each side a full unit of attention. That is a different model. Here is the split
# of attention mass between pixels and memory for each slot:

# %%
weights = layer.memory_attention.last_weights.detach()  # (B, h, N, P + N)
P = pixels.shape[1]
print("mass on pixels per slot (batch 0, head 0):", weights[0, 0, :, :P].sum(-1))
print("mass on memory per slot (batch 0, head 0):", weights[0, 0, :, P:].sum(-1))

# %% [markdown]
# ## 4. Latent memory: the same layer, one frame at a time
#
# Attending to all $T\cdot h\cdot w$ pixels of a clip is hard to learn at high resolution.
# TubeFormer therefore first lets each **frame** talk to a small latent memory
# $x_l\in\mathbb{R}^{L\times C}$ ($L=16$), copied per frame. This is latent-to-frame (L2F) plus
# latent-to-latent (L2L) attention in one softmax, then frame-to-latent (F2L). It is exactly the
# dual-path layer with the frames folded into the batch:
#
# $$y^l_{t,a} = \sum_{n=1}^{hw+L}\operatorname{softmax}_n\!\left(q^l_{t,a}\cdot
# \begin{bmatrix}k^f_t\\ k^l_t\end{bmatrix}_n\right)\begin{bmatrix}v^f_t\\ v^l_t\end{bmatrix}_n .$$
#
# Frame $t$ only sees its own pixels and its own latent copy, so frames never exchange
# information here. We check that below: change frame 2 and watch frame 1.


# %%
class LatentDualPath(DualPath):
    def forward(self, pixels, latent):  # (B, T, P, C), (B, T, L, C)
        T = pixels.shape[1]
        p, l = super().forward(rearrange(pixels, "b t p c -> (b t) p c"),
                               rearrange(latent, "b t l c -> (b t) l c"))  # fmt: skip
        return rearrange(p, "(b t) p c -> b t p c", t=T), rearrange(l, "(b t) l c -> b t l c", t=T)


latent_layer = LatentDualPath(24, 32).eval()
for module in latent_layer.modules():  # switch the gamma-0 branches on for this check
    if isinstance(module, nn.BatchNorm1d):
        nn.init.ones_(module.weight)
video, lat = torch.randn(1, T, 40, 24), torch.randn(1, 1, 4, 32).expand(1, T, 4, 32)
changed = video.clone()
changed[:, 1] += 3 * torch.randn(40, 24)
with torch.no_grad():
    (a, la), (b, lb) = latent_layer(video, lat), latent_layer(changed, lat)
print("latent: frame 0 latent changed by", (la[:, 0] - lb[:, 0]).abs().max().item())
print("latent: frame 1 latent changed by", (la[:, 1] - lb[:, 1]).abs().max().item())

# %% [markdown]
# ## 5. The hierarchical block
#
# TubeFormer (Fig. 3) stacks blocks of three parts. An **axial block** (frame-level pixel
# attention, F2F, from lesson 01) runs first. The **latent** dual-path (frame ↔ latent) comes next,
# and the **global** dual-path (clip ↔ global memory) comes last. Stacking the blocks alternates
# frame-level and clip-level communication.


# %%
class HierarchicalBlock(nn.Module):
    def __init__(self, pixel_block, latent, global_path):
        super().__init__()
        self.pixel_block, self.latent, self.global_path = pixel_block, latent, global_path

    def forward(self, video, memory, latent):  # (B, T, C, h, w), (B, N, C), (B, T, L, C)
        B, T = video.shape[:2]
        x = self.pixel_block(rearrange(video, "b t c h w -> (b t) c h w"))  # F2F, per frame
        h, w = x.shape[-2:]
        pixels = rearrange(x, "(b t) c h w -> b t (h w) c", b=B)
        pixels, latent = self.latent(pixels, latent)  # L2F, L2L, F2L, per frame
        clip, memory = self.global_path(rearrange(pixels, "b t p c -> b (t p) c"), memory)
        pixels = rearrange(clip, "b (t h w) c -> b t c h w", t=T, h=h)  # M2V, M2M, V2M
        return pixels, memory, latent


# %% [markdown]
# ## 6. A tiny tube model on the toy clip
#
# We give the toy pixels a 3×3 conv stem (RGB plus x/y coordinates) and stack two hierarchical
# blocks with $N=4$ global slots and $L=4$ latent slots. The heads follow MaX-DeepLab: a tube
# embedding $w$ per slot and a pixel embedding $x'_v$ (BN and L2 normalisation), with tube
# logits $x'_v\cdot w$ passed through a single-channel BN whose $\gamma$ starts at 0.1. The
# target assigns slot $k$ to tube $k$ (no matching here; lesson 04 does the matching), and we
# train with cross-entropy over the slots.

# %%
C, N, L = 32, 4, 4


class ToyTubeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(5, C, 3, padding=1, bias=False), nn.BatchNorm2d(C, **BN)
        )
        self.blocks = nn.ModuleList(
            HierarchicalBlock(BottleneckBlock(C, C // 4, axial=True, num_heads=2),
                              LatentDualPath(C, C), DualPath(C, C))
            for _ in range(2)
        )  # fmt: skip
        self.memory = nn.Parameter(torch.randn(1, N, C))
        self.latent = nn.Parameter(torch.randn(1, 1, L, C))
        self.mask_head = LinearBN(C, 16)
        self.pixel_head = nn.Sequential(nn.Conv2d(C, 16, 1), nn.BatchNorm2d(16, **BN))
        self.mask_bn = nn.BatchNorm1d(1, **BN)
        nn.init.constant_(self.mask_bn.weight, 0.1)

    def forward(self, frames):  # (B, T, 3, H, W) -> tube logits (B, N, T, H, W)
        B, T, _, H, W = frames.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
        coords = torch.stack([ys, xs]).expand(B * T, 2, H, W)
        x = self.stem(torch.cat([rearrange(frames, "b t c h w -> (b t) c h w"), coords], 1))
        video, memory = rearrange(x, "(b t) c h w -> b t c h w", b=B), self.memory.expand(B, -1, -1)
        latent = self.latent.expand(B, T, -1, -1)
        for block in self.blocks:
            video, memory, latent = block(video, memory, latent)
        embedding = F.normalize(self.pixel_head(F.relu(video.flatten(0, 1))), dim=1)
        embedding = rearrange(embedding, "(b t) d h w -> b d t h w", b=B)
        logits = torch.einsum("bnd,bdthw->bnthw", self.mask_head(memory), embedding)  # Eq. (1)
        return self.mask_bn(logits.reshape(B, 1, -1)).view_as(logits)


model = ToyTubeModel()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
clip, target = frames[None], tubes[None]
losses = []
for _ in range(80):
    loss = F.cross_entropy(model(clip), target)  # softmax over the N slots
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
with torch.no_grad():
    accuracy = (model(clip).argmax(1) == target).float().mean().item()
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; pixel accuracy {accuracy:.3f}")

# %% [markdown]
# ## Attention maps
#
# Which pixels does each global slot read? Take the M2V part of the last global layer's
# attention (the first $P$ keys of the one softmax), averaged over heads, and fold it back to
# $T\times H\times W$. One softmax covers all three frames, so a slot can gather evidence along
# a **whole tube** at once (in this run, slot 2 reads the blue square in every frame). What a
# slot reads is not necessarily the mask it predicts: the mask comes from its embedding $w$. The
# latent slots (bottom rows) have one softmax per frame, so each map covers a single frame.

# %%
model.train()  # BN with batch statistics, as during training
with torch.no_grad():
    predicted = model(clip).argmax(1)[0]
global_attention = model.blocks[-1].global_path.memory_attention.last_weights  # (1, h, N, P + N)
m2v = rearrange(global_attention[0, :, :, : T * H * W].mean(0), "n (t h w) -> n t h w", t=T, h=H)
latent_attention = model.blocks[-1].latent.memory_attention.last_weights  # (T, h, L, hw + L)
l2f = rearrange(latent_attention[:, :, :, : H * W].mean(1), "t l (h w) -> l t h w", h=H)

fig, axes = plt.subplots(1 + 3 + 2, T, figsize=(8, 13))
for t in range(T):
    axes[0, t].imshow(predicted[t], cmap="tab10", vmin=0, vmax=9)
    axes[0, t].set_title(f"predicted tubes, frame {t}", fontsize=9)
    for n in range(3):
        axes[1 + n, t].imshow(m2v[n, t], cmap="magma", vmin=0, vmax=m2v[n].max())
        axes[1 + n, t].set_title(f"global slot {n}: M2V, frame {t}", fontsize=9)
    for j in range(2):
        axes[4 + j, t].imshow(l2f[j, t], cmap="viridis")
        axes[4 + j, t].set_title(f"latent slot {j}: L2F, frame {t}", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()

plt.figure(figsize=(4, 2.5))
plt.plot(losses)
plt.xlabel("step")
plt.ylabel("cross-entropy over slots")
plt.title("toy tube model")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Check against the package
#
# `minivseg.dual_path.GlobalDualPath` is the layer of section 3, with MaX-DeepLab-S sizes by
# default and drop path. `LatentDualPath` is section 4. Load our trained weights into them
# (`strict=True`: the same parameter and buffer names) and compare outputs in eval mode.

# %%
from minivseg.dual_path import GlobalDualPath as PackageGlobal
from minivseg.dual_path import LatentDualPath as PackageLatent

sizes = dict(bottleneck_channels=32, key_channels=16, value_channels=32, num_heads=2,
             ffn_channels=64)  # fmt: skip
ours_global, ours_latent = model.blocks[-1].global_path.eval(), model.blocks[-1].latent.eval()
package_global = PackageGlobal(C, memory_channels=C, **sizes).eval()
package_latent = PackageLatent(C, latent_channels=C, **sizes).eval()
package_global.load_state_dict(ours_global.state_dict(), strict=True)
package_latent.load_state_dict(ours_latent.state_dict(), strict=True)

video_pixels, clip_memory = torch.randn(2, T * 40, C), torch.randn(2, N, C)
frame_pixels, frame_latent = torch.randn(2, T, 40, C), torch.randn(2, T, L, C)
with torch.no_grad():
    for ours, theirs in zip(ours_global(video_pixels, clip_memory),
                            package_global(video_pixels, clip_memory)):  # fmt: skip
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(ours_latent(frame_pixels, frame_latent),
                            package_latent(frame_pixels, frame_latent)):  # fmt: skip
        torch.testing.assert_close(ours, theirs)
print("GlobalDualPath and LatentDualPath match the lesson's layers.")

# %% [markdown]
# ## The assembled model
#
# `minivseg.tubeformer.build_model` stacks these layers into TubeFormer-DeepLab (its module
# docstring draws the data flow): the backbone of lesson 01 per frame, four hierarchical blocks
# at stride 16, the stride-4 pixel decoder, and the heads of section 6 with MaX-DeepLab's class
# head and void prior. The `tiny` preset runs on a CPU; any `TubeFormerConfig` field is an
# override, e.g. `build_model("kitti", use_latent=False, n=2, gradient_checkpointing=True)`.
# Drop path follows deeplab2's linear schedule, and the dual-path layers of a block share their
# axial block's rate. The last 17 slots are reserved for the 17 stuff classes
# (`model.stuff_slot_classes`).

# %%
from minivseg.tubeformer import build_model

tubeformer = build_model("tiny").eval()
with torch.no_grad():
    out = tubeformer(torch.rand(1, 2, 3, 129, 417) * 255)  # (B, T, 3, H, W) in [0, 255]
for key in ("class_logits", "mask_logits", "semantic_logits", "pixel_embedding"):
    print(f"{key:16s}", tuple(out[key].shape))  # mask logits at stride 4: h = (H - 1) // 4 + 1
print("parameters:", sum(p.numel() for p in tubeformer.parameters()))
print("stuff slots:", min(tubeformer.stuff_slot_classes), "...", max(tubeformer.stuff_slot_classes))
print(f"lesson ran in {time.time() - start:.1f} s")

# %% [markdown]
# ## Measured
#
# **Presets.**
#
# | preset | backbone | stride-16 blocks | N / L | memory C, heads, FFN | D | parameters |
# |---|---|---|---|---|---|---|
# | `tiny` | blocks (1,1,1,1), width 16, stem 16-16-16, 4 axial heads | 2 | 32 / 4 | 64, 4, 128 | 32 | 2,005,201 |
# | `kitti` (TubeFormer-DeepLab-B1) | MaX-DeepLab-S Axial-ResNet-50 [3,4,6,3] | 4 | 128 / 16 | 256, 8, 2048 | 128 | 70,772,537 |
#
# **Parameter counts reproduce deeplab2.** Built as MaX-DeepLab-S
# (`build_model("kitti", use_latent=False)`), the counts match `tests/test_tubeformer.py`:
# backbone (stem + stages 2–5) **41,343,424**; encoder (+ 4 DPT + stage5_extra + s8/s4 decoder +
# class/mask FFN + memory) **61,726,624** (the sum is written out in lesson 01, "Measured"); one
# DPT layer **2,503,712**; with the pixel/mask/20-way class heads and the mask BN 61,870,902
# (+2,451 for the semantic head). The `kitti` preset adds 4 latent layers and the 16×256 latent
# memory; the last latent layer has no memory update, because its output memory is never read.
# That gives 70,772,537. Each step of `n` (TubeFormer-DeepLab-B`n`) stacks the 5 stage-4 axial
# blocks once more: +11,194,080 parameters. The paper says "+13M" and does not give the layout.
#
# **Cost**, measured on this project's 2-core x86 CPU machine, shared with other jobs (load
# average 5–7 during the runs, so wall times are inflated; the process CPU time is the one-thread
# cost without contention):
#
# | what | command | result |
# |---|---|---|
# | `tiny` forward+backward, batch 2, T=2, 129×417, 1 thread, train mode | script below, `tiny` | process CPU 0.40–0.42 s per step (min/median of 10); wall 0.49–1.1 s under load |
# | `kitti` parameters | `sum(p.numel() for p in build_model("kitti").parameters())` | 70,772,537 |
# | `kitti` FLOPs per clip, 385×1249, T=2, batch 1 (`torch.utils.flop_counter.FlopCounterMode`, matmul/conv FLOPs) | script below, `flops` | 646.2 GFLOPs: stride-16 blocks 364.8 (axial 285.1, latent 37.9, global 41.8), decoder 29.3, pixel head 12.7, backbone stem–stage 4 ≈ 237. TubeFormer-DeepLab-Simple (no latent): 608.3 |
# | `kitti` CPU forward, eval, `torch.no_grad`, 385×1249, T=2, batch 1 | script below, `time` | 1 thread: process CPU 12.4–12.8 s, wall 42–66 s under load; 2 threads: wall 45–53 s under load |
# | `kitti` peak memory of that forward (`resource.getrusage(...).ru_maxrss`, fresh process incl. model) | script below, `time` | 1.43 GiB (1 thread), 1.59 GiB (2 threads) |
# | output shapes at 385×1249, T=2 | — | mask logits (1, 128, 2, 97, 313); class logits (1, 128, 20) |
#
# ```python
# # python measure.py flops | time
# import resource, sys, time, torch
# from torch.utils.flop_counter import FlopCounterMode
# from minivseg.tubeformer import build_model
# torch.set_num_threads(1)
# if sys.argv[1] == "flops":
#     with torch.device("meta"):
#         model, x = build_model("kitti").eval(), torch.rand(1, 2, 3, 385, 1249)
#     model.requires_grad_(False)  # FlopCounterMode's module tracker and no_grad don't mix here
#     with FlopCounterMode(display=False) as counter:
#         model(x)
#     print(counter.get_total_flops() / 1e9, "GFLOPs")
# else:
#     model, x = build_model("kitti").eval(), torch.rand(1, 2, 3, 385, 1249) * 255
#     with torch.no_grad():
#         t, c = time.perf_counter(), time.process_time()
#         model(x)
#     print(time.perf_counter() - t, "s wall", time.process_time() - c, "s CPU")
#     print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB peak RSS")
# # tiny: model = build_model("tiny").train(); x = torch.rand(2, 2, 3, 129, 417) * 255; time
# # model(x) → sum of squared outputs → .backward(), over 10 steps after a warm-up.
# ```
#
# **A tiny overfit.** The `tiny` preset keeps the deeplab2 initialisation: γ-0 residual BNs, the
# void prior, mask BN γ 0.1, and memories drawn from a truncated normal with std 1. With the tube
# loss (`minivseg.tube_loss.TubeLoss`, lesson 04) it overfits a 65×129 two-frame clip with two
# tracks and stuff (road, sky). On one thread the total loss goes 6.37 → 1.57 in 150 AdamW steps
# at lr 2e-3 (44 s wall under load). In eval mode the argmax tubes are then person → slot 8 and
# car → slot 12, plus the reserved stuff slots road → 15 and sky → 25, each with class
# probability ≈ 1.0.
