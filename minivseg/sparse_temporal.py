"""Sparse Temporal Transformer (STT): the current frame's features attend to the T previous frames,
made cheap by query selection and key selection, plugged between a per-frame encoder and a PSP
decoder (Li et al., "Video Semantic Segmentation via Sparse Temporal Transformer", ACM MM 2021).

Implements §3.2.1 query selection by the Neighbouring Similarity Matrix (Eq. 1-4), §3.2.2 key
selection by growing windows (Eq. 5), §3.2.3 the temporal transformer encoder (Eq. 6-10), and a
dense mode (every query, every key) for comparison. No public code exists; this file is the
reference. Choices where the paper is silent or inconsistent:

- Eq. (2) is printed as sum p_u log(p_sim / p_u), which is <= 0; we use the standard
  KL(p_u || p_sim) = sum p_u log(p_u / p_sim) >= 0, large when neighbours differ (as the text says).
- The neighbourhood includes the centre; at the borders only in-bounds neighbours count.
- One shared two-layer MLP reduces query, key and value maps from d_t to d_t / 4 (§3.2.3). NSM is
  computed on the reduced query map, without gradient (top-k selection is not differentiable).
- The encoder layer (Eq. 6-10) works at d_t / 4; its FFN hidden width is d_hat = d_t / (4 n_h) as
  printed under Eq. (10) unless `ffn_channels` is given. A linear map brings the result back to
  d_t and adds it to the input feature at the selected positions. Unselected positions pass
  through unchanged (the paper does not say what happens to them).
- No positional encoding (the paper mentions none). Window keys outside the map are masked.
- `STTSegmenter` encodes with a compact dilated ResNet (output stride 8), not ResNet-18.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivseg.backbone import BottleneckBlock, conv_bn


def key_window_radii(num_key_frames: int, start: int = 1, end: int = 5, expansion: int = 1):
    """Eq. (5): key-window radius l_t of key frame t = 1 (farthest) ... T (nearest), farthest first.

    Frame t contributes (2 l_t + 1)^2 keys; with s=1, e=5, eps=1 and T=7 that is 527 keys
    (Table 3, row 1).
    """
    T = num_key_frames
    # Eq. (5): l_t = s + (T - t) * eps while that is below e, else e
    return [min(start + (T - t) * expansion, end) for t in range(1, T + 1)]


def neighborhood_similarity(features: torch.Tensor, radius: int) -> torch.Tensor:
    """Eq. (1)-(4): NSM score of every position; large where a position differs from its neighbours.

    features (B, C, H, W) -> (B, H, W). The neighbourhood is the (2r+1)^2 window around the
    position, centre included, cut at the borders. The loop runs over window offsets, not positions.
    """
    H, W = features.shape[-2:]
    x = features.float()
    norm = x.norm(dim=1)  # (B, H, W)
    pad = (radius,) * 4
    padded, padded_norm = F.pad(x, pad), F.pad(norm, pad)
    padded_inside = F.pad(torch.ones_like(norm), pad)
    offsets = [(dy, dx) for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]

    def shifted(y):
        return torch.stack([y[..., dy : dy + H, dx : dx + W] for dy, dx in offsets], dim=1)

    dots = torch.stack(
        [
            torch.einsum("bchw,bchw->bhw", padded[..., dy : dy + H, dx : dx + W], x)
            for dy, dx in offsets
        ],
        dim=1,
    )  # (B, n_b, H, W): Q^n_i . q
    inside = shifted(padded_inside) > 0
    num_neighbours = inside.sum(1)  # n_b, smaller at the borders
    # Eq. (1): p_sim = softmax_i(Q^n_i . q), over the in-bounds neighbours
    log_p_sim = dots.masked_fill(~inside, float("-inf")).log_softmax(dim=1)
    # Eq. (2), standard direction: sum_i p_u log(p_u / p_sim_i) with p_u = 1 / n_b
    kl = -num_neighbours.log() - log_p_sim.masked_fill(~inside, 0).sum(1) / num_neighbours
    # Eq. (3): mean cosine distance to the neighbours
    cosine = dots / (shifted(padded_norm) * norm[:, None]).clamp_min(1e-8)
    cosine_distance = (1 - cosine).masked_fill(~inside, 0).sum(1) / num_neighbours
    return kl + cosine_distance  # Eq. (4)


def select_queries(nsm: torch.Tensor, ratio: float) -> torch.Tensor:
    """§3.2.1: flat indices (B, N) of the N = round(ratio * H * W) positions of largest NSM."""
    num_selected = max(1, round(ratio * nsm.shape[-2] * nsm.shape[-1]))
    return nsm.flatten(1).topk(num_selected, dim=1).indices


def key_window_index(selected: torch.Tensor, height: int, width: int, radii: list[int]):
    """§3.2.2: where each selected query looks in the stacked key maps (T*H*W positions).

    selected (B, N) flat query positions; radii from `key_window_radii`, farthest frame first.
    Returns index (B, N, n_k) into T*H*W and inside (B, N, n_k), False for window positions
    outside the map (their index is clamped and must be masked); n_k = sum_t (2 l_t + 1)^2.
    """
    u, v = selected // width, selected % width
    index, inside = [], []
    for t, radius in enumerate(radii):
        offset = torch.arange(-radius, radius + 1, device=selected.device)
        dy, dx = torch.meshgrid(offset, offset, indexing="ij")
        y, x = u[..., None] + dy.flatten(), v[..., None] + dx.flatten()  # (B, N, (2l+1)^2)
        inside.append((y >= 0) & (y < height) & (x >= 0) & (x < width))
        index.append(t * height * width + y.clamp(0, height - 1) * width + x.clamp(0, width - 1))
    return torch.cat(index, -1), torch.cat(inside, -1)


def windowed_attention(q, k, v, index, inside, num_heads: int, chunk_size: int = 64):
    """Eq. (6): every query attends to its own gathered key set; heads concatenated (Eq. 7, no W^O).

    q (B, N, C); k, v (B, T*H*W, C); index, inside (B, N, n_k) from `key_window_index`. Queries go
    in chunks, so memory is O(chunk_size * n_k * C) and the dense (N x T*H*W) attention is never
    formed. Returns (B, N, C).
    """
    B, N = index.shape[:2]
    if N > chunk_size:
        chunks = [slice(i, i + chunk_size) for i in range(0, N, chunk_size)]
        attend = lambda c: windowed_attention(q[:, c], k, v, index[:, c], inside[:, c], num_heads)
        return torch.cat([attend(c) for c in chunks], dim=1)
    rows = (index + torch.arange(B, device=q.device)[:, None, None] * k.shape[1]).flatten()
    pattern = "(b q k) (h d) -> b q k h d"
    k, v = (rearrange(x.flatten(0, 1)[rows], pattern, b=B, q=N, h=num_heads) for x in (k, v))
    q = rearrange(q, "b q (h d) -> b q h d", h=num_heads)
    # products and sums, not einsum: einsum would copy the gathered keys into a bmm layout
    logits = (q[:, :, None] * k).sum(-1) / math.sqrt(q.shape[-1])  # (B, N, n_k, h)
    attention = logits.masked_fill(~inside[..., None], float("-inf")).softmax(2)
    return rearrange((attention[..., None] * v).sum(2), "b q h d -> b q (h d)")


def dense_attention(q, k, v, num_heads: int) -> torch.Tensor:
    """Eq. (6)-(7) without W^O, all queries on all keys: q (B, N, C), k, v (B, M, C) -> (B, N, C).

    Forms the (B, h, N, M) attention: O(N * M) time and memory.
    """
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=num_heads) for x in (q, k, v))
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return rearrange(torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), v), "b h q d -> b q (h d)")


class SparseTemporalTransformer(nn.Module):
    """STT (§3.2): query and key selection, then one temporal transformer encoder layer."""

    def __init__(
        self,
        channels: int,  # d_t, channels of the encoder features
        num_key_frames: int,  # T previous frames
        num_heads: int = 8,  # n_h
        reduction: int = 4,  # Q, K, V reduced to d_t / reduction
        ffn_channels: int | None = None,  # FFN hidden width; None = d_hat as printed (Eq. 9)
        query_ratio: float = 0.5,  # fraction of positions selected as queries
        nsm_radius: int = 5,  # r of the NSM neighbourhood
        start: int = 1,  # s, key-window radius in the nearest key frame (Eq. 5)
        end: int = 5,  # e, largest key-window radius
        expansion: int = 1,  # eps, radius growth per frame of distance
        dense: bool = False,  # every query attends to every key (no selection)
    ):
        super().__init__()
        width = channels // reduction
        ffn_channels = ffn_channels or width // num_heads
        self.num_heads, self.query_ratio, self.nsm_radius = num_heads, query_ratio, nsm_radius
        self.radii = key_window_radii(num_key_frames, start, end, expansion)
        self.dense = dense
        self.reduce = nn.Sequential(nn.Linear(channels, width), nn.ReLU(), nn.Linear(width, width))
        self.to_q = nn.Linear(width, width)  # W^Q_j of all heads, stacked
        self.to_k = nn.Linear(width, width)  # W^K_j
        self.to_v = nn.Linear(width, width)  # W^V_j
        self.to_out = nn.Linear(width, width)  # W^O
        self.norm1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_channels), nn.ReLU(), nn.Linear(ffn_channels, width)
        )
        self.norm2 = nn.LayerNorm(width)
        self.expand = nn.Linear(width, channels)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> dict:
        """query (B, C, H, W) current frame; keys (B, T, C, H, W) previous frames, farthest first.

        Returns {"features": (B, C, H, W), "selected": (B, N) flat positions that were updated,
        "nsm": (B, H, W) NSM scores, or None in dense mode}.
        """
        B, C, H, W = query.shape
        if keys.shape[1] != len(self.radii):
            raise ValueError(f"built for {len(self.radii)} key frames, got {keys.shape[1]}")
        flat = rearrange(query, "b c h w -> b (h w) c")
        q = self.reduce(flat)  # (B, H*W, C/4)
        kv = self.reduce(rearrange(keys, "b t c h w -> b (t h w) c"))  # (B, T*H*W, C/4)
        k, v = self.to_k(kv), self.to_v(kv)
        if self.dense:
            nsm = None
            selected = torch.arange(H * W, device=query.device).expand(B, -1)
            heads = dense_attention(self.to_q(q), k, v, self.num_heads)
        else:
            with torch.no_grad():
                nsm = neighborhood_similarity(
                    rearrange(q, "b (h w) c -> b c h w", h=H), self.nsm_radius
                )
            selected = select_queries(nsm, self.query_ratio)  # (B, N)
            q = q.gather(1, selected[..., None].expand(-1, -1, q.shape[-1]))  # (B, N, C/4)
            index, inside = key_window_index(selected, H, W, self.radii)
            heads = windowed_attention(self.to_q(q), k, v, index, inside, self.num_heads)
        # Eq. (7)-(8): X = LN(Q + MH(Q, K))
        x = self.norm1(q + self.to_out(heads))
        # Eq. (9)-(10): LN(X + FFN(X))
        x = self.norm2(x + self.ffn(x))
        position = selected[..., None].expand(-1, -1, C)
        updated = flat.gather(1, position) + self.expand(x).to(flat.dtype)
        features = flat.scatter(1, position, updated)
        return {
            "features": rearrange(features, "b (h w) c -> b c h w", h=H),
            "selected": selected,
            "nsm": nsm,
        }


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
        size = x.shape[-2:]
        pooled = [
            F.interpolate(s(x), size, mode="bilinear", align_corners=False) for s in self.stages
        ]
        return self.classify(self.fuse(torch.cat([x, *pooled], 1)))


class STTSegmenter(nn.Module):
    """Video semantic segmentation (STT Fig. 2): shared encoder -> STT -> PSP decoder."""

    def __init__(
        self,
        num_classes: int = 19,  # K
        num_key_frames: int = 2,  # T previous frames used as keys
        width: int = 32,  # encoder stem width; features have 4 * width channels (d_t)
        use_stt: bool = True,  # False: same model, STT skipped (per-frame baseline)
        num_heads: int = 4,  # n_h of the STT layer
        **stt_options,  # further SparseTemporalTransformer options (query_ratio, end, ...)
    ):
        super().__init__()
        self.num_classes, self.num_key_frames, self.use_stt = num_classes, num_key_frames, use_stt
        self.encoder = nn.Sequential(
            conv_bn(3, width, 3, stride=2),
            BottleneckBlock(width, width // 2, stride=2),
            BottleneckBlock(2 * width, width, stride=2),
            BottleneckBlock(4 * width, width, dilation=2),
            nn.ReLU(),
        )  # output stride 8, 4 * width channels
        self.stt = SparseTemporalTransformer(4 * width, num_key_frames, num_heads, **stt_options)
        self.decoder = PyramidPooling(4 * width, num_classes)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, H, W) in [0, 255] -> features (N, 4 * width, H / 8, W / 8)."""
        return self.encoder(frames / 127.5 - 1)

    def decode(self, features, keys, size) -> torch.Tensor:
        """features (B, C, h, w), keys (B, T, C, h, w) or None -> logits (B, K, *size)."""
        if self.use_stt:
            features = self.stt(features, keys)["features"]
        return F.interpolate(self.decoder(features), size, mode="bilinear", align_corners=False)

    def forward(self, frames: torch.Tensor) -> dict:
        """frames (B, T+1, 3, H, W) in [0, 255] -> {"semantic_logits": (B, K, H, W)}, last frame.

        The T earlier frames (oldest first) are the keys; without STT only the last is encoded.
        """
        size = frames.shape[-2:]
        if not self.use_stt:
            return {"semantic_logits": self.decode(self.encode(frames[:, -1]), None, size)}
        features = self.encode(rearrange(frames, "b t c h w -> (b t) c h w"))
        features = rearrange(features, "(b t) c h w -> b t c h w", b=frames.shape[0])
        return {"semantic_logits": self.decode(features[:, -1], features[:, :-1], size)}

    @torch.no_grad()
    def predict_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (F, 3, H, W) in [0, 255] -> (F, H, W) int64 labels, in eval mode, frame by frame.

        Each frame is encoded once and its features are cached. Frame f uses frames f-T ... f-1 as
        keys, with frame 0 repeated for those before the video starts (frame 0 attends to T copies
        of itself); this equals `forward` on the window frames[max(f-T..f, 0)] up to float rounding.
        """
        was_training = self.training
        self.eval()
        on_cuda = frames.device.type == "cuda"
        labels, keys = [], None
        with torch.autocast(frames.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            for frame in frames:
                feature = self.encode(frame[None])
                keys = keys or [feature] * self.num_key_frames
                logits = self.decode(feature, torch.stack(keys, 1), frame.shape[-2:])
                labels.append(logits.argmax(1)[0])
                keys = keys[1:] + [feature]
        self.train(was_training)
        return torch.stack(labels)


@dataclass
class STTConfig:
    num_classes: int = 19  # K
    num_key_frames: int = 2  # T; training clips have T + 1 frames
    width: int = 32  # encoder stem width; d_t = 4 * width
    use_stt: bool = True  # False: the per-frame baseline
    num_heads: int = 4  # n_h
    ffn_channels: int | None = None  # None: d_hat as printed under Eq. (10)
    query_ratio: float = 0.5  # top ratio of NSM (Table 4)
    nsm_radius: int = 5  # r (Table 4)
    start: int = 1  # s (Table 3)
    end: int = 5  # e
    expansion: int = 1  # eps


def build_stt(preset: str = "tiny", **overrides) -> STTSegmenter:
    """`STTSegmenter` from a named preset with field overrides.

    "tiny": T = 2, width 32 (d_t = 128), for CPU training on 129 x 417 synthetic clips.
    """
    presets = {"tiny": STTConfig()}
    if preset not in presets:
        raise ValueError(f"unknown STT preset {preset!r}: {', '.join(presets)}")
    return STTSegmenter(**{**asdict(presets[preset]), **overrides})
