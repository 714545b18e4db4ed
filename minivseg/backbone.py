"""Axial-ResNet-50 backbone (MaX-DeepLab-S), its stride-8/4 pixel decoder and a torchvision loader.

The MaX-DeepLab-S backbone (Wang et al., CVPR 2021; DeepLab2 report, "Axial-ResNet"), which
TubeFormer-DeepLab uses (§4.2: "ResNet-50 with axial-attention blocks in the last two stages"):
- an Inception stem: three 3x3 convs with 64, 64 and 128 channels, no max-pool;
- bottleneck stages [3, 4, 6, 3] at output stride 16 (``AxialResNet(output_stride=32)`` is the
  ImageNet-style variant);
- Axial-DeepLab §3.2 Eq. (4) axial blocks (`minivseg.axial_attention`) wherever the original
  ResNet stride reaches 16: stage 4 blocks 2-6 and all of stage 5. An axial block's widths are
  2F (conv1), then key F / value 2F (the attention), then 4F (conv3);
- TubeFormer-DeepLab-Bn (§4.2, §4.4) stacks more axial blocks in stage 4:
  ``extra_stage4_axial_blocks``, 2,238,816 parameters each. The paper's "+13M parameters per n"
  fits six extra blocks per n (13.4M); stacking the five stage-4 axial blocks gives 11.2M.
``AxialResNet()`` has 41,343,424 trainable parameters, ``use_axial=False`` (ResNet-50-beta)
23,631,808, as deeplab2's axial_resnet_instances_test.py.

Follows deeplab2 (model/encoder/axial_resnet.py, model/layers/stems.py, axial_blocks.py,
axial_block_groups.py, drop_path.py; the decoder: axial_resnet.py ``call_stacked_decoder`` with
zero stacks, resized_fuse.py):
- "activation at block input": a block applies ReLU to its non-activated input, takes the
  shortcut from that activated input, and returns shortcut + branch without activation;
- ``activation="gelu"`` puts exact (erf) GeLU in place of every ReLU, in the stem, the blocks and
  the decoder (deeplab2 passes ``activation`` to each; activations.py ``'gelu'`` is
  ``approximate=False``): deeplab2's kMaX pixel encoder ``axial_resnet50``, whose ImageNet-22k
  checkpoint is "Axial-ResNet-50 (MaX-S w/ GeLU)". The state_dict keys are the same;
- the last BN of every residual branch (conv3) starts with gamma 0;
- drop path with deeplab2's linear schedule (keep 1 - (1 - p) * stage / 4 beyond stride 16):
  keep 0.85 at stride 16 and 0.8 at stride 32 when ``drop_path_keep_prob=0.8``;
- `PixelDecoder`: stride 16 -> 8 -> 4, a ResizedFuse with the skip feature, then one conv
  bottleneck per stride;
- BatchNorm momentum 0.01 (TF 0.99), eps 1e-3.
Differences: endpoints are named res2..res5 but are all NON-activated (deeplab2's "stage2..");
convs use PyTorch's He-normal (deeplab2: truncated He-normal); the decoder's ResizedFuse only
upsamples (deeplab2 also has a stride-2 conv path for downsampling inputs).

deeplab2's ImageNet checkpoints for Axial-ResNet are TensorFlow. `load_torchvision_resnet50`
starts the convolutional part from a torchvision ResNet-50 state dict (torchvision key names). It
copies a tensor only where the shapes agree, and a BN only if its conv was copied. Skipped: the
7x7 stem; stage 2 block 1's conv1 and shortcut (our stem gives 128 channels, torchvision's 64);
everything an axial block replaces (its conv1, conv3, attention); ``fc``. On MaX-S that loads
156 tensors, 5,027,968 of 41,343,424 parameters; with ``use_axial=False`` 300 tensors,
23,477,376 of 23,631,808.

    backbone, decoder = AxialResNet(), PixelDecoder(2048, 512, 256)
    f = backbone(torch.rand(1, 3, 129, 417) * 255 / 127.5 - 1)  # the model normalises x/127.5 - 1
    s4 = torch.relu(decoder(f["res5"], f["res3"], f["res2"]))    # (1, 256, 33, 105)
    report = load_torchvision_resnet50(backbone, torch.load("resnet50.pth", weights_only=True))
"""

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from minivseg.axial_attention import BN_EPS, BN_MOMENTUM, AxialAttention2D

OUTPUT_STRIDE = 16
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # F.gelu is the exact erf form


def activation_fn(name: str):
    """``"relu"`` or ``"gelu"`` -> its function; any other name raises a ValueError."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def conv_bn(in_channels, out_channels, kernel_size, stride=1, dilation=1, zero_gamma=False):
    """Bias-free conv (symmetric padding) followed by BatchNorm; no activation."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride,
        padding=dilation * (kernel_size - 1) // 2,
        dilation=dilation,
        bias=False,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    bn = nn.BatchNorm2d(out_channels, BN_EPS, BN_MOMENTUM)
    if zero_gamma:
        nn.init.zeros_(bn.weight)
    return nn.Sequential(OrderedDict(conv=conv, bn=bn))


def drop_path_rate(keep_prob_last_stage: float, resnet_stride: int) -> float:
    """Drop rate of a block at this original-ResNet stride (deeplab2 'linear' schedule)."""
    if resnet_stride < 16:
        return 0.0
    stage = math.log2(resnet_stride) - 1  # stride 16 -> stage 3, stride 32 -> stage 4
    return (1.0 - keep_prob_last_stage) * stage / 4


class DropPath(nn.Module):
    """Stochastic depth: per sample, zero the residual branch or rescale it by 1/keep."""

    def __init__(self, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) -> same shape; identity in eval mode."""
        if not self.training or self.drop_rate == 0.0:
            return x
        keep = 1.0 - self.drop_rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.floor(keep + torch.rand(shape, device=x.device, dtype=x.dtype))
        return x * mask / keep


class BottleneckBlock(nn.Module):
    """Residual bottleneck: 1x1 -> 3x3 conv (or axial attention) -> 1x1, activation at input.

    Conv filters [F, F, 4F]; axial filters [2F, (key F, value 2F), 4F] (deeplab2 axial_blocks.py).
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        stride: int = 1,
        axial: bool = False,
        drop_path: float = 0.0,
        num_heads: int = 8,
        max_span: int = 255,
        dilation: int = 1,
        activation: str = "relu",
    ):
        super().__init__()
        self.stride, self.axial = stride, axial
        self.act = activation_fn(activation)
        width = 2 * filters if axial else filters
        self.conv1 = conv_bn(in_channels, width, 1)
        if axial:
            self.attention = AxialAttention2D(
                width, filters, 2 * filters, num_heads, max_span, stride
            )
        else:
            self.conv2 = conv_bn(width, filters, 3, stride, dilation)
        self.conv3 = conv_bn(width if axial else filters, 4 * filters, 1, zero_gamma=True)
        self.shortcut = None
        if in_channels != 4 * filters:
            self.shortcut = conv_bn(in_channels, 4 * filters, 1, stride)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) non-activated -> (B, 4F, (H-1)//stride + 1, (W-1)//stride + 1) idem."""
        x = self.act(x)
        s = self.stride
        shortcut = x[:, :, ::s, ::s] if self.shortcut is None else self.shortcut(x)
        y = self.act(self.conv1(x))
        if self.axial:
            y = self.act(self.attention(y))  # strided inside, as deeplab2
        else:
            y = self.act(self.conv2(y))
        return shortcut + self.drop_path(self.conv3(y))


class AxialResNet(nn.Module):
    """Inception stem + 4 bottleneck stages at output stride 16; axial blocks at stride 16.

    ``output_stride=32`` (an ImageNet-style ResNet, as VisTR's backbone) strides stage 5's first
    block by 2 and dilates nothing; axial blocks stay where the original ResNet stride is 16.
    ``activation="gelu", output_stride=32`` is deeplab2's "Axial-ResNet-50 (MaX-S w/ GeLU)".
    """

    def __init__(
        self,
        num_blocks=(3, 4, 6, 3),
        base_width: int = 64,
        stem_channels=(64, 64, 128),
        drop_path_keep_prob: float = 1.0,
        use_axial: bool = True,
        num_heads: int = 8,
        max_span: int = 255,
        extra_stage4_axial_blocks: int = 0,
        output_stride: int = OUTPUT_STRIDE,
        activation: str = "relu",
    ):
        super().__init__()
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        activation_fn(activation)
        self.output_stride = output_stride
        c1, c2, c3 = stem_channels
        # Inception stem: three 3x3 convs, no max-pool; the last one is not activated.
        act = nn.GELU if activation == "gelu" else nn.ReLU  # nn.GELU() is the exact form
        self.stem = nn.Sequential(
            conv_bn(3, c1, 3, stride=2),
            act(),
            conv_bn(c1, c2, 3),
            act(),
            conv_bn(c2, c3, 3),
        )
        self.channels = {"stem": c3}
        blocks_per_stage = list(num_blocks)
        blocks_per_stage[2] += extra_stage4_axial_blocks
        in_channels, resnet_stride = c3, 2  # the stride of the ResNet without atrous convs
        for index, blocks in enumerate(blocks_per_stage):
            filters = base_width * 2**index
            stage = []
            for block_index in range(blocks):
                first = block_index == 0
                stage.append(
                    BottleneckBlock(
                        in_channels,
                        filters,
                        stride=2 if first and resnet_stride < output_stride else 1,
                        axial=use_axial and resnet_stride >= OUTPUT_STRIDE,
                        drop_path=drop_path_rate(drop_path_keep_prob, resnet_stride),
                        num_heads=num_heads,
                        max_span=max_span,
                        dilation=max(resnet_stride // output_stride, 1),
                        activation=activation,
                    )
                )
                in_channels = 4 * filters
                resnet_stride *= 2 if first else 1
            setattr(self, f"stage{index + 2}", nn.Sequential(*stage))
            self.channels[f"res{index + 2}"] = in_channels

    def forward(self, x: torch.Tensor) -> dict:
        """x (B, 3, H, W), normalised -> dict of (B, C, h, w) features, all non-activated.

        stem at stride 2, res2 at 4, res3 at 8, res4 at 16, res5 at 16 (``output_stride=32``:
        at 32); h = (H - 1) // stride + 1.
        """
        out = {"stem": self.stem(x)}
        out["res2"] = self.stage2(out["stem"])
        out["res3"] = self.stage3(out["res2"])
        out["res4"] = self.stage4(out["res3"])
        out["res5"] = self.stage5(out["res4"])
        return out


class ResizedFuse(nn.Module):
    """Sum of inputs brought to one size and width: equal width -> resize only, else ReLU -> 1x1."""

    def __init__(self, in_channels, out_channels: int, activation: str = "relu"):
        super().__init__()
        self.act = activation_fn(activation)
        self.projections = nn.ModuleList(
            nn.Identity() if c == out_channels else conv_bn(c, out_channels, 1) for c in in_channels
        )

    def forward(self, features, size) -> torch.Tensor:
        """features: list of (B, C_i, H_i, W_i); size (H, W) -> (B, out_channels, H, W)."""
        fused = 0
        for feature, project in zip(features, self.projections):
            if not isinstance(project, nn.Identity):
                feature = project(self.act(feature))
            if tuple(feature.shape[-2:]) != tuple(size):
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=True)
            fused = fused + feature
        return fused


class PixelDecoder(nn.Module):
    """Stride 16 -> 8 -> 4 decoder: ResizedFuse with the skip feature, then one conv bottleneck."""

    def __init__(
        self,
        in_channels_s16: int,
        in_channels_s8: int,
        in_channels_s4: int,
        filters_s8: int = 128,
        filters_s4: int = 64,
        activation: str = "relu",
    ):
        super().__init__()
        width_s8, width_s4 = 4 * filters_s8, 4 * filters_s4
        self.fuse_s8 = ResizedFuse([in_channels_s16, in_channels_s8], width_s8, activation)
        self.block_s8 = BottleneckBlock(width_s8, filters_s8, activation=activation)
        self.fuse_s4 = ResizedFuse([width_s8, in_channels_s4], width_s4, activation)
        self.block_s4 = BottleneckBlock(width_s4, filters_s4, activation=activation)
        self.out_channels = width_s4

    def forward(self, s16: torch.Tensor, s8: torch.Tensor, s4: torch.Tensor) -> torch.Tensor:
        """s16 (B,C16,h16,w16), s8 (B,C8,h8,w8), s4 (B,C4,h4,w4) -> (B, out_channels, h4, w4).

        Output is non-activated; the caller applies the activation.
        """
        x = self.block_s8(self.fuse_s8([s16, s8], s8.shape[-2:]))
        return self.block_s4(self.fuse_s4([x, s4], s4.shape[-2:]))


def _torchvision_target(key: str):
    """torchvision ResNet key -> (our conv+BN unit, our key), or None if it has no counterpart."""
    stem = re.fullmatch(r"(conv1|bn1)\.(.+)", key)
    if stem:
        part = "conv" if stem[1] == "conv1" else "bn"
        return "stem.0", f"stem.0.{part}.{stem[2]}"
    block = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(.+)", key)
    if block is None:
        return None
    layer, index, name, param = block.groups()
    prefix = f"stage{int(layer) + 1}.{index}"
    if name.startswith("downsample"):
        unit, part = f"{prefix}.shortcut", "conv" if name.endswith("0") else "bn"
    else:
        unit, part = f"{prefix}.conv{name[-1]}", name[:-1]
    return unit, f"{unit}.{part}.{param}"


def load_torchvision_resnet50(backbone: AxialResNet, state_dict: dict) -> dict:
    """Copy the tensors of a torchvision ResNet-50 state dict whose counterpart has the same shape.

    A BN is copied only if the conv it normalises was. Returns dict(loaded=torchvision keys copied,
    copied=the backbone keys they filled, skipped=torchvision keys not copied, missing=backbone
    keys left at init, reasons={key: why}).
    """
    ours = backbone.state_dict()
    targets = {key: _torchvision_target(key) for key in state_dict}
    conv_loaded = {
        target[0]
        for key, target in targets.items()
        if target and target[1].endswith("conv.weight") and target[1] in ours
        if ours[target[1]].shape == state_dict[key].shape
    }
    copied, reasons = {}, {}
    for key, value in state_dict.items():
        target = targets[key]
        if target is None or target[1] not in ours:
            reasons[key] = "no counterpart (head, axial attention or absent block)"
        elif ours[target[1]].shape != value.shape:
            reasons[key] = f"shape {tuple(value.shape)} vs {tuple(ours[target[1]].shape)}"
        elif target[0] not in conv_loaded:
            reasons[key] = "its convolution was skipped"
        else:
            copied[target[1]] = value
    backbone.load_state_dict(copied, strict=False)
    return {
        "loaded": [key for key in state_dict if key not in reasons],
        "copied": list(copied),
        "skipped": list(reasons),
        "missing": [key for key in ours if key not in copied],
        "reasons": reasons,
    }
