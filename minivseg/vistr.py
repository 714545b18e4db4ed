"""VisTR: video instance segmentation as direct set prediction of instance sequences.

Implements VisTR (Wang et al., CVPR 2021): the 3-D sine positional encoding (§3.1, Eq. 1) added
DETR-style to an encoder over all T·h·w clip pixels and to a decoder over T·n frame-major instance
queries (query ``t·n + i`` is slot ``i`` in frame ``t``); instance sequence matching (§3.2,
Eq. 2-6, 8); the sequence loss (Eq. 7-9); instance sequence segmentation (§3.3: per-frame mask
features from attention maps and backbone features, then 3-D convolutions over the T frames of each
slot); and the inference rules of §4.1. Targets use the official instance-major layout
(entry ``j·T + t`` is track ``j`` in frame ``t``).

Where the official code (Epiphqny/VisTR) differs from the paper, we follow the code:

- matcher: the box cost is a mean over frames *and* the 4 coordinates (Eq. 8 sums coordinates);
  the "giou" cost is plain IoU smoothed by 1e-6; costs average over all T frames, frames where the
  track is absent included (target box 0); no mask cost; weights class 1, L1 5, IoU 2.
- loss: every term is divided by ``num_boxes`` = tracks × T, absent frames counted (the paper
  says "number of instances"); the focal loss is a per-mask pixel mean; box losses are L1 + real
  GIoU; the intermediate decoder layers get class and box losses only, each with its own matching.
- mask features come from the encoder output E (DETR used the input projection), with one softmax
  over heads × h × w jointly; the 3-D head is three 3×3×3 convs (dilation 2) + GroupNorm + ReLU.
  With dilation 2 in time the convs only mix frames of equal parity (for T = 2 they act per
  frame); GroupNorm statistics over T·H·W are the only coupling across parity.

Deliberate differences from the official code:

- a plain 3×3 conv replaces the deformable conv in the last mask-FPN layer;
- the backbone is a compact ResNet (basic blocks, BatchNorm) trained from scratch, not a
  DETR-initialised ResNet-50/101 with frozen BatchNorm;
- in absent frames the target class is no-object (index K): the official label 0 is an unused
  YouTube-VIS id, here it would be "person". Only the matcher's class cost reads it;
- matched pairs are emitted for the valid frames of the *matched* track (the official code reads
  the valid flags of the j-th track in assignment order, which differ when tracks are permuted);
- the per-frame mask FPN runs on all frames and batch items at once (the official code loops over
  frames and assumes batch 1); no padding masks, so positions are normalised by the full length;
- at inference a frame whose score is below 0.001 gets an empty mask (official: ``None``) and a
  slot whose mask is empty in every frame is dropped; long videos go through clip stitching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from scipy.optimize import linear_sum_assignment
from torch import nn

from minivseg.panoptic import LABEL_DIVISOR, THING_CLASSES, VOID_ID
from minivseg.stitching import VideoStitcher, sliding_clips

PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics on the 0..255 scale
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class VisTRConfig:
    thing_classes: tuple[int, ...] = THING_CLASSES  # dataset id of each class logit (K of them)
    num_frames: int = 36  # T, frames per clip (queries are per frame, so fixed per model)
    num_slots: int = 10  # n, instance slots per frame; T·n queries in all
    hidden_dim: int = 384  # d, divisible by 6 (three axes of sin/cos pairs)
    num_heads: int = 8  # attention heads in the transformer and the attention maps
    encoder_layers: int = 6
    decoder_layers: int = 6
    ffn_dim: int = 2048  # transformer feed-forward width
    dropout: float = 0.1
    backbone_widths: tuple[int, ...] = (64, 128, 256, 512)  # ResNet channels at strides 4..32
    backbone_blocks: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per ResNet stage
    mask_dims: tuple[int, ...] = (192, 96, 48, 24)  # mask-FPN widths at strides 32, 16, 8, 4
    mask_groups: int = 8  # GroupNorm groups in the mask FPN (divides d + heads and mask_dims)
    sequence_channels: int = 12  # width of the 3-D instance sequence head
    sequence_groups: int = 4  # GroupNorm groups in the 3-D head
    cost_class: float = 1.0  # matcher weight of -mean_t p(class)
    cost_bbox: float = 5.0  # matcher weight of the mean box L1
    cost_iou: float = 2.0  # matcher weight of -mean_t IoU
    ce_weight: float = 1.0  # loss weights (aux layers reuse them)
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1  # CE weight of the no-object class (eos_coef)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def vistr_config(preset: str = "tiny", **overrides) -> VisTRConfig:
    """Named presets: "tiny" (CPU, T=2) and "paper" (VisTR §4.1 sizes, ResNet-18-shaped)."""
    presets = {
        "tiny": VisTRConfig(
            num_frames=2,
            hidden_dim=48,
            num_heads=4,
            encoder_layers=2,
            decoder_layers=2,
            ffn_dim=96,
            dropout=0.0,  # short CPU runs: dropout slows the fit of boxes and classes
            backbone_widths=(16, 32, 64, 96),
            backbone_blocks=(1, 1, 1, 1),
            mask_dims=(24, 16, 8, 8),
            mask_groups=4,
            sequence_channels=8,
        ),
        "paper": VisTRConfig(),
    }
    if preset not in presets:
        raise ValueError(f"unknown VisTR preset {preset!r}; choose from {sorted(presets)}")
    return replace(presets[preset], **overrides)


def sine_position_encoding_3d(
    num_frames: int, height: int, width: int, dim: int, temperature: float = 10000.0, device=None
) -> torch.Tensor:
    """Fixed (T, H, W, dim) encoding: thirds for t, y, x, each interleaved sin/cos pairs.

    Positions are 1-based, divided by the axis length and scaled to (0, 2π] (official
    ``normalize=True``); pair k of a third uses frequency ``temperature^(-2k / (dim/3))``.
    """
    if dim % 6:
        raise ValueError(f"dim must be divisible by 6 (3 axes x sin/cos), got {dim}")
    third = dim // 3
    channel = torch.arange(third, device=device)
    period = temperature ** (2 * torch.div(channel, 2, rounding_mode="floor") / third)
    parts = []
    for length in (num_frames, height, width):
        pos = torch.arange(1, length + 1, device=device) / (length + 1e-6) * 2 * math.pi
        angle = pos[:, None] / period  # (L, dim/3)
        # Eq. (1): PE(pos, 2k) = sin(pos·ω_k), PE(pos, 2k+1) = cos(pos·ω_k)
        parts.append(torch.where(channel % 2 == 0, angle.sin(), angle.cos()))
    t, y, x = parts
    return torch.cat(
        [
            repeat(t, "T C -> T H W C", H=height, W=width),
            repeat(y, "H C -> T H W C", T=num_frames, W=width),
            repeat(x, "W C -> T H W C", T=num_frames, H=height),
        ],
        dim=-1,
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with BatchNorm and a (projected) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNetFeatures(nn.Module):
    """Compact ResNet: (B, 3, H, W) -> features at strides 4, 8, 16, 32 (VisTR §3.1 backbone)."""

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        stages, in_channels = [], widths[0]
        for k, (channels, depth) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(in_channels, channels, 1 if k == 0 else 2)]
            layers += [BasicBlock(channels, channels) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*layers))
            in_channels = channels
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, features = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class EncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: the position encoding is added to queries and keys only."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, T·H·W, C), pos (1, T·H·W, C) -> (B, T·H·W, C)."""
        q = x + pos
        x = self.norm1(x + self.dropout(self.attention(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: query self-attention, cross-attention to the clip, FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, pos, query_pos) -> torch.Tensor:
        """x, query_pos (B, T·n, C); memory (B, T·H·W, C); pos (1, T·H·W, C) -> (B, T·n, C)."""
        q = x + query_pos
        x = self.norm1(x + self.dropout(self.self_attention(q, q, x, need_weights=False)[0]))
        attended = self.cross_attention(x + query_pos, memory + pos, memory, need_weights=False)[0]
        x = self.norm2(x + self.dropout(attended))
        return self.norm3(x + self.dropout(self.ffn(x)))


class AttentionMaps(nn.Module):
    """Per-frame attention of each instance feature O over the encoded frame E (§3.3)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries (B, N, C), memory (B, C, H, W) -> maps (B, N, h, H, W), softmax over h·H·W."""
        q = rearrange(self.q_proj(queries), "B N (h d) -> B N h d", h=self.heads)
        k = self.k_proj(rearrange(memory, "B C H W -> B H W C"))
        k = rearrange(k, "B H W (h d) -> B h d H W", h=self.heads)
        logits = torch.einsum("BNhd,BhdHW->BNhHW", q * q.shape[-1] ** -0.5, k)
        return logits.flatten(2).softmax(-1).view_as(logits)  # one softmax over heads and pixels


class MaskFPN(nn.Module):
    """Per-frame mask features: [E ‖ attention maps] at stride 32 -> 4, adding backbone skips."""

    def __init__(self, in_dim: int, skip_dims, mask_dims, groups: int):
        super().__init__()
        dims = (in_dim, in_dim, *mask_dims)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(dims, dims[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(groups, c) for c in dims[1:])
        self.adapters = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(skip_dims, mask_dims))
        for conv in [*self.convs, *self.adapters]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """x (B·N, C, H/32, W/32); skips (B, ., ., .) at strides 16, 8, 4 -> (B·N, ., H/4, W/4)."""
        layers = list(zip(self.convs, self.norms))
        for conv, norm in layers[:2]:
            x = F.relu(norm(conv(x)))
        for (conv, norm), adapter, skip in zip(layers[2:], self.adapters, skips):
            skip = repeat(adapter(skip), "B C H W -> (B N) C H W", N=x.shape[0] // skip.shape[0])
            x = skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return x


class SequenceHead(nn.Module):
    """Instance sequence segmentation (§3.3): 3-D convs over the T mask features of one slot."""

    def __init__(self, in_channels: int, channels: int = 12, groups: int = 4):
        super().__init__()
        layers = []
        for c_in in (in_channels, channels, channels):
            layers += [
                nn.Conv3d(c_in, channels, 3, padding=2, dilation=2),
                nn.GroupNorm(groups, channels),
                nn.ReLU(),
            ]
        self.layers = nn.Sequential(*layers, nn.Conv3d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features G_i (B, C, T, H, W) -> mask logits m_i (B, T, H, W)."""
        return self.layers(features)[:, 0]


class VisTR(nn.Module):
    """Backbone, 3-D-encoded clip transformer, frame-major queries, box/class/mask heads."""

    def __init__(self, cfg: VisTRConfig):
        super().__init__()
        self.cfg = cfg
        d, heads, widths = cfg.hidden_dim, cfg.num_heads, cfg.backbone_widths
        self.backbone = ResNetFeatures(widths, cfg.backbone_blocks)
        self.input_proj = nn.Conv2d(widths[-1], d, 1)
        args = (d, heads, cfg.ffn_dim, cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*args) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.query_embed = nn.Embedding(cfg.num_frames * cfg.num_slots, d)  # T·n, frame-major
        self.class_head = nn.Linear(d, len(cfg.thing_classes) + 1)
        self.box_head = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4)
        )
        self.attention_maps = AttentionMaps(d, heads)
        self.mask_fpn = MaskFPN(d + heads, widths[-2::-1], cfg.mask_dims, cfg.mask_groups)
        self.sequence_head = SequenceHead(
            cfg.mask_dims[-1], cfg.sequence_channels, cfg.sequence_groups
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN)[:, None, None], False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD)[:, None, None], False)

    def forward(self, frames: torch.Tensor) -> dict:
        """frames (B, T, 3, H, W) in [0, 255] -> pred_logits (B, T·n, K+1), pred_boxes (B, T·n, 4)
        normalised cxcywh, pred_masks (B, T·n, H/4, W/4) logits, aux_outputs (per earlier decoder
        layer: pred_logits, pred_boxes), num_frames T."""
        B, T = frames.shape[:2]
        if T != self.cfg.num_frames:
            raise ValueError(f"VisTR was built for {self.cfg.num_frames} frames, got {T}")
        x = rearrange((frames - self.pixel_mean) / self.pixel_std, "B T C H W -> (B T) C H W")
        s4, s8, s16, s32 = self.backbone(x)
        src = self.input_proj(s32)  # (B·T, d, h, w)
        h, w = src.shape[-2:]
        pos = sine_position_encoding_3d(T, h, w, self.cfg.hidden_dim, device=src.device)
        pos = rearrange(pos, "T H W C -> 1 (T H W) C").to(src.dtype)
        memory = rearrange(src, "(B T) C H W -> B (T H W) C", B=B)  # clip-level sequence
        for layer in self.encoder:
            memory = layer(memory, pos)
        query_pos = repeat(self.query_embed.weight, "N C -> B N C", B=B)
        out, hidden = torch.zeros_like(query_pos), []
        for layer in self.decoder:
            out = layer(out, memory, pos, query_pos)
            hidden.append(self.decoder_norm(out))
        logits = [self.class_head(o) for o in hidden]
        boxes = [self.box_head(o).sigmoid() for o in hidden]
        # §3.3: each frame's n instance features attend to that frame's encoded features E
        n = self.cfg.num_slots
        queries = rearrange(hidden[-1], "B (T N) C -> (B T) N C", T=T)
        encoded = rearrange(memory, "B (T H W) C -> (B T) C H W", T=T, H=h)
        maps = self.attention_maps(queries, encoded)  # (B·T, n, heads, h, w)
        x = torch.cat(
            [
                repeat(encoded, "b C H W -> (b N) C H W", N=n),
                rearrange(maps, "b N h H W -> (b N) h H W"),
            ],
            dim=1,
        )
        features = self.mask_fpn(x, [s16, s8, s4])  # (B·T·n, C, H/4, W/4)
        # G_i: slot i's mask features of all T frames, segmented as one sequence
        features = rearrange(features, "(B T N) C H W -> (B N) C T H W", B=B, T=T)
        masks = rearrange(self.sequence_head(features), "(B N) T H W -> B (T N) H W", B=B)
        return {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "pred_masks": masks,
            "aux_outputs": [
                {"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])
            ],
            "num_frames": T,
        }


def build_vistr(preset: str = "tiny", **overrides) -> VisTR:
    """`VisTR` from a named preset (see `vistr_config`) with field overrides."""
    return VisTR(vistr_config(preset, **overrides))


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, ...]:
    """Element-wise (broadcast) IoU of xyxy boxes, smoothed as the official ``multi_iou``."""
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter[..., 0] * inter[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return (inter + eps) / (union + eps), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of xyxy boxes (Rezatofighi et al.)."""
    iou, union = box_iou(a, b)
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull[..., 0] * hull[..., 1]
    return iou - (hull - union) / hull.clamp(min=1e-6)


def targets_from_panoptic(panoptic, thing_classes=THING_CLASSES) -> dict:
    """(T, H, W) panoptic ids -> VIS targets, instance-major: entry ``j·T + t``.

    Tracks are thing pixels with instance id > 0, ordered by panoptic id; crowd is not a track.
    Returns ``labels (M·T,)`` class index (K = no object where the track is absent), ``boxes
    (M·T, 4)`` normalised cxcywh (zeros where absent), ``masks (M·T, H, W)`` float and ``valid
    (M·T,)`` bool.
    """
    if not torch.is_tensor(panoptic):
        panoptic = torch.from_numpy(np.asarray(panoptic, dtype=np.int64))
    T, H, W = panoptic.shape
    classes = torch.tensor(thing_classes, device=panoptic.device)
    semantic, instance = panoptic // LABEL_DIVISOR, panoptic % LABEL_DIVISOR
    track_ids = torch.unique(panoptic[torch.isin(semantic, classes) & (instance > 0)])
    masks = panoptic[None] == track_ids[:, None, None, None]  # (M, T, H, W)
    valid = masks.flatten(2).any(-1)  # (M, T)
    class_index = (track_ids[:, None] // LABEL_DIVISOR == classes).int().argmax(-1)  # (M,)
    labels = torch.where(valid, class_index[:, None], len(thing_classes))
    rows, cols = masks.any(-1), masks.any(-2)  # (M, T, H), (M, T, W)
    ys, xs = torch.arange(H, device=panoptic.device), torch.arange(W, device=panoptic.device)
    y0, y1 = torch.where(rows, ys, H).amin(-1), torch.where(rows, ys + 1, 0).amax(-1)
    x0, x1 = torch.where(cols, xs, W).amin(-1), torch.where(cols, xs + 1, 0).amax(-1)
    boxes = torch.stack(
        [(x0 + x1) / (2 * W), (y0 + y1) / (2 * H), (x1 - x0) / W, (y1 - y0) / H], -1
    )
    boxes = boxes * valid[..., None]  # (M, T, 4)
    return {
        "labels": rearrange(labels, "M T -> (M T)"),
        "boxes": rearrange(boxes.float(), "M T C -> (M T) C"),
        "masks": rearrange(masks.float(), "M T H W -> (M T) H W"),
        "valid": rearrange(valid, "M T -> (M T)"),
    }


def sequence_cost(probs, boxes, labels, target_boxes, weights=(1.0, 5.0, 2.0)) -> torch.Tensor:
    """Matching cost (n, M) between slot sequences and track sequences (Eq. 6, 8, official form).

    probs (T, n, K+1) softmax, boxes (T, n, 4) cxcywh, labels (M, T), target_boxes (M, T, 4).
    """
    T = probs.shape[0]
    # Eq. (4), (6): -mean_t p_(i,t)(c_j,t)
    class_cost = -probs[torch.arange(T, device=probs.device)[None, :], :, labels].mean(1)  # (M, n)
    # Eq. (8), L1 term: mean over frames and coordinates
    bbox_cost = (boxes[None] - target_boxes[:, :, None]).abs().mean((1, 3))  # (M, n)
    # Eq. (8), "giou" term: the official code uses plain IoU
    iou, _ = box_iou(box_cxcywh_to_xyxy(boxes)[None], box_cxcywh_to_xyxy(target_boxes)[:, :, None])
    cost = weights[0] * class_cost + weights[1] * bbox_cost - weights[2] * iou.mean(1)
    return cost.T


class SequenceMatcher:
    """Hungarian matching of n slot sequences to M track sequences per clip (Eq. 2)."""

    def __init__(self, num_frames: int, cost_class=1.0, cost_bbox=5.0, cost_iou=2.0):
        self.num_frames, self.weights = num_frames, (cost_class, cost_bbox, cost_iou)

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, ...]]:
        """Per clip: (query indices ``t·n + i``, target indices ``j·T + t``) over valid frames."""
        T = self.num_frames
        probs = rearrange(outputs["pred_logits"].float().softmax(-1), "B (T N) K -> B T N K", T=T)
        boxes = rearrange(outputs["pred_boxes"].float(), "B (T N) C -> B T N C", T=T)
        n, indices = probs.shape[2], []
        for b, target in enumerate(targets):
            labels = rearrange(target["labels"], "(M T) -> M T", T=T)
            target_boxes = rearrange(target["boxes"], "(M T) C -> M T C", T=T)
            valid = rearrange(target["valid"], "(M T) -> M T", T=T).cpu()
            cost = sequence_cost(probs[b], boxes[b], labels, target_boxes, self.weights)
            slots, tracks = linear_sum_assignment(cost.cpu().numpy())
            frames = [valid[j].nonzero()[:, 0] for j in tracks]
            query = [t * n + i for i, t in zip(slots, frames)]
            target_index = [j * T + t for j, t in zip(tracks, frames)]
            empty = torch.zeros(0, dtype=torch.long)
            device = outputs["pred_logits"].device
            indices.append(
                (
                    torch.cat([empty, *query]).to(device),
                    torch.cat([empty, *target_index]).to(device),
                )
            )
        return indices


def focal_and_dice(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float):
    """(P, pixels) mask logits/targets -> per-mask focal loss (pixel mean) and Dice loss (Eq. 9)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    focal = (alpha_t * ce * (1 - p_t) ** gamma).mean(1)
    dice = 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)
    return focal, dice


class VisTRLoss(nn.Module):
    """Sequence loss of Eq. (7): CE + box L1 + GIoU + focal + Dice, normalised per track-frame."""

    def __init__(self, cfg: VisTRConfig):
        super().__init__()
        self.cfg = cfg
        self.matcher = SequenceMatcher(cfg.num_frames, cfg.cost_class, cfg.cost_bbox, cfg.cost_iou)
        class_weight = torch.ones(len(cfg.thing_classes) + 1)
        class_weight[-1] = cfg.no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.weights = {
            "ce": cfg.ce_weight, "bbox": cfg.bbox_weight, "giou": cfg.giou_weight,
            "focal": cfg.focal_weight, "dice": cfg.dice_weight,
        }  # fmt: skip

    def class_box_terms(self, outputs, targets, indices, num_boxes) -> dict:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query = torch.cat([q for q, _ in indices])
        classes = torch.full(logits.shape[:2], len(self.cfg.thing_classes), device=logits.device)
        classes[batch, query] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        pred = boxes[batch, query]
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target_boxes))
        return {
            "ce": F.cross_entropy(logits.transpose(1, 2), classes, self.class_weight),
            "bbox": (pred - target_boxes).abs().sum() / num_boxes,
            "giou": (1 - giou).sum() / num_boxes,
        }

    def mask_terms(self, outputs, targets, indices, num_boxes) -> dict:
        pred = torch.cat([m[q] for m, (q, _) in zip(outputs["pred_masks"].float(), indices)])
        target = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])
        if len(pred) == 0:  # keep the mask head in the graph
            zero = outputs["pred_masks"].sum() * 0
            return {"focal": zero, "dice": zero}
        pred = F.interpolate(
            pred[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False
        )
        focal, dice = focal_and_dice(
            pred.flatten(1), target.flatten(1), self.cfg.focal_alpha, self.cfg.focal_gamma
        )
        return {"focal": focal.sum() / num_boxes, "dice": dice.sum() / num_boxes}

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """outputs of `VisTR`; ``batch["panoptic"]`` (B, T, H, W) -> (weighted total, terms)."""
        device = outputs["pred_logits"].device
        targets = [
            {k: v.to(device) for k, v in targets_from_panoptic(p, self.cfg.thing_classes).items()}
            for p in batch["panoptic"]
        ]
        # official normalisation: all target entries (tracks × T), averaged over workers
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_boxes = num_boxes.to(device)
            torch.distributed.all_reduce(num_boxes)
            num_boxes = num_boxes / torch.distributed.get_world_size()
        num_boxes = num_boxes.clamp(min=1).item()
        indices = self.matcher(outputs, targets)
        terms = self.class_box_terms(outputs, targets, indices, num_boxes)
        terms.update(self.mask_terms(outputs, targets, indices, num_boxes))
        for aux in outputs.get("aux_outputs", []):
            aux_indices = self.matcher(aux, targets)
            for name, value in self.class_box_terms(aux, targets, aux_indices, num_boxes).items():
                terms[f"aux_{name}"] = terms.get(f"aux_{name}", 0) + value
        total = sum(self.weights[name.removeprefix("aux_")] * v for name, v in terms.items())
        return total, terms


@torch.no_grad()
def predict_tubes(
    outputs: dict, out_size, class_ids=THING_CLASSES, mask_threshold=0.5, frame_score_floor=1e-3,
    valid=None,
) -> list[list[tuple[np.ndarray, int, float]]]:  # fmt: skip
    """Official inference rules (§4.1): per clip, a list of (mask (T', H, W) bool, class id, score).

    Per frame the score is the max class probability (no-object dropped) and the class its
    argmax; the tube score is the mean over frames, the class the majority vote (ties to the
    lowest index); masks are upsampled bilinearly to ``out_size`` (H, W) and thresholded at
    sigmoid > 0.5. No score threshold; tubes are sorted by score, highest first. ``valid``: per
    clip, the number T' ≤ T of real frames; the frames after them (padding that repeats the last
    frame) are cut before the score mean and the vote, as the official code does.
    """
    T = outputs["num_frames"]
    probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]
    frame_scores, frame_classes = rearrange(probs, "B (T N) K -> B N T K", T=T).max(-1)
    logits = F.interpolate(
        outputs["pred_masks"].float(), size=tuple(out_size), mode="bilinear", align_corners=False
    )
    masks = rearrange(logits.sigmoid() > mask_threshold, "B (T N) H W -> B N T H W", T=T)
    masks = masks & (frame_scores >= frame_score_floor)[..., None, None]
    results = []
    for b in range(len(masks)):
        tubes, real = [], T if valid is None else valid[b]
        for i in range(masks.shape[1]):
            if not masks[b, i, :real].any():
                continue
            votes = torch.bincount(frame_classes[b, i, :real], minlength=len(class_ids))
            score = float(frame_scores[b, i, :real].mean())
            mask = masks[b, i, :real].cpu().numpy()
            tubes.append((mask, int(class_ids[int(votes.argmax())]), score))
        results.append(sorted(tubes, key=lambda tube: -tube[2]))
    return results


def tubes_to_panoptic(tubes, num_frames: int, height: int, width: int) -> np.ndarray:
    """Paste tubes in score order into a (T, H, W) panoptic clip: id = class·1000 + rank + 1.

    A higher-scoring tube keeps the pixels it shares with a lower one; unclaimed pixels are void.
    A tube cut to its clip's real frames T' < T covers the first T' frames.
    """
    panoptic = np.full((num_frames, height, width), VOID_ID, dtype=np.int64)
    for rank, (mask, class_id, _) in enumerate(sorted(tubes, key=lambda tube: -tube[2])):
        part = panoptic[: len(mask)]
        part[mask & (part == VOID_ID)] = class_id * LABEL_DIVISOR + rank + 1
    return panoptic


@torch.no_grad()
def instance_frames(model: VisTR, frames, num_frames: int, stride: int = 1, batch_size: int = 4,
                   scores: dict | None = None):  # fmt: skip
    """Stream a video: ``frames`` (any iterable of (3, H, W) in [0, 255]) -> one (H, W) frame of
    video ids (``VIDEO_LABEL_DIVISOR``) at a time, with video-long track ids.

    Clips of T frames start every ``stride`` frames (the end padded by repeating the last frame,
    cut again before scoring); each clip's tubes are pasted by `tubes_to_panoptic` and linked by
    `VideoStitcher`. ``scores`` receives {"vistr": {track id: score}} at the end (video AP).
    """
    T, thing_classes = model.cfg.num_frames, model.cfg.thing_classes
    stitcher = VideoStitcher(T, stride, thing_classes, num_frames=num_frames)  # padding dropped
    for _, clips, valid in sliding_clips(frames, num_frames, T, stride, batch_size):
        size = clips.shape[-2:]
        for tubes in predict_tubes(model(clips), size, thing_classes, valid=valid):
            ranked = sorted(tubes, key=lambda tube: -tube[2])  # as `tubes_to_panoptic` names them
            ids = {c * LABEL_DIVISOR + rank + 1: score for rank, (_, c, score) in enumerate(ranked)}
            yield from (frame for _, frame in stitcher.add(tubes_to_panoptic(tubes, T, *size), ids))
    yield from (frame for _, frame in stitcher.finish())
    if scores is not None:
        scores["vistr"] = stitcher.scores()


def instance_video(model: VisTR, frames: torch.Tensor, stride: int = 1, batch_size: int = 4):
    """Whole video (F, 3, H, W) in [0, 255] in memory -> (F, H, W) video ids (`instance_frames`)."""
    return np.stack(list(instance_frames(model, frames, len(frames), stride, batch_size)))
