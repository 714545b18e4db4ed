"""Sparse Temporal Transformer (STT): the current frame's features attend to those of the T
previous frames, made cheap by selecting queries and keys (Li et al., "Video Semantic Segmentation
via Sparse Temporal Transformer", ACM MM 2021, §3.2). Dense temporal attention costs O(T h^2 w^2);
with both selections it is O(T h w) (§3.2.3, last paragraph). `minivseg.stt_segmenter` puts this
layer between a per-frame encoder and a PSP decoder (§3.1, Fig. 2).

- Query selection (§3.2.1, Eq. 1-4): `neighborhood_similarity` scores each position q against its
  (2r+1)^2 neighbourhood Q^n, D_NSM = KL(p_u || softmax(Q^n q)) + mean_i(1 - cos(Q^n_i, q)): high
  at boundaries and small objects, near zero in flat regions. `select_queries` keeps the top 50%
  (r = 5, Table 4 row 3); the other positions pass through unchanged.
- Key selection (§3.2.2, Eq. 5): in key frame t (1 farthest ... T nearest) a query sees only the
  (2 l_t + 1)^2 window around its own position, l_t = min(s + (T - t) eps, e) (`key_window_radii`,
  `key_window_index`). s=1, e=5, eps=1, T=7 give radii 5,5,5,4,3,2,1: 527 keys per query. All
  seven key sizes of Table 3 (527, 639, 735, 279, 679, 663, 695) follow from Eq. (5).
- Encoder layer (§3.2.3, Eq. 6-10, `SparseTemporalTransformer`): an MLP reduces Q, K, V to d_t/4;
  each selected query attends to its own key windows (the dense attention is never formed), then
  a post-LN residual and an FFN. `dense=True` uses every query and every key, for comparison.

The windowed attention has two forms with the same output (tested to 1e-5, gradients included).
`windowed_attention` gathers each query's n_k keys, in chunks of queries: the readable reference.
`tiled_attention`, the default (`tiled=True`), groups the queries in 4 x 4 tiles of the map; a
tile attends to the union of its queries' windows ((4 + 2 l_t)^2 keys in key frame t, 932 in all
at T = 7 instead of 527) by one batched matrix product per group of 8 tiles, masked to each
query's own window and to the map. More multiply-adds, but as matrix products instead of a
memory-bound gather: about 4x faster on one CPU thread at the paper's size (measured by
tests/benchmarks/bench_sparse_temporal.py, whose docstring has the numbers).

Choices where the paper is silent or inconsistent (no public code exists; this file is the
reference):

- The printed Eq. (2), sum p_u log(p_sim / p_u), is <= 0; we use the standard
  KL(p_u || p_sim) = sum p_u log(p_u / p_sim) >= 0, large when the neighbours differ, as the text
  says. Eq. (1) has no temperature. The neighbourhood includes the centre and is cut at the
  borders: n_b counts the in-bounds neighbours only.
- One shared two-layer MLP reduces the query, key and value maps from d_t to d_t / 4 (§3.2.3, "a
  multi-layer perceptron"). Keys and values are the same reduced maps (§1: the key and value
  feature maps are identical), projected by W^K and W^V. NSM is computed on the reduced query
  map, without gradient (top-k selection is not differentiable).
- The layer works at d_t / 4; the FFN hidden width is d_hat = d_t / (4 n_h), the d_hat = d_t / n_h
  of W_1 under Eq. (10) at that width, unless `ffn_channels` is given. A linear map brings the
  result back to d_t and it is added to the input features at the selected positions; unselected
  positions pass through unchanged. The paper says neither how d_t / 4 returns to d_t nor what
  happens at unselected positions.
- No positional encoding (the paper mentions none). Window keys outside the map are masked.

Usage (lesson 05 rebuilds this file and proves it equal):

    key_window_radii(7)                         # [5, 5, 5, 4, 3, 2, 1], farthest key frame first
    nsm = neighborhood_similarity(features, 5)  # (B, C, H, W) -> (B, H, W)
    stt = SparseTemporalTransformer(512, num_key_frames=7, num_heads=8)  # dense=True: full
    out = stt(query, keys)  # query (B, C, H, W), keys (B, T, C, H, W) oldest first
    # out["features"] (B, C, H, W), out["selected"] (B, N) updated positions, out["nsm"] (B, H, W)
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


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
    x = rearrange(features.float(), "b c h w -> b h w c").contiguous()  # sums over contiguous c
    norm = x.norm(dim=-1)  # (B, H, W)
    pad = (radius,) * 4
    padded, padded_norm = F.pad(x, (0, 0, *pad)), F.pad(norm, pad)
    padded_inside = F.pad(torch.ones_like(norm), pad)
    offsets = [(dy, dx) for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    shifted = lambda y: [y[:, dy : dy + H, dx : dx + W] for dy, dx in offsets]
    dots = torch.stack([(y * x).sum(-1) for y in shifted(padded)], 1)  # (B, n_b, H, W): Q^n_i . q
    inside = torch.stack(shifted(padded_inside), dim=1) > 0
    num_neighbours = inside.sum(1)  # n_b, smaller at the borders
    # Eq. (1): p_sim = softmax_i(Q^n_i . q), over the in-bounds neighbours
    log_p_sim = dots.masked_fill(~inside, float("-inf")).log_softmax(dim=1)
    # Eq. (2), standard direction: sum_i p_u log(p_u / p_sim_i) with p_u = 1 / n_b
    kl = -num_neighbours.log() - log_p_sim.masked_fill(~inside, 0).sum(1) / num_neighbours
    # Eq. (3): mean cosine distance to the neighbours
    cosine = dots / (torch.stack(shifted(padded_norm), 1) * norm[:, None]).clamp_min(1e-8)
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
        part = lambda c: (q[:, c], k, v, index[:, c], inside[:, c], num_heads, chunk_size)
        return torch.cat([windowed_attention(*part(c)) for c in chunks], dim=1)
    rows = (index + torch.arange(B, device=q.device)[:, None, None] * k.shape[1]).flatten()
    pattern = "(b q k) (h d) -> b q k h d"
    k, v = (rearrange(x.flatten(0, 1)[rows], pattern, b=B, q=N, h=num_heads) for x in (k, v))
    q = rearrange(q, "b q (h d) -> b q h d", h=num_heads)
    # Eq. (6): softmax_k(q . k / sqrt(d_hat)) v over the query's own n_k keys. Products and sums,
    # not einsum: einsum would copy the gathered keys into a bmm layout
    logits = (q[:, :, None] * k).sum(-1) / math.sqrt(q.shape[-1])  # (B, N, n_k, h)
    attention = logits.masked_fill(~inside[..., None], float("-inf")).softmax(2)
    # Eq. (7) without W^O: the heads concatenated
    return rearrange((attention[..., None] * v).sum(2), "b q h d -> b q (h d)")


def tiled_attention(q, k, v, selected, height, width, radii, num_heads: int, group_size: int = 8):
    """Eq. (6)-(7) as `windowed_attention`, by one batched matrix product per group of tiles.

    q (B, N, C) at the `selected` (B, N) positions; k, v (B, T*H*W, C) -> (B, N, C). Queries are
    grouped in 4 x 4 tiles of the map; a tile's queries attend to the union of their windows in
    each key frame ((4 + 2 l_t)^2 keys: 932, not 527, for T=7), masked to each query's own window
    and to the map. Equal to the gather to float rounding; ~4x faster on one CPU thread.
    """
    B, N, C = q.shape
    T, P, S, d = len(radii), max(radii), 4, C // num_heads  # S: tile side
    rows, cols = -(-height // S), -(-width // S)  # tile grid
    Hp, Wp = rows * S + 2 * P, cols * S + 2 * P  # key maps padded by P, to whole tiles
    u, x = selected // width, selected % width
    tile = (torch.arange(B, device=q.device)[:, None] * rows + u // S) * cols + x // S  # (B, N)
    tiles, tile = tile.flatten().unique(return_inverse=True)  # only tiles holding a query
    slot = (u % S * S + x % S).flatten()  # place in the tile
    queries = q.new_zeros(len(tiles), S * S, C).index_put_((tile, slot), q.flatten(0, 1))
    queries = rearrange(queries / math.sqrt(d), "n s (h d) -> n h s d", h=num_heads)
    used = torch.zeros(len(tiles), S * S, dtype=torch.bool, device=q.device)
    used[tile, slot] = True
    # the union of a tile's windows in frame t: rows, cols r = 0 .. S+2l-1 from the tile's start - l
    a, offset, window = torch.arange(S, device=q.device), [], []
    for t, radius in enumerate(radii):
        r = torch.arange(S + 2 * radius, device=q.device)
        near = (r >= a[:, None]) & (r <= a[:, None] + 2 * radius)  # (S, S+2l): |row - a| <= l
        pair = near[:, None, :, None] & near[None, :, None]  # (a, b, y, x): (y, x) near (a, b)
        window.append(rearrange(pair, "a b y x -> (a b) (y x)"))
        offset.append(((t * Hp + P - radius + r[:, None]) * Wp + P - radius + r).flatten())
    offset, window = torch.cat(offset), torch.cat(window, 1)  # (M,), (S*S, M) union keys
    b, i, j = tiles // (rows * cols), tiles // cols % rows, tiles % cols
    index = (i * Wp + j)[:, None] * S + offset  # (n, M) into the padded T*Hp*Wp
    pad = (P, Wp - P - width, P, Hp - P - height)
    inside = F.pad(q.new_ones(T, height, width, dtype=torch.bool), pad).flatten()[index]
    # every slot row keeps >= 1 key: empty slots see the whole union (their output is dropped)
    allowed = (window | ~used[..., None]) & inside[:, None]  # (n, S*S, M)
    bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
    pattern = "b (t y x) (h d) -> b h t y x d"
    k, v = (F.pad(rearrange(z, pattern, t=T, y=height, h=num_heads), (0, 0, *pad)) for z in (k, v))
    heads = torch.arange(num_heads, device=q.device)[:, None]
    out = []
    for g in (slice(s, s + group_size) for s in range(0, len(tiles), group_size)):
        flat = ((b[g, None, None] * num_heads + heads) * T * Hp * Wp + index[g, None]).flatten()
        key, value = (z.reshape(-1, d).index_select(0, flat).view(-1, num_heads, len(offset), d)
                      for z in (k, v))  # fmt: skip
        # Eq. (6) for a group of tiles (1 / sqrt(d_hat) is already in the queries)
        logits = queries[g] @ key.transpose(-1, -2)  # (n_g, h, S*S, M)
        logits += bias[g, None]
        out.append(logits.softmax(-1) @ value)  # (n_g, h, S*S, d)
    out = rearrange(torch.cat(out), "n h s d -> n s (h d)")
    return out[tile, slot].view(B, N, C)


def dense_attention(q, k, v, num_heads: int) -> torch.Tensor:
    """Eq. (6)-(7) without W^O, all queries on all keys: q (B, N, C), k, v (B, M, C) -> (B, N, C).

    Forms the (B, h, N, M) attention: O(N * M) time and memory.
    """
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=num_heads) for x in (q, k, v))
    # Eq. (6) on all M keys; Eq. (7) without W^O
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return rearrange(torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), v), "b h q d -> b q (h d)")


class SparseTemporalTransformer(nn.Module):
    """STT (§3.2): query selection (§3.2.1), key selection (§3.2.2), then one temporal
    transformer encoder layer (§3.2.3, Eq. 6-10) at d_t / 4 channels.

    Sparse attention is `tiled_attention` by default (faster), `windowed_attention` if not tiled.
    """

    def __init__(
        self,
        channels: int,  # d_t, channels of the encoder features
        num_key_frames: int,  # T previous frames
        num_heads: int = 8,  # n_h
        reduction: int = 4,  # Q, K, V reduced to d_t / reduction
        ffn_channels: int | None = None,  # FFN hidden width; None: d_hat (W_1 under Eq. 10)
        query_ratio: float = 0.5,  # fraction of positions selected as queries (top ratio)
        nsm_radius: int = 5,  # r of the NSM neighbourhood
        start: int = 1,  # s, key-window radius in the nearest key frame (Eq. 5)
        end: int = 5,  # e, largest key-window radius
        expansion: int = 1,  # eps, radius growth per frame of distance
        dense: bool = False,  # every query attends to every key (no selection)
        tiled: bool = True,  # sparse attention by `tiled_attention`, else `windowed_attention`
    ):
        super().__init__()
        width = channels // reduction
        hidden = ffn_channels or width // num_heads
        self.num_heads, self.query_ratio, self.nsm_radius = num_heads, query_ratio, nsm_radius
        self.radii = key_window_radii(num_key_frames, start, end, expansion)
        self.dense, self.tiled = dense, tiled
        # §3.2.3: one MLP reduces Q, K and V from d_t to d_t / 4
        self.reduce = nn.Sequential(nn.Linear(channels, width), nn.ReLU(), nn.Linear(width, width))
        self.to_q = nn.Linear(width, width)  # W^Q_j of all heads, stacked
        self.to_k = nn.Linear(width, width)  # W^K_j
        self.to_v = nn.Linear(width, width)  # W^V_j
        self.to_out = nn.Linear(width, width)  # W^O (Eq. 7)
        self.norm1 = nn.LayerNorm(width)
        # Eq. (9): max(0, X W_1 + b_1) W_2 + b_2
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.norm2 = nn.LayerNorm(width)
        self.expand = nn.Linear(width, channels)  # not in the paper: back to d_t

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> dict:
        """query (B, C, H, W) current frame; keys (B, T, C, H, W) previous frames, farthest first.

        Returns {"features": (B, C, H, W), "selected": (B, N) flat positions that were updated,
        "nsm": (B, H, W) NSM scores, or None in dense mode}.
        """
        return self.attend(query, *self.project(keys)[1:])

    def project(self, maps: torch.Tensor):
        """maps (B, T, C, H, W) -> reduced, k, v, each (B, T, H*W, C/4): the per-frame part."""
        reduced = self.reduce(rearrange(maps, "b t c h w -> b t (h w) c"))
        return reduced, self.to_k(reduced), self.to_v(reduced)

    def attend(self, query, k, v, reduced=None) -> dict:
        """`forward` with keys projected: k, v (B, T, H*W, C/4) from `project`; reduced (B, H*W,
        C/4) = `reduce` of the query map if known (a frame cached as a future key has it)."""
        B, C, H, W = query.shape
        if k.shape[1] != len(self.radii):
            raise ValueError(f"built for {len(self.radii)} key frames, got {k.shape[1]}")
        flat = rearrange(query, "b c h w -> b (h w) c")
        q = self.reduce(flat) if reduced is None else reduced  # (B, H*W, C/4)
        k, v = (rearrange(z, "b t n c -> b (t n) c") for z in (k, v))  # (B, T*H*W, C/4)
        if self.dense:
            nsm = None
            selected = torch.arange(H * W, device=query.device).expand(B, -1)
            heads = dense_attention(self.to_q(q), k, v, self.num_heads)
        else:
            # §3.2.1, Eq. (1)-(4): NSM of the reduced query map; top-k has no gradient
            q_map = rearrange(q.detach(), "b (h w) c -> b c h w", h=H)
            nsm = neighborhood_similarity(q_map, self.nsm_radius)
            selected = select_queries(nsm, self.query_ratio)  # (B, N)
            q = q.gather(1, selected[..., None].expand(-1, -1, q.shape[-1]))  # (B, N, C/4)
            # §3.2.2, Eq. (5)-(6): each selected query on its own key windows
            if self.tiled:
                heads = tiled_attention(
                    self.to_q(q), k, v, selected, H, W, self.radii, self.num_heads
                )
            else:
                index, inside = key_window_index(selected, H, W, self.radii)
                heads = windowed_attention(self.to_q(q), k, v, index, inside, self.num_heads)
        # Eq. (7)-(8): X = LN(Q + MH(Q, K))
        x = self.norm1(q + self.to_out(heads))
        # Eq. (9)-(10): LN(X + FFN(X))
        x = self.norm2(x + self.ffn(x))
        # not in the paper: added to the input at the selected positions, the rest unchanged
        position = selected[..., None].expand(-1, -1, C)
        updated = flat.gather(1, position) + self.expand(x).to(flat.dtype)
        features = rearrange(flat.scatter(1, position, updated), "b (h w) c -> b c h w", h=H)
        return {"features": features, "selected": selected, "nsm": nsm}
