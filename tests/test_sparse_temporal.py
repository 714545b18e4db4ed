"""Tests for minivseg.sparse_temporal and minivseg.stt_segmenter.

The layer: NSM vs a per-position loop; Eq. (5) radii against all seven key sizes of STT Table 3;
sparse vs dense attention when the windows cover the map; tiled vs gathered attention to 1e-5,
gradients included, on random maps with windows past every border; window locality. The
segmenter: two training steps; streaming inference equal to `forward` on each frame's window (to
float rounding) with the encoder, reduction and projections run once per frame; the paper preset
(527 keys, 64 x 128 maps); and the benchmark's runs."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minivseg import sparse_temporal
from minivseg.config import PRESETS
from minivseg.sparse_temporal import (
    SparseTemporalTransformer,
    dense_attention,
    key_window_index,
    key_window_radii,
    neighborhood_similarity,
    tiled_attention,
    windowed_attention,
)
from minivseg.stt_segmenter import STTSegmenter, build_stt

_spec = importlib.util.spec_from_file_location(
    "bench_sparse_temporal", Path(__file__).parent / "benchmarks" / "bench_sparse_temporal.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def naive_nsm(features: torch.Tensor, radius: int) -> torch.Tensor:
    """Eq. (1)-(4) one position at a time, KL in the standard direction, borders cut."""
    B, C, H, W = features.shape
    out = torch.zeros(B, H, W, dtype=torch.float64)
    x = features.double()
    for b in range(B):
        for u in range(H):
            for v in range(W):
                q = x[b, :, u, v]
                rows = range(max(0, u - radius), min(H, u + radius + 1))
                cols = range(max(0, v - radius), min(W, v + radius + 1))
                neighbours = torch.stack([x[b, :, i, j] for i in rows for j in cols])
                p_sim = torch.softmax(neighbours @ q, 0)
                p_u = torch.full_like(p_sim, 1 / len(p_sim))
                kl = (p_u * (p_u / p_sim).log()).sum()
                cos = 1 - F.cosine_similarity(neighbours, q[None], dim=1)
                out[b, u, v] = kl + cos.mean()
    return out


@pytest.mark.parametrize("radius", [1, 2])
def test_nsm_matches_naive_loop(radius):
    torch.manual_seed(0)
    features = torch.randn(2, 6, 5, 7)
    expected = naive_nsm(features, radius).float()
    torch.testing.assert_close(neighborhood_similarity(features, radius), expected)


def test_nsm_is_zero_on_flat_maps_and_high_on_boundaries():
    flat = torch.ones(1, 4, 6, 6) * torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None, None]
    torch.testing.assert_close(neighborhood_similarity(flat, 2), torch.zeros(1, 6, 6))
    two_regions = flat.clone()
    two_regions[..., 3:] = -two_regions[..., 3:]  # left and right halves point opposite ways
    nsm = neighborhood_similarity(two_regions, 1)[0]
    assert nsm[:, 2:4].min() > 1.0  # columns touching the boundary
    torch.testing.assert_close(nsm[:, [0, 5]], torch.zeros(6, 2))


def test_key_window_radii_reproduce_table3_key_sizes():
    assert key_window_radii(7) == [5, 5, 5, 4, 3, 2, 1]
    assert key_window_radii(3, start=2, end=3, expansion=1) == [3, 3, 2]
    assert key_window_radii(4, start=1, end=9, expansion=2) == [7, 5, 3, 1]
    # STT Table 3 rows 1-7: (s, e, eps) -> accumulated key size with T = 7 key frames
    table3 = {(1, 5, 1): 527, (2, 5, 1): 639, (3, 5, 1): 735, (1, 3, 1): 279, (1, 7, 1): 679}
    table3.update({(1, 5, 2): 663, (1, 5, 3): 695})
    for (s, e, eps), size in table3.items():
        assert sum((2 * l + 1) ** 2 for l in key_window_radii(7, s, e, eps)) == size


def test_key_window_index_marks_out_of_bounds():
    selected = torch.tensor([[0, 11]])  # corner (0, 0) and (2, 3) of a 3x4 map
    index, inside = key_window_index(selected, 3, 4, [1, 0])
    assert index.shape == (1, 2, 9 + 1)
    assert inside[0, 0].tolist() == [False] * 4 + [True, True, False, True, True, True]
    assert index[0, 0, 4].item() == 0 and index[0, 0, 9].item() == 12  # centre in frames 0 and 1
    assert index[0, 1, 9].item() == 12 + 11


@pytest.mark.parametrize("ratio,expected", [(0.5, 24), (0.25, 12), (1.0, 48)])
def test_selected_count_and_top_nsm(ratio, expected):
    torch.manual_seed(1)
    layer = SparseTemporalTransformer(
        16, num_key_frames=2, num_heads=2, query_ratio=ratio, nsm_radius=1
    )
    query, keys = torch.randn(1, 16, 6, 8), torch.randn(1, 2, 16, 6, 8)
    out = layer(query, keys)
    selected = out["selected"][0]
    assert selected.shape == (expected,) and selected.unique().numel() == expected
    nsm = out["nsm"].flatten()
    unselected = torch.ones(48, dtype=torch.bool)
    unselected[selected] = False
    if unselected.any():
        assert nsm[selected].min() >= nsm[unselected].max()
        # unselected positions pass through unchanged, selected ones are updated
        features, flat = out["features"].flatten(2)[0], query.flatten(2)[0]
        torch.testing.assert_close(features[:, unselected], flat[:, unselected])
    delta = out["features"].flatten(2)[0, :, selected] - query.flatten(2)[0, :, selected]
    assert delta.abs().amax(0).min() > 0


def test_windowed_attention_equals_dense_when_window_covers_map():
    torch.manual_seed(2)
    B, N, T, H, W, C = 2, 12, 3, 3, 4, 8
    q, k, v = torch.randn(B, N, C), torch.randn(B, T * H * W, C), torch.randn(B, T * H * W, C)
    selected = torch.arange(N).expand(B, -1)
    index, inside = key_window_index(selected, H, W, [3] * T)
    sparse = windowed_attention(q, k, v, index, inside, num_heads=2)
    torch.testing.assert_close(sparse, dense_attention(q, k, v, num_heads=2))
    chunked = windowed_attention(q, k, v, index, inside, num_heads=2, chunk_size=5)
    torch.testing.assert_close(chunked, sparse)  # 12 queries in chunks of 5, 5, 2
    # with small windows the answers differ (the test can fail)
    index, inside = key_window_index(selected, H, W, [0] * T)
    assert not torch.allclose(windowed_attention(q, k, v, index, inside, 2), sparse)


def test_windowed_attention_passes_chunk_size_on(monkeypatch):
    torch.manual_seed(7)
    N, T, H, W, C = 250, 2, 10, 25, 8
    q, k, v = torch.randn(1, N, C), torch.randn(1, T * H * W, C), torch.randn(1, T * H * W, C)
    index, inside = key_window_index(torch.arange(N)[None], H, W, [2, 1])
    whole = windowed_attention(q, k, v, index, inside, num_heads=2, chunk_size=N)
    computed, original = [], sparse_temporal.windowed_attention

    def spy(q, k, v, index, inside, num_heads, chunk_size=64):
        if index.shape[1] <= chunk_size:
            computed.append(index.shape[1])  # a chunk attended to without splitting further
        return original(q, k, v, index, inside, num_heads, chunk_size)

    monkeypatch.setattr(sparse_temporal, "windowed_attention", spy)  # the recursion calls the spy
    chunked = sparse_temporal.windowed_attention(q, k, v, index, inside, 2, chunk_size=100)
    assert computed == [100, 100, 50]  # not re-split into chunks of the default 64
    torch.testing.assert_close(chunked, whole)


# (B, H, W, radii, ratio): windows past every border, sides not multiples of 4, radius 0,
# a one-position map, the paper's radii, a few scattered queries
TILED_CASES = [
    (2, 7, 9, [2, 0, 1], 0.5),
    (1, 5, 3, [3], 1.0),
    (2, 13, 6, [5, 5, 5, 4, 3, 2, 1], 0.3),
    (1, 8, 12, [1, 1], 0.1),
    (1, 1, 1, [1], 1.0),
]


@pytest.mark.parametrize("B,H,W,radii,ratio", TILED_CASES)
def test_tiled_attention_equals_gather_with_gradients(B, H, W, radii, ratio):
    torch.manual_seed(8)
    T, C, n = len(radii), 16, max(1, round(ratio * H * W))
    selected = torch.stack([torch.randperm(H * W)[:n] for _ in range(B)])  # unsorted subsets
    q = torch.randn(B, n, C, requires_grad=True)
    k, v = (torch.randn(B, T * H * W, C, requires_grad=True) for _ in range(2))
    index, inside = key_window_index(selected, H, W, radii)
    reference = windowed_attention(q, k, v, index, inside, num_heads=4)
    tiled = tiled_attention(q, k, v, selected, H, W, radii, num_heads=4, group_size=3)
    assert tiled.shape == (B, n, C) and (tiled - reference).abs().max() <= 1e-5
    weights = torch.randn(B, n, C)
    grads = [torch.autograd.grad((out * weights).sum(), (q, k, v)) for out in (reference, tiled)]
    for expected, got in zip(*grads):
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_layer_is_tiled_by_default_and_equals_the_gather_layer():
    torch.manual_seed(9)
    options = dict(num_heads=2, nsm_radius=1, end=2)
    tiled = SparseTemporalTransformer(32, 3, **options)
    gather = SparseTemporalTransformer(32, 3, tiled=False, **options)
    gather.load_state_dict(tiled.state_dict(), strict=True)
    assert tiled.tiled and not gather.tiled
    query, keys = torch.randn(2, 32, 8, 11), torch.randn(2, 3, 32, 8, 11)
    a, b = tiled(query, keys), gather(query, keys)
    assert torch.equal(a["selected"], b["selected"])  # the same NSM code on the same input
    assert (a["features"] - b["features"]).abs().max() <= 1e-5
    assert (a["features"] - query).abs().amax(1).gt(0).float().mean() == 0.5  # half updated


def test_sparse_layer_equals_dense_layer_with_full_windows_and_all_queries():
    torch.manual_seed(3)
    options = dict(num_heads=2, query_ratio=1.0, nsm_radius=1, start=6, end=6)
    sparse = SparseTemporalTransformer(32, 2, **options)
    dense = SparseTemporalTransformer(32, 2, dense=True, **options)
    dense.load_state_dict(sparse.state_dict(), strict=True)
    query, keys = torch.randn(2, 32, 4, 5), torch.randn(2, 2, 32, 4, 5)
    expected = dense(query, keys)["features"]
    torch.testing.assert_close(sparse(query, keys)["features"], expected)
    assert (expected - query).abs().mean() > 0.1
    small = SparseTemporalTransformer(32, 2, **{**options, "start": 0, "end": 0})
    small.load_state_dict(sparse.state_dict(), strict=True)
    assert not torch.allclose(small(query, keys)["features"], expected)


def test_query_never_attends_outside_its_window():
    torch.manual_seed(4)
    H = W = 9
    layer = SparseTemporalTransformer(16, 2, num_heads=2, query_ratio=1.0, start=1, end=2)
    assert layer.radii == [2, 1]  # farthest key frame first
    query, keys = torch.randn(1, 16, H, W), torch.randn(1, 2, 16, H, W)
    before = layer(query, keys)["features"][0]
    for frame, radius in enumerate(layer.radii):
        perturbed = keys.clone()
        perturbed[0, frame, :, 4, 4] += 10.0
        after = layer(query, perturbed)["features"][0]
        changed = (after - before).abs().amax(0) > 1e-6  # (H, W)
        rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        in_window = ((rows - 4).abs() <= radius) & ((cols - 4).abs() <= radius)
        assert torch.equal(changed, in_window)


def test_segmenter_trains_two_steps():
    torch.manual_seed(5)
    model = STTSegmenter(num_classes=5, num_key_frames=2, width=4, num_heads=2, nsm_radius=1)
    frames = torch.rand(2, 3, 3, 32, 40) * 255
    target = torch.randint(0, 5, (2, 32, 40))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for _ in range(2):
        logits = model(frames)["semantic_logits"]
        assert logits.shape == (2, 5, 32, 40)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    for name in (
        "encoder.0.conv.weight",
        "stt.to_q.weight",
        "stt.expand.weight",
        "decoder.classify.weight",
    ):
        assert not torch.equal(start[name], dict(model.named_parameters())[name]), name


def clear_top2(logits: torch.Tensor, margin: float = 1e-4) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W): True where the best class leads the runner-up by > margin.

    Two computation paths (here batch-1 vs batched encoder) differ by ~1e-6; only pixels with a
    clear top-2 gap must get the same argmax label on every CPU.
    """
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1] > margin


@pytest.mark.parametrize("use_stt,T", [(True, 2), (False, 2), (True, 3)])
def test_semantic_video_with_cache_equals_forward_on_each_window(use_stt, T):
    torch.manual_seed(6)
    num_frames = 5
    model = STTSegmenter(num_classes=5, num_key_frames=T, width=8, num_heads=2, use_stt=use_stt)
    model.eval()
    decoded = []  # decoder logits of every call, recorded by a hook
    model.decoder.register_forward_hook(lambda module, inputs, output: decoded.append(output))
    video = torch.rand(num_frames, 3, 48, 64) * 255
    labels = model.semantic_video(video)
    assert labels.shape == (num_frames, 48, 64) and labels.dtype == torch.int64
    assert not model.training
    cached, decoded[:] = list(decoded), []
    window_logits = []
    with torch.no_grad():
        for f in range(num_frames):
            window = [max(i, 0) for i in range(f - T, f + 1)]
            window_logits.append(model(video[window][None])["semantic_logits"][0])
        torch.testing.assert_close(torch.cat(cached), torch.cat(decoded))
        # semantic_video's full-size logits: its decoder outputs upsampled as `decode` does (the
        # same computation, so exactly its labels); the per-window forwards agree to a tolerance.
        size = video.shape[-2:]
        upsampled = torch.cat(
            [F.interpolate(c, size, mode="bilinear", align_corners=False) for c in cached]
        )
        assert torch.equal(upsampled.argmax(1), labels)
        window_logits = torch.stack(window_logits)  # (F, K, H, W)
        torch.testing.assert_close(upsampled, window_logits)
        clear = clear_top2(upsampled) & clear_top2(window_logits)
        assert clear.float().mean() > 0.9  # near-ties excluded, not the whole video
        assert torch.equal(labels[clear], window_logits.argmax(1)[clear])
        model(video[[1] * T + [2]][None])  # frame 2 with keys [1, 1...] instead of [0.., 1]
    keys_matter = not torch.allclose(decoded[-1], decoded[2])
    assert keys_matter == use_stt


def test_build_stt_presets_and_key_frame_check():
    model = build_stt("tiny", width=8, use_stt=False)
    assert model.num_key_frames == 2 and not model.use_stt
    assert model.stt.radii == [2, 1] and model.stt.expand.out_features == 32
    with pytest.raises(ValueError, match="preset"):
        build_stt("huge")
    with pytest.raises(ValueError, match="key frames"):
        model.stt(torch.randn(1, 32, 4, 4), torch.randn(1, 3, 32, 4, 4))


def test_semantic_frames_streams_and_runs_the_key_side_once_per_frame():
    torch.manual_seed(10)
    T, num_frames = 3, 6
    model = STTSegmenter(num_classes=5, num_key_frames=T, width=8, num_heads=2, nsm_radius=1)
    calls = dict.fromkeys(("encoder", "stt.reduce", "stt.to_k", "stt.to_v", "decoder"), 0)
    for name in calls:
        count = lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        model.get_submodule(name).register_forward_hook(count)
    video = torch.rand(num_frames, 3, 32, 40) * 255
    pulled = []

    def frames():  # a generator, not a tensor: the segmenter must not need the whole video
        for f in range(num_frames):
            pulled.append(f)
            yield video[f]

    labels = []
    for f, label in enumerate(model.semantic_frames(frames())):
        assert len(pulled) == f + 1 and not model.training  # one frame in, one label out
        assert label.shape == (32, 40) and label.dtype == torch.int64
        labels.append(label)
    assert calls == dict.fromkeys(calls, num_frames)  # query and key side share one reduce
    assert model.training  # the mode it had before
    assert torch.equal(torch.stack(labels), model.semantic_video(video))  # the same computation


def test_paper_preset_has_table3_keys_and_64x128_maps():
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = build_stt("paper")
        features = model.encode(torch.empty(1, 3, 1024, 2048))
    assert features.shape == (1, 512, 64, 128)  # d_t = 512 at output stride 16
    stt, (h, w) = model.stt, features.shape[-2:]
    assert model.num_key_frames == 7 and stt.radii == [5, 5, 5, 4, 3, 2, 1] and stt.tiled
    assert (stt.num_heads, stt.query_ratio, stt.nsm_radius) == (8, 0.5, 5)
    assert stt.reduce[0].in_features == 512 and stt.to_k.out_features == 128  # d_t / 4
    index, inside = key_window_index(torch.tensor([[32 * w + 64]]), h, w, stt.radii)
    assert index.shape[-1] == inside.sum() == 527  # Table 3 row 1, all inside the map
    assert 7 * h * w == 57_344 and 57_344 // 7 == 64 * 128  # Table 3 row 8: every key
    cfg = PRESETS["stt_paper"]()
    assert (cfg.task, cfg.model, cfg.clip_length) == ("stt", "paper", 8)  # 7 keys + the frame
    # stride 16 changes the last block's stride, not its weights
    stride8, stride16 = build_stt("tiny", width=8), build_stt("tiny", width=8, output_stride=16)
    stride16.load_state_dict(stride8.state_dict(), strict=True)
    frames = torch.rand(1, 3, 64, 96) * 255
    assert stride8.encode(frames).shape[-2:] == (8, 12)
    assert stride16.encode(frames).shape[-2:] == (4, 6)


def test_bench_size_flag_and_dense_on_the_same_selected_queries():
    assert bench.parse_size("64x128") == (64, 128)
    h, w = 6, 8
    inputs = bench.attention_inputs(h, w)
    selected = inputs[-1][0]
    runs = {mode: bench.run_attention(mode, h, w, inputs) for mode in bench.MODES}
    assert (runs["sparse"] - runs["gather"]).abs().max() <= 1e-5
    chunked = bench.run_attention("dense_selected", h, w, inputs, dense_chunk=5)
    torch.testing.assert_close(chunked, runs["dense_selected"])
    torch.testing.assert_close(runs["dense_selected"], runs["dense"][:, selected])
    assert not torch.allclose(runs["sparse"], runs["dense_selected"])  # the windows matter
