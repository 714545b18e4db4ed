"""Clustering mask-transformer layer: memory slots as cluster centres of the clip's pixels.

CMT-DeepLab (Yu et al., CVPR 2022) §3.1-3.3, Eq. (3)-(13), on TubeFormer's video pixels: the
pixels are all ``P = T*h*w`` pixels of a clip, so one cluster is one video tube. The tube masks of
Eq. (4), ``Z = softmax_N(F C^T)`` (§3.1), are read as the pixel-to-centre assignment and
``Z^T V`` as the centre update, Eq. (5) (§3.2). Per layer (§3.3):

- assignment, Eq. (6): ``Z = softmax_N(S + K~p . Q~c)`` with the assignment logits ``S`` of the
  previous layer (a residual path; ``S`` has the tube-logit format and is deeply supervised);
- centre update, Eq. (7): ``C + softmax_HW(Qc . Kp) Vp + Z^T Vp``: MaX-DeepLab's memory attention
  (Eq. (3); here M2P + M2M in one softmax over ``[pixels; memory]``) plus the clustering update;
- pixel update, Eq. (8): ``F + Z Vc``, through the same assignment ``Z``;
- location-sensitive clustering, Eq. (9)-(12): ``R`` reference points per centre (the paper's M;
  M is taken by GT tubes here), ``r = sigmoid(e + MLP(C))`` with ``e`` carried across layers, and
  coordinate convolutions: the normalised pixel coordinates and the centres' reference points are
  concatenated to the layer's input projections;
- mask approximation loss, Eq. (13), on the matched slots' reference points.

In TubeFormer (``memory_update="clustering"``) every global layer is a `ClusteringUpdate` inside a
`ClusteringBlock` (TubeFormer §3.2, Fig. 3), which carries the state (``S`` and ``e``) from one
hierarchical block to the next. Each layer's ``S``, reshaped to tubes and upsampled to stride 4
(`assignment_mask_logits`), is that layer's deep-supervision tube prediction ("further supervised
by the ground-truths", §3.3), matched with the final output's matching.

``assignment="argmax"`` swaps Z for kMaX-DeepLab's stop-gradient one-hot argmax over N (the
clustering term is then its k-means "sum, then BN" update); everything else is shared, so unlike
kMaX the argmax layer keeps the cross-attention and the pixel update, and takes the argmax of
``S`` rather than of an auxiliary mask head's logits.
Conventions are deeplab2's dual-path layer (``dual_path.py``): bias-free projections + BN, BN on
logits and retrieved values, no 1/sqrt(d), gamma-0 last BN per residual branch, ReLU after each
memory add, non-activated pixels; ``activation="gelu"``: every ReLU here an exact GeLU, as in
`GlobalDualPath` (deeplab2's layer has one ``activation``, k-means branch included). deeplab2
(model/layers/dual_path_transformer.py) has kMaX's argmax assignment (``kmeans_assignment_step``)
and k-means branch (``kmeans_update_memory_step``, added beside the attention branch in
``call``): Eq. (7)'s two terms are two such residual branches with their own BN and projection,
and Eq. (8) has the layout of its P2M branch. The aux outputs follow model/kmax_deeplab.py
``_prepare_auxiliary_results`` (the centres before the update, align-corners resize).
Eq. (9)-(13) have no reference code; they follow the paper.
Differences from the paper: ``S`` and Z are single-head (the attention has ``num_heads``);
``e`` is 0 before the first layer, so its ``e + MLP(C)`` is the projection of the centres;
coordinates are ``(y, x)`` in ``[0, 1]`` per frame (``i / (h - 1)``, align-corners), and a tube's
reference mask is its 2-D footprint over the clip (Eq. (13) pools the pixels of all T frames).

    layer = ClusteringUpdate(64, memory_channels=64, bottleneck_channels=64, key_channels=32,
                             value_channels=64, num_heads=4, ffn_channels=128)
    pixels, memory, state = layer(pixels, memory, (T, h, w), state)  # state None for the first
    state["assignment_logits"]  # (B, N, T*h*w): S; softmax over N gives this layer's tubes
    state["reference_points"]   # (B, N, R, 2): (y, x) in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivseg.axial_attention import BN_EPS, BN_MOMENTUM
from minivseg.backbone import DropPath, activation_fn
from minivseg.dual_path import Attention, HierarchicalBlock, LinearBN


def normalized_coordinates(height: int, width: int, device=None) -> torch.Tensor:
    """(y, x) of every pixel in [0, 1], row-major -> (height * width, 2); i / (h - 1)."""
    y = torch.arange(height, device=device, dtype=torch.float32) / max(height - 1, 1)
    x = torch.arange(width, device=device, dtype=torch.float32) / max(width - 1, 1)
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), -1).reshape(-1, 2)


def clustering_center_update(values: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Clustering update of Eq. (5)/(7), ``Z^T V``: values (B, P, C), assignment Z (B, N, P) ->
    (B, N, C), the assignment-weighted SUM of pixel values (hard Z and ``V = 1``: member counts)."""
    return torch.einsum("bnp,bpc->bnc", assignment, values)


def assign(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits S (B, N, P) -> Z (B, N, P): softmax over N, or its stop-gradient one-hot argmax."""
    if mode == "soft":
        return logits.softmax(dim=1)  # Eq. (6)
    hard = F.one_hot(logits.argmax(dim=1), logits.shape[1])  # kMaX: argmax, no gradient
    return rearrange(hard, "b p n -> b n p").to(logits.dtype)


class ClusteringUpdate(nn.Module):
    """One CMT-DeepLab clustering mask-transformer layer over a clip's ``T*h*w`` pixels.

    Channel sizes as `minivseg.dual_path.GlobalDualPath` (MaX-DeepLab-S: bottleneck 256, key 128,
    value 256, 8 heads, FFN 2048). ``num_reference_points=0`` switches the reference masks off (then
    ``coord_conv`` must be False); ``coord_conv=False`` keeps them as a supervised prediction only.
    """

    def __init__(
        self,
        pixel_channels: int,
        memory_channels: int = 256,
        bottleneck_channels: int = 256,
        key_channels: int = 128,
        value_channels: int = 256,
        num_heads: int = 8,
        ffn_channels: int = 2048,
        drop_path: float = 0.0,
        num_reference_points: int = 8,
        assignment: str = "soft",
        coord_conv: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        self.act = activation_fn(activation)
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(f"key/value channels must be divisible by num_heads={num_heads}")
        if assignment not in ("soft", "argmax"):
            raise ValueError(f"assignment must be 'soft' or 'argmax', got {assignment!r}")
        if coord_conv and num_reference_points < 1:
            raise ValueError("coord_conv needs reference points (num_reference_points >= 1)")
        self.assignment = assignment
        self.coord_conv = coord_conv
        self.num_reference_points = num_reference_points
        self.memory_split = (key_channels, key_channels, value_channels)
        self.pixel_split = (key_channels, value_channels)
        std = bottleneck_channels**-0.5
        coords = 2 if coord_conv else 0
        # Eq. (9): the reference-mask MLP reads the centres; 2R outputs = R (y, x) points.
        if num_reference_points:
            self.reference_mlp1 = LinearBN(memory_channels, bottleneck_channels)
            self.reference_mlp2 = nn.Linear(bottleneck_channels, 2 * num_reference_points)
        # Eq. (11)/(12): coordinate convolution = the input projection on [features; coordinates].
        memory_in_channels = memory_channels + coords * num_reference_points
        self.memory_conv1 = LinearBN(memory_in_channels, bottleneck_channels)
        self.pixel_conv1 = LinearBN(pixel_channels + coords, bottleneck_channels)
        self.memory_qkv = LinearBN(bottleneck_channels, sum(self.memory_split), std=std)
        self.pixel_kv = LinearBN(bottleneck_channels, sum(self.pixel_split), std=std)
        # Eq. (5)/(6): the clustering query and key come from their own projections.
        self.memory_cluster_query = LinearBN(bottleneck_channels, key_channels, std=std)
        self.pixel_cluster_key = LinearBN(bottleneck_channels, key_channels, std=std)
        self.assignment_bn = nn.BatchNorm2d(1, BN_EPS, BN_MOMENTUM)  # BN on logits, no 1/sqrt(d)
        self.memory_attention = Attention(num_heads, value_channels, activation)
        self.memory_conv3 = LinearBN(value_channels, memory_channels, gamma=0.0)
        self.cluster_values_bn = nn.BatchNorm1d(value_channels, BN_EPS, BN_MOMENTUM)
        self.cluster_conv3 = LinearBN(value_channels, memory_channels, gamma=0.0)
        self.memory_ffn1 = LinearBN(memory_channels, ffn_channels)
        self.memory_ffn2 = LinearBN(ffn_channels, memory_channels, gamma=0.0)
        self.pixel_values_bn = nn.BatchNorm1d(value_channels, BN_EPS, BN_MOMENTUM)
        self.pixel_conv3 = LinearBN(value_channels, pixel_channels, gamma=0.0)
        # One independent per-sample mask per residual branch (as deeplab2).
        self.memory_drop_path = DropPath(drop_path)
        self.cluster_drop_path = DropPath(drop_path)
        self.ffn_drop_path = DropPath(drop_path)
        self.pixel_drop_path = DropPath(drop_path)

    def forward(
        self,
        pixels: torch.Tensor,
        memory: torch.Tensor,
        shape: tuple[int, int, int],
        state: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """pixels (B, P, Cp) non-activated with P = T*h*w in (t, y, x) order, memory (B, N, Cm),
        shape (T, h, w), state from the previous layer (None for the first).

        Returns ``(pixels (B, P, Cp), memory (B, N, Cm), state)``; state holds
        ``assignment_logits`` (B, N, P) = S after Eq. (6) (softmax over N gives Z) and, with
        reference points, ``reference_logits`` (B, N, R, 2) = e-hat of Eq. (9) and
        ``reference_points`` (B, N, R, 2) its sigmoid, (y, x) in [0, 1].
        """
        T, h, w = shape
        B, P, _ = pixels.shape
        if P != T * h * w:
            raise ValueError(f"pixels have P={P}, but shape {tuple(shape)} gives {T * h * w}")
        state = state or {}
        new_state = {}
        memory_in, pixels_in = memory, self.act(pixels)
        if self.num_reference_points:
            e = state.get("reference_logits", 0.0)
            mlp = self.reference_mlp2(self.act(self.reference_mlp1(memory)))
            e = e + rearrange(mlp.float(), "b n (r two) -> b n r two", two=2)  # Eq. (9)
            reference_points = torch.sigmoid(e)  # Eq. (10)
            new_state.update(reference_logits=e, reference_points=reference_points)
        if self.coord_conv:
            r_c = rearrange(reference_points, "b n r two -> b n (r two)").to(memory.dtype)
            memory_in = torch.cat([memory, r_c], -1)  # Eq. (11)
            r_p = normalized_coordinates(h, w, pixels.device).to(pixels.dtype).repeat(T, 1)
            pixels_in = torch.cat([pixels_in, r_p.expand(B, P, 2)], -1)  # Eq. (12)
        m = self.act(self.memory_conv1(memory_in))
        p = self.act(self.pixel_conv1(pixels_in))
        q_m, k_m, v_m = self.memory_qkv(m).split(self.memory_split, dim=-1)
        k_p, v_p = self.pixel_kv(p).split(self.pixel_split, dim=-1)

        # Eq. (6): S = S_prev + K~p . Q~c (BN'd); Z = softmax_N(S) (or its one-hot argmax).
        logits = torch.einsum(
            "bnc,bpc->bnp", self.memory_cluster_query(m), self.pixel_cluster_key(p)
        )
        logits = self.assignment_bn(logits[:, None])[:, 0].float()
        logits = state.get("assignment_logits", 0.0) + logits  # the residual sum stays float32
        new_state["assignment_logits"] = logits  # (B, N, P)
        Z = assign(logits, self.assignment).to(v_p.dtype)

        # Eq. (7): C + softmax_{P+N}(Qc . [Kp; Km]) [Vp; Vm] + Z^T Vp, two residual branches.
        y_m = self.memory_attention(q_m, torch.cat([k_p, k_m], 1), torch.cat([v_p, v_m], 1))
        y_c = clustering_center_update(v_p, Z)  # (B, N, vd), a sum over the assigned pixels
        y_c = self.cluster_values_bn(y_c.reshape(-1, y_c.shape[-1])).view_as(y_c)
        memory_out = self.act(
            memory
            + self.memory_drop_path(self.memory_conv3(y_m))
            + self.cluster_drop_path(self.cluster_conv3(y_c))
        )
        ffn = self.memory_ffn2(self.act(self.memory_ffn1(memory_out)))
        memory_out = self.act(memory_out + self.ffn_drop_path(ffn))

        # Eq. (8): F + Z Vc, with the layer-input centres' values; pixels stay non-activated.
        y_p = torch.einsum("bnp,bnc->bpc", Z, v_m)
        y_p = self.act(self.pixel_values_bn(y_p.reshape(-1, y_p.shape[-1])).view_as(y_p))
        pixels_out = pixels + self.pixel_drop_path(self.pixel_conv3(y_p))
        return pixels_out, memory_out, new_state


class ClusteringBlock(HierarchicalBlock):
    """TubeFormer Fig. 3 with a `ClusteringUpdate` as the global layer: pixel block per frame ->
    latent dual-path -> clustering over the clip's ``T*h*w`` pixels, with the clustering state
    (the residual ``S`` of Eq. (6) and ``e`` of Eq. (9)) passed from block to block."""

    def forward(self, video, memory, latent, state=None):
        """video (B, T, C, h, w) non-activated, memory (B, N, Cm), latent (B, T, L, Cl) or None,
        state of the previous block (None for the first).

        Returns ``(video (B, T, C', h', w'), memory, latent, state)``, state as `ClusteringUpdate`.
        """
        B, T = video.shape[:2]
        x = self._run(self.pixel_block, rearrange(video, "b t c h w -> (b t) c h w"))
        h, w = x.shape[-2:]
        pixels = rearrange(x, "(b t) c h w -> b t (h w) c", b=B)
        if self.latent is not None:
            pixels, latent = self._run(self.latent, pixels, latent)
        clip = rearrange(pixels, "b t p c -> b (t p) c")  # all T*h*w pixels of the clip
        clip, memory, state = self._run(self.global_path, clip, memory, (T, h, w), state)
        video = rearrange(clip, "b (t h w) c -> b t c h w", t=T, h=h, w=w)
        return video, memory, latent, state


def assignment_mask_logits(
    logits: torch.Tensor, shape: tuple[int, int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Assignment logits S (B, N, T*h*w) over a (T, h, w) clip -> tube logits (B, N, T, H', W')
    at ``size = (H', W')``, bilinear with align_corners (exact for 16k+1 -> 4k+1 sizes)."""
    T, h, w = shape
    frames = rearrange(logits, "b n (t h w) -> b (n t) h w", t=T, h=h, w=w)
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=True)
    return rearrange(frames, "b (n t) h w -> b n t h w", t=T)


def extreme_points(mask: torch.Tensor) -> torch.Tensor:
    """Extreme points and centre of one mask: (..., h, w), leading axes (frames) pooled ->
    (5, 2) (y, x) in [0, 1]: top, bottom, left, right (each the middle one of its tied mask
    pixels), centre (the mean). The mask must be non-empty."""
    h, w = mask.shape[-2:]
    coords = normalized_coordinates(h, w, mask.device)
    inside = mask.reshape(-1, h * w).any(0)
    points = coords[inside]  # (pixels in the mask, 2)
    extremes = []
    for axis, pick in ((0, torch.min), (0, torch.max), (1, torch.min), (1, torch.max)):
        tied = points[points[:, axis] == pick(points[:, axis])]
        tied = tied[torch.argsort(tied[:, 1 - axis])]
        extremes.append(tied[(len(tied) - 1) // 2])
    mean = (mask.reshape(-1, h * w).float().sum(0)[:, None] * coords).sum(0) / mask.float().sum()
    return torch.stack([*extremes, mean])


def mask_approximation_loss(
    reference_points: torch.Tensor,
    gt_masks: Sequence[torch.Tensor],
    matches: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Mask approximation loss, CMT-DeepLab Eq. (13), averaged over all K matched tubes of a batch.

    reference_points (B, N, R, 2) (y, x) in [0, 1]; gt_masks[b] (M_b, T, h, w) (or (M_b, h, w))
    non-empty GT tubes of clip b; matches[b] = (slot, tube) index pairs, e.g.
    ``(m["slot"], m["tube"])`` from `minivseg.tube_loss.match_tubes`. The extreme coordinates
    (min/max over the R points vs over the tube's pixels) and the centre (mean of the R points vs
    mean of the pixels) are compared with L1. Returns unweighted ``extreme`` and ``center`` terms
    (L_loc = extreme + center).
    """
    extreme, center, count = [], [], 0
    for b, (slot, tube) in enumerate(matches):
        if len(tube) == 0:
            continue
        points = reference_points[b, slot].float()  # (K, R, 2)
        masks = gt_masks[b][tube]
        h, w = masks.shape[-2:]
        inside = rearrange(masks.reshape(len(tube), -1, h, w) > 0, "k t h w -> k (t h w) 1")
        coords = normalized_coordinates(h, w, masks.device).repeat(inside.shape[1] // (h * w), 1)
        y_min = torch.where(inside, coords, torch.inf).amin(1)  # (K, 2): min y, min x
        y_max = torch.where(inside, coords, -torch.inf).amax(1)
        y_mean = (inside * coords).sum(1) / inside.sum(1)
        extreme.append((points.amin(1) - y_min).abs().sum() + (points.amax(1) - y_max).abs().sum())
        center.append((points.mean(1) - y_mean).abs().sum())
        count += len(tube)
    if count == 0:
        zero = reference_points.sum() * 0.0
        return dict(extreme=zero, center=zero)
    return dict(extreme=sum(extreme) / (4 * count), center=sum(center) / (2 * count))
