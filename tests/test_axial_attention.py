"""Axial attention against a naive per-line loop, axis isolation, shapes and position tables.

The naive loop (heads x queries x keys, BatchNorms written out) agrees with the layer to 1e-10 in
float64 in eval mode with random BN statistics, relative-position table clipping included.
"""

import math

import pytest
import torch

from minivseg.axial_attention import AxialAttention, AxialAttention2D, relative_index


def randomize_batchnorms(module, generator):
    """Give every BN non-trivial eval statistics and affine parameters."""
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(n, generator=generator, dtype=torch.float64) + 0.5)
            bn.weight.data.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
            bn.bias.data.copy_(torch.randn(n, generator=generator, dtype=torch.float64))


def make_layer(axis, seed=0, max_span=255, in_channels=6, key_channels=4, value_channels=8):
    torch.manual_seed(seed)
    layer = AxialAttention(in_channels, key_channels, value_channels, 2, axis, max_span)
    layer = layer.double().eval()
    with torch.no_grad():
        randomize_batchnorms(layer, torch.Generator().manual_seed(seed + 1))
    return layer


def bn_eval(bn, value, channel):
    """Eval-mode BatchNorm of one channel, written out."""
    scale = bn.weight[channel] / torch.sqrt(bn.running_var[channel] + bn.eps)
    return (value - bn.running_mean[channel]) * scale + bn.bias[channel]


def naive_line(layer, line):
    """Position-sensitive attention on one (C, length) line, looping over heads, queries, keys."""
    heads, kd, vd = layer.num_heads, layer.key_channels, layer.value_channels
    dk, dv = kd // heads, vd // heads
    qkv = layer.qkv.weight[:, :, 0] @ line  # (2kd + vd, length)
    qkv = torch.stack([bn_eval(layer.qkv_bn, qkv[c], c) for c in range(qkv.shape[0])])
    q, k, v = qkv[:kd], qkv[kd : 2 * kd], qkv[2 * kd :]
    length = line.shape[1]
    out = torch.zeros(vd, length, dtype=line.dtype)
    for head in range(heads):
        qh, kh = q[head * dk : (head + 1) * dk], k[head * dk : (head + 1) * dk]
        vh = v[head * dv : (head + 1) * dv]
        for i in range(length):
            logits, rows = [], []
            for j in range(length):
                row = min(max(j - i + layer.max_span - 1, 0), 2 * layer.max_span - 2)
                rows.append(row)
                content = qh[:, i] @ kh[:, j]
                query_term = qh[:, i] @ layer.query_rpe[row]
                key_term = kh[:, j] @ layer.key_rpe[row]
                logits.append(
                    bn_eval(layer.similarity_bn, content, head)
                    + bn_eval(layer.similarity_bn, query_term, heads + head)
                    + bn_eval(layer.similarity_bn, key_term, 2 * heads + head)
                )
            weights = torch.softmax(torch.stack(logits), dim=0)
            content_out = sum(weights[j] * vh[:, j] for j in range(length))
            rpe_out = sum(weights[j] * layer.value_rpe[rows[j]] for j in range(length))
            for c in range(dv):
                channel = head * dv + c
                out[channel, i] = bn_eval(layer.output_bn, content_out[c], channel) + bn_eval(
                    layer.output_bn, rpe_out[c], vd + channel
                )
    return out


def naive_axial(layer, x):
    b, _, height, width = x.shape
    out = torch.zeros(b, layer.value_channels, height, width, dtype=x.dtype)
    for n in range(b):
        if layer.axis == "height":
            for w in range(width):
                out[n, :, :, w] = naive_line(layer, x[n, :, :, w])
        else:
            for h in range(height):
                out[n, :, h, :] = naive_line(layer, x[n, :, h, :])
    return out


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("max_span", [255, 3])  # 3 < length: distances beyond the table are clipped
def test_matches_naive_loop_reference(axis, max_span):
    layer = make_layer(axis, max_span=max_span)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = naive_axial(layer, x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_position_terms_matter():
    """Zeroing the position tables changes the output (they are really used)."""
    layer = make_layer("width")
    x = torch.randn(1, 6, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        for table in (layer.query_rpe, layer.key_rpe, layer.value_rpe):
            table.zero_()
        assert (layer(x) - before).abs().max() > 1e-3


def test_relative_index_hand_computed():
    assert relative_index(3, 255).tolist() == [[254, 255, 256], [253, 254, 255], [252, 253, 254]]
    # max_span 2 -> 3 rows; distances beyond +-1 share the outermost row.
    assert relative_index(4, 2).tolist() == [[1, 2, 2, 2], [0, 1, 2, 2], [0, 0, 1, 2], [0, 0, 0, 1]]


def test_table_size_and_parameter_count():
    layer = AxialAttention(512, 256, 512, num_heads=8, axis="height")
    assert layer.query_rpe.shape == (509, 32) and layer.value_rpe.shape == (509, 64)
    qkv = 512 * (2 * 256 + 512) + 2 * (2 * 256 + 512)
    bns = 2 * 3 * 8 + 2 * 2 * 512
    tables = 509 * (32 + 32 + 64)
    assert sum(p.numel() for p in layer.parameters()) == qkv + bns + tables


def test_width_axis_never_mixes_rows_and_is_global_along_rows():
    layer = make_layer("width")
    x = torch.randn(1, 6, 5, 9, dtype=torch.float64)
    y = x.clone()
    y[:, :, 2, 0] += 3.0  # perturb row 2, first column
    with torch.no_grad():
        a, b = layer(x), layer(y)
    changed = (a - b).abs().amax(dim=(0, 1))  # (H, W)
    assert torch.all(changed[[0, 1, 3, 4]] < 1e-12)  # float64: rounding is ~1e-16
    assert torch.all(changed[2] > 1e-6)  # global: even the last column of that row changes


def test_height_axis_never_mixes_columns():
    layer = make_layer("height")
    x = torch.randn(1, 6, 8, 5, dtype=torch.float64)
    y = x.clone()
    y[:, :, 0, 3] -= 2.0
    with torch.no_grad():
        changed = (layer(x) - layer(y)).abs().amax(dim=(0, 1))
    assert torch.all(changed[:, [0, 1, 2, 4]] < 1e-12) and torch.all(changed[:, 3] > 1e-6)


@pytest.mark.parametrize("size", [(17, 33), (1, 5), (7, 3), (9, 27), (2, 200), (1, 300)])
def test_output_shapes(size):
    """Odd sizes, 16k+1 sizes, a 200-long axis (<= max_span) and one beyond max_span (clipped)."""
    layer = AxialAttention2D(4, 4, 8, num_heads=2).eval()
    x = torch.randn(1, 4, *size)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (1, 8, *size) and torch.isfinite(out).all()


def test_2d_is_height_then_width_and_sees_whole_image():
    torch.manual_seed(0)
    layer = AxialAttention2D(6, 4, 8, num_heads=2).double().eval()
    x = torch.randn(1, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, layer.width(layer.height(x)))
    assert layer.width.axis == "width" and layer.height.axis == "height"
    out[0, :, 0, 0].sum().backward()
    assert (x.grad.abs().sum(1) > 0).all()  # one output pixel depends on every input pixel


def test_train_mode_updates_bn_and_bf16_autocast():
    layer = AxialAttention2D(4, 4, 8, num_heads=2).train()
    x = torch.randn(2, 4, 5, 6)
    layer(x)
    assert layer.height.similarity_bn.num_batches_tracked == 1
    assert not torch.allclose(layer.height.output_bn.running_mean, torch.zeros(16))
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    with torch.no_grad():
        high = layer(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - high).abs().max() < 0.1 * math.sqrt(high.pow(2).mean().item()) + 0.05


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        AxialAttention(4, 4, 8, num_heads=3)
    with pytest.raises(ValueError):
        AxialAttention(4, 4, 8, num_heads=2, axis="time")
