"""Dual-path layers: naive-reference attention, frame independence, init, counts, checkpointing."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minivseg.dual_path import GlobalDualPath, HierarchicalBlock, LatentDualPath

CORE = dict(bottleneck_channels=16, key_channels=8, value_channels=16, num_heads=2, ffn_channels=20)
SMALL = dict(memory_channels=12, **CORE)


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


def bn_eval(x: torch.Tensor, bn: nn.Module, dim: int = -1) -> torch.Tensor:
    """Eval-mode BatchNorm written out, channels on axis ``dim``."""
    shape = [1] * x.dim()
    shape[dim] = -1
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def linear_bn(x, layer):
    return bn_eval(x @ layer.linear.weight.T, layer.bn)


def exact_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / 2**0.5))


def naive_attention(q, k, v, attention, heads, joint=True, split=None, act=F.relu):
    """Per-head loops; ``joint=False``: separate softmaxes over keys[:split] and keys[split:]."""
    B, Q, _ = q.shape
    d, dv = q.shape[-1] // heads, v.shape[-1] // heads
    out = v.new_zeros(B, Q, v.shape[-1])
    for b in range(B):
        for h in range(heads):
            qh, kh = q[b, :, h * d : (h + 1) * d], k[b, :, h * d : (h + 1) * d]
            vh = v[b, :, h * dv : (h + 1) * dv]
            logits = qh @ kh.T  # no 1/sqrt(d)
            bn = attention.logits_bn
            logits = (logits - bn.running_mean[h]) / torch.sqrt(bn.running_var[h] + bn.eps)
            logits = logits * bn.weight[h] + bn.bias[h]
            if joint:
                weights = logits.softmax(-1)
            else:
                weights = torch.cat(
                    [logits[:, :split].softmax(-1), logits[:, split:].softmax(-1)], 1
                )
            out[b, :, h * dv : (h + 1) * dv] = weights @ vh
    return act(bn_eval(out, attention.values_bn))


def naive_dual_path(layer, pixels, memory, heads, joint=True, act=F.relu):
    kd, _, vd = layer.split
    m = act(linear_bn(memory, layer.memory_conv1))
    p = act(linear_bn(act(pixels), layer.pixel_conv1))
    mq = linear_bn(m, layer.memory_qkv)
    pq = linear_bn(p, layer.pixel_qkv)
    q_m, k_m, v_m = mq[..., :kd], mq[..., kd : 2 * kd], mq[..., 2 * kd :]
    q_p, k_p, v_p = pq[..., :kd], pq[..., kd : 2 * kd], pq[..., 2 * kd :]
    P = pixels.shape[1]
    y_m = naive_attention(
        q_m, torch.cat([k_p, k_m], 1), torch.cat([v_p, v_m], 1), layer.memory_attention, heads,
        joint=joint, split=P, act=act,
    )  # fmt: skip
    mem = act(memory + linear_bn(y_m, layer.memory_conv3))
    ffn = linear_bn(act(linear_bn(mem, layer.memory_ffn1)), layer.memory_ffn2)
    mem = act(mem + ffn)
    y_p = naive_attention(q_p, k_m, v_m, layer.pixel_attention, heads, act=act)
    return pixels + linear_bn(y_p, layer.pixel_conv3), mem


def test_global_dual_path_matches_naive_single_softmax():
    torch.manual_seed(0)
    layer = GlobalDualPath(10, **SMALL).eval()
    randomize_batch_norms(layer)
    pixels, memory = torch.randn(2, 15, 10), torch.randn(2, 5, 12)
    with torch.no_grad():
        got_p, got_m = layer(pixels, memory)
        want_p, want_m = naive_dual_path(layer, pixels, memory, heads=2)
        split_p, split_m = naive_dual_path(layer, pixels, memory, heads=2, joint=False)
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_m, want_m, rtol=1e-5, atol=1e-5)
    # Two separate softmaxes (pixels, memory) summed is a different model.
    assert (got_m - split_m).abs().max() > 1e-2
    torch.testing.assert_close(got_p, split_p, rtol=1e-5, atol=1e-5)  # V2M has one key set only


def test_gelu_layer_matches_naive_with_exact_gelu_everywhere():
    """activation="gelu": every ReLU, memory path included, becomes the exact (erf) GeLU, as in
    deeplab2's layer; float64, so the tanh approximation would be far outside the tolerance."""
    torch.manual_seed(0)
    relu = GlobalDualPath(10, **SMALL).double().eval()
    randomize_batch_norms(relu)
    gelu = GlobalDualPath(10, **SMALL, activation="gelu").double().eval()
    gelu.load_state_dict(relu.state_dict())  # same keys and shapes
    pixels, memory = torch.randn(2, 15, 10).double(), torch.randn(2, 5, 12).double()
    tanh = functools.partial(F.gelu, approximate="tanh")
    with torch.no_grad():
        got, from_relu = gelu(pixels, memory), relu(pixels, memory)
        want = naive_dual_path(gelu, pixels, memory, heads=2, act=exact_gelu)
        approximated = naive_dual_path(gelu, pixels, memory, heads=2, act=tanh)
    for g, w, a, r in zip(got, want, approximated, from_relu):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        assert (g - a).abs().max() > 1e-6 and (g - r).abs().max() > 1e-2
    with pytest.raises(ValueError, match="activation must be one of"):
        GlobalDualPath(10, **SMALL, activation="silu")


def test_pixel_update_ignores_this_layers_memory_update():
    """V2M reads the INPUT memory's k/v: changing the memory FFN leaves the pixel output alone."""
    torch.manual_seed(1)
    layer = GlobalDualPath(10, **SMALL).eval()
    randomize_batch_norms(layer)
    pixels, memory = torch.randn(1, 9, 10), torch.randn(1, 4, 12)
    with torch.no_grad():
        p1, m1 = layer(pixels, memory)
        layer.memory_ffn2.linear.weight.mul_(-3.0)
        layer.memory_conv3.linear.weight.mul_(2.0)
        p2, m2 = layer(pixels, memory)
    torch.testing.assert_close(p1, p2)
    assert (m1 - m2).abs().max() > 1e-3


def test_layer_without_memory_update_keeps_v2m_only():
    torch.manual_seed(9)
    full = GlobalDualPath(10, **SMALL).eval()
    randomize_batch_norms(full)
    v2m_only = GlobalDualPath(10, **SMALL, update_memory=False).eval()
    assert not hasattr(v2m_only, "memory_ffn1")
    v2m_only.load_state_dict(full.state_dict(), strict=False)
    pixels, memory = torch.randn(2, 9, 10), torch.randn(2, 4, 12)
    with torch.no_grad():
        p_full, _ = full(pixels, memory)
        p, m = v2m_only(pixels, memory)
    torch.testing.assert_close(p, p_full)
    assert m is memory


def test_attention_probabilities_hook_covers_pixels_and_memory():
    layer = GlobalDualPath(10, **SMALL).eval()
    seen = {}
    for key, attention in (("m", layer.memory_attention), ("p", layer.pixel_attention)):
        attention.probabilities.register_forward_hook(
            lambda mod, inp, out, key=key: seen.update({key: out})  # returns None: output kept
        )
    with torch.no_grad():
        layer(torch.randn(2, 15, 10), torch.randn(2, 5, 12))
    assert seen["m"].shape == (2, 2, 5, 15 + 5)  # (B, h, N, P + N)
    assert seen["p"].shape == (2, 2, 15, 5)  # (B, h, P, N)
    torch.testing.assert_close(seen["m"].sum(-1), torch.ones(2, 2, 5))


def test_zero_gamma_init_makes_layer_identity_on_pixels():
    """Every residual branch ends in a gamma-0 BN: at init pixels pass, memory is only ReLU'd."""
    torch.manual_seed(2)
    layer = GlobalDualPath(10, **SMALL).train()
    pixels, memory = torch.randn(3, 15, 10), torch.randn(3, 5, 12)
    p, m = layer(pixels, memory)
    torch.testing.assert_close(p, pixels)
    torch.testing.assert_close(m, F.relu(memory))
    for name in ("memory_conv3", "memory_ffn2", "pixel_conv3"):
        assert torch.all(getattr(layer, name).bn.weight == 0)
    assert torch.all(layer.memory_conv1.bn.weight == 1)


def test_max_s_dual_path_parameter_count():
    with torch.device("meta"):
        layer = GlobalDualPath(2048)
    assert sum(p.numel() for p in layer.parameters()) == 2_503_712


def test_drop_path_masks_are_independent_per_branch():
    torch.manual_seed(3)
    layer = GlobalDualPath(10, **SMALL, drop_path=0.5).train()
    randomize_batch_norms(layer)
    kept = {}
    for name in ("memory_drop_path", "ffn_drop_path", "pixel_drop_path"):
        getattr(layer, name).register_forward_hook(
            lambda mod, inp, out, name=name: kept.update({name: out.flatten(1).abs().sum(1) > 0})
        )
    layer(torch.randn(64, 6, 10), torch.randn(64, 3, 12))
    masks = list(kept.values())
    assert len(masks) == 3 and all(0 < m.sum() < 64 for m in masks)  # some dropped, some kept
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_latent_dual_path_keeps_frames_independent_global_does_not():
    """Two stacked layers: latent never mixes frames; global mixes them through the memory."""
    torch.manual_seed(4)
    latent_layers = [LatentDualPath(10, latent_channels=12, **CORE).eval() for _ in range(2)]
    global_layers = [GlobalDualPath(10, **SMALL).eval() for _ in range(2)]
    for seed, layer in enumerate(latent_layers + global_layers):
        randomize_batch_norms(layer, seed)
    B, T, P = 2, 3, 7
    pixels, latent = torch.randn(B, T, P, 10), torch.randn(1, 1, 4, 12).expand(B, T, 4, 12)
    memory = torch.randn(B, 5, 12)
    perturbed = pixels.clone()
    perturbed[:, 1] += 5 * torch.randn(B, P, 10)  # frame 2 only
    outputs = []
    with torch.no_grad():
        for video in (pixels, perturbed):
            p, l = video, latent
            g, m = video.flatten(1, 2), memory
            for latent_layer, global_layer in zip(latent_layers, global_layers):
                p, l = latent_layer(p, l)
                g, m = global_layer(g, m)
            outputs.append((p, l, g, m))
    (p1, l1, g1, m1), (p2, l2, g2, m2) = outputs
    assert p1.shape == (B, T, P, 10) and l1.shape == (B, T, 4, 12)
    for t in (0, 2):  # frames 1 and 3 untouched
        torch.testing.assert_close(p1[:, t], p2[:, t])
        torch.testing.assert_close(l1[:, t], l2[:, t])
    assert (l1[:, 1] - l2[:, 1]).abs().max() > 1e-3
    # Global: the memory reads frame 2 (M2V), and the next layer writes it into frame 1 (V2M).
    assert (m1 - m2).abs().max() > 1e-3
    assert (g1[:, :P] - g2[:, :P]).abs().max() > 1e-3


def test_latent_dual_path_equals_global_layer_per_frame():
    torch.manual_seed(5)
    layer = LatentDualPath(10, latent_channels=12, **CORE).eval()
    randomize_batch_norms(layer)
    pixels, latent = torch.randn(2, 2, 6, 10), torch.randn(2, 2, 3, 12)
    with torch.no_grad():
        p, l = layer(pixels, latent)
        for b in range(2):
            for t in range(2):
                pf, lf = GlobalDualPath.forward(layer, pixels[b : b + 1, t], latent[b : b + 1, t])
                # batch of one frame vs all B * T frames at once: equal up to rounding
                torch.testing.assert_close(p[b, t], pf[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(l[b, t], lf[0], rtol=1e-5, atol=1e-5)


def make_block(latent=True, global_path=True, checkpointing=False, drop_path=0.3):
    torch.manual_seed(6)
    pixel_block = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.BatchNorm2d(10))
    return HierarchicalBlock(
        pixel_block,
        LatentDualPath(10, latent_channels=8, **CORE, drop_path=drop_path) if latent else None,
        GlobalDualPath(10, **SMALL, drop_path=drop_path) if global_path else None,
        gradient_checkpointing=checkpointing,
    )


@pytest.mark.parametrize("latent,global_path", [(True, True), (False, True), (True, False)])
def test_hierarchical_block_shapes_and_switches(latent, global_path):
    block = make_block(latent, global_path).eval()
    randomize_batch_norms(block)
    video, memory, lat = torch.randn(2, 3, 6, 5, 7), torch.randn(2, 4, 12), torch.randn(2, 3, 3, 8)
    with torch.no_grad():
        v, m, l = block(video, memory, lat if latent else None)
        frames = block.pixel_block(video.flatten(0, 1)).view(2, 3, 10, 5, 7)
    assert v.shape == (2, 3, 10, 5, 7) and m.shape == (2, 4, 12)
    assert (l is None) == (not latent)
    if not global_path:
        torch.testing.assert_close(m, memory)  # memory untouched without the global layer
    if not latent and global_path:
        p, m_ref = block.global_path(frames.permute(0, 1, 3, 4, 2).reshape(2, 105, 10), memory)
        torch.testing.assert_close(v, p.view(2, 3, 5, 7, 10).permute(0, 1, 4, 2, 3))
        torch.testing.assert_close(m, m_ref)


def test_gradient_checkpointing_same_outputs_gradients_and_bn_stats():
    plain = make_block(checkpointing=False).train()
    randomize_batch_norms(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    torch.manual_seed(7)
    video, memory, lat = torch.randn(4, 2, 6, 5, 7), torch.randn(4, 4, 12), torch.randn(4, 2, 3, 8)
    outs = []
    for block in (plain, ckpt):
        inputs = [t.clone().requires_grad_() for t in (video, memory, lat)]
        torch.manual_seed(8)  # same drop-path masks
        v, m, l = block(*inputs)
        (v.square().mean() + m.sin().sum() + l.cos().sum()).backward()
        outs.append((v, m, l, [t.grad for t in inputs], block))
    (v1, m1, l1, g1, b1), (v2, m2, l2, g2, b2) = outs
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    for (name, a), (_, b) in zip(b1.named_parameters(), b2.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), (_, b) in zip(b1.named_buffers(), b2.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)  # running stats updated exactly once
