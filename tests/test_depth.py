"""Depth branch and depth loss (TubeFormer §3.2, ViP-DeepLab's loss as deeplab2 computes it).

The loss against a per-pixel loop (value and gradient), zero for a perfect prediction, SILog's
invariance to a global scale, a clip without depth (0, gradient 0, no NaN), float32 under bf16
autocast, shapes for T = 1..3; DepthAwareLoss adds exactly weight x depth loss and forwards
``losses``; the branch's layout and parameter counts; the model with ``depth=True`` (range,
shape, the other outputs and weights those of the default model); 30 Adam steps on a synthetic
clip lower the depth loss.
"""

import math

import pytest
import torch
from torch import nn

from minivseg.depth import ASPP_RATES, DepthAwareLoss, DepthBranch, depth_loss, upsample_depth
from minivseg.synthetic import generate_sequence
from minivseg.tube_loss import TubeLoss
from minivseg.tubeformer import build_model


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def naive_depth_loss(pred, target):
    """deeplab2's SILogError + RelativeSquaredError, one frame and one pixel at a time."""
    silogs, relsqs = [], []
    for p_frame, t_frame in zip(pred.flatten(0, -3), target.flatten(0, -3)):
        pairs = [(p, t) for p, t in zip(p_frame.flatten(), t_frame.flatten()) if t > 0]
        if not pairs:
            continue  # a frame without depth leaves the mean
        n = len(pairs)
        d = [torch.log(t) - torch.log(p) for p, t in pairs]
        silogs.append(sum(x * x for x in d) / n - (sum(d) / n) ** 2)
        relsqs.append(torch.sqrt(sum(((t - p) / t) ** 2 for p, t in pairs) / n))
    return sum(silogs) / len(silogs), sum(relsqs) / len(relsqs)


def random_depth(shape, seed, valid=0.6):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=g) * 70 + 1
    target = torch.rand(shape, generator=g) * 70 + 1
    return pred, target * (torch.rand(shape, generator=g) < valid)


def test_depth_loss_matches_a_per_pixel_loop_value_and_gradient():
    pred, target = random_depth((2, 3, 4, 5), seed=0)
    target[1, 2] = 0  # one frame without depth
    pred64 = pred.double().requires_grad_()
    silog, relsq = naive_depth_loss(pred64, target.double())
    (silog + relsq).backward()

    pred32 = pred.clone().requires_grad_()
    loss, terms = depth_loss(pred32, target)
    loss.backward()
    assert set(terms) == {"depth_silog", "depth_relsq"}
    torch.testing.assert_close(terms["depth_silog"].double(), silog.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["depth_relsq"].double(), relsq.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, terms["depth_silog"] + terms["depth_relsq"])
    torch.testing.assert_close(pred32.grad.double(), pred64.grad, rtol=1e-4, atol=1e-7)
    assert (pred32.grad[target == 0] == 0).all() and (pred32.grad[target > 0] != 0).any()


def test_perfect_prediction_is_zero_with_zero_gradient():
    _, target = random_depth((1, 2, 6, 7), seed=1)
    pred = torch.where(target > 0, target, 5.0).requires_grad_()
    loss, terms = depth_loss(pred, target)
    loss.backward()
    assert loss.item() == 0 and terms["depth_silog"].item() == 0
    assert terms["depth_relsq"].item() == 0  # sqrt(0) kept out of the gradient: no NaN
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()


def test_silog_is_invariant_to_a_global_scale_relsq_is_not():
    pred, target = random_depth((2, 2, 5, 6), seed=2)
    _, base = depth_loss(pred, target)
    _, scaled = depth_loss(pred * 1.7, target)
    torch.testing.assert_close(scaled["depth_silog"], base["depth_silog"], rtol=1e-4, atol=1e-6)
    assert base["depth_silog"] > 1e-2
    assert abs(scaled["depth_relsq"] - base["depth_relsq"]) > 0.1
    # A per-frame scale too: SILog is computed per frame.
    per_frame = pred * torch.tensor([0.5, 2.0, 3.0, 1.1]).view(2, 2, 1, 1)
    torch.testing.assert_close(
        depth_loss(per_frame, target)[1]["depth_silog"], base["depth_silog"], rtol=1e-4, atol=1e-6
    )


def test_clip_without_depth_is_zero_with_zero_gradient_under_bf16_autocast():
    pred = (torch.rand(2, 2, 9, 13) * 80).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = depth_loss(pred.bfloat16(), torch.zeros(2, 2, 9, 13))
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert loss.item() == 0 and all(t.item() == 0 for t in terms.values())
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()
    # Predictions that reach 0 (a float32 sigmoid below -88) stay finite.
    target = torch.full((1, 3, 3), 10.0)
    loss, _ = depth_loss(torch.zeros(1, 3, 3, requires_grad=True), target)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_shapes_clip_and_frame_layouts_agree(frames):
    pred, target = random_depth((2, frames, 6, 8), seed=3 + frames)
    loss, terms = depth_loss(pred, target)
    assert loss.shape == () and all(t.shape == () for t in terms.values())
    flat_loss, _ = depth_loss(pred.flatten(0, 1), target.flatten(0, 1))  # (N, H, W)
    torch.testing.assert_close(loss, flat_loss)
    up = upsample_depth(pred[..., :3, :4], (6, 8))
    assert up.shape == (2, frames, 6, 8) and up.dtype == torch.float32
    torch.testing.assert_close(up[..., ::5, ::7], pred[..., :3, :4][..., ::2, ::3])  # corners


class SumLoss:
    """A stand-in task loss with ``losses``, counting its calls."""

    def __init__(self):
        self.batched_calls = 0

    def __call__(self, outputs, batch):
        value = outputs["x"].sum()
        return 2 * value, {"x": value}

    def losses(self, pairs):
        self.batched_calls += 1
        return [self(outputs, batch) for outputs, batch in pairs]


def test_depth_aware_loss_adds_weight_times_depth_loss_and_forwards_losses():
    pred, target = random_depth((2, 2, 9, 13), seed=7)
    small = pred[..., ::4, ::4].contiguous()  # (2, 2, 3, 4): the stride-4 prediction
    outputs, batch = {"x": torch.ones(3), "depth": small}, {"depth": target}
    expected, parts = depth_loss(upsample_depth(small, (9, 13)), target)
    criterion = DepthAwareLoss(SumLoss(), weight=100.0)
    total, terms = criterion(outputs, batch)
    torch.testing.assert_close(total, 6.0 + 100.0 * expected)
    assert set(terms) == {"x", "depth", "depth_silog", "depth_relsq"}
    torch.testing.assert_close(terms["depth"], expected)
    torch.testing.assert_close(terms["depth_silog"], parts["depth_silog"])
    # Without depth in the outputs or the batch: the task loss alone.
    assert criterion({"x": torch.ones(3)}, batch)[0].item() == 6.0
    assert set(criterion(outputs, {})[1]) == {"x"}
    # losses(pairs): one batched call to the wrapped loss, depth added per pair.
    pairs = [(outputs, batch), ({"x": torch.ones(3), "depth": small * 2}, batch)]
    results = criterion.losses(pairs)
    assert criterion.criterion.batched_calls == 1 and len(results) == 2
    torch.testing.assert_close(results[0][0], total)
    expected2, _ = depth_loss(upsample_depth(small * 2, (9, 13)), target)
    torch.testing.assert_close(results[1][0], 6.0 + 100.0 * expected2)
    # A plain function loss (no ``losses``) is called per pair.
    plain = DepthAwareLoss(lambda o, b: (o["x"].sum(), {}), weight=0.5)
    torch.testing.assert_close(plain.losses(pairs)[1][0], 3.0 + 0.5 * expected2)


def test_branch_layout_follows_deeplab2_and_parameter_counts():
    branch = DepthBranch((2048, 512, 256), channels=256)
    assert [conv[0].conv.dilation for conv in branch.aspp.atrous] == [(r, r) for r in ASPP_RATES]
    assert ASPP_RATES == (6, 12, 18) and branch.aspp.dropout.p == 0.1
    assert [p[0].conv.out_channels for p in branch.project] == [64, 32]  # res3, res2
    assert [f.depthwise.kernel_size for f in branch.fuse] == [(5, 5), (5, 5)]
    assert branch.head.depthwise.in_channels == 256 and branch.output.in_channels == 64
    assert branch.aspp.conv[0].bn.eps == 1e-3 and branch.aspp.conv[0].bn.momentum == 0.01
    # deeplab2's PanopticDeepLabSingleDecoder + SingleHead at these widths (built in TensorFlow)
    # have the same trainable counts: kitti 15,772,833 (+22% on 70.8M), tiny 120,462 (+6%).
    with torch.device("meta"):
        kitti, kitti_depth = build_model("kitti"), build_model("kitti", depth=True)
    assert count(kitti_depth.depth_branch) == 15_772_833
    assert count(kitti_depth) == count(kitti) + 15_772_833
    tiny, tiny_depth = build_model("tiny"), build_model("tiny", depth=True)
    assert count(tiny_depth.depth_branch) == 120_462 and count(tiny) == 2_005_201
    assert count(tiny_depth.depth_branch) < 0.07 * count(tiny)


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_model_with_depth_shape_range_and_max_depth(frames):
    torch.manual_seed(0)
    model = build_model("tiny", depth=True, max_depth=12.0).eval()
    H, W = 65, 97
    with torch.no_grad():
        out = model(torch.rand(2, frames, 3, H, W) * 255)
    assert out["depth"].shape == (2, frames, (H - 1) // 4 + 1, (W - 1) // 4 + 1)
    assert out["depth"].dtype == torch.float32
    assert (out["depth"] > 0).all() and (out["depth"] < 12.0).all()
    # At init the output conv is ~0, so the depth starts near max_depth / 2.
    torch.testing.assert_close(out["depth"], torch.full_like(out["depth"], 6.0), atol=0.5, rtol=0)


def test_depth_output_is_float32_under_bf16_autocast_and_trains_with_two_frames():
    torch.manual_seed(1)
    model = build_model("tiny", depth=True).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 2, 3, 33, 49) * 255)
    assert out["depth"].dtype == torch.float32 and out["depth"].shape == (1, 2, 9, 13)
    out["depth"].mean().backward()
    grads = [p.grad for p in model.depth_branch.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.stem[0].conv.weight.grad.abs().sum() > 0  # reaches the CNN
    assert model.blocks[-1].pixel_block.conv1.conv.weight.grad is None  # res5 is before it


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_default_model_unchanged_and_depth_only_adds(mode):
    """Same seed: the depth model has the default model's weights plus ``depth_branch.*``, and
    the same outputs plus "depth"; the default model has no depth key or module."""
    models, outputs = [], []
    x = torch.rand(2, 2, 3, 33, 49) * 255
    for depth in (False, True):
        torch.manual_seed(5)
        model = getattr(build_model("tiny", aux_heads=True, depth=depth), mode)()
        torch.manual_seed(6)
        models.append(model)
        outputs.append(model(x))
    plain, deep = (m.state_dict() for m in models)
    extra = [k for k in deep if k not in plain]
    assert extra and all(k.startswith("depth_branch.") for k in extra)
    assert list(plain) == [k for k in deep if k in plain]
    assert all(torch.equal(plain[k], deep[k]) for k in plain)
    assert "depth" not in outputs[0] and not hasattr(models[0], "depth_branch")
    assert set(outputs[1]) == set(outputs[0]) | {"depth"}
    for key in ("class_logits", "mask_logits", "semantic_logits", "pixel_embedding"):
        assert torch.equal(outputs[0][key], outputs[1][key])
    for a, b in zip(outputs[0]["aux"], outputs[1]["aux"]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_thirty_adam_steps_lower_the_depth_loss():
    frames, panoptic, depth = generate_sequence(3, 2, 129, 417, depth=True)
    batch = dict(
        frames=torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float(),
        panoptic=torch.from_numpy(panoptic)[None],
        depth=torch.from_numpy(depth)[None],
    )
    assert 0.3 < (batch["depth"] > 0).float().mean() < 1.0
    torch.manual_seed(0)
    model = build_model("tiny", depth=True).train()
    cfg = model.cfg
    criterion = DepthAwareLoss(TubeLoss(cfg.num_classes, cfg.thing_classes, cfg.num_slots))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        total, terms = criterion(model(batch["frames"]), batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        assert math.isfinite(total.item())
        history.append(terms["depth"].item())
    # Measured: 2.81 -> 1.00 (the sigmoid starts at 40 m; the clip's depths are 6.6..80 m).
    assert history[0] > 2.0
    assert history[-1] < 0.5 * history[0]
    assert sum(history[-5:]) < sum(history[:5])
