"""Position-sensitive axial attention: global 1-D multi-head attention along height or width.

Implements Axial-DeepLab (Wang et al., ECCV 2020): the position-sensitive self-attention of §3.1,
Eq. (3), restricted to the 1 x m line through each pixel, §3.2 Eq. (4):

    y_o = sum_{p in 1 x m(o)} softmax_p(q_o.k_p + q_o.r^q_{p-o} + k_p.r^k_{p-o}) (v_p + r^v_{p-o})

and ``AxialAttention2D`` = a height-axis layer followed by a width-axis layer (§3.2), the
pixel-to-pixel (frame-level, F2F) attention of TubeFormer-DeepLab §3.2.

Follows the deeplab2 variant used by MaX-DeepLab and TubeFormer-DeepLab
(model/layers/axial_layers.py, model/layers/positional_encodings.py):
- the span is global along the axis (m = axis length);
- no 1/sqrt(d) scaling; instead BatchNorm on the three stacked similarity terms (one channel per
  (term, head)) and on the two stacked retrieved outputs (one channel per (term, head, channel));
- one BatchNorm after the q/k/v projection;
- relative-position tables of 2 * max_span - 1 rows (509 for MAX_SPAN 255), indexed by the runtime
  distance ``key - query + max_span - 1`` clipped to the table, so any length works and lengths
  beyond max_span share the outermost embedding;
- ``stride`` keeps every stride-th row after the height axis and every stride-th column after the
  width axis, so the width axis (and its train-mode BN statistics) sees only the kept rows.
Differences: none intended (a PyTorch transcription of deeplab2's layer gives the same outputs;
lesson 01, "Measured").

    layer = AxialAttention2D(in_channels=128, key_channels=64, value_channels=128)
    y = layer(x)  # x (B, 128, H, W) -> (B, 128, H, W), every output sees the whole image

Einsum letters: B batch of lines (images x other axis), h heads, d channels per head, i query
position and j key position along the axis.
"""

import torch
from einops import rearrange
from torch import nn

BN_MOMENTUM = 0.01  # deeplab2's TF momentum 0.99
BN_EPS = 1e-3


def relative_index(length: int, max_span: int, device=None) -> torch.Tensor:
    """Table row of each (query i, key j) pair: j - i + max_span - 1, clipped. -> (i, j) int64."""
    position = torch.arange(length, device=device)
    distance = position[None, :] - position[:, None]  # (i, j): key - query
    return (distance + max_span - 1).clamp(0, 2 * max_span - 2)


class AxialAttention(nn.Module):
    """Multi-head position-sensitive attention along one axis of a (B, C, H, W) feature map."""

    def __init__(
        self,
        in_channels: int,
        key_channels: int,
        value_channels: int,
        num_heads: int = 8,
        axis: str = "height",
        max_span: int = 255,
    ):
        super().__init__()
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError("key_channels and value_channels must be divisible by num_heads")
        self.axis, self.num_heads, self.max_span = axis, num_heads, max_span
        self.key_channels, self.value_channels = key_channels, value_channels
        key_depth, value_depth = key_channels // num_heads, value_channels // num_heads

        # One linear map C -> q, k, v (channels head-major: head * d + j), then BN.
        self.qkv = nn.Conv1d(in_channels, 2 * key_channels + value_channels, 1, bias=False)
        self.qkv_bn = nn.BatchNorm1d(2 * key_channels + value_channels, BN_EPS, BN_MOMENTUM)
        # BN on the stacked (content, query-RPE, key-RPE) logits: one channel per (term, head).
        self.similarity_bn = nn.BatchNorm2d(3 * num_heads, BN_EPS, BN_MOMENTUM)
        # BN on the stacked (content, value-RPE) outputs: one channel per (term, head, d).
        self.output_bn = nn.BatchNorm1d(2 * value_channels, BN_EPS, BN_MOMENTUM)
        rows = 2 * max_span - 1
        self.query_rpe = nn.Parameter(torch.empty(rows, key_depth))
        self.key_rpe = nn.Parameter(torch.empty(rows, key_depth))
        self.value_rpe = nn.Parameter(torch.empty(rows, value_depth))
        self.reset_parameters(in_channels)

    def reset_parameters(self, in_channels: int) -> None:
        std = in_channels**-0.5  # standard transformer init, as deeplab2
        nn.init.trunc_normal_(self.qkv.weight, std=std, a=-2 * std, b=2 * std)
        for table in (self.query_rpe, self.key_rpe, self.value_rpe):
            nn.init.trunc_normal_(table, std=1.0, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, value_channels, H, W); columns (height) or rows (width) alone."""
        b, _, height, width = x.shape
        # The q/k/v projection and its BN are per pixel, so they run on the whole map, before it
        # is cut into lines: the same products and BN statistics (over every pixel), but long
        # BN planes (H*W, not one line's H or W, which makes torch's BN kernel slow).
        qkv = self.qkv_bn(self.qkv(rearrange(x, "B C H W -> B C (H W)")))  # (B, 2Ck+Cv, H*W)
        if self.axis == "height":
            lines = rearrange(qkv, "B C (H W) -> (B W) C H", H=height)
        else:
            lines = rearrange(qkv, "B C (H W) -> (B H) C W", H=height)
        length = lines.shape[-1]
        q, k, v = lines.split([self.key_channels, self.key_channels, self.value_channels], dim=1)
        q, k, v = (rearrange(t, "B (h d) i -> B h d i", h=self.num_heads) for t in (q, k, v))

        index = relative_index(length, self.max_span, x.device)
        r_q, r_k, r_v = self.query_rpe[index], self.key_rpe[index], self.value_rpe[index]  # (i,j,d)

        # Eq. (3)/(4): content, query-RPE and key-RPE similarities, no 1/sqrt(d).
        content = torch.einsum("Bhdi,Bhdj->Bhij", q, k)
        query_term = torch.einsum("Bhdi,ijd->Bhij", q, r_q)
        key_term = torch.einsum("Bhdj,ijd->Bhij", k, r_k)
        logits = rearrange([content, query_term, key_term], "S B h i j -> B (S h) i j")
        logits = self.similarity_bn(logits)
        logits = rearrange(logits, "B (S h) i j -> S B h i j", S=3).sum(0)
        attention = logits.softmax(dim=-1)  # (B, h, i, j): normalised over keys j

        # Eq. (3)/(4): retrieve v_p + r^v_{p-o}, each retrieval BatchNormed before the sum (on
        # the whole map again: BN is per pixel and channel).
        retrieved = torch.einsum("Bhij,Bhdj->Bhdi", attention, v)
        retrieved_rpe = torch.einsum("Bhij,ijd->Bhdi", attention, r_v)
        out = rearrange([retrieved, retrieved_rpe], "S B h d i -> B (S h d) i")
        if self.axis == "height":
            out = rearrange(out, "(B W) C H -> B C (H W)", B=b, W=width)
        else:
            out = rearrange(out, "(B H) C W -> B C (H W)", B=b, H=height)
        out = rearrange(self.output_bn(out), "B (S c) (H W) -> S B c H W", S=2, H=height)
        return out.sum(0)  # (B, value_channels, H, W)


class AxialAttention2D(nn.Module):
    """Height-axis then width-axis attention, with no BN or activation between them (§3.2)."""

    def __init__(
        self,
        in_channels: int,
        key_channels: int,
        value_channels: int,
        num_heads: int = 8,
        max_span: int = 255,
        stride: int = 1,
    ):
        super().__init__()
        self.stride = stride
        self.height = AxialAttention(
            in_channels, key_channels, value_channels, num_heads, "height", max_span
        )
        self.width = AxialAttention(
            value_channels, key_channels, value_channels, num_heads, "width", max_span
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, value_channels, H', W'), every output sees the whole image;
        H' = (H - 1) // stride + 1, W' likewise."""
        if self.stride == 1:
            return self.width(self.height(x))
        s = self.stride
        return self.width(self.height(x)[:, :, ::s])[:, :, :, ::s]
