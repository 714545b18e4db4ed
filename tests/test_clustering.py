"""Clustering update (CMT-DeepLab): k-means limit, naive reference layer, Eq. (6)-(13) checks.

`OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_clustering.py -q` (19 tests; with
test_tube_loss.py 46 tests in 6.4 s wall on this project's 2-core machine). The whole layer
against naive loops, with Eq. (7) as the sum of its two parts; a hard assignment with identity
projections is one k-means step (against a Lloyd loop); the pixel update reaches pixels only
through Z; the residual paths of S and e; reference points in [0, 1]^2; Eq. (13) at zero and on
hand-computed values; shapes for T = 1..3; soft and argmax forward and backward (argmax stops the
gradient); independent drop paths; bf16 autocast. Inside TubeFormer: two training steps through
`minivseg.train.main` with soft and with argmax, where all terms are finite, the aux0_/aux1_ and
mask_approx terms are present, and both layers' clustering keys move.
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minivseg.clustering import (
    ClusteringUpdate,
    assign,
    clustering_center_update,
    extreme_points,
    mask_approximation_loss,
    normalized_coordinates,
)
from minivseg.config import demo
from minivseg.train import main

SMALL = dict(
    memory_channels=12, bottleneck_channels=16, key_channels=8, value_channels=16, num_heads=2,
    ffn_channels=20, num_reference_points=3,
)  # fmt: skip


def randomize_batch_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affines (gamma-0 BNs would hide whole branches)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


def bn_eval(x, bn):
    """Eval-mode BatchNorm written out, channels on the last axis."""
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def linear_bn(x, layer):
    return bn_eval(x @ layer.linear.weight.T, layer.bn)


def naive_layer(layer, pixels, memory, shape, state):
    """Eq. (6)-(12) with explicit loops over batch, heads, slots and pixels (eval mode)."""
    T, h, w = shape
    B, P, _ = pixels.shape
    N = memory.shape[1]
    kd, _, vd = layer.memory_split
    heads = layer.memory_attention.num_heads
    e = state["reference_logits"] + layer.reference_mlp2(
        F.relu(linear_bn(memory, layer.reference_mlp1))
    ).reshape(B, N, -1, 2)
    r_c = torch.sigmoid(e)
    coords = torch.tensor([[y / (h - 1), x / (w - 1)] for t in range(T) for y in range(h)
                           for x in range(w)])  # fmt: skip
    m = F.relu(linear_bn(torch.cat([memory, r_c.reshape(B, N, -1)], -1), layer.memory_conv1))
    p = F.relu(
        linear_bn(torch.cat([F.relu(pixels), coords.expand(B, P, 2)], -1), layer.pixel_conv1)
    )
    mq, pk = linear_bn(m, layer.memory_qkv), linear_bn(p, layer.pixel_kv)
    q_m, k_m, v_m = mq[..., :kd], mq[..., kd : 2 * kd], mq[..., 2 * kd :]
    k_p, v_p = pk[..., :kd], pk[..., kd:]
    q_c, k_c = linear_bn(m, layer.memory_cluster_query), linear_bn(p, layer.pixel_cluster_key)
    bn = layer.assignment_bn
    S = torch.zeros(B, N, P)
    Z = torch.zeros(B, N, P)
    for b in range(B):
        for i in range(P):
            for n in range(N):
                logit = (q_c[b, n] @ k_c[b, i] - bn.running_mean[0]) / torch.sqrt(
                    bn.running_var[0] + bn.eps
                )
                S[b, n, i] = state["assignment_logits"][b, n, i] + logit * bn.weight[0] + bn.bias[0]
            Z[b, :, i] = torch.exp(S[b, :, i]) / torch.exp(S[b, :, i]).sum()  # softmax over N
    # Eq. (7) part 1: per-head attention, one softmax over the P + N keys [pixels; memory].
    keys, values = torch.cat([k_p, k_m], 1), torch.cat([v_p, v_m], 1)
    attended = torch.zeros(B, N, vd)
    d, dv = kd // heads, vd // heads
    abn = layer.memory_attention.logits_bn
    for b in range(B):
        for hd in range(heads):
            logits = q_m[b, :, hd * d : (hd + 1) * d] @ keys[b, :, hd * d : (hd + 1) * d].T
            logits = (logits - abn.running_mean[hd]) / torch.sqrt(abn.running_var[hd] + abn.eps)
            weights = (logits * abn.weight[hd] + abn.bias[hd]).softmax(-1)
            attended[b, :, hd * dv : (hd + 1) * dv] = (
                weights @ values[b, :, hd * dv : (hd + 1) * dv]
            )
    attention_part = linear_bn(
        F.relu(bn_eval(attended, layer.memory_attention.values_bn)), layer.memory_conv3
    )
    # Eq. (7) part 2: the clustering update, a Z-weighted sum of pixel values per centre.
    pooled = torch.zeros(B, N, vd)
    for b in range(B):
        for n in range(N):
            for i in range(P):
                pooled[b, n] += Z[b, n, i] * v_p[b, i]
    cluster_part = linear_bn(bn_eval(pooled, layer.cluster_values_bn), layer.cluster_conv3)
    # Eq. (8): every pixel receives the Z-weighted values of the centres.
    gathered = torch.zeros(B, P, vd)
    for b in range(B):
        for i in range(P):
            gathered[b, i] = sum(Z[b, n, i] * v_m[b, n] for n in range(N))
    pixel_part = linear_bn(F.relu(bn_eval(gathered, layer.pixel_values_bn)), layer.pixel_conv3)
    return dict(
        S=S, r_c=r_c, e=e, attention=attention_part, cluster=cluster_part,
        pixels=pixels + pixel_part,
    )  # fmt: skip


def test_layer_matches_naive_loops_and_eq7_is_the_sum_of_its_parts():
    torch.manual_seed(0)
    shape = (2, 2, 3)
    layer = ClusteringUpdate(10, **SMALL).eval()
    randomize_batch_norms(layer)
    pixels, memory = torch.randn(2, 12, 10), torch.randn(2, 4, 12)
    state = dict(assignment_logits=torch.randn(2, 4, 12), reference_logits=torch.randn(2, 4, 3, 2))
    seen = {}
    layer.memory_ffn1.register_forward_hook(lambda mod, inp, out: seen.update(ffn_in=inp[0]))
    with torch.no_grad():
        got_p, got_m, got_state = layer(pixels, memory, shape, state)
        want = naive_layer(layer, pixels, memory, shape, state)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state["assignment_logits"], want["S"], **tol)
    torch.testing.assert_close(got_state["reference_logits"], want["e"], **tol)
    torch.testing.assert_close(got_state["reference_points"], want["r_c"], **tol)
    torch.testing.assert_close(got_p, want["pixels"], **tol)
    # Eq. (7): C + attention part + clustering part, each computed on its own.
    torch.testing.assert_close(
        seen["ffn_in"], F.relu(memory + want["attention"] + want["cluster"]), **tol
    )
    for part in ("attention", "cluster"):  # neither part alone explains the update
        other = want["cluster" if part == "attention" else "attention"]
        assert (seen["ffn_in"] - F.relu(memory + other)).abs().max() > 1e-2
    ffn = linear_bn(F.relu(linear_bn(seen["ffn_in"], layer.memory_ffn1)), layer.memory_ffn2)
    torch.testing.assert_close(got_m, F.relu(seen["ffn_in"] + ffn), **tol)


def test_hard_assignment_center_update_is_one_kmeans_step():
    """Identity projections: key [x, 1], query [c, -|c|^2/2] => argmax_N = nearest centre."""
    g = torch.Generator().manual_seed(1)
    B, P, N, C = 2, 40, 4, 3
    x = torch.randn(B, P, C, generator=g)
    centres = x[:, :N].clone() + 0.01  # start at data points: no empty cluster
    keys = torch.cat([x, torch.ones(B, P, 1)], -1)
    queries = torch.cat([centres, -0.5 * centres.pow(2).sum(-1, keepdim=True)], -1)
    logits = torch.einsum("bnc,bpc->bnp", queries, keys)
    # The loop below finds the nearest centre another way: every point must have a clear one
    # (top-2 logit gap well above float error), or the two could pick different centres.
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
    Z = assign(logits, "argmax")
    sums = clustering_center_update(x, Z)
    counts = clustering_center_update(torch.ones(B, P, 1), Z)
    want = torch.zeros(B, N, C)
    for b in range(B):  # one Lloyd step, written as loops
        total, count = torch.zeros(N, C), torch.zeros(N)
        for i in range(P):
            nearest = min(range(N), key=lambda n: float(((x[b, i] - centres[b, n]) ** 2).sum()))
            total[nearest] += x[b, i]
            count[nearest] += 1
        want[b] = total / count[:, None]
    torch.testing.assert_close(sums / counts, want)
    assert torch.all(Z.sum(1) == 1) and not Z.requires_grad
    # Soft clustering tends to it as the temperature goes to 0.
    soft = assign(logits / 1e-4, "soft")
    soft_means = clustering_center_update(x, soft) / clustering_center_update(
        torch.ones(B, P, 1), soft
    )
    torch.testing.assert_close(soft_means, want, rtol=1e-4, atol=1e-4)
    assert (assign(logits, "soft") - Z).abs().max() > 0.1  # at temperature 1 it is still soft


@pytest.mark.parametrize("mode", ["soft", "argmax"])
def test_pixel_update_reaches_pixels_only_through_assignment(mode):
    """A centre that no pixel is assigned to (Z = 0 via the residual S) cannot move pixels."""
    torch.manual_seed(2)
    layer = ClusteringUpdate(10, **SMALL, assignment=mode).eval()
    randomize_batch_norms(layer)
    shape, B, N = (1, 3, 3), 2, 4
    pixels, memory = torch.randn(B, 9, 10), torch.randn(B, N, 12)
    blocked = torch.zeros(B, N, 9)
    blocked[:, 1] = -1e9  # slot 1 loses every pixel, whatever this layer adds
    changed, changed_assigned = memory.clone(), memory.clone()
    changed[:, 1] += 3 * torch.randn(B, 12)
    changed_assigned[:, 2] += 3 * torch.randn(B, 12)
    with torch.no_grad():
        p0, m0, s0 = layer(pixels, memory, shape, dict(assignment_logits=blocked))
        p1, m1, _ = layer(pixels, changed, shape, dict(assignment_logits=blocked))
        p2, _, _ = layer(pixels, changed_assigned, shape, dict(assignment_logits=blocked))
    assert torch.all(assign(s0["assignment_logits"], mode)[:, 1] == 0)
    torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-6)  # vs changes > 1e-3 below
    assert (m1 - m0)[:, 1].abs().max() > 1e-2  # the centre itself did change
    assert (p2 - p0).abs().max() > 1e-3  # an assigned centre does reach the pixels


def test_residual_paths_across_layers():
    """Eq. (6): S_l = S_(l-1) + new logits; Eq. (9): e_l = e_(l-1) + MLP(C)."""
    torch.manual_seed(3)
    layer = ClusteringUpdate(10, **SMALL).eval()
    randomize_batch_norms(layer)
    pixels, memory, shape = torch.randn(2, 8, 10), torch.randn(2, 4, 12), (2, 2, 2)
    previous_s, previous_e = torch.randn(2, 4, 8), torch.randn(2, 4, 3, 2)
    with torch.no_grad():
        _, _, fresh = layer(pixels, memory, shape)
        _, _, with_s = layer(pixels, memory, shape, dict(assignment_logits=previous_s))
        _, _, with_e = layer(pixels, memory, shape, dict(reference_logits=previous_e))
    torch.testing.assert_close(with_s["assignment_logits"], previous_s + fresh["assignment_logits"])
    torch.testing.assert_close(with_e["reference_logits"], previous_e + fresh["reference_logits"])
    # The reference points feed the coordinate convolution, so they move the assignment.
    assert (with_e["assignment_logits"] - fresh["assignment_logits"]).abs().max() > 1e-3


def test_reference_points_stay_in_unit_square():
    torch.manual_seed(4)
    layers = [ClusteringUpdate(10, **SMALL).train() for _ in range(3)]
    pixels, memory, state = 50 * torch.randn(2, 12, 10), 50 * torch.randn(2, 4, 12), None
    for layer in layers:
        randomize_batch_norms(layer)
        pixels, memory, state = layer(pixels, memory, (3, 2, 2), state)
        points = state["reference_points"]
        assert points.shape == (2, 4, 3, 2) and torch.isfinite(points).all()
        assert points.min() >= 0 and points.max() <= 1
    assert points.std() > 0.05  # not collapsed onto one value


def test_extreme_points_hand_computed():
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)  # an L over two frames (frame 2 empty)
    mask[0, :, 0] = True
    mask[0, 2, :] = True
    want = torch.tensor([[0, 0], [1, 0.5], [0.5, 0], [1, 1], [0.7, 0.3]])
    torch.testing.assert_close(extreme_points(mask), want)
    torch.testing.assert_close(normalized_coordinates(2, 3)[4], torch.tensor([1.0, 0.5]))


def test_mask_approximation_loss_zero_at_extreme_points_and_centre():
    """A symmetric tube (a growing plus): its extremes + centre give zero loss."""
    tube = torch.zeros(2, 9, 9)
    tube[0, 2:7, 4] = tube[0, 4, 2:7] = 1
    tube[1, 1:8, 4] = tube[1, 4, 1:8] = 1
    other = torch.zeros(2, 9, 9)
    other[:, :2, :3] = 1
    gt = torch.stack([other, tube])  # (M, T, h, w)
    reference = torch.rand(1, 6, 5, 2, requires_grad=True)
    with torch.no_grad():
        reference[0, 4] = extreme_points(tube)
    loss = mask_approximation_loss(reference, [gt], [(torch.tensor([4]), torch.tensor([1]))])
    assert loss["extreme"].item() == pytest.approx(0, abs=1e-6)
    assert loss["center"].item() == pytest.approx(0, abs=1e-6)
    # The same points matched to the other tube are far from zero.
    wrong = mask_approximation_loss(reference, [gt], [(torch.tensor([4]), torch.tensor([0]))])
    assert wrong["extreme"] > 0.1 and wrong["center"] > 0.1


def test_mask_approximation_loss_hand_computed_and_only_matched_slots():
    gt_a = torch.zeros(1, 1, 5, 5)
    gt_a[0, 0, 2, 4] = 1  # one pixel at (y, x) = (0.5, 1.0)
    gt_b = torch.zeros(2, 1, 3, 3)
    gt_b[0, 0, 1, 1] = 1  # one pixel at (0.5, 0.5)
    gt_b[1, 0] = 1  # the whole frame: extremes 0 and 1, centre (0.5, 0.5)
    reference = torch.zeros(2, 3, 2, 2)  # all points at (0, 0) ...
    reference[0, 1, 1] = torch.tensor([1.0, 0.5])  # ... but one: clip a, slot 1, point 2
    reference.requires_grad_(True)
    matches = [
        (torch.tensor([1]), torch.tensor([0])),
        (torch.tensor([2, 0]), torch.tensor([1, 0])),
    ]
    loss = mask_approximation_loss(reference, [gt_a, gt_b], matches)
    # extreme, per match: a |0-.5|+|1-.5|+|0-1|+|.5-1| = 2.5; b/whole 0+1+0+1 = 2; b/pixel 2
    assert loss["extreme"].item() == pytest.approx((2.5 + 2 + 2) / (4 * 3))
    # center (mean of the points): a |.5-.5|+|.25-1| = .75; b/whole .5+.5 = 1; b/pixel 1
    assert loss["center"].item() == pytest.approx((0.75 + 1 + 1) / (2 * 3))
    (loss["extreme"] + loss["center"]).backward()
    touched = reference.grad.abs().sum((2, 3)) > 0  # (B, N)
    assert touched.tolist() == [[False, True, False], [True, False, True]]
    none = (torch.tensor([], dtype=torch.long),) * 2
    empty = mask_approximation_loss(reference, [gt_a, gt_b], [none, none])
    assert empty["extreme"].item() == 0 and empty["center"].item() == 0


@pytest.mark.parametrize("T", [1, 2, 3])
def test_output_shapes_for_clip_lengths(T):
    torch.manual_seed(5)
    shape, B, N = (T, 3, 4), 2, 5
    P = T * 3 * 4
    for kwargs in (dict(), dict(coord_conv=False), dict(num_reference_points=0, coord_conv=False)):
        layer = ClusteringUpdate(10, **{**SMALL, **kwargs})
        pixels, memory, state = layer(torch.randn(B, P, 10), torch.randn(B, N, 12), shape)
        pixels, memory, state = layer(pixels, memory, shape, state)
        assert pixels.shape == (B, P, 10) and memory.shape == (B, N, 12)
        assert state["assignment_logits"].shape == (B, N, P)
        if layer.num_reference_points:
            assert state["reference_points"].shape == (B, N, 3, 2)
        else:
            assert set(state) == {"assignment_logits"}
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(B, P + 1, 10), torch.randn(B, N, 12), shape)
    with pytest.raises(ValueError, match="reference points"):
        ClusteringUpdate(10, **{**SMALL, "num_reference_points": 0})


def test_zero_gamma_init_keeps_pixels_and_relus_memory():
    torch.manual_seed(6)
    layer = ClusteringUpdate(10, **SMALL).train()
    pixels, memory = torch.randn(2, 12, 10), torch.randn(2, 4, 12)
    p, m, _ = layer(pixels, memory, (1, 3, 4))
    torch.testing.assert_close(p, pixels)
    torch.testing.assert_close(m, F.relu(memory))


@pytest.mark.parametrize("mode", ["soft", "argmax"])
def test_soft_and_argmax_train_forward_backward(mode):
    """Both run forward + backward without NaN; argmax stops the gradient through Z."""
    torch.manual_seed(7)
    layers = nn.ModuleList(ClusteringUpdate(10, **SMALL, assignment=mode) for _ in range(2)).train()
    for seed, layer in enumerate(layers):
        randomize_batch_norms(layer, seed)
    pixels = torch.randn(2, 2 * 3 * 3, 10, requires_grad=True)
    memory, shape, state = torch.randn(2, 4, 12), (2, 3, 3), None
    p, m = pixels, memory
    for layer in layers:
        p, m, state = layer(p, m, shape, state)
    # Through the outputs only: the clustering key gets a gradient via Z only when Z is soft.
    (p.square().mean() + m.square().mean()).backward(retain_graph=True)
    key_grad = layers[1].pixel_cluster_key.linear.weight.grad
    if mode == "soft":
        assert key_grad.abs().sum() > 0
    else:
        assert key_grad is None or key_grad.abs().sum() == 0
    # With the deep supervision on S and the reference points, every projection learns.
    gt = torch.zeros(2, 1, 2, 3, 3)
    gt[:, 0, :, 1:, :2] = 1
    matches = [(torch.tensor([0]), torch.tensor([0]))] * 2
    approx = mask_approximation_loss(state["reference_points"], gt, matches)
    target = gt[:, 0].flatten(1).long()  # pixels of the tube -> slot 0, others -> slot 1
    supervision = F.cross_entropy(state["assignment_logits"][:, :2], target)
    (approx["extreme"] + approx["center"] + supervision).backward()
    for name, param in layers.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert layers[1].pixel_cluster_key.linear.weight.grad.abs().sum() > 0
    assert layers[0].reference_mlp2.weight.grad.abs().sum() > 0
    assert torch.isfinite(pixels.grad).all()


def test_drop_path_masks_are_independent_per_branch():
    torch.manual_seed(8)
    layer = ClusteringUpdate(10, **SMALL, drop_path=0.5).train()
    randomize_batch_norms(layer)
    names = ("memory_drop_path", "cluster_drop_path", "ffn_drop_path", "pixel_drop_path")
    kept = {}
    for name in names:
        getattr(layer, name).register_forward_hook(
            lambda mod, inp, out, name=name: kept.update({name: out.flatten(1).abs().sum(1) > 0})
        )
    layer(torch.randn(64, 4, 10), torch.randn(64, 3, 12), (1, 2, 2))
    masks = [kept[name] for name in names]
    assert all(0 < m.sum() < 64 for m in masks)  # some samples dropped, some kept
    assert len({tuple(m.tolist()) for m in masks}) == 4


def test_bf16_autocast_keeps_residual_state_in_float32():
    torch.manual_seed(9)
    layer = ClusteringUpdate(10, **SMALL).train()
    pixels = torch.randn(2, 12, 10, requires_grad=True)
    state = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p, m = pixels, torch.randn(2, 4, 12)
        for _ in range(2):
            p, m, state = layer(p, m, (3, 2, 2), state)
    assert {v.dtype for v in state.values()} == {torch.float32}
    (p.float().square().mean() + state["assignment_logits"].mean()).backward()
    assert torch.isfinite(pixels.grad).all()


@pytest.mark.parametrize("mode", ["soft", "argmax"])
def test_tubeformer_with_clustering_trains_two_steps(tmp_path, mode):
    """``--model.memory_update=clustering`` through the training loop: finite, weights move."""
    overrides = {"memory_update": "clustering", "clustering_assignment": mode}
    cfg = dataclasses.replace(
        demo(), data=str(Path(__file__).resolve().parents[1] / "data_samples"),
        out_dir=str(tmp_path), max_steps=2, batch_size=1, num_workers=0, crop_size=(65, 97),
        model_overrides=overrides, device="cpu", checkpoint_every=1, log_every=1,
    )  # fmt: skip
    result = main(cfg)
    model = result["model"]
    assert result["step"] == 2 and result["skipped_steps"] == 0
    assert all(isinstance(b.global_path, ClusteringUpdate) for b in model.blocks)
    assert model.blocks[0].global_path.assignment == mode
    # Both clustering layers' S are deeply supervised (aux0_, aux1_ terms); Eq. (13) is on.
    assert {"aux0_tube_id", "aux1_tube_id", "aux1_pq_dice"} <= set(result)
    assert result["mask_approx"] > 0
    assert all(math.isfinite(v) for k, v in result.items() if isinstance(v, float))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["config"]["model_overrides"] == overrides
    fresh = ClusteringUpdate(
        64, 64, 64, 32, 64, 4, 128, num_reference_points=8, assignment=mode
    ).state_dict()
    trained = {k.removeprefix("blocks.0.global_path."): v for k, v in checkpoint["model"].items()
               if k.startswith("blocks.0.global_path.")}  # fmt: skip
    assert trained.keys() == fresh.keys()
    assert torch.isfinite(torch.cat([v.float().flatten() for v in trained.values()])).all()
    # Step 2 moved the clustering keys of both layers (argmax: only S's supervision reaches them).
    before = torch.load(tmp_path / "prev.pt", weights_only=True)["model"]
    for layer in (0, 1):
        key = f"blocks.{layer}.global_path.pixel_cluster_key.linear.weight"
        assert not torch.equal(before[key], checkpoint["model"][key])
