"""Video semantic segmentation with STT (Li et al., ACM MM 2021, §3.1 and Fig. 2): a shared
per-frame encoder, the Sparse Temporal Transformer of `minivseg.sparse_temporal`, and a PSP
decoder; inference streams the video and encodes each frame once.

§3.1: the input is a clip of T + 1 frames; the last one is labelled (the only annotated frame)
and the T before it are the key frames. The paper splits an image segmenter (PSPNet18/101 or
BiSeNet18/34, split as in TDNet, §4.1.3) into encoder and decoder and plugs STT between them.

- `STTSegmenter`: the encoder is a compact dilated ResNet of `minivseg.backbone` bottleneck
  blocks with output stride 8, or 16 with `output_stride=16` (the last block strided instead of
  dilated, same weights); then the STT layer; then `PyramidPooling`, the PSPNet decoder (average
  pooling into 1, 2, 3 and 6 bins, concatenation, a 3x3 fusion, a 1x1 classifier). Logits are
  upsampled to the input size. `use_stt=False` is the same model without STT, encoding only the
  last frame: the per-frame baseline. `minivseg.tasks` trains it with cross-entropy on the last
  frame's logits.
- Streaming inference (§3.1: "all the frames only need to be encoded once"):
  `semantic_frames(frames)` takes any iterable of (3, H, W) frames, a generator included, and
  yields an (H, W) int64 label map as soon as each frame is in. Each frame is encoded once and its
  key side (the reduction MLP, W^K, W^V) computed once; only the last T frames' keys and values
  are kept. For the first T frames, frame 0 stands in for the missing key frames; the result
  equals `forward` on each frame's window to float rounding. `semantic_video(video)` stacks it.
- Presets (`build_stt`). "tiny" (T = 2, width 32 so d_t = 128, 4 heads, output stride 8, 378 k
  parameters) trains on the CPU: `python -m minivseg.train --preset stt_demo` (training cost and
  a 300-step check in lesson 05, "Measured"). "paper" is the Cityscapes setting of Tables 3 and 4,
  row 1: T = 7 key frames, d_t = 512 reduced to 128, s=1, e=5, eps=1 (527 keys per query), r = 5,
  the top 50% of queries, 8 heads. Its output stride is 16 because Table 3's last row (every key)
  has 57,344 = 7 x 64 x 128 keys: the 64 x 128 maps of a 1024 x 2048 frame at stride 16.
  `python -m minivseg.train --preset stt_paper --data=/data/kitti-step` trains it on one GPU with
  clips of 8 frames.

Deliberate differences: the encoder is the compact ResNet above, trained from scratch, not the
ResNet-18/101 of the paper's PSPNet18/101 (Table 1); n_h = 8 in "paper" is our choice (the paper
does not print it); unlike PSPNet, the pyramid-pooling branches have no normalisation (a 1 x 1
bin of a batch of one has no batch statistics).

Usage:

    model = build_stt("tiny")  # = STTSegmenter(num_classes=19, num_key_frames=2, width=32)
    paper = build_stt("paper")  # T = 7, d_t 512 -> 128, 8 heads, output stride 16
    logits = model(frames)["semantic_logits"]  # (B, T+1, 3, H, W) in [0, 255] -> (B, K, H, W)
    labels = model.semantic_video(video)  # (F, 3, H, W) -> (F, H, W) int64
    for label in model.semantic_frames(stream):  # any iterable of (3, H, W) frames
        ...
"""

from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivseg.backbone import BottleneckBlock, conv_bn
from minivseg.sparse_temporal import SparseTemporalTransformer


class PyramidPooling(nn.Module):
    """PSPNet decoder: pool into 1, 2, 3, 6 bins, project, upsample, concatenate, fuse, classify."""

    def __init__(self, channels: int, num_classes: int, bins=(1, 2, 3, 6)):
        super().__init__()
        branch = channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(channels, branch, 1), nn.ReLU())
            for b in bins
        )  # no norm: a 1x1 bin of a batch of one has no batch statistics
        self.fuse = nn.Sequential(conv_bn(channels + branch * len(bins), channels, 3), nn.ReLU())
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K, H, W) logits."""
        up = lambda y: F.interpolate(y, x.shape[-2:], mode="bilinear", align_corners=False)
        return self.classify(self.fuse(torch.cat([x, *(up(s(x)) for s in self.stages)], 1)))


class STTSegmenter(nn.Module):
    """Video semantic segmentation (STT §3.1, Fig. 2): shared encoder -> STT -> PSP decoder."""

    def __init__(
        self,
        num_classes: int = 19,  # K
        num_key_frames: int = 2,  # T previous frames used as keys
        width: int = 32,  # encoder stem width; features have 4 * width channels (d_t)
        use_stt: bool = True,  # False: same model, STT skipped (per-frame baseline)
        num_heads: int = 4,  # n_h of the STT layer
        output_stride: int = 8,  # 8: last block dilated; 16: last block strided (same weights)
        **stt_options,  # further SparseTemporalTransformer options (query_ratio, end, ...)
    ):
        super().__init__()
        self.num_classes, self.num_key_frames, self.use_stt = num_classes, num_key_frames, use_stt
        self.encoder = nn.Sequential(
            conv_bn(3, width, 3, stride=2),
            BottleneckBlock(width, width // 2, stride=2),
            BottleneckBlock(2 * width, width, stride=2),
            BottleneckBlock(4 * width, width, output_stride // 8, dilation=16 // output_stride),
            nn.ReLU(),
        )  # 4 * width channels
        self.stt = SparseTemporalTransformer(4 * width, num_key_frames, num_heads, **stt_options)
        self.decoder = PyramidPooling(4 * width, num_classes)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, H, W) in [0, 255] -> features (N, 4 * width, H / stride, W / stride)."""
        return self.encoder(frames / 127.5 - 1)

    def decode(self, features, keys, size) -> torch.Tensor:
        """features (B, C, h, w), keys (B, T, C, h, w) or None -> logits (B, K, *size)."""
        if self.use_stt:
            features = self.stt(features, keys)["features"]
        return F.interpolate(self.decoder(features), size, mode="bilinear", align_corners=False)

    def forward(self, frames: torch.Tensor) -> dict:
        """frames (B, T+1, 3, H, W) in [0, 255] -> {"semantic_logits": (B, K, H, W)}, last frame.

        The T earlier frames (oldest first) are the keys (§3.1); without STT only the last is
        encoded.
        """
        size = frames.shape[-2:]
        if not self.use_stt:
            return {"semantic_logits": self.decode(self.encode(frames[:, -1]), None, size)}
        features = self.encode(rearrange(frames, "b t c h w -> (b t) c h w"))
        features = rearrange(features, "(b t) c h w -> b t c h w", b=frames.shape[0])
        return {"semantic_logits": self.decode(features[:, -1], features[:, :-1], size)}

    @torch.no_grad()
    def semantic_frames(self, frames):
        """Iterable of (3, H, W) frames in [0, 255] -> yields (H, W) int64 labels, frame by frame.

        Eval mode (restored when the frames end), the frames' device, bf16 autocast on CUDA. Each
        frame is encoded, and its key side (`stt.project`) computed, once (§3.1); the query side
        reuses the same reduced map, and the last T frames' k, v are kept. Frame f's keys are
        frames f-T ... f-1, frame 0 standing in for those before the video starts: `forward` on
        the window frames[max(f-T..f, 0)] up to float rounding.
        """
        was_training = self.training
        self.eval()
        cache = deque(maxlen=self.num_key_frames)  # (k, v) of the previous T frames
        try:
            for frame in frames:
                on_cuda = frame.device.type == "cuda"
                with torch.autocast(frame.device.type, dtype=torch.bfloat16, enabled=on_cuda):
                    feature = self.encode(frame[None])  # (1, C, h, w)
                    if self.use_stt:
                        reduced, k, v = self.stt.project(feature[:, None])
                        cache.extend([(k, v)] * (self.num_key_frames - len(cache)))  # frame 0
                        keys = [torch.cat(z, 1) for z in zip(*cache)]  # k, v (1, T, h*w, C/4)
                        feature = self.stt.attend(feature, *keys, reduced[:, 0])["features"]
                        cache.append((k, v))
                    logits = self.decoder(feature)
                    size = frame.shape[-2:]
                    logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
                yield logits.argmax(1)[0]
        finally:
            self.train(was_training)

    def semantic_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (F, 3, H, W) in [0, 255] -> (F, H, W) int64 labels (`semantic_frames`)."""
        return torch.stack(list(self.semantic_frames(frames)))


@dataclass
class STTConfig:
    """`STTSegmenter` arguments of a preset; the STT fields are those of the paper's §3.2."""

    num_classes: int = 19  # K
    num_key_frames: int = 2  # T; training clips have T + 1 frames
    width: int = 32  # encoder stem width; d_t = 4 * width
    use_stt: bool = True  # False: the per-frame baseline
    num_heads: int = 4  # n_h
    ffn_channels: int | None = None  # None: d_hat (W_1 under Eq. 10)
    query_ratio: float = 0.5  # top ratio of NSM (§3.2.1, Table 4)
    nsm_radius: int = 5  # r (§3.2.1, Table 4)
    start: int = 1  # s (Eq. 5, Table 3)
    end: int = 5  # e (Eq. 5)
    expansion: int = 1  # eps (Eq. 5)
    output_stride: int = 8  # 8 or 16 (the paper's 64 x 128 maps of 1024 x 2048 frames)
    tiled: bool = True  # sparse attention by `tiled_attention`, else the gather reference


def build_stt(preset: str = "tiny", **overrides) -> STTSegmenter:
    """`STTSegmenter` from a named preset with field overrides.

    "tiny": T = 2, width 32 (d_t = 128), for CPU training on 129 x 417 synthetic clips.
    "paper": the paper's Cityscapes setting (Table 3-4, row 1): T = 7, d_t = 512 reduced to 128,
    8 heads, s=1, e=5, eps=1 (527 keys), r=5, 50% of queries; output stride 16 (64 x 128 maps).
    """
    paper = STTConfig(num_key_frames=7, width=128, num_heads=8, output_stride=16)
    presets = {"tiny": STTConfig(), "paper": paper}
    if preset not in presets:
        raise ValueError(f"unknown STT preset {preset!r}: {', '.join(presets)}")
    return STTSegmenter(**{**asdict(presets[preset]), **overrides})
