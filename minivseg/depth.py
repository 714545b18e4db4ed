"""Depth prediction branch and depth loss: TubeFormer-DeepLab for depth-aware video panoptic seg.

TubeFormer-DeepLab §3.2 "Depth prediction branch": ASPP and a DeepLabv3+ lightweight decoder on
the CNN backbone features x_v (not on the decoded x'_v, which the paper found slightly worse),
sigmoid times the maximum depth, trained with ViP-DeepLab's loss (Qiao et al. 2021): scale
invariant logarithmic error (Eigen et al. 2014) + relative squared error (Uhrig et al. 2017),
weight 100. Frames are independent (folded into the batch), as in the backbone.

Layout as deeplab2 builds ViP-DeepLab's depth prediction (model/decoder/vip_deeplab_decoder.py,
panoptic_deeplab.py ``PanopticDeepLabSingleDecoder``/``PanopticDeepLabSingleHead``, aspp.py,
layers/convolutions.py; configs/*_dvps/vip_deeplab/*.textproto), at ``channels = C`` (256 there):

    res5 (s16) -> ASPP: [1x1, 3x3 at rates 6/12/18, image pool + 1x1] -> concat -> 1x1, dropout 0.1
      -> per low-level feature res3 (s8), then res2 (s4): 1x1 projection to C/4, resp. C/8
         channels; upsample the running feature to it (bilinear, align corners); concat;
         separable 5x5 conv (depthwise 5x5 + BN + ReLU, pointwise -> C + BN + ReLU)
      -> head: separable 5x5 conv -> C/4, 1x1 conv -> 1 (bias, truncated normal std 0.01)
      -> sigmoid x max_depth: (N, h, w) metres at stride 4

Every conv is bias-free + BN (deeplab2's BN_EPS/BN_MOMENTUM) + ReLU; the inputs get the backbone's
activation first (deeplab2's resN endpoints are the activated stage outputs). Which x_v: deeplab2's
``res5``, the output of the stage-5 hierarchical blocks (``TubeFormer.resnet_view`` "stage5",
deeplab2's MaX-DeepLab ``backbone_output``), which ViP-DeepLab's configs feed the ASPP
(``feature_key: "res5"``); it has seen the latent and global attention, not the pixel decoder.
The alternatives: res4 (per-frame CNN only, half the channels) or the stride-16 feature after
stage5_extra, where the pixel decoder starts.

`depth_loss` is deeplab2's SILogPlusRelativeSquaredLoss (model/loss/base_loss.py), per frame on
the pixels with depth (> 0, deeplab2's ``ignore_depth=0``), then the mean over frames:

    d_i = log d*_i - log d_i;  SILog = mean(d^2) - mean(d)^2   (no lambda, no sqrt, no x100)
    RelSq = sqrt(mean(((d*_i - d_i) / d*_i)^2))

Differences from deeplab2: its depth head reads the semantic decoder's feature, upsampled 2x
(stride 2); here the decoder is the depth branch's own (TubeFormer) and predicts at stride 4
(`upsample_depth` brings it to the label size, as deeplab2 resizes every prediction for the loss).
Convs start from PyTorch's He-normal (deeplab2: Keras he_normal; glorot-uniform depthwise).
deeplab2's DVPS configs use rates 3/6/9 (also at output stride 16) and max depth 88; here
DeepLab's stride-16 rates 6/12/18 and ``MAX_DEPTH`` (80). The ASPP pool is global (deeplab2 pools
over the training crop: the same at crop size). SILog is computed as mean((d - mean d)^2), the same
value without the cancellation. Frames without depth leave the mean (deeplab2's NaN zeroes the
whole step's loss); predictions are floored at 1e-6 before the log; the 1-channel output and the
loss run in float32 under autocast. Training needs 2+ frames a batch (the image-pool BN).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from minivseg.axial_attention import BN_EPS, BN_MOMENTUM
from minivseg.backbone import activation_fn, conv_bn
from minivseg.panoptic import MAX_DEPTH

ASPP_RATES = (6, 12, 18)  # DeepLab's atrous rates at output stride 16
MIN_PREDICTION = 1e-6  # floor before the log: a float32 sigmoid reaches 0 below logit -88


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
    """deeplab2's Conv2DSame(use_bn=True, activation="relu"): bias-free conv, BN, ReLU."""
    return nn.Sequential(
        conv_bn(in_channels, out_channels, kernel_size, dilation=dilation), nn.ReLU()
    )


def separable_conv(in_channels: int, out_channels: int, kernel_size: int = 5) -> nn.Sequential:
    """deeplab2's depthwise_separable_conv: depthwise k x k + BN + ReLU, pointwise + BN + ReLU."""
    depthwise = nn.Conv2d(
        in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels,
        bias=False,
    )  # fmt: skip
    nn.init.kaiming_normal_(depthwise.weight, mode="fan_in", nonlinearity="relu")
    return nn.Sequential(
        OrderedDict(
            depthwise=depthwise,
            depthwise_bn=nn.BatchNorm2d(in_channels, BN_EPS, BN_MOMENTUM),
            depthwise_relu=nn.ReLU(),
            pointwise=conv_bn_relu(in_channels, out_channels, 1),
        )
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3 §3.3): five parallel branches, concat, 1x1."""

    def __init__(self, in_channels: int, channels: int, rates=ASPP_RATES, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 1)
        self.atrous = nn.ModuleList(conv_bn_relu(in_channels, channels, 3, r) for r in rates)
        self.pool = conv_bn_relu(in_channels, channels, 1)  # on the image mean, one value/frame
        self.project = conv_bn_relu((len(rates) + 2) * channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C_in, h, w) activated -> (N, channels, h, w). Training needs N >= 2 (pool BN)."""
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        branches = [self.conv(x), *(conv(x) for conv in self.atrous), pooled]
        return self.dropout(self.project(torch.cat(branches, 1)))


class DepthBranch(nn.Module):
    """res5 (s16), res3 (s8), res2 (s4) of each frame -> depth (N, h4, w4) in (0, max_depth)."""

    def __init__(
        self,
        in_channels: tuple[int, int, int],
        channels: int = 256,
        max_depth: float = MAX_DEPTH,
        activation: str = "relu",
    ):
        super().__init__()
        c5, c3, c2 = in_channels
        self.max_depth = max_depth
        self.act = activation_fn(activation)  # the backbone's, for its non-activated features
        self.aspp = ASPP(c5, channels)
        # Low-level projections C/4 (res3) and C/8 (res2): deeplab2's 64 and 32 at C = 256.
        projections = (max(channels // 4, 1), max(channels // 8, 1))
        self.project = nn.ModuleList(conv_bn_relu(c, p, 1) for c, p in zip((c3, c2), projections))
        self.fuse = nn.ModuleList(separable_conv(channels + p, channels) for p in projections)
        self.head = separable_conv(channels, max(channels // 4, 1))  # deeplab2's head_channels 64
        self.output = nn.Conv2d(max(channels // 4, 1), 1, 1)
        nn.init.trunc_normal_(self.output.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(self.output.bias)

    def forward(self, res5: torch.Tensor, res3: torch.Tensor, res2: torch.Tensor) -> torch.Tensor:
        """Non-activated (N, C5, h16, w16), (N, C3, h8, w8), (N, C2, h4, w4) -> (N, h4, w4) m."""
        x = self.aspp(self.act(res5))
        for feature, project, fuse in zip((res3, res2), self.project, self.fuse):
            low = project(self.act(feature))
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
            x = fuse(torch.cat([x, low], 1))
        x = self.head(x)
        # The 1-channel output in float32: bf16 would round 80 m to 0.5 m steps.
        with torch.autocast(x.device.type, enabled=False):
            logits = self.output(x.float())[:, 0]
        return torch.sigmoid(logits) * self.max_depth


def upsample_depth(depth: torch.Tensor, size) -> torch.Tensor:
    """depth (B, T, h, w) -> (B, T, H, W): bilinear, align corners (as the mask logits), float32."""
    with torch.autocast(depth.device.type, enabled=False):
        return F.interpolate(depth.float(), size=tuple(size), mode="bilinear", align_corners=True)


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """pred, target (B, T, H, W) or (N, H, W) metres, target 0 = no depth -> (loss, terms).

    ``loss = depth_silog + depth_relsq`` (both unweighted): each per frame over its pixels with
    depth, then the mean over frames that have any; 0 (gradient 0) when no frame has depth.
    """
    with torch.autocast(pred.device.type, enabled=False):
        pred = pred.float().flatten(0, -3).flatten(1)  # (N, HW)
        target = target.to(pred.device).float().flatten(0, -3).flatten(1)
        valid = target > 0
        count = valid.sum(1)  # (N,)
        n = count.clamp_min(1)
        safe_target = torch.where(valid, target, 1.0)
        safe_pred = torch.where(valid, pred.clamp_min(MIN_PREDICTION), 1.0)
        # SILog: the variance of the log ratio over the frame's depth pixels.
        d = safe_target.log() - safe_pred.log()  # 0 off the depth pixels
        mean = d.sum(1, keepdim=True) / n[:, None]
        silog = torch.where(valid, (d - mean) ** 2, 0.0).sum(1) / n
        # RelSq: root mean squared relative error; sqrt'(0) is infinite, so 0 stays out of it.
        mean_square = (((safe_target - safe_pred) / safe_target) ** 2).sum(1) / n
        positive = mean_square > 0
        relsq = torch.where(positive, torch.where(positive, mean_square, 1.0).sqrt(), 0.0)
        has_depth = (count > 0).float()
        frames = has_depth.sum().clamp_min(1)
        terms = {
            "depth_silog": (silog * has_depth).sum() / frames,
            "depth_relsq": (relsq * has_depth).sum() / frames,
        }
    return terms["depth_silog"] + terms["depth_relsq"], terms


class DepthAwareLoss(nn.Module):
    """A task loss plus ``weight`` x `depth_loss` (TubeFormer §3.2: weight 100).

    ``forward(outputs, batch) -> (total, terms)``: when ``outputs["depth"]`` (B, T, h, w) and
    ``batch["depth"]`` (B, T, H, W) are both there, the prediction is upsampled to the label size
    and ``terms`` gains "depth" (unweighted) with its parts "depth_silog" and "depth_relsq".
    ``losses(pairs)`` does the same for a list of (outputs, batch), through the wrapped loss's own
    ``losses`` where it has one (the tube loss matches all clips in one transfer). Targets beyond
    ``max_depth``, which the head cannot reach (a frame scaled down by s has depth / s), count as
    unknown.
    """

    def __init__(self, criterion, weight: float = 100.0, max_depth: float = MAX_DEPTH):
        super().__init__()
        self.criterion, self.weight, self.max_depth = criterion, weight, max_depth

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """The wrapped loss's (total, terms), plus the weighted depth loss and its terms."""
        return self.add_depth(outputs, batch, *self.criterion(outputs, batch))

    def losses(self, pairs) -> list[tuple[torch.Tensor, dict]]:
        """`forward` for each (outputs, batch) of ``pairs``."""
        if hasattr(self.criterion, "losses"):
            results = self.criterion.losses(pairs)
        else:
            results = [self.criterion(outputs, batch) for outputs, batch in pairs]
        return [self.add_depth(o, b, *result) for (o, b), result in zip(pairs, results)]

    def add_depth(self, outputs: dict, batch: dict, total, terms: dict):
        """(total, terms) of the wrapped loss -> with the weighted depth loss added."""
        if "depth" not in outputs or "depth" not in batch:
            return total, terms
        target = batch["depth"].to(outputs["depth"].device, non_blocking=True)
        target = torch.where(target <= self.max_depth, target, 0.0)
        loss, parts = depth_loss(upsample_depth(outputs["depth"], target.shape[-2:]), target)
        parts = {name: value.detach() for name, value in parts.items()}
        return total + self.weight * loss, {**terms, "depth": loss.detach(), **parts}
