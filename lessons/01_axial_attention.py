# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 01 · Axial attention: from 2-D self-attention to position-sensitive axial attention
#
# TubeFormer-DeepLab (§3.2) lets the pixels of each frame talk to each other with
# *axial-attention blocks* [Axial-DeepLab, Wang et al., ECCV 2020], and its backbone is
# MaX-DeepLab-S: a ResNet-50 whose stride-16 stages use those blocks (§4.2). This lesson rebuilds
# the layer step by step:
#
# 1. full 2-D self-attention and why its memory explodes,
# 2. axial attention: attend along a column, then along a row,
# 3. relative positions and the 509-row tables of deeplab2,
# 4. the position-sensitive layer (Axial-DeepLab Eq. (3)/(4)) with deeplab2's BatchNorms,
#
# and ends by loading our weights into `minivseg.axial_attention.AxialAttention` and checking
# that both give the same output.

# %%
import matplotlib.pyplot as plt
import torch
from einops import rearrange
from torch import nn

torch.manual_seed(0)

# %% [markdown]
# ## 1. Full 2-D self-attention
#
# Every output pixel $o$ is a softmax-weighted sum over **all** $HW$ pixels $p$
# (Axial-DeepLab Eq. (1)):
#
# $$y_o = \sum_{p \in H\times W} \operatorname{softmax}_p\!\left(q_o^\top k_p\right) v_p,
# \qquad q = W_Q x,\; k = W_K x,\; v = W_V x .$$
#
# The attention matrix has $(HW)^2$ entries per head and image. At the stride-16 resolution of a
# KITTI-STEP crop (25 × 79) that is 3.9 million entries per head — and 8 heads, a batch of clips
# and a backward pass multiply it.

# %%
C, H, W = 8, 6, 10
x = torch.randn(1, C, H, W)
w_q, w_k, w_v = (torch.randn(C, C) / C**0.5 for _ in range(3))


def full_attention(x):
    """(B, C, H, W) -> (B, C, H, W): every pixel attends to every pixel."""
    pixels = rearrange(x, "B C H W -> B (H W) C")
    q, k, v = pixels @ w_q, pixels @ w_k, pixels @ w_v
    attention = torch.einsum("Bic,Bjc->Bij", q, k).softmax(dim=-1)  # (B, HW, HW)
    out = torch.einsum("Bij,Bjc->Bic", attention, v)
    return rearrange(out, "B (H W) C -> B C H W", H=x.shape[2])


print("full attention matrix entries:", (H * W) ** 2)

# %% [markdown]
# ## 2. Axial attention
#
# Axial attention restricts $p$ to the $1\times m$ line through $o$ — first the column
# (height axis), then the row (width axis), Axial-DeepLab Eq. (4) without positions:
#
# $$y_o = \sum_{p \in 1\times m(o)} \operatorname{softmax}_p\!\left(q_o^\top k_p\right) v_p .$$
#
# With a global span ($m$ = axis length) one layer sees its whole column; stacking the height and
# the width layer lets every output depend on every input pixel, at a cost of $HW(H+W)$ attention
# entries instead of $(HW)^2$. The figure shows, for one output pixel, which input pixels it
# depends on (gradient magnitude).


# %%
def axis_attention(x, axis):
    """Plain attention along one axis: every column (height) or row (width) on its own."""
    pattern = "B C H W -> (B W) H C" if axis == "height" else "B C H W -> (B H) W C"
    lines = rearrange(x, pattern)
    q, k, v = lines @ w_q, lines @ w_k, lines @ w_v
    attention = torch.einsum("Bic,Bjc->Bij", q, k).softmax(dim=-1)  # (B*, L, L)
    out = torch.einsum("Bij,Bjc->Bic", attention, v)
    back = "(B W) H C -> B C H W" if axis == "height" else "(B H) W C -> B C H W"
    return rearrange(out, back, B=x.shape[0], **({"W": W} if axis == "height" else {"H": H}))


def dependence(fn, row=2, col=3):
    inp = x.clone().requires_grad_(True)
    fn(inp)[0, :, row, col].sum().backward()
    return inp.grad.abs().sum(1)[0]


maps = {
    "full 2-D attention": dependence(full_attention),
    "height axis only": dependence(lambda t: axis_attention(t, "height")),
    "height then width": dependence(lambda t: axis_attention(axis_attention(t, "height"), "width")),
}
fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), layout="constrained")
for ax, (title, grad) in zip(axes, maps.items()):
    ax.imshow(grad > 0, cmap="Greens", vmin=0, vmax=1)
    ax.scatter([3], [2], c="red", marker="x")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("input pixels that output pixel × depends on")
plt.show()

# %% [markdown]
# ### Memory: $(HW)^2$ versus $HW(H+W)$
#
# Count the attention-matrix entries (per head and image) for square maps of side $s$:
# full attention grows like $s^4$, axial attention like $2s^3$. We also measure the bytes of the
# float32 logit tensors our two functions above allocate.

# %%
sides = [8, 16, 25, 33, 49, 65, 97, 129]
full_entries = [(s * s) ** 2 for s in sides]
axial_entries = [s * s * (s + s) for s in sides]
measured = []
for s in sides[:4]:
    lines = torch.randn(s, s, C)  # s lines of length s, as in one axis of an s x s map
    logits_axial = torch.einsum("Bic,Bjc->Bij", lines, lines)
    flat = torch.randn(1, s * s, C)
    logits_full = torch.einsum("Bic,Bjc->Bij", flat, flat)
    measured.append((s, 2 * logits_axial.nbytes, logits_full.nbytes))

fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
ax.loglog(sides, full_entries, "o-", label="full 2-D: $(HW)^2$")
ax.loglog(sides, axial_entries, "s-", label="axial: $HW(H+W)$")
ax.loglog([m[0] for m in measured], [m[2] / 4 for m in measured], "k+", ms=12, label="measured")
ax.loglog([m[0] for m in measured], [m[1] / 4 for m in measured], "kx", ms=9)
ax.set_xlabel("side s of an s × s feature map")
ax.set_ylabel("attention entries per head")
ax.legend()
plt.show()
for s, axial_bytes, full_bytes in measured:
    print(f"s={s:3d}: axial {axial_bytes / 1e6:8.3f} MB, full {full_bytes / 1e6:8.3f} MB")
kitti = 25 * 79
print(f"KITTI s16 map 25x79: full {kitti**2:,} vs axial {kitti * (25 + 79):,} entries per head")

# %% [markdown]
# ## 3. Relative positions
#
# Attention by itself is blind to where pixels are. Axial-DeepLab adds learned **relative**
# positional encodings $r_{p-o}$: one vector per offset between key $p$ and query $o$ along the
# axis. deeplab2 stores them in a table of $2\cdot\text{MAX\_SPAN}-1 = 509$ rows
# (MAX_SPAN = 255) and looks up the row
#
# $$\text{row}(o, p) = \operatorname{clip}\big((p - o) + \text{MAX\_SPAN} - 1,\; 0,\; 2\,\text{MAX\_SPAN}-2\big)$$
#
# from the *runtime* length, so the same weights work for any input size (a $2L-1$ table tied to
# one training size would not), and offsets beyond MAX_SPAN share the outermost row. The picture
# uses a tiny MAX_SPAN = 4 on a line of 9 so the clipping is visible.


# %%
def relative_index(length, max_span):
    position = torch.arange(length)
    distance = position[None, :] - position[:, None]  # (i, j) = key - query
    return (distance + max_span - 1).clamp(0, 2 * max_span - 2)


fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout="constrained")
for ax, span in zip(axes, [255, 4]):
    index = relative_index(9, span)
    ax.imshow(index, cmap="viridis")
    for i in range(9):
        for j in range(9):
            ax.text(j, i, int(index[i, j]), ha="center", va="center", fontsize=6, color="w")
    ax.set_title(f"table row, MAX_SPAN={span}")
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
plt.show()

# %% [markdown]
# ## 4. Position-sensitive axial attention (deeplab2 variant)
#
# Axial-DeepLab Eq. (3), restricted to one axis (Eq. (4)), uses three similarity terms and adds
# a positional term to the retrieved values:
#
# $$y_o = \sum_{p \in 1\times m(o)} \operatorname{softmax}_p\!\left(q_o^\top k_p
#   + q_o^\top r^q_{p-o} + k_p^\top r^k_{p-o}\right)\left(v_p + r^v_{p-o}\right).$$
#
# deeplab2 (used by MaX-DeepLab and TubeFormer) adds BatchNorms and drops the $1/\sqrt{d}$:
#
# * one linear map $C \to 2d_k + d_v$ for $q, k, v$, followed by BN;
# * the three logit terms are stacked and BatchNormed with **one channel per (term, head)**,
#   then summed — the BN learns the temperature that $1/\sqrt{d}$ would fix;
# * the two retrieved outputs $\sum_p a_{op} v_p$ and $\sum_p a_{op} r^v_{p-o}$ are stacked and
#   BatchNormed with one channel per (term, head, channel), then summed.
#
# The attribute names below are the ones of `minivseg.axial_attention.AxialAttention`, so the
# weights can be exchanged at the end.


# %%
class LessonAxialAttention(nn.Module):
    def __init__(self, in_channels, key_channels, value_channels, num_heads, axis, max_span=255):
        super().__init__()
        self.axis, self.num_heads, self.max_span = axis, num_heads, max_span
        self.key_channels, self.value_channels = key_channels, value_channels
        total = 2 * key_channels + value_channels
        self.qkv = nn.Conv1d(in_channels, total, 1, bias=False)
        self.qkv_bn = nn.BatchNorm1d(total, eps=1e-3, momentum=0.01)
        self.similarity_bn = nn.BatchNorm2d(3 * num_heads, eps=1e-3, momentum=0.01)
        self.output_bn = nn.BatchNorm1d(2 * value_channels, eps=1e-3, momentum=0.01)
        rows = 2 * max_span - 1
        self.query_rpe = nn.Parameter(torch.randn(rows, key_channels // num_heads))
        self.key_rpe = nn.Parameter(torch.randn(rows, key_channels // num_heads))
        self.value_rpe = nn.Parameter(torch.randn(rows, value_channels // num_heads))

    def forward(self, x):
        b, _, height, width = x.shape
        pattern = "B C H W -> (B W) C H" if self.axis == "height" else "B C H W -> (B H) C W"
        lines = rearrange(x, pattern)  # each column / row is its own sequence
        qkv = self.qkv_bn(self.qkv(lines))
        q, k, v = qkv.split([self.key_channels, self.key_channels, self.value_channels], dim=1)
        q, k, v = (rearrange(t, "B (h d) i -> B h d i", h=self.num_heads) for t in (q, k, v))
        index = relative_index(lines.shape[-1], self.max_span)
        r_q, r_k, r_v = self.query_rpe[index], self.key_rpe[index], self.value_rpe[index]

        terms = [
            torch.einsum("Bhdi,Bhdj->Bhij", q, k),  # content q_o . k_p
            torch.einsum("Bhdi,ijd->Bhij", q, r_q),  # query-position q_o . r^q_{p-o}
            torch.einsum("Bhdj,ijd->Bhij", k, r_k),  # key-position  k_p . r^k_{p-o}
        ]
        logits = self.similarity_bn(torch.cat(terms, dim=1))  # channels (term, head)
        logits = rearrange(logits, "B (S h) i j -> S B h i j", S=3).sum(0)
        attention = logits.softmax(dim=-1)

        retrieved = [
            torch.einsum("Bhij,Bhdj->Bhdi", attention, v),  # sum_p a_op v_p
            torch.einsum("Bhij,ijd->Bhdi", attention, r_v),  # sum_p a_op r^v_{p-o}
        ]
        out = self.output_bn(rearrange(retrieved, "S B h d i -> B (S h d) i"))
        out = rearrange(out, "B (S c) i -> S B c i", S=2).sum(0)
        if self.axis == "height":
            return rearrange(out, "(B W) C H -> B C H W", B=b, W=width)
        return rearrange(out, "(B H) C W -> B C H W", B=b, H=height)


# %% [markdown]
# What do the position terms buy? Feed a **featureless** line (every pixel the same vector).
# Content alone cannot tell the pixels apart: $q_o^\top k_p$ is the same for every key, so the
# attention is uniform. With the position terms the weights depend on the offset $p-o$: each
# diagonal of the query × key matrix has its own (here random, later learned) preference.

# %%
layer = LessonAxialAttention(C, 8, 16, num_heads=2, axis="width").eval()
flat_line = torch.ones(1, C, 1, 21)
with torch.no_grad():
    lines = rearrange(flat_line, "B C H W -> (B H) C W")
    q, k, _ = layer.qkv_bn(layer.qkv(lines)).split([8, 8, 16], dim=1)
    q, k = (rearrange(t, "B (h d) i -> B h d i", h=2) for t in (q, k))
    index = relative_index(21, 255)
    content = torch.einsum("Bhdi,Bhdj->Bhij", q, k)
    with_positions = (
        content
        + torch.einsum("Bhdi,ijd->Bhij", q, layer.query_rpe[index])
        + torch.einsum("Bhdj,ijd->Bhij", k, layer.key_rpe[index])
    )
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout="constrained")
panels = {"content only": content, "content + positions": with_positions}
for ax, (title, logits) in zip(axes, panels.items()):
    ax.imshow(logits[0, 0].softmax(-1), cmap="magma", vmin=0, vmax=0.5)  # uniform = 1/21
    ax.set_title(f"{title}: attention weights")
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
plt.show()

# %% [markdown]
# ### The 2-D layer
#
# `AxialAttention2D` runs a height layer ($C \to d_v$) and then a width layer ($d_v \to d_v$)
# with **nothing in between** (no BN, no ReLU). In the Axial-ResNet bottleneck the input has
# $2F$ channels, keys $F$ and values $2F$, so the output width matches the input width.


# %%
class LessonAxialAttention2D(nn.Module):
    def __init__(self, in_channels, key_channels, value_channels, num_heads, max_span=255):
        super().__init__()
        self.height = LessonAxialAttention(
            in_channels, key_channels, value_channels, num_heads, "height", max_span
        )
        self.width = LessonAxialAttention(
            value_channels, key_channels, value_channels, num_heads, "width", max_span
        )

    def forward(self, x):
        return self.width(self.height(x))


block = LessonAxialAttention2D(16, 8, 16, num_heads=2)
feature = torch.randn(2, 16, 9, 27)  # a 16k+1 sized stride-16 map
print("2-D axial output:", tuple(block(feature).shape))

# %% [markdown]
# ## 5. Check against the package
#
# Load the lesson layer's weights into `minivseg.axial_attention.AxialAttention` (and the 2-D
# version) with `strict=True`, then compare outputs in eval mode (BN running statistics) after a
# few training-mode passes have moved those statistics away from their initial values.

# %%
from minivseg.axial_attention import AxialAttention, AxialAttention2D

ours = LessonAxialAttention(C, 8, 16, num_heads=2, axis="height", max_span=255)
ours.train()
for _ in range(3):
    ours(torch.randn(4, C, 7, 5))  # update the BN running statistics
package = AxialAttention(C, 8, 16, num_heads=2, axis="height", max_span=255)
package.load_state_dict(ours.state_dict(), strict=True)
ours.eval(), package.eval()
probe = torch.randn(3, C, 11, 6)
with torch.no_grad():
    torch.testing.assert_close(package(probe), ours(probe))

block.train()
block(torch.randn(2, 16, 9, 27))
package_2d = AxialAttention2D(16, 8, 16, num_heads=2)
package_2d.load_state_dict(block.state_dict(), strict=True)
block.eval(), package_2d.eval()
with torch.no_grad():
    torch.testing.assert_close(package_2d(feature), block(feature))
print("lesson layers match minivseg.axial_attention")

# %% [markdown]
# ## Measured
#
# `minivseg.backbone.AxialResNet` stacks this layer into the MaX-DeepLab-S backbone (its module
# docstring gives the layout and the torchvision loader). Numbers measured on this project's 2-core
# x86 CPU machine, shared with other jobs (no GPU numbers here):
#
# | quantity | value | reproduce |
# |---|---|---|
# | MaX-DeepLab-S backbone trainable parameters | **41,343,424** (= deeplab2 test) | `.venv/bin/python -m pytest tests/test_backbone.py -k parameter_counts` |
# | ResNet-50-beta (`use_axial=False`) | 23,631,808 (= deeplab2 test) | same test |
# | one stage-4 / one stage-5 axial block | 2,238,816 / 8,671,840 (= deeplab2) | same test |
# | PixelDecoder(2048, 512, 256) | 1,531,648 | `sum(p.numel() for p in PixelDecoder(2048,512,256).parameters())` |
# | MaX-S shapes, 129×417 input | stem 65×209, res2 33×105, res3 17×53, res4/res5 9×27, decoder 33×105 | `tests/test_backbone.py::test_endpoint_and_decoder_shapes` (tiny widths) |
# | axial attention vs a naive per-line loop | equal to 1e-10 (float64, eval, random BN statistics, table clipping included) | `tests/test_axial_attention.py` |
# | attention entries per head, KITTI s16 map 25×79 | full 2-D 3,900,625 vs axial 205,400 | this lesson, section 2 |
# | MaX-S backbone forward, 1×3×129×417, CPU, 1 thread, eval | 1.58 s (one run on the shared 2-core machine) | the timing command below |
#
# Timing command:
# `OMP_NUM_THREADS=1 .venv/bin/python -c "import torch,time; from minivseg.backbone import AxialResNet; m=AxialResNet().eval(); x=torch.randn(1,3,129,417); torch.no_grad().__enter__(); m(x); t=time.time(); m(x); print(time.time()-t)"`
#
# The decoder count agrees with the deeplab2 encoder total of 61,726,624 (arithmetic only):
# backbone 41,343,424 + 4 dual-path transformer layers × 2,503,712 + the stage5_extra axial block
# 8,671,840 + the memory 32,768 + one 2-layer 256-channel FFN 132,096 + the decoder 1,531,648.
#
# Against deeplab2's code: a PyTorch transcription of deeplab2's AxialAttention2D (kmax-deeplab,
# `kmax_pixel_decoder.py`), run outside this repository with shared weights, matched our layer
# exactly (max abs difference 0.0) in both eval and train mode.
