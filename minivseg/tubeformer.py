"""TubeFormer-DeepLab: a mask transformer that predicts class-labelled video tubes for a clip.

TubeFormer-DeepLab §3.2 and Fig. 3, with MaX-DeepLab-S's sizes and heads as deeplab2 builds them:

    frames (B,T,3,H,W) in [0,255] -> x/127.5-1 -> backbone per frame (stem, stages 2-4)
      -> 4 hierarchical blocks at stride 16 (stage-5 blocks x3 + stage5_extra), each: axial block
         -> latent dual-path (per frame, L slots) -> global dual-path (whole clip, N slots)
      -> pixel decoder s16 -> s8 -> s4 -> pixel head (dw 5x5, 1x1, 1x1 -> D, BN, L2 norm) = x'_v
      -> heads on the memory: class (things, stuff ascending, void; + log(K*9) void prior) and
         tube embedding w; tube logits BN_1(x'_v . w) (one shared BN channel, gamma 0.1), Eq. (1)
      -> semantic logits = one linear layer on x'_v

Eq. (1): ``m = softmax_N(x'_v . w)``, the softmax over the N slots of every clip pixel.
deeplab2: model/encoder/axial_resnet.py (memory, stage5_extra, stacked decoder, class and mask
FFNs), model/decoder/max_deeplab.py (pixel, mask and class heads, void prior, mask BN),
model/encoder/axial_resnet_instances.py (MaX-DeepLab-S, whose parameter count
``build_model("kitti", use_latent=False)`` reproduces). TubeFormer additions (§3.2): the latent
memory (L slots, copied per frame); the last |C_stuff| global slots kept for the stuff classes
("split thing and stuff"); the semantic head on x'_v; `minivseg.depth`; ``n`` = -Bn (§4.2, §4.4).
``activation="gelu"`` (exact GeLU) goes wherever deeplab2's AxialResNet passes its ``activation``:
backbone, dual paths, decoder, class/mask FFNs; the pixel head keeps ReLU (deeplab2's MaX head).
``memory_update="clustering"``: CMT-DeepLab's clustering update (`minivseg.clustering`, §3.3) in
every global layer; its aux outputs pair as kMaX-DeepLab's ``_prepare_auxiliary_results``.
Deep supervision (``aux_heads``, the loss's ``deep_supervision``): memory-side heads for every
earlier global layer, as kMaX-DeepLab (deeplab2's MaX-DeepLab has none).
Differences from deeplab2: none in the layers. The stage-5 blocks live in the hierarchical blocks
(``blocks.{i}.pixel_block``), so ``backbone`` is stem + stages 2-4 (``resnet_view()`` gives the
whole ResNet). The last latent layer skips its memory update, whose output nothing reads.

    model = build_model("tiny")  # or "kitti"; any TubeFormerConfig field as an override
    out = model(frames)  # frames (B, T, 3, H, W) in [0, 255]; the keys are in TubeFormer.forward
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivseg.axial_attention import BN_EPS, BN_MOMENTUM
from minivseg.backbone import (
    AxialResNet,
    BottleneckBlock,
    PixelDecoder,
    activation_fn,
    drop_path_rate,
)
from minivseg.clustering import ClusteringBlock, ClusteringUpdate, assignment_mask_logits
from minivseg.depth import DepthBranch
from minivseg.dual_path import (
    GlobalDualPath,
    HierarchicalBlock,
    LatentDualPath,
    LinearBN,
    run_checkpointed,
)
from minivseg.panoptic import MAX_DEPTH, NUM_CLASSES, THING_CLASSES, thing_stuff_class_ids


@dataclass
class TubeFormerConfig:
    # backbone (Axial-ResNet-50 = MaX-DeepLab-S)
    num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottlenecks in stages 2-5
    base_width: int = 64  # stage-2 bottleneck width F; stages use F * (1, 2, 4, 8)
    stem_channels: tuple[int, int, int] = (64, 64, 128)  # the three 3x3 stem convs
    use_axial: bool = True  # axial attention blocks where the stride reaches 16
    axial_heads: int = 8  # heads of every axial attention
    max_span: int = 255  # longest axis with its own relative position (509-row tables)
    n: int = 1  # TubeFormer-DeepLab-Bn: stage-4 axial blocks stacked n times (+11.2M per n)
    drop_path_keep_prob: float = 1.0  # keep prob at stride 32 (linear schedule; 0.8 for training)
    activation: str = "relu"  # "relu" or "gelu" (exact; "Axial-ResNet-50 (MaX-S w/ GeLU)")
    # global memory and dual-path layers
    memory_update: str = "dual_path"  # global layer type: "dual_path" or "clustering" (CMT)
    clustering_assignment: str = "soft"  # clustering Z: "soft" softmax_N or "argmax" (kMaX)
    num_reference_points: int = 8  # clustering: reference points R per slot (CMT M=8; 0 = none)
    coord_conv: bool = True  # clustering: concat (y, x) / reference points before the projections
    use_global: bool = True  # global dual-path after every stride-16 block
    use_latent: bool = True  # latent dual-path before it (False: TubeFormer-DeepLab-Simple)
    num_slots: int = 128  # N global memory slots = predicted tubes (last |C_stuff| for stuff)
    memory_channels: int = 256  # C of the global memory
    num_latent: int = 16  # L latent memory slots, copied per frame
    latent_channels: int = 256  # C of the latent memory
    transformer_heads: int = 8  # heads of every dual-path attention
    bottleneck_channels: int = 256  # dual-path width after the input projections
    key_channels: int = 128  # total query/key depth of a dual-path attention
    value_channels: int = 256  # total value depth of a dual-path attention
    ffn_channels: int = 2048  # hidden width of the memory feed-forward network
    # pixel decoder and heads
    decoder_filters_s8: int = 128  # stride-8 decoder bottleneck width (output 4x)
    decoder_filters_s4: int = 64  # stride-4 decoder bottleneck width (output 4x)
    head_channels: int = 256  # class / mask FFN width on the memory
    pixel_head_channels: int = 256  # depthwise-separable conv width of the pixel head
    embedding_channels: int = 128  # D of the tube and pixel embeddings
    num_classes: int = NUM_CLASSES  # K dataset classes (void is extra)
    thing_classes: tuple[int, ...] = THING_CLASSES  # classes with instances (tracks)
    num_frames: int = 2  # clip length T this preset trains on (forward accepts any T)
    aux_heads: bool = False  # deep supervision: own class/mask heads on every earlier layer
    gradient_checkpointing: bool = False  # recompute axial and dual-path blocks in backward
    depth: bool = False  # add the depth branch: output "depth" (B, T, h, w) in (0, max_depth)
    max_depth: float = MAX_DEPTH  # metres: the depth sigmoid's scale
    depth_channels: int = 256  # ASPP and decoder width C of the depth branch (deeplab2: 256)


def tiny_config() -> TubeFormerConfig:
    """CPU size: trains on 129x417 synthetic clips in minutes. 2 stride-16 blocks, N=32, L=4;
    2,005,201 parameters (``memory_update="clustering"``: 2,030,949; ``depth``: +120,462)."""
    return TubeFormerConfig(
        num_blocks=(1, 1, 1, 1), base_width=16, stem_channels=(16, 16, 16), axial_heads=4,
        num_slots=32, memory_channels=64, num_latent=4, latent_channels=64, transformer_heads=4,
        bottleneck_channels=64, key_channels=32, value_channels=64, ffn_channels=128,
        decoder_filters_s8=16, decoder_filters_s4=16, head_channels=64, pixel_head_channels=64,
        embedding_channels=32, depth_channels=8,
    )  # fmt: skip


def kitti_config() -> TubeFormerConfig:
    """TubeFormer-DeepLab-B1 on KITTI-STEP: MaX-DeepLab-S sizes, N=128, L=16, T=2, drop path 0.8;
    70,772,537 parameters (``memory_update="clustering"``: 71,469,889; ``depth``: +15,772,833)."""
    return TubeFormerConfig(drop_path_keep_prob=0.8)


PRESETS = {"tiny": tiny_config, "kitti": kitti_config}


def make_global_layer(cfg: TubeFormerConfig, pixel_channels: int, drop_path: float) -> nn.Module:
    """The one place that picks the global memory update (same forward contract for every kind)."""
    if cfg.memory_update == "dual_path":
        return GlobalDualPath(
            pixel_channels, cfg.memory_channels, cfg.bottleneck_channels, cfg.key_channels,
            cfg.value_channels, cfg.transformer_heads, cfg.ffn_channels, drop_path,
            activation=cfg.activation,
        )  # fmt: skip
    if cfg.memory_update == "clustering":
        return ClusteringUpdate(
            pixel_channels, cfg.memory_channels, cfg.bottleneck_channels, cfg.key_channels,
            cfg.value_channels, cfg.transformer_heads, cfg.ffn_channels, drop_path,
            cfg.num_reference_points, cfg.clustering_assignment, cfg.coord_conv, cfg.activation,
        )  # fmt: skip
    raise ValueError(
        f"unknown memory_update {cfg.memory_update!r}; available: 'dual_path', 'clustering'"
    )


class TubeFormer(nn.Module):
    """frames (B, T, 3, H, W) in [0, 255] -> dict of class and tube predictions (see forward)."""

    def __init__(self, cfg: TubeFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.act = activation_fn(cfg.activation)
        K = cfg.num_classes
        things = tuple(cfg.thing_classes)
        if len(set(things)) != len(things) or not all(0 <= c < K for c in things):
            raise ValueError(
                f"thing_classes={cfg.thing_classes} must be distinct class ids below "
                f"num_classes={K}; set both, e.g. --model.num_classes=12 --model.thing_classes=11"
            )
        self.thing_stuff_class_ids = thing_stuff_class_ids(K, cfg.thing_classes)
        stuff = self.thing_stuff_class_ids[len(cfg.thing_classes) :]
        self.num_stuff = len(stuff)
        if cfg.num_slots <= self.num_stuff:
            raise ValueError(f"num_slots={cfg.num_slots} must exceed {self.num_stuff} stuff slots")
        # TubeFormer "split thing and stuff": slot N - S + j is reserved for the j-th stuff class.
        first = cfg.num_slots - self.num_stuff
        self.stuff_slot_classes = {first + j: c for j, c in enumerate(stuff)}

        # Stem + stages 2-4; stage 5 is built below, inside the hierarchical blocks.
        stage4_axial = cfg.num_blocks[2] - 1  # the first stage-4 block is a strided conv block
        self.backbone = AxialResNet(
            (*cfg.num_blocks[:3], 0), cfg.base_width, cfg.stem_channels, cfg.drop_path_keep_prob,
            cfg.use_axial, cfg.axial_heads, cfg.max_span, (cfg.n - 1) * stage4_axial,
            activation=cfg.activation,
        )  # fmt: skip
        channels = self.backbone.channels

        # Stride 16: stage 5 (ResNet stride 16, then 32) + stage5_extra, each block + dual paths.
        filters = 8 * cfg.base_width
        in_channels, pixel_channels = channels["res4"], 4 * filters
        resnet_strides = [16] + [32] * cfg.num_blocks[3]
        blocks = []
        for index, stride in enumerate(resnet_strides):
            rate = drop_path_rate(cfg.drop_path_keep_prob, stride)
            pixel_block = BottleneckBlock(
                in_channels, filters, axial=cfg.use_axial, drop_path=rate,
                num_heads=cfg.axial_heads, max_span=cfg.max_span, dilation=stride // 16,
                activation=cfg.activation,
            )  # fmt: skip
            latent = None
            if cfg.use_latent:
                latent = LatentDualPath(
                    pixel_channels, cfg.latent_channels, drop_path=rate,
                    bottleneck_channels=cfg.bottleneck_channels,
                    key_channels=cfg.key_channels, value_channels=cfg.value_channels,
                    num_heads=cfg.transformer_heads, ffn_channels=cfg.ffn_channels,
                    activation=cfg.activation,
                    update_memory=index < len(resnet_strides) - 1,  # the last latent is never read
                )  # fmt: skip
            global_path = make_global_layer(cfg, pixel_channels, rate) if cfg.use_global else None
            # The clustering block also carries the clustering state from block to block.
            block = (
                ClusteringBlock if isinstance(global_path, ClusteringUpdate) else HierarchicalBlock
            )
            blocks.append(block(pixel_block, latent, global_path, cfg.gradient_checkpointing))
            in_channels = pixel_channels
        self.blocks = nn.ModuleList(blocks)

        # Learned memories (truncated normal, std 1); the latent one is copied per frame.
        self.memory = nn.Parameter(torch.empty(1, cfg.num_slots, cfg.memory_channels))
        nn.init.trunc_normal_(self.memory, std=1.0, a=-2.0, b=2.0)
        if cfg.use_latent:
            latent_shape = (1, 1, cfg.num_latent, cfg.latent_channels)
            self.latent_memory = nn.Parameter(torch.empty(latent_shape))
            nn.init.trunc_normal_(self.latent_memory, std=1.0, a=-2.0, b=2.0)

        self.decoder = PixelDecoder(
            pixel_channels, channels["res3"], channels["res2"], cfg.decoder_filters_s8,
            cfg.decoder_filters_s4, cfg.activation,
        )  # fmt: skip

        # Memory side: class and mask FFNs, class FC, mask-embedding FC + BN, tube-logit BN.
        add_memory_heads(self, cfg)
        # Void prior: log(K * 0.9 / 0.1) on the void logit, p(void) ~ 0.9 at init, every forward.
        prior = torch.zeros(K + 1)
        prior[-1] = math.log(K * 9)
        self.register_buffer("void_prior", prior, persistent=False)

        # Pixel side: depthwise 5x5 + BN + ReLU, 1x1 + BN + ReLU, 1x1 -> D with bias, BN, L2 norm.
        # ReLU for any activation: deeplab2's MaX-DeepLab builds this head with its default.
        width, P, D = self.decoder.out_channels, cfg.pixel_head_channels, cfg.embedding_channels
        self.pixel_head = nn.Sequential(
            OrderedDict(
                depthwise=nn.Conv2d(width, width, 5, padding=2, groups=width, bias=False),
                depthwise_bn=nn.BatchNorm2d(width, BN_EPS, BN_MOMENTUM),
                depthwise_relu=nn.ReLU(),
                pointwise=nn.Conv2d(width, P, 1, bias=False),
                pointwise_bn=nn.BatchNorm2d(P, BN_EPS, BN_MOMENTUM),
                pointwise_relu=nn.ReLU(),
                embedding=nn.Conv2d(P, D, 1),
                embedding_bn=nn.BatchNorm2d(D, BN_EPS, BN_MOMENTUM),
            )
        )
        for conv in (self.pixel_head.depthwise, self.pixel_head.pointwise):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.trunc_normal_(self.pixel_head.embedding.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(self.pixel_head.embedding.bias)
        # TubeFormer "shared semantic and panoptic prediction": a linear layer on x'_v.
        self.semantic_head = nn.Conv3d(D, K, 1)
        nn.init.kaiming_normal_(self.semantic_head.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.semantic_head.bias)

        # Deep supervision: every earlier layer gets its own memory-side heads (kMaX-DeepLab), so
        # the final heads' BN statistics are the final layer's alone. A clustering layer's tube
        # logits are its assignment, so its aux head only classifies.
        num_aux = 0
        if cfg.aux_heads and cfg.use_global:
            num_aux = len(self.blocks) - (cfg.memory_update != "clustering")
        self.aux_heads = nn.ModuleList(
            add_memory_heads(nn.Module(), cfg, masks=cfg.memory_update != "clustering")
            for _ in range(num_aux)
        )
        if cfg.depth:  # built last, so the other weights are the default model's for a seed
            c = (pixel_channels, channels["res3"], channels["res2"])  # res5, res3, res2
            self.depth_branch = DepthBranch(c, cfg.depth_channels, cfg.max_depth, cfg.activation)

    def resnet_view(self) -> nn.Module:
        """Stem + stages 2-5 as one AxialResNet-shaped module that shares this model's weights.

        Stage 5 lives in the hierarchical blocks, so ``self.backbone`` has no torchvision
        ``layer4``; use ``load_torchvision_resnet50(model.resnet_view(), state_dict)``. Its
        parameters are the ImageNet-pretrainable ones (deeplab2's 0.1x backbone learning rate).
        """
        view = nn.Module()
        for name in ("stem", "stage2", "stage3", "stage4"):
            setattr(view, name, getattr(self.backbone, name))
        view.stage5 = nn.Sequential(*(b.pixel_block for b in self.blocks[: self.cfg.num_blocks[3]]))
        return view

    def classify(self, memory: torch.Tensor, heads: nn.Module | None = None) -> torch.Tensor:
        """memory (B, N, Cm) -> class logits (B, N, K + 1), void prior added."""
        heads = self if heads is None else heads
        return heads.class_head(self.act(heads.class_feature(memory))) + self.void_prior

    def predict(
        self, memory: torch.Tensor, pixel_embedding: torch.Tensor, heads: nn.Module | None = None
    ) -> dict:
        """memory (B, N, Cm), pixel_embedding (B, D, T, h, w) -> class and tube logits, from
        ``heads`` (an aux head) or the final heads."""
        heads = self if heads is None else heads
        class_logits = self.classify(memory, heads)
        kernels = heads.mask_head(self.act(heads.mask_feature(memory)))  # (B, N, D), no activation
        # Eq. (1): tube logits x'_v . w for every slot and every pixel of the clip.
        logits = torch.einsum("bnd,bdthw->bnthw", kernels, pixel_embedding)
        logits = heads.mask_bn(logits.reshape(len(logits), 1, -1)).view_as(logits)
        return {
            "class_logits": class_logits,  # (B, N, K + 1)
            "mask_logits": logits,  # (B, N, T, h, w)
        }

    def _run(self, module: nn.Module, *inputs):
        if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
            return run_checkpointed(module, *inputs)
        return module(*inputs)

    def forward(self, frames: torch.Tensor) -> dict:
        """frames (B, T, 3, H, W) float in [0, 255] -> dict, with h = (H - 1) // 4 + 1 for 16k+1:

        ``class_logits (B, N, K+1)`` (order ``thing_stuff_class_ids``, then void),
        ``mask_logits (B, N, T, h, w)``, ``semantic_logits (B, K, T, h, w)`` (dataset order),
        ``pixel_embedding (B, D, T, h, w)`` (L2-normalised), ``depth (B, T, h, w)`` (metres in
        (0, max_depth), with ``depth``), and ``aux``: empty unless ``aux_heads``, then a list of
        dicts with ``class_logits`` and ``mask_logits`` from each earlier global layer through its
        own heads. With ``memory_update="clustering"``, ``aux`` holds one dict per clustering
        layer instead: ``mask_logits`` = its assignment logits S upsampled to (B, N, T, h, w),
        ``class_logits`` from its input memory; and ``reference_points``, (B, N, R, 2) per layer.
        """
        B, T = frames.shape[:2]
        x = rearrange(frames, "b t c h w -> (b t) c h w") / 127.5 - 1.0  # per-frame backbone
        backbone = self.backbone
        res2 = backbone.stage2(backbone.stem(x))
        res3 = backbone.stage3(res2)
        res4 = res3
        for block in backbone.stage4:
            res4 = self._run(block, res4)

        video = rearrange(res4, "(b t) c h w -> b t c h w", b=B)
        memory = self.memory.expand(B, -1, -1)
        latent = self.latent_memory.expand(B, T, -1, -1) if self.cfg.use_latent else None
        memories, states = [memory], []  # the input memory of every block, then the last output
        for index, block in enumerate(self.blocks):
            if isinstance(block, ClusteringBlock):
                state = states[-1] if states else None
                video, memory, latent, state = block(video, memory, latent, state)
                states.append(state)
            else:
                video, memory, latent = block(video, memory, latent)
            memories.append(memory)
            if index < max(self.cfg.num_blocks[3], 1):  # deeplab2's res5: the end of stage 5
                res5 = video  # the depth branch's x_v

        s16 = rearrange(video, "b t c h w -> (b t) c h w")
        decoded = self.act(self.decoder(s16, res3, res2))  # (B*T, C, h, w) at stride 4
        embedding = F.normalize(self.pixel_head(decoded), dim=1)
        embedding = rearrange(embedding, "(b t) d h w -> b d t h w", b=B)  # x'_v

        # Without global layers the learned memory goes straight to the heads.
        final = self.predict(memories[-1], embedding)
        if states:  # clustering: layer i's tubes are S_i, made by its input centres memories[i]
            shape, size = (T, *video.shape[-2:]), embedding.shape[-2:]
            aux = [
                dict(
                    class_logits=self.classify(m, heads),
                    mask_logits=assignment_mask_logits(s["assignment_logits"], shape, size),
                )
                for m, s, heads in zip(memories, states, self.aux_heads)
            ]
            if self.cfg.num_reference_points:
                final["reference_points"] = [s["reference_points"] for s in states]
        else:  # dual path: the earlier layers' memories through their own heads
            aux = [self.predict(m, embedding, h) for m, h in zip(memories[1:-1], self.aux_heads)]
        final["pixel_embedding"] = embedding  # (B, D, T, h, w)
        final["semantic_logits"] = self.semantic_head(embedding)  # (B, K, T, h, w)
        final["aux"] = aux
        if self.cfg.depth:  # per frame: (B*T, h, w) metres
            final["depth"] = self.depth_branch(res5.flatten(0, 1), res3, res2).unflatten(0, (B, T))
        return final


def add_memory_heads(module: nn.Module, cfg: TubeFormerConfig, masks: bool = True) -> nn.Module:
    """Give ``module`` MaX-DeepLab's memory-side heads: class and mask FFNs (FC + BN + ReLU), the
    class FC (K + 1) and, with ``masks``, the mask-embedding FC + BN and the tube-logit BN."""
    C = cfg.head_channels
    module.class_feature = LinearBN(cfg.memory_channels, C)
    if masks:
        module.mask_feature = LinearBN(cfg.memory_channels, C)
    module.class_head = nn.Linear(C, cfg.num_classes + 1)
    nn.init.trunc_normal_(module.class_head.weight, std=0.01, a=-0.02, b=0.02)
    nn.init.zeros_(module.class_head.bias)
    if masks:
        module.mask_head = LinearBN(C, cfg.embedding_channels)
        # One BN channel shared by all N x T x h x w tube logits; gamma 0.1 = low temperature.
        module.mask_bn = nn.BatchNorm1d(1, BN_EPS, BN_MOMENTUM)
        nn.init.constant_(module.mask_bn.weight, 0.1)
    return module


def build_model(preset: str = "tiny", **overrides) -> TubeFormer:
    """``build_model("tiny" | "kitti", field=value, ...)``: a preset, TubeFormerConfig overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(TubeFormerConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown TubeFormerConfig field(s) {unknown}; valid: {sorted(names)}")
    return TubeFormer(dataclasses.replace(PRESETS[preset](), **overrides))
