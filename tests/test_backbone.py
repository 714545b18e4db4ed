"""Axial-ResNet: deeplab2 parameter counts, layout, shapes, drop path, decoder, torchvision.

The counts are those of deeplab2's axial_resnet_instances_test.py: MaX-DeepLab-S 41,343,424,
ResNet-50-beta 23,631,808, one stage-4 / stage-5 axial block 2,238,816 / 8,671,840. The shape
test runs MaX-S's layout at tiny widths: a 129x417 input gives stem 65x209, res2 33x105, res3
17x53, res4/res5 9x27 and a 33x105 decoder output.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minivseg.backbone import (
    AxialResNet,
    BottleneckBlock,
    DropPath,
    PixelDecoder,
    ResizedFuse,
    drop_path_rate,
    load_torchvision_resnet50,
)

BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def tiny_backbone(**kwargs):
    torch.manual_seed(0)
    return AxialResNet(base_width=8, stem_channels=(8, 8, 16), num_heads=2, **kwargs)


def test_max_deeplab_s_parameter_counts():
    """Numbers from deeplab2's axial_resnet_instances_test.py and the facts sheet §9."""
    with torch.device("meta"):
        max_s = AxialResNet()
        resnet50_beta = AxialResNet(use_axial=False)
        stage4_axial = BottleneckBlock(1024, 256, axial=True)
        stage5_axial = BottleneckBlock(2048, 512, axial=True)
        b2 = AxialResNet(extra_stage4_axial_blocks=6)
    assert count(max_s) == 41_343_424
    assert count(resnet50_beta) == 23_631_808
    assert count(stage4_axial) == 2_238_816
    assert count(stage5_axial) == 8_671_840
    assert count(b2) == 41_343_424 + 6 * 2_238_816
    tables = sum(p.numel() for n, p in max_s.named_parameters() if n.endswith("_rpe"))
    assert tables == 509 * (32 + 32 + 64) * 10 + 509 * (64 + 64 + 128) * 6


def test_block_layout_strides_and_drop_path_schedule():
    with torch.device("meta"):
        model = AxialResNet(drop_path_keep_prob=0.8, extra_stage4_axial_blocks=2)
        plain = AxialResNet(use_axial=False)
    stages = (model.stage2, model.stage3, model.stage4, model.stage5)
    assert [len(s) for s in stages] == [3, 4, 8, 3]
    assert [b.axial for b in model.stage4] == [False] + [True] * 7
    assert all(b.axial for b in model.stage5)
    assert not any(b.axial for b in [*model.stage2, *model.stage3])
    strides = [[b.stride for b in s] for s in stages]
    assert strides == [[2, 1, 1], [2, 1, 1, 1], [2] + [1] * 7, [1, 1, 1]]  # stage 5 is OS16
    rates = [b.drop_path.drop_rate for b in [*model.stage4, *model.stage5]]
    assert rates == pytest.approx([0.0] + [0.15] * 7 + [0.15, 0.2, 0.2])
    assert all(b.drop_path.drop_rate == 0 for b in [*model.stage2, *model.stage3])
    assert drop_path_rate(0.8, 32) == pytest.approx(0.2) and drop_path_rate(0.8, 8) == 0.0
    # Without axial attention stage 5 keeps stride 16 with atrous rate 2 after its first block.
    assert [b.conv2.conv.dilation for b in plain.stage5] == [(1, 1), (2, 2), (2, 2)]
    assert model.channels == {"stem": 128, "res2": 256, "res3": 512, "res4": 1024, "res5": 2048}


@pytest.mark.parametrize(
    "size", [(65, 65), (129, 417), (50, 37)], ids=["65x65", "129x417", "50x37"]
)
def test_endpoint_and_decoder_shapes(size):
    model = tiny_backbone().eval()
    decoder = PixelDecoder(256, 64, 32, filters_s8=8, filters_s4=4).eval()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.fill_(1.0)  # residual branches start at 0; open them up
        out = model(torch.randn(1, 3, *size))
        decoded = decoder(out["res5"], out["res3"], out["res2"])
    strides = {"stem": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 16}
    for name, stride in strides.items():
        h, w = ((n - 1) // stride + 1 for n in size)
        expected = (1, model.channels[name], h, w)
        assert out[name].shape == expected, name
        assert out[name].min() < 0  # endpoints are not activated
    assert decoded.shape == (1, decoder.out_channels, *out["res2"].shape[-2:])
    assert decoder.out_channels == 16


@pytest.mark.parametrize("size", [(129, 417), (50, 37)], ids=["129x417", "50x37"])
def test_output_stride_32_endpoints_and_layout(size):
    """ImageNet-style strides 2..32 (VisTR's backbone); the same tensors as output stride 16."""
    model = tiny_backbone(use_axial=False, output_stride=32).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    strides = {"stem": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}
    for name, stride in strides.items():
        h, w = ((n - 1) // stride + 1 for n in size)
        assert out[name].shape == (1, model.channels[name], h, w), name
    stages = (model.stage2, model.stage3, model.stage4, model.stage5)
    assert [[b.stride for b in s] for s in stages] == [[2, 1, 1], [2, 1, 1, 1], [2] + [1] * 5,
                                                      [2, 1, 1]]  # fmt: skip
    assert all(b.conv2.conv.dilation == (1, 1) for s in stages for b in s)  # nothing dilated
    os16 = tiny_backbone(use_axial=False).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in os16.items()
    }
    with torch.device("meta"):
        assert count(AxialResNet(use_axial=False, output_stride=32)) == 23_631_808
    with pytest.raises(ValueError):
        AxialResNet(output_stride=8)


@pytest.mark.parametrize("axial", [False, True])
def test_block_activates_its_input_and_starts_as_its_shortcut(axial):
    torch.manual_seed(0)
    block = BottleneckBlock(12, 4, axial=axial, num_heads=2).eval()
    x = torch.randn(2, 12, 7, 5)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, block(F.relu(x)))  # ReLU at the block input
        # conv3's BN gamma starts at 0: the block starts as its (projection) shortcut.
        torch.testing.assert_close(out, block.shortcut(F.relu(x)))
        block.conv3.bn.weight.fill_(1.0)
        assert (block(x) - block.shortcut(F.relu(x))).abs().max() > 1e-3
    assert (block.conv1.bn.weight == 1).all() and block.conv1.conv.kernel_size == (1, 1)


@pytest.mark.parametrize("axial", [False, True])
def test_strided_block_without_projection_subsamples_shortcut(axial):
    block = BottleneckBlock(16, 4, stride=2, axial=axial, num_heads=2).eval()
    assert block.shortcut is None
    x = torch.randn(1, 16, 9, 8)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, F.relu(x)[:, :, ::2, ::2])


def test_strided_axial_block_runs_the_width_axis_on_the_kept_rows_only():
    """deeplab2 (axial_layers.py AxialAttention2D) strides the rows between the two axes: the eval
    output of striding at the end, but the width axis (and its train-mode BN statistics) sees the
    kept rows only. Only ``output_stride=32`` has such a block (stage 5's first)."""
    torch.manual_seed(0)
    strided = BottleneckBlock(16, 4, stride=2, axial=True, num_heads=2)
    full = BottleneckBlock(16, 4, axial=True, num_heads=2)
    full.load_state_dict(strided.state_dict())
    for block in (strided, full):
        block.conv3.bn.weight.data.fill_(1.0)  # the branch counts
    rows = []
    strided.attention.width.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape))
    x = torch.randn(2, 16, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(strided.eval()(x), full.eval()(x)[:, :, ::2, ::2])
        assert strided.train()(x).shape == (2, 16, 5, 4) and rows[-1][-2:] == (5, 8)


def test_drop_path_identity_in_eval_and_per_sample_in_train():
    drop = DropPath(0.25)
    x = torch.randn(4000, 3, 2, 2)
    assert drop.eval()(x) is x
    torch.manual_seed(0)
    ratio = drop.train()(x) / x  # (B, 3, 2, 2): one factor per sample
    per_sample = ratio.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample))
    values = per_sample[:, 0]
    assert torch.all((values == 0) | torch.isclose(values, torch.tensor(1 / 0.75)))
    assert abs((values > 0).float().mean().item() - 0.75) < 0.03
    assert DropPath(0.0).train()(x) is x


def test_resized_fuse_sums_projected_and_resized_inputs():
    torch.manual_seed(0)
    fuse = ResizedFuse([6, 4], 4).eval()
    low, high = torch.randn(1, 6, 3, 3), torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        out = fuse([low, high], (5, 5))
        projected = fuse.projections[0](F.relu(low))  # width differs: ReLU -> 1x1 conv + BN
    expected = F.interpolate(projected, size=(5, 5), mode="bilinear", align_corners=True) + high
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[..., ::2, ::2], projected + high[..., ::2, ::2])  # corners kept
    assert isinstance(fuse.projections[1], torch.nn.Identity)


def exact_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # deeplab2 "gelu": approximate=False


def test_gelu_option_keeps_the_parameters_and_changes_every_activation():
    """Default = explicit "relu", bit for bit; "gelu": same state_dict, exact GeLU everywhere."""
    default, relu, gelu = (tiny_backbone(**kw) for kw in ({}, {"activation": "relu"},
                                                           {"activation": "gelu"}))  # fmt: skip
    assert repr(default) == repr(relu) and count(gelu) == count(default)
    assert {k: v.shape for k, v in gelu.state_dict().items()} == {
        k: v.shape for k, v in default.state_dict().items()
    }
    gelu.load_state_dict(default.state_dict())  # the same seed gave the same weights anyway
    assert [type(m).__name__ for m in gelu.stem[1::2]] == ["GELU", "GELU"]
    assert all(m.approximate == "none" for m in gelu.stem[1::2])
    x = torch.randn(1, 3, 33, 49)
    with torch.no_grad():
        out, out_relu, out_gelu = (m.eval()(x) for m in (default, relu, gelu))
    for key in out:
        assert torch.equal(out[key], out_relu[key])
        assert (out[key] - out_gelu[key]).abs().max() > 1e-2
    # One block and the decoder fuse against a reference with the erf formula, in float64: the
    # tanh approximation differs from it by up to 5e-4, far above this tolerance.
    torch.manual_seed(0)
    block = BottleneckBlock(12, 4, activation="gelu").double().eval()
    fuse = ResizedFuse([6, 4], 4, activation="gelu").double().eval()
    block.conv3.bn.weight.data.fill_(1.0)
    x, low, high = (torch.randn(*shape, dtype=torch.float64) for shape in
                    ((2, 12, 7, 5), (1, 6, 3, 3), (1, 4, 3, 3)))  # fmt: skip
    with torch.no_grad():
        a = exact_gelu(x)
        y = exact_gelu(block.conv2(exact_gelu(block.conv1(a))))
        torch.testing.assert_close(block(x), block.shortcut(a) + block.conv3(y), rtol=0, atol=1e-12)
        want = fuse.projections[0](exact_gelu(low)) + high
        torch.testing.assert_close(fuse([low, high], (3, 3)), want, rtol=0, atol=1e-12)
    assert PixelDecoder(32, 16, 8, 4, 2, "gelu").block_s4.act is F.gelu
    for bad in ("swish", "GELU", "approximated_gelu"):
        with pytest.raises(ValueError, match="activation must be one of"):
            AxialResNet(activation=bad)
    with pytest.raises(ValueError, match="activation must be one of"):
        BottleneckBlock(8, 2, activation="tanh")


def fake_torchvision_resnet50(width=8, blocks=(3, 4, 6, 3)):
    """A state dict with torchvision ResNet-50 key names and shapes (scaled by width/64)."""
    g = torch.Generator().manual_seed(1)
    sd = {}

    def conv(name, out, inp, k):
        sd[f"{name}.weight"] = torch.randn(out, inp, k, k, generator=g)

    def bn(name, c):
        for p in BN_PARAMS[:4]:
            sd[f"{name}.{p}"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    in_channels = width
    for layer, n in enumerate(blocks, start=1):
        planes = width * 2 ** (layer - 1)
        for i in range(n):
            prefix = f"layer{layer}.{i}"
            for k, (out, inp, size) in enumerate(
                [(planes, in_channels, 1), (planes, planes, 3), (4 * planes, planes, 1)], start=1
            ):
                conv(f"{prefix}.conv{k}", out, inp, size)
                bn(f"{prefix}.bn{k}", out)
            if i == 0:
                conv(f"{prefix}.downsample.0", 4 * planes, in_channels, 1)
                bn(f"{prefix}.downsample.1", 4 * planes)
            in_channels = 4 * planes
    sd["fc.weight"] = torch.randn(1000, in_channels, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


def unit_keys(conv, bn):
    return [f"{conv}.weight"] + [f"{bn}.{p}" for p in BN_PARAMS]


def test_torchvision_loading_on_fake_state_dict():
    model = tiny_backbone()
    sd = fake_torchvision_resnet50()
    report = load_torchvision_resnet50(model, sd)

    expected = set()
    for i, n in [(1, 3), (2, 4), (3, 1)]:  # conv blocks: stage2, stage3, stage4 block 1
        for b in range(n):
            for k in (1, 2, 3):
                expected.update(unit_keys(f"layer{i}.{b}.conv{k}", f"layer{i}.{b}.bn{k}"))
        expected.update(unit_keys(f"layer{i}.0.downsample.0", f"layer{i}.0.downsample.1"))
    # Our stem outputs 128 (here 16) channels, torchvision's 64 (here 8): block 1's inputs differ.
    expected -= set(unit_keys("layer1.0.conv1", "layer1.0.bn1"))
    expected -= set(unit_keys("layer1.0.downsample.0", "layer1.0.downsample.1"))
    # Stage 5 is axial, but its first block's 1x1 projection shortcut keeps its shape.
    expected.update(unit_keys("layer4.0.downsample.0", "layer4.0.downsample.1"))

    assert set(report["loaded"]) == expected
    assert set(report["skipped"]) == set(sd) - expected
    assert "shape (8, 3, 7, 7) vs (8, 3, 3, 3)" == report["reasons"]["conv1.weight"]
    assert report["reasons"]["bn1.weight"] == "its convolution was skipped"
    assert "layer3.1.conv2.weight" in report["skipped"] and "fc.weight" in report["skipped"]

    state = model.state_dict()
    pairs = {
        "stage3.0.conv2.conv.weight": "layer2.0.conv2.weight",
        "stage2.1.conv3.bn.running_var": "layer1.1.bn3.running_var",
        "stage4.0.shortcut.bn.bias": "layer3.0.downsample.1.bias",
        "stage5.0.shortcut.conv.weight": "layer4.0.downsample.0.weight",
        "stage2.0.conv3.bn.weight": "layer1.0.bn3.weight",
    }
    for ours, theirs in pairs.items():
        torch.testing.assert_close(state[ours], sd[theirs])
        assert ours not in report["missing"]
    assert (state["stem.0.bn.weight"] == 1).all()  # bn1 not copied onto our 3x3 stem
    assert (state["stage4.1.conv3.bn.weight"] == 0).all()  # axial block left at init
    assert {
        "stem.0.conv.weight",
        "stage2.0.conv1.conv.weight",
        "stage5.2.attention.width.key_rpe",
    } <= set(report["missing"])
    assert len(report["missing"]) + len(expected) == len(state)  # one backbone key per loaded key
