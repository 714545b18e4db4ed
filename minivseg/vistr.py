"""VisTR: video instance segmentation as direct set prediction of instance sequences.

The model and inference of VisTR (Wang et al., CVPR 2021), following the official code
(Epiphqny/VisTR @445c9e4); matching and loss (§3.2, Eq. 2-9) are in `minivseg.vistr_loss`, the
optimiser recipe is the ``vistr_official`` training preset. The parts and their official files:

- §3.1 backbone (models/backbone.py): `minivseg.backbone.AxialResNet` per frame;
- §3.1 transformer (models/transformer.py, models/vistr.py): the 3-D sine positional encoding of
  Eq. (1) (models/position_encoding.py) is added DETR-style to an encoder over all T·h·w clip
  pixels and to a decoder over T·n frame-major instance queries: query ``t·n + i`` is slot ``i``
  in frame ``t``, and slot ``i`` over the frames is one instance sequence (no tracking step);
- §3.3 (not numbered; its loss is Eq. 9): per frame, attention maps of the instance features O
  over the encoded frame E and a mask FPN with backbone skips (`AttentionMaps`, `MaskFPN`:
  models/segmentation.py MHAttentionMap, MaskHeadSmallConv), then 3-D convolutions over the T
  frames of each slot (`SequenceHead`: VisTRsegm.insmask_head);
- §4.1 "Inference" (inference.py): `predict_tubes`, `tubes_to_panoptic`, `instance_frames`.

Usage (``tubes`` is the input of `minivseg.video_ap.VideoAP.update`)::

    model = build_vistr("tiny")  # or "paper"; overrides: build_vistr("tiny", num_frames=4)
    outputs = model(frames)  # (B, T, 3, H, W) in [0, 255] -> dict, see `VisTR.forward`
    tubes = predict_tubes(outputs, (H, W))  # per clip: [(mask (T, H, W) bool, 11 | 13, score)]
    clip = tubes_to_panoptic(tubes[0], T, H, W)  # (T, H, W): class·1000 + rank + 1, else void
    video = instance_video(model, video_frames, stride=1)  # (F, 3, H, W) -> (F, H, W) video ids
    for frame in instance_frames(model, stream, num_frames, scores=found): ...  # found["vistr"]

Where the official code differs from the paper, we follow the code:

- mask features come from the encoder output E (DETR used the input projection), with one softmax
  over heads × h × w jointly; the 3-D head is three 3×3×3 convs (dilation 2) + GroupNorm(4) + ReLU,
  24→12→12→12→1 channels. With dilation 2 in time the convs only mix frames of equal parity (for
  T = 2 they act per frame); GroupNorm statistics over T·H·W are the only coupling across parity;
- inference (§4.1 rules: mean score, majority class, frame score floor 0.001) has no instance
  score threshold (see `predict_tubes`).

Deliberate differences from the official code:

- the backbone is deeplab2's ResNet-beta, `AxialResNet(use_axial=False, output_stride=32)`, with
  an Inception stem (three 3×3 convs, no max-pool) where torchvision's ResNet has a 7×7 conv and a
  max-pool; "paper" is ResNet-50-shaped (bottlenecks [3, 4, 6, 3], width 64) as in §4.1 (the
  official default is ResNet-101), trained from scratch with BatchNorm (official: DETR's COCO
  weights, frozen BatchNorm). Its endpoints are not activated: VisTR applies ReLU where it reads;
- a plain 3×3 conv replaces the deformable conv in the last mask-FPN layer;
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
from torch import nn

from minivseg.backbone import AxialResNet
from minivseg.panoptic import LABEL_DIVISOR, NUM_CLASSES, THING_CLASSES, VOID_ID
from minivseg.stitching import VideoStitcher, sliding_clips

PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics on the 0..255 scale
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class VisTRConfig:
    thing_classes: tuple[int, ...] = THING_CLASSES  # dataset id of each class logit (K of them)
    num_classes: int = NUM_CLASSES  # dataset classes (stuff included; ids below it are valid)
    num_frames: int = 36  # T, frames per clip (queries are per frame, so fixed per model)
    num_slots: int = 10  # n, instance slots per frame; T·n queries in all
    hidden_dim: int = 384  # d, divisible by 6 (three axes of sin/cos pairs)
    num_heads: int = 8  # attention heads in the transformer and the attention maps
    encoder_layers: int = 6
    decoder_layers: int = 6
    ffn_dim: int = 2048  # transformer feed-forward width
    dropout: float = 0.1
    backbone_blocks: tuple[int, ...] = (3, 4, 6, 3)  # bottleneck blocks per stage (ResNet-50)
    backbone_base_width: int = 64  # bottleneck width of stage 2; outputs 4w, 8w, 16w, 32w
    backbone_stem: tuple[int, ...] = (64, 64, 128)  # Inception-stem conv widths
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
    """Named presets: "tiny" (CPU, T=2) and "paper" (VisTR §4.1 sizes, ResNet-50-shaped)."""
    presets = {
        "tiny": VisTRConfig(
            num_frames=2, hidden_dim=48, num_heads=4, encoder_layers=2, decoder_layers=2,
            ffn_dim=96, dropout=0.0,  # short CPU runs: dropout slows the fit of boxes and classes
            backbone_blocks=(1, 1, 1, 1), backbone_base_width=8, backbone_stem=(8, 8, 16),
            mask_dims=(24, 16, 8, 8), mask_groups=4, sequence_channels=8,
        ),
        "paper": VisTRConfig(),
    }  # fmt: skip
    if preset not in presets:
        raise ValueError(f"unknown VisTR preset {preset!r}; choose from {sorted(presets)}")
    return replace(presets[preset], **overrides)


def sine_position_encoding_3d(
    num_frames: int, height: int, width: int, dim: int, temperature: float = 10000.0, device=None
) -> torch.Tensor:
    """Fixed (T, H, W, dim) encoding (§3.1, Eq. 1): thirds for t, y, x, interleaved sin/cos pairs.

    Positions are 1-based, divided by the axis length and scaled to (0, 2π] (official
    ``normalize=True``); pair k of a third uses frequency ``temperature^(-2k / (dim/3))``, as the
    official code (Eq. 1 prints ω_k = 1/10000^(2k/d)).
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
    t = repeat(t, "T C -> T H W C", H=height, W=width)
    y = repeat(y, "H C -> T H W C", T=num_frames, W=width)
    x = repeat(x, "W C -> T H W C", T=num_frames, H=height)
    return torch.cat([t, y, x], dim=-1)  # [t | y | x], as the official code


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
            layers += [nn.Conv3d(c_in, channels, 3, padding=2, dilation=2),
                       nn.GroupNorm(groups, channels), nn.ReLU()]  # fmt: skip
        self.layers = nn.Sequential(*layers, nn.Conv3d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features G_i (B, C, T, H, W) -> mask logits m_i (B, T, H, W)."""
        return self.layers(features)[:, 0]


class VisTR(nn.Module):
    """Backbone, 3-D-encoded clip transformer, frame-major queries, box/class/mask heads."""

    def __init__(self, cfg: VisTRConfig):
        super().__init__()
        self.cfg = cfg
        d, heads = cfg.hidden_dim, cfg.num_heads
        blocks, width, stem = cfg.backbone_blocks, cfg.backbone_base_width, cfg.backbone_stem
        self.backbone = AxialResNet(blocks, width, stem, use_axial=False, output_stride=32)
        widths = [self.backbone.channels[f"res{k}"] for k in (2, 3, 4, 5)]  # strides 4 .. 32
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
        normalised cxcywh in [0, 1], pred_masks (B, T·n, H/4, W/4) logits, aux_outputs (per
        earlier decoder layer: pred_logits, pred_boxes), num_frames T."""
        B, T = frames.shape[:2]
        if T != self.cfg.num_frames:
            raise ValueError(f"VisTR was built for {self.cfg.num_frames} frames, got {T}")
        x = rearrange((frames - self.pixel_mean) / self.pixel_std, "B T C H W -> (B T) C H W")
        features = self.backbone(x)  # §3.1 backbone, per frame; endpoints are not activated
        s4, s8, s16, s32 = (F.relu(features[f"res{k}"]) for k in (2, 3, 4, 5))
        src = self.input_proj(s32)  # (B·T, d, h, w): 1×1 conv from C to d
        h, w = src.shape[-2:]
        pos = sine_position_encoding_3d(T, h, w, self.cfg.hidden_dim, device=src.device)
        pos = rearrange(pos, "T H W C -> 1 (T H W) C").to(src.dtype)
        memory = rearrange(src, "(B T) C H W -> B (T H W) C", B=B)  # §3.1: one clip sequence
        for layer in self.encoder:
            memory = layer(memory, pos)
        query_pos = repeat(self.query_embed.weight, "N C -> B N C", B=B)  # instance queries
        out, hidden = torch.zeros_like(query_pos), []
        for layer in self.decoder:
            out = layer(out, memory, pos, query_pos)
            hidden.append(self.decoder_norm(out))
        logits = [self.class_head(o) for o in hidden]  # §3.2: linear class head, FFN boxes
        boxes = [self.box_head(o).sigmoid() for o in hidden]
        # §3.3: each frame's n instance features attend to that frame's encoded features E
        n = self.cfg.num_slots
        queries = rearrange(hidden[-1], "B (T N) C -> (B T) N C", T=T)
        encoded = rearrange(memory, "B (T H W) C -> (B T) C H W", T=T, H=h)
        maps = self.attention_maps(queries, encoded)  # (B·T, n, heads, h, w)
        encoded = repeat(encoded, "b C H W -> (b N) C H W", N=n)
        x = torch.cat([encoded, rearrange(maps, "b N h H W -> (b N) h H W")], dim=1)
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
    `VideoStitcher`. ``scores`` receives {"vistr": {track id: score}} at the end (video AP): a
    track's score is the mean of its tubes' scores over the frames that show it.
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
