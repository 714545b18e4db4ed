"""Dual-path transformers: a pixel path and a memory path that read and write each other.

One layer couples pixels ``(B, P, Cp)`` with a memory ``(B, N, Cm)``: the dual-path transformer of
MaX-DeepLab (Wang et al., CVPR 2021; its "Dual-Path Transformer", P2M feedback attention and
M2P + M2M attention), used by TubeFormer-DeepLab §3.2 and Fig. 3. TubeFormer numbers no equation
for these layers; MaX-DeepLab's two attention equations are written out here and at the lines
that compute them:

- memory update, M2V + M2M in ONE softmax over the concatenated keys ``[pixels; memory]``:
  ``y_m = sum_{n in P+N} softmax_n(q_m . [k_p; k_m]_n) [v_p; v_m]_n``, then an FFN on the memory;
- pixel update, V2M: ``y_p = sum_{n in N} softmax_n(q_p . k_m_n) v_m_n`` with the key/value of the
  layer-INPUT memory (the pixel update does not see this layer's memory update).

Three ways to use it (TubeFormer-DeepLab §3.2):

- `GlobalDualPath`: the global dual-path transformer. The pixels are ALL ``T*h*w`` pixels of the
  clip, so a memory slot gathers a whole video tube (M2V, M2M, V2M).
- `LatentDualPath`: the latent dual-path transformer. The same layer run frame by frame (frames
  folded into the batch) on a small latent memory ``(L, C)`` copied per frame: L2F + L2L in one
  softmax, then F2L. Frames never exchange information here.
- `HierarchicalBlock`: axial block (per frame, F2F) -> latent dual-path -> global dual-path
  (Fig. 3); ``None`` switches a part off (no latent = TubeFormer-DeepLab-Simple).

Implementation facts follow deeplab2 ``model/layers/dual_path_transformer.py``
(DualPathTransformerLayer, AttentionOperation) and ``model/layers/axial_block_groups.py`` (block
+ dual-path layer, drop-path masks) exactly: every "linear" is a bias-free 1x1 projection followed
by BatchNorm over channels; BN on the attention logits (one channel per head) replaces the
1/sqrt(d) scaling; BN + ReLU on the retrieved values; the last BN of every residual branch starts
at gamma 0; the memory path ends every residual add in ReLU, the pixel path stays non-activated;
each branch has its own drop-path mask. With MaX-DeepLab-S sizes a layer has 2,503,712
parameters, as in deeplab2. ``activation="gelu"`` makes every one of those ReLUs an exact GeLU,
memory path included, as deeplab2's layer does with its ``activation`` argument.
Differences from the papers: none intended. TubeFormer gives no internals for the latent layer;
we use MaX-DeepLab's layer for it, which realises exactly its L2F, L2L and F2L attentions.
``gradient_checkpointing`` (an addition) recomputes each part in backward with identical outputs,
gradients and BN running statistics (`run_checkpointed`).
"""

from __future__ import annotations

import contextlib

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from minivseg.axial_attention import BN_EPS, BN_MOMENTUM
from minivseg.backbone import DropPath, activation_fn


class LinearBN(nn.Module):
    """Bias-free linear map on the last axis + BatchNorm over it (deeplab2 ``Conv1D``).

    BN statistics run over every leading axis (batch and length). ``gamma=0`` starts a residual
    branch at zero; ``std`` replaces the He-normal init (the q/k/v projections use ``C_in**-0.5``).
    """

    def __init__(self, in_channels: int, out_channels: int, gamma: float = 1.0, std=None):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.bn = nn.BatchNorm1d(out_channels, BN_EPS, BN_MOMENTUM)
        nn.init.constant_(self.bn.weight, gamma)
        if std is None:
            nn.init.kaiming_normal_(self.linear.weight, mode="fan_in", nonlinearity="relu")
        else:
            nn.init.trunc_normal_(self.linear.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C_in) -> (..., C_out)."""
        y = self.linear(x)
        return self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)


class Attention(nn.Module):
    """Multi-head attention with BN on the logits and on the retrieved values, no 1/sqrt(d).

    ``probabilities`` is an identity module: a forward hook on it reads the attention maps.
    """

    def __init__(self, num_heads: int, value_channels: int, activation: str = "relu"):
        super().__init__()
        self.num_heads = num_heads
        self.act = activation_fn(activation)
        self.logits_bn = nn.BatchNorm2d(num_heads, BN_EPS, BN_MOMENTUM)  # one channel per head
        self.values_bn = nn.BatchNorm1d(value_channels, BN_EPS, BN_MOMENTUM)
        self.probabilities = nn.Identity()

    def forward(self, query, key, value) -> torch.Tensor:
        """query (B, Q, kd), key (B, K, kd), value (B, K, vd) -> act(BN(retrieved)) (B, Q, vd)."""
        q, k, v = (
            rearrange(x, "b n (h d) -> b h n d", h=self.num_heads) for x in (query, key, value)
        )
        logits = self.logits_bn(torch.einsum("bhqd,bhkd->bhqk", q, k))
        weights = self.probabilities(logits.softmax(dim=-1))  # (B, h, Q, K)
        retrieved = rearrange(torch.einsum("bhqk,bhkd->bhqd", weights, v), "b h q d -> b q (h d)")
        retrieved = self.values_bn(retrieved.reshape(-1, retrieved.shape[-1])).view_as(retrieved)
        return self.act(retrieved)


class GlobalDualPath(nn.Module):
    """One MaX-DeepLab dual-path layer; on all pixels of a clip it is TubeFormer's global one.

    Channel sizes are MaX-DeepLab-S's (bottleneck 256, key 128, value 256, 8 heads, FFN 2048): with
    ``pixel_channels=2048`` the layer has 2,503,712 parameters. ``update_memory=False`` keeps only
    V2M (the output memory is the input): the last latent layer, whose memory nothing reads.
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
        update_memory: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(f"key/value channels must be divisible by num_heads={num_heads}")
        self.split = (key_channels, key_channels, value_channels)
        self.act = activation_fn(activation)
        std = bottleneck_channels**-0.5
        self.memory_conv1 = LinearBN(memory_channels, bottleneck_channels)
        self.pixel_conv1 = LinearBN(pixel_channels, bottleneck_channels)
        self.memory_qkv = LinearBN(bottleneck_channels, sum(self.split), std=std)
        self.pixel_qkv = LinearBN(bottleneck_channels, sum(self.split), std=std)
        self.pixel_attention = Attention(num_heads, value_channels, activation)
        self.pixel_conv3 = LinearBN(value_channels, pixel_channels, gamma=0.0)
        # Three independent per-sample masks (deeplab2 draws one per branch).
        self.pixel_drop_path = DropPath(drop_path)
        self.update_memory = update_memory
        if update_memory:  # off when nothing reads this layer's output memory
            self.memory_attention = Attention(num_heads, value_channels, activation)
            self.memory_conv3 = LinearBN(value_channels, memory_channels, gamma=0.0)
            self.memory_ffn1 = LinearBN(memory_channels, ffn_channels)
            self.memory_ffn2 = LinearBN(ffn_channels, memory_channels, gamma=0.0)
            self.memory_drop_path = DropPath(drop_path)
            self.ffn_drop_path = DropPath(drop_path)

    def forward(self, pixels: torch.Tensor, memory: torch.Tensor):
        """pixels (B, P, Cp) non-activated, memory (B, N, Cm) -> (pixels (B, P, Cp), memory)."""
        m = self.act(self.memory_conv1(memory))  # the memory itself is not activated first
        p = self.act(self.pixel_conv1(self.act(pixels)))
        q_m, k_m, v_m = self.memory_qkv(m).split(self.split, dim=-1)
        q_p, k_p, v_p = self.pixel_qkv(p).split(self.split, dim=-1)

        # V2M: y_p = sum_{n in N} softmax_n(q_p . k_m_n) v_m_n, with the layer-input memory's k, v.
        y_p = self.pixel_attention(q_p, k_m, v_m)
        pixels_out = pixels + self.pixel_drop_path(self.pixel_conv3(y_p))  # stays non-activated
        if not self.update_memory:
            return pixels_out, memory

        # M2V + M2M: y_m = sum_{n in P+N} softmax_n(q_m . [k_p; k_m]_n) [v_p; v_m]_n, one softmax.
        y_m = self.memory_attention(q_m, torch.cat([k_p, k_m], 1), torch.cat([v_p, v_m], 1))
        memory_out = self.act(memory + self.memory_drop_path(self.memory_conv3(y_m)))
        ffn = self.memory_ffn2(self.act(self.memory_ffn1(memory_out)))
        memory_out = self.act(memory_out + self.ffn_drop_path(ffn))
        return pixels_out, memory_out


class LatentDualPath(GlobalDualPath):
    """TubeFormer's latent dual-path transformer: the same layer, one frame at a time.

    L2F + L2L (latent queries over [frame pixels; latent], one softmax), FFN, then F2L. The frames
    are folded into the batch, so frame t only ever sees its own pixels and its own latent copy.
    """

    def __init__(self, pixel_channels: int, latent_channels: int = 256, **kwargs):
        super().__init__(pixel_channels, memory_channels=latent_channels, **kwargs)

    def forward(self, pixels: torch.Tensor, latent: torch.Tensor):
        """pixels (B, T, P, Cp) per frame, latent (B, T, L, C) -> (pixels, latent), same shapes."""
        T = pixels.shape[1]
        pixels, latent = super().forward(
            rearrange(pixels, "b t p c -> (b t) p c"), rearrange(latent, "b t l c -> (b t) l c")
        )
        return (
            rearrange(pixels, "(b t) p c -> b t p c", t=T),
            rearrange(latent, "(b t) l c -> b t l c", t=T),
        )


def batch_norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics (and batch counters) of every BatchNorm inside ``module``."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return [b for m in norms for b in m.buffers()]


@contextlib.contextmanager
def keep_batch_norm_stats(module: nn.Module):
    """Restore all BN running statistics on exit (a checkpointed recompute must not update them)."""
    buffers = batch_norm_buffers(module)
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def run_checkpointed(module: nn.Module, *inputs):
    """``module(*inputs)``, recomputed in backward to save memory; same values and gradients.

    Non-reentrant torch checkpointing replays the RNG (same drop-path masks); BN running stats are
    restored after the replay, so they are updated exactly once, as without checkpointing.
    """
    return checkpoint(
        module,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), keep_batch_norm_stats(module)),
    )


class HierarchicalBlock(nn.Module):
    """TubeFormer Fig. 3: pixel block per frame -> latent dual-path -> global dual-path.

    ``latent=None`` or ``global_path=None`` switches that part off (no latent = TubeFormer-DeepLab-
    Simple). ``gradient_checkpointing`` recomputes each of the three parts in backward.
    """

    def __init__(
        self,
        pixel_block: nn.Module,
        latent: LatentDualPath | None,
        global_path: nn.Module | None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.pixel_block = pixel_block
        self.latent = latent
        self.global_path = global_path
        self.gradient_checkpointing = gradient_checkpointing

    def _run(self, module: nn.Module, *inputs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return run_checkpointed(module, *inputs)
        return module(*inputs)

    def forward(self, video: torch.Tensor, memory: torch.Tensor, latent: torch.Tensor | None):
        """video (B, T, C, h, w) non-activated, memory (B, N, Cm), latent (B, T, L, Cl) or None.

        Returns ``(video (B, T, C', h', w'), memory, latent)``.
        """
        B, T = video.shape[:2]
        x = self._run(self.pixel_block, rearrange(video, "b t c h w -> (b t) c h w"))
        h, w = x.shape[-2:]
        pixels = rearrange(x, "(b t) c h w -> b t (h w) c", b=B)
        if self.latent is not None:
            pixels, latent = self._run(self.latent, pixels, latent)
        if self.global_path is not None:
            clip = rearrange(pixels, "b t p c -> b (t p) c")  # all T*h*w pixels of the clip
            clip, memory = self._run(self.global_path, clip, memory)
            pixels = rearrange(clip, "b (t p) c -> b t p c", t=T)
        return rearrange(pixels, "b t (h w) c -> b t c h w", h=h, w=w), memory, latent
