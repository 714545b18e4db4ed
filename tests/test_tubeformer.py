"""TubeFormer assembly: MaX-S parameter counts, shapes, heads vs reference, presets, checkpoints.

Built as MaX-DeepLab-S the counts are deeplab2's: backbone 41,343,424, encoder 61,726,624, one
dual-path layer 2,503,712. With ``memory_update="clustering"``: forward shapes for T = 1..3 with
soft and argmax; the aux tube logits equal S at the stride-16 grid points, with the 3/4, 1/2, 1/4
linear blend between them; the aux class logits equal the class head on each block's input
memory; the state passes from block to block; the reference-point options and their errors;
checkpointing gives the same outputs, gradients and BN buffers, and no parameter is left unused.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minivseg import config, tasks
from minivseg.clustering import ClusteringBlock, ClusteringUpdate
from minivseg.panoptic import STUFF_CLASSES
from minivseg.tubeformer import TubeFormerConfig, build_model


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize_batch_norms(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.25)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny", aux_heads=True).eval()
    randomize_batch_norms(model)
    return model


@pytest.fixture(scope="module")
def kitti_meta():
    with torch.device("meta"):
        return build_model("kitti")


def test_max_deeplab_s_parameter_counts(kitti_meta):
    """Configured as MaX-DeepLab-S (no latent memory) the counts are deeplab2's (facts §9)."""
    with torch.device("meta"):
        model = build_model("kitti", use_latent=False)
    blocks = model.blocks
    assert len(blocks) == 4 and all(b.latent is None for b in blocks)
    backbone = count(model.backbone) + sum(count(b.pixel_block) for b in blocks[:3])
    assert backbone == 41_343_424
    assert [count(b.global_path) for b in blocks] == [2_503_712] * 4
    encoder = (
        count(model.backbone) + sum(count(b) for b in blocks) + count(model.decoder)
        + count(model.class_feature) + count(model.mask_feature) + model.memory.numel()
    )  # fmt: skip
    assert encoder == 61_726_624
    # + pixel head, mask head, 20-way class head and mask BN = facts' KITTI MaX-S, + semantic head.
    semantic = count(model.semantic_head)
    assert semantic == 128 * 19 + 19
    assert count(model) - semantic == 61_870_902

    kitti = kitti_meta
    with torch.device("meta"):
        b2 = build_model("kitti", n=2)
    # A latent dual-path per block (same sizes; the last one without the memory update, whose
    # output nothing reads: 1,119,760 fewer) + the L x C latent memory.
    assert [b.latent.update_memory for b in kitti.blocks] == [True, True, True, False]
    assert count(kitti) == count(model) + 4 * 2_503_712 - 1_119_760 + 16 * 256
    assert count(b2) - count(kitti) == 5 * 2_238_816  # B-2: five more stage-4 axial blocks


def test_kitti_drop_path_schedule_is_linear(kitti_meta):
    model = kitti_meta
    stage4 = [b.drop_path.drop_rate for b in model.backbone.stage4]
    assert stage4 == [0.0] + [pytest.approx(0.15)] * 5
    for block, rate in zip(model.blocks, (0.15, 0.2, 0.2, 0.2)):
        assert block.pixel_block.drop_path.drop_rate == pytest.approx(rate)
        for path in (block.global_path, block.latent):
            assert path.pixel_drop_path.drop_rate == pytest.approx(rate)
            if path.update_memory:
                assert path.memory_drop_path.drop_rate == pytest.approx(rate)
                assert path.ffn_drop_path.drop_rate == pytest.approx(rate)


@pytest.mark.parametrize("size,frames", [((65, 97), 1), ((50, 70), 2), ((33, 49), 3)])
def test_output_shapes_odd_sizes(tiny, size, frames):
    H, W = size
    x = torch.rand(2, frames, 3, H, W) * 255
    seen = {}
    hook = tiny.backbone.stem.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    with torch.no_grad():
        out = tiny(x)
    hook.remove()
    torch.testing.assert_close(seen["x"], x.flatten(0, 1) / 127.5 - 1)  # normalised inside
    h, w = H, W
    for _ in range(2):  # two stride-2 3x3 convs, "(L - 1) / 2 + 1"
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    N, K, D = 32, 19, 32
    assert out["class_logits"].shape == (2, N, K + 1)
    assert out["mask_logits"].shape == (2, N, frames, h, w)
    assert out["semantic_logits"].shape == (2, K, frames, h, w)
    assert out["pixel_embedding"].shape == (2, D, frames, h, w)
    torch.testing.assert_close(out["pixel_embedding"].norm(dim=1), torch.ones(2, frames, h, w))
    assert len(out["aux"]) == 1  # tiny: 2 global layers -> 1 earlier output
    assert out["aux"][0]["mask_logits"].shape == out["mask_logits"].shape
    if (H - 1) % 16 == 0:
        assert (h, w) == ((H - 1) // 4 + 1, (W - 1) // 4 + 1)


def test_heads_and_deep_supervision_match_reference(tiny):
    """Class/mask/semantic heads written out; aux outputs use each earlier layer's memory and
    that layer's own heads."""
    x = torch.rand(1, 2, 3, 33, 65) * 255
    memories = []
    hooks = [b.register_forward_hook(lambda m, i, o: memories.append(o[1])) for b in tiny.blocks]
    with torch.no_grad():
        out = tiny(x)
    for hook in hooks:
        hook.remove()
    emb = out["pixel_embedding"]

    def bn(x, m):
        return (x - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

    def lin_bn(x, layer):
        return bn(x @ layer.linear.weight.T, layer.bn)

    with torch.no_grad():
        for memory, pred, heads in zip(memories, out["aux"] + [out], [*tiny.aux_heads, tiny]):
            cls = F.relu(lin_bn(memory, heads.class_feature)) @ heads.class_head.weight.T
            cls = cls + heads.class_head.bias
            cls[..., -1] += math.log(19 * 9)
            torch.testing.assert_close(pred["class_logits"], cls)
            kernel = lin_bn(F.relu(lin_bn(memory, heads.mask_feature)), heads.mask_head)
            pixels = emb.permute(0, 2, 3, 4, 1)[:, None]  # (B, 1, T, h, w, D)
            logits = bn((kernel[:, :, None, None, None, :] * pixels).sum(-1), heads.mask_bn)
            torch.testing.assert_close(pred["mask_logits"], logits, atol=1e-5, rtol=1e-5)
        # One pixel embedding for every output: only the final dict carries it.
        assert all("pixel_embedding" not in aux for aux in out["aux"])
        assert tiny.aux_heads[0].mask_bn is not tiny.mask_bn
        semantic = torch.einsum("bdthw,kd->bkthw", emb, tiny.semantic_head.weight.flatten(1))
        semantic = semantic + tiny.semantic_head.bias[:, None, None, None]
        torch.testing.assert_close(out["semantic_logits"], semantic, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["aux"][0]["mask_logits"], out["mask_logits"])


def test_void_prior_added_every_forward():
    torch.manual_seed(1)
    model = build_model("tiny").eval()
    with torch.no_grad():
        model.class_head.weight.zero_()
        model.class_head.bias.fill_(0.5)
        out = model(torch.rand(1, 1, 3, 33, 33) * 255)
    expected = torch.full((1, 32, 20), 0.5)
    expected[..., -1] += math.log(19 * 9)
    torch.testing.assert_close(out["class_logits"], expected)
    assert math.log(19 * 9) == pytest.approx(5.1417, abs=1e-4)
    assert "void_prior" not in model.state_dict()  # a constant, not a learned bias
    # At init (zero bias, tiny weights) p(void) ~ K*9 / (K*9 + K) = 0.9.
    fresh = build_model("tiny").eval()
    with torch.no_grad():
        p = fresh(torch.rand(1, 1, 3, 33, 33) * 255)["class_logits"].softmax(-1)[..., -1]
    assert torch.allclose(p, torch.full_like(p, 0.9), atol=0.01)


def test_stuff_slots_are_the_last_ones_in_class_order():
    with torch.device("meta"):
        model = build_model("tiny")
    N, S = model.cfg.num_slots, len(STUFF_CLASSES)
    assert model.num_stuff == S == 17
    assert model.stuff_slot_classes == {N - S + j: c for j, c in enumerate(STUFF_CLASSES)}
    assert list(model.stuff_slot_classes) == list(range(N - S, N))
    assert model.thing_stuff_class_ids == (11, 13) + STUFF_CLASSES
    for j, cls in enumerate(model.stuff_slot_classes.values()):
        assert model.thing_stuff_class_ids[2 + j] == cls  # its class channel is channel 2 + j
    with pytest.raises(ValueError, match="num_slots"):
        build_model("tiny", num_slots=17)


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="num_slot"):
        build_model("tiny", num_slot=8)
    with pytest.raises(ValueError, match="preset"):
        build_model("huge")
    with pytest.raises(ValueError, match="memory_update"):
        build_model("tiny", memory_update="kmeans")
    assert build_model("tiny", num_slots=20).cfg == TubeFormerConfig(
        **{**build_model("tiny").cfg.__dict__, "num_slots": 20}
    )


@pytest.mark.parametrize("memory_update", ["dual_path", "clustering"])
def test_gelu_activation_same_parameters_other_outputs_and_flag(memory_update):
    """Exact GeLU wherever deeplab2's AxialResNet passes ``activation`` (backbone, global and
    latent layers, decoder, class/mask FFNs); the pixel head keeps ReLU. Default "relu", exact."""
    models = []
    for kwargs in ({}, {"activation": "relu"}, {"activation": "gelu"}):
        torch.manual_seed(0)
        models.append(build_model("tiny", memory_update=memory_update, **kwargs).eval())
    default, relu, gelu = models
    randomize_batch_norms(default)
    relu.load_state_dict(default.state_dict())
    gelu.load_state_dict(default.state_dict())  # strict: the same keys and shapes
    assert repr(default) == repr(relu) and count(gelu) == count(default)
    assert {m.act for m in gelu.modules() if hasattr(m, "act")} == {F.gelu}
    assert {m.act for m in default.modules() if hasattr(m, "act")} == {F.relu}
    assert isinstance(gelu.pixel_head.pointwise_relu, nn.ReLU)
    x = torch.rand(1, 2, 3, 33, 49) * 255
    with torch.no_grad():
        out, out_relu, out_gelu = (m(x) for m in models)
    for key in ("class_logits", "mask_logits", "semantic_logits"):
        assert torch.equal(out[key], out_relu[key])
        assert (out[key] - out_gelu[key]).abs().max() > 1e-3
    flags = ["--preset=demo", "--model.activation=gelu", f"--model.memory_update={memory_update}"]
    model, _ = tasks.build_task(config.parse_args(flags))
    assert model.cfg.activation == "gelu" and model.backbone.stage2[0].act is F.gelu
    with pytest.raises(ValueError, match="activation must be one of"):
        tasks.build_task(config.parse_args(["--model.activation=swish"]))


def test_latent_and_global_switches():
    torch.manual_seed(2)
    simple = build_model("tiny", use_latent=False, aux_heads=True).eval()
    assert not hasattr(simple, "latent_memory") and all(b.latent is None for b in simple.blocks)
    memory_only = build_model("tiny", use_global=False, aux_heads=True).eval()
    assert all(b.global_path is None for b in memory_only.blocks)
    x = torch.rand(1, 2, 3, 33, 33) * 255
    with torch.no_grad():
        out_simple, out_memory = simple(x), memory_only(x)
    assert len(out_simple["aux"]) == 1 and out_memory["aux"] == []
    assert out_memory["mask_logits"].shape == out_simple["mask_logits"].shape


def test_kitti_preset_forward_backward_small():
    torch.manual_seed(3)
    model = build_model("kitti", aux_heads=True).train()
    assert model.cfg.num_slots == 128 and model.cfg.num_latent == 16 and model.cfg.num_frames == 2
    out = model(torch.rand(1, 2, 3, 65, 65) * 255)
    assert out["class_logits"].shape == (1, 128, 20)
    assert out["mask_logits"].shape == (1, 128, 2, 17, 17)
    assert out["pixel_embedding"].shape == (1, 128, 2, 17, 17)
    assert len(out["aux"]) == 3
    loss = sum(o["mask_logits"].square().mean() + o["class_logits"].square().mean()
               for o in out["aux"] + [out]) + out["semantic_logits"].square().mean()  # fmt: skip
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.memory.grad.abs().sum() > 0
    # The latent memory reaches the output only through gamma-0 BNs (zero at init); their gammas
    # get gradient, so after one step the latent path is live.
    assert model.blocks[0].latent.pixel_conv3.bn.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_outputs_and_gradients():
    torch.manual_seed(4)
    plain = build_model("tiny", drop_path_keep_prob=0.8, aux_heads=True).train()
    randomize_batch_norms(plain)
    ckpt = build_model(
        "tiny", drop_path_keep_prob=0.8, gradient_checkpointing=True, aux_heads=True
    ).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 2, 3, 33, 49) * 255
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)  # same drop-path masks
        out = model(x)
        loss = (out["mask_logits"].square().mean() + out["class_logits"].square().mean()
                + out["aux"][0]["mask_logits"].square().mean())  # fmt: skip
        loss.backward()
        results.append(out)
    torch.testing.assert_close(results[0]["mask_logits"], results[1]["mask_logits"])
    torch.testing.assert_close(results[0]["class_logits"], results[1]["class_logits"])
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-5, rtol=1e-4)
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_gradient_checkpointing_flag_reaches_every_block():
    with torch.device("meta"):
        model = build_model("tiny", gradient_checkpointing=True)
    assert all(b.gradient_checkpointing for b in model.blocks)


def test_resnet_view_loads_torchvision_layer4_into_the_blocks():
    """Stage 5 lives in the hierarchical blocks; the view maps torchvision layer4 onto them."""
    from minivseg.backbone import load_torchvision_resnet50

    torch.manual_seed(6)
    model = build_model("tiny", use_axial=False, num_blocks=(1, 1, 1, 2))
    view = model.resnet_view()
    assert [m for m in view.stage5] == [b.pixel_block for b in model.blocks[:2]]
    assert view.stage2 is model.backbone.stage2
    ours = view.state_dict()
    fake = {  # torchvision names, our shapes
        "layer4.0.conv1.weight": torch.randn(ours["stage5.0.conv1.conv.weight"].shape),
        "layer4.1.conv2.weight": torch.randn(ours["stage5.1.conv2.conv.weight"].shape),
        "layer4.1.bn2.running_mean": torch.randn(ours["stage5.1.conv2.bn.running_mean"].shape),
        "layer3.0.conv3.weight": torch.randn(ours["stage4.0.conv3.conv.weight"].shape),
    }
    report = load_torchvision_resnet50(view, fake)
    assert sorted(report["loaded"]) == sorted(fake)
    torch.testing.assert_close(
        model.blocks[0].pixel_block.conv1.conv.weight, fake["layer4.0.conv1.weight"]
    )
    torch.testing.assert_close(
        model.blocks[1].pixel_block.conv2.bn.running_mean, fake["layer4.1.bn2.running_mean"]
    )
    torch.testing.assert_close(
        model.backbone.stage4[0].conv3.conv.weight, fake["layer3.0.conv3.weight"]
    )
    # The stage5_extra block is not part of the ImageNet ResNet.
    assert all(
        p is not q for p in view.parameters() for q in model.blocks[2].pixel_block.parameters()
    )


@pytest.mark.parametrize("mode", ["soft", "argmax"])
@pytest.mark.parametrize("frames", [1, 2, 3])
def test_clustering_switch_shapes_and_deep_supervision(mode, frames):
    """Every global layer clusters the clip; aux tubes = upsampled S, classes = input memory's."""
    torch.manual_seed(7)
    model = build_model(
        "tiny", memory_update="clustering", clustering_assignment=mode, aux_heads=True
    ).eval()
    randomize_batch_norms(model)
    assert all(isinstance(b, ClusteringBlock) for b in model.blocks)
    assert all(isinstance(b.global_path, ClusteringUpdate) for b in model.blocks)
    assert all(b.global_path.assignment == mode for b in model.blocks)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((i, o))) for b in model.blocks]
    x = torch.rand(2, frames, 3, 33, 49) * 255  # stride 16: 3 x 4, stride 4: 9 x 13
    with torch.no_grad():
        out = model(x)
    for hook in hooks:
        hook.remove()
    N, h, w = 32, 9, 13
    assert out["mask_logits"].shape == (2, N, frames, h, w)
    assert len(out["aux"]) == len(model.blocks) == 2  # one aux output per clustering layer
    assert len(out["reference_points"]) == 2
    (_, first_out), (second_in, _) = seen
    assert second_in[3] is first_out[3]  # block 2 receives block 1's clustering state
    with torch.no_grad():
        for layer, (aux, (inputs, outputs)) in enumerate(zip(out["aux"], seen)):
            assert set(aux) == {"class_logits", "mask_logits"}
            state = outputs[3]
            assert state["assignment_logits"].shape == (2, N, frames * 3 * 4)
            torch.testing.assert_close(out["reference_points"][layer], state["reference_points"])
            S = state["assignment_logits"].reshape(2, N, frames, 3, 4)
            tubes = aux["mask_logits"]
            assert tubes.shape == (2, N, frames, h, w)
            # align_corners: the stride-16 pixels sit on every 4th stride-4 pixel, in between
            # the values are linear (weights 3/4, 1/2, 1/4).
            torch.testing.assert_close(tubes[..., ::4, ::4], S)
            for k in (1, 2, 3):
                between = (1 - k / 4) * S[..., :-1, :] + k / 4 * S[..., 1:, :]
                torch.testing.assert_close(tubes[..., k::4, ::4], between)
            # Class logits from the centres that made the assignment: this block's input memory,
            # through the layer's own class head.
            heads = model.aux_heads[layer]
            torch.testing.assert_close(aux["class_logits"], model.classify(inputs[1], heads))
        torch.testing.assert_close(out["class_logits"], model.classify(seen[-1][1][1]))
        learned = model.classify(model.memory, model.aux_heads[0])
        torch.testing.assert_close(out["aux"][0]["class_logits"], learned.expand(2, -1, -1))
    assert not torch.allclose(out["aux"][0]["mask_logits"], out["aux"][1]["mask_logits"])


def test_clustering_switch_reference_point_options():
    torch.manual_seed(8)
    x = torch.rand(1, 2, 3, 33, 33) * 255
    model = build_model(
        "tiny", memory_update="clustering", num_reference_points=3, aux_heads=True
    ).eval()
    with torch.no_grad():
        points = model(x)["reference_points"]
    assert [p.shape for p in points] == [(1, 32, 3, 2)] * 2
    assert all(p.min() >= 0 and p.max() <= 1 for p in points)
    plain = build_model(
        "tiny", memory_update="clustering", num_reference_points=0, coord_conv=False,
        aux_heads=True,
    ).eval()  # fmt: skip
    with torch.no_grad():
        out = plain(x)
    assert "reference_points" not in out and len(out["aux"]) == 2
    assert not hasattr(plain.blocks[0].global_path, "reference_mlp1")
    with pytest.raises(ValueError, match="reference points"):
        build_model("tiny", memory_update="clustering", num_reference_points=0)
    with pytest.raises(ValueError, match="assignment"):
        build_model("tiny", memory_update="clustering", clustering_assignment="hard")


@pytest.mark.parametrize("mode", ["soft", "argmax"])
def test_clustering_switch_checkpointing_same_outputs_and_gradients(mode):
    """Checkpointed blocks carry the clustering state through the recompute unchanged."""
    torch.manual_seed(9)
    kwargs = dict(memory_update="clustering", clustering_assignment=mode, drop_path_keep_prob=0.8,
                  aux_heads=True)  # fmt: skip
    plain = build_model("tiny", **kwargs).train()
    randomize_batch_norms(plain)
    ckpt = build_model("tiny", **kwargs, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 2, 3, 33, 49) * 255
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(10)  # same drop-path masks
        out = model(x)
        loss = out["mask_logits"].square().mean() + out["class_logits"].square().mean()
        for aux, points in zip(out["aux"], out["reference_points"]):
            loss = loss + aux["mask_logits"].square().mean() + aux["class_logits"].mean()
            loss = loss + points.square().mean()
        loss.backward()
        results.append(out)
    for key in ("mask_logits", "class_logits"):
        torch.testing.assert_close(results[0][key], results[1][key])
    for a, b in zip(results[0]["aux"], results[1]["aux"]):
        torch.testing.assert_close(a["mask_logits"], b["mask_logits"])
    for a, b in zip(results[0]["reference_points"], results[1]["reference_points"]):
        torch.testing.assert_close(a, b)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        # Every weight is used, also with argmax (its S is deeply supervised): DDP-safe.
        if not name.startswith("semantic_head"):
            assert a.grad is not None and b.grad is not None, name
            torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-5, rtol=1e-4)
    assert plain.blocks[1].global_path.pixel_cluster_key.linear.weight.grad.abs().sum() > 0
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("memory_update", ["dual_path", "clustering"])
def test_aux_heads_are_separate_and_leave_the_final_head_alone(memory_update):
    """Deep supervision adds heads of its own (kMaX): the final outputs, and the running
    statistics of the final heads' BNs, are those of the same model without aux heads."""
    models = []
    for aux in (False, True):
        torch.manual_seed(11)  # aux heads are built last: same initial weights otherwise
        models.append(build_model("tiny", memory_update=memory_update, aux_heads=aux).train())
    plain, supervised = models
    assert len(plain.aux_heads) == 0 and len(supervised.aux_heads) == 2 - (
        memory_update == "dual_path"
    )
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(supervised.state_dict()[name], value, rtol=0, atol=0)
    x = torch.rand(2, 2, 3, 33, 49) * 255
    outs = [model(x) for model in models]
    assert outs[0]["aux"] == [] and len(outs[1]["aux"]) == len(supervised.aux_heads)
    for key in ("class_logits", "mask_logits"):
        torch.testing.assert_close(outs[1][key], outs[0][key])
    for name, value in plain.state_dict().items():  # the final BNs saw the final layer alone
        torch.testing.assert_close(supervised.state_dict()[name], value, msg=name)
    # Without aux heads every parameter still reaches the loss (DDP needs no unused ones).
    loss = sum(outs[0][k].square().mean() for k in ("class_logits", "mask_logits"))
    loss = loss + outs[0]["semantic_logits"].square().mean()
    for points in outs[0].get("reference_points", []):
        loss = loss + points.square().mean()
    loss.backward()
    unused = [n for n, p in plain.named_parameters() if p.grad is None]
    assert unused == []


def test_depth_branch_reads_res5_the_end_of_stage_5():
    """x_v of the depth branch: deeplab2's res5, the output of the stage-5 blocks (here 2 of them),
    activated; not res4, not the stage5_extra output the pixel decoder starts from."""
    torch.manual_seed(7)
    model = build_model("tiny", num_blocks=(1, 1, 1, 2), depth=True).eval()
    randomize_batch_norms(model)  # the blocks are identities at init (gamma-0 BNs)
    seen = {}
    hooks = [
        block.register_forward_hook(lambda m, inp, out, i=i: seen.update({i: out[0]}))
        for i, block in enumerate(model.blocks)
    ]
    hooks.append(
        model.depth_branch.aspp.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    )
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, 33, 49) * 255)
    for hook in hooks:
        hook.remove()
    assert len(model.blocks) == 3 and out["depth"].shape == (1, 2, 9, 13)
    torch.testing.assert_close(seen["x"], F.relu(seen[1].flatten(0, 1)), rtol=0, atol=0)
    assert not torch.equal(seen[1], seen[2])


def test_depth_flags_from_the_command_line_checkpointing_and_clustering():
    flags = ["--preset=demo", "--model.depth=true", "--model.max_depth=50"]
    model, _ = tasks.build_task(config.parse_args(flags))
    assert model.cfg.depth and model.depth_branch.max_depth == 50.0
    model, _ = tasks.build_task(config.parse_args(["--preset=demo"]))
    assert not model.cfg.depth and not hasattr(model, "depth_branch")
    x = torch.rand(2, 2, 3, 33, 49) * 255
    for kwargs in ({"memory_update": "clustering"}, {"activation": "gelu"}):
        results = []
        for checkpointing in (False, True):
            torch.manual_seed(8)
            model = build_model("tiny", depth=True, gradient_checkpointing=checkpointing, **kwargs)
            torch.manual_seed(9)  # the same dropout in the ASPP
            out = model.train()(x)
            out["depth"].mean().backward()
            grad = model.depth_branch.aspp.conv[0].conv.weight.grad
            results.append((out["depth"], grad, model.backbone.stem[0].conv.weight.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert results[0][2].abs().sum() > 0
