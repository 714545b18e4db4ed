"""deeplab2 checkpoints -> minivseg: a checkpoint written by deeplab2's own code converts, loads and
reproduces deeplab2's outputs; the full MaX-DeepLab-S layout fills TubeFormer-DeepLab; bad
checkpoints stop with the variable's name; ``--init`` loads the result by name.

Fixtures (tests/fixtures/deeplab2, made by tests/fixtures/make_deeplab2_fixtures.py with deeplab2
and TensorFlow, which the tests never import): a reduced ``max_deeplab_s_backbone`` checkpoint in
float64 with deeplab2's eval-mode endpoints for a fixed input, and the key/shape list of a
full-size MaX-DeepLab-S COCO checkpoint.
"""

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from minivseg import convert_deeplab2 as C
from minivseg import tasks, train
from minivseg.backbone import AxialResNet
from minivseg.config import parse_args
from minivseg.tubeformer import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "deeplab2"
SAMPLES = Path(__file__).parents[1] / "data_samples"
BACKBONE = str(FIXTURES / "backbone" / "ckpt-1")
SMALL = dict(num_blocks=(1, 1, 2, 1), base_width=4, stem_channels=(8, 8, 16))  # the fixture's size
SMALL_FLAGS = ["--model.num_blocks=1,1,2,1", "--model.base_width=4", "--model.stem_channels=8,8,16",
               "--model.axial_heads=2"]  # fmt: skip


def full_layout() -> dict:
    """{checkpoint key: shape} of deeplab2's full-size MaX-DeepLab-S checkpoint."""
    rows = (line.rstrip("\n").split("\t") for line in open(FIXTURES / "max_deeplab_s_keys.txt"))
    return {key: tuple(ast.literal_eval(shape)) for key, shape in rows}


def test_backbone_checkpoint_converts_and_gives_deeplab2s_outputs():
    model = AxialResNet(**SMALL, num_heads=2, drop_path_keep_prob=1.0).double().eval()
    state, report = C.convert(BACKBONE, model, backbone_only=True)
    assert len(report["loaded"]) == 159 and report["new"] == [] and not report["reinitialised"]
    reasons = list(report["unused"].values())
    assert reasons.count("optimizer state") == 4  # Adam m, v of one variable, iterations, lr
    assert reasons.count("step counters, object graph") == 3
    model.load_state_dict(state, strict=False)
    reference = np.load(FIXTURES / "backbone_outputs.npz")
    with torch.no_grad():
        ours = model(torch.from_numpy(reference["x"]))
    for end in ("stem", "res2", "res3", "res4", "res5"):  # float64: an exact port agrees to ~1e-12
        scale = np.abs(reference[end]).max()
        assert np.abs(ours[end].numpy() - reference[end]).max() <= 1e-8 * scale, end


def test_full_max_deeplab_s_layout_fills_every_tubeformer_part_but_latent_and_heads():
    with torch.device("meta"):
        state = build_model("kitti").state_dict()
    moves, unused, reinitialised = C.plan(full_layout(), state)
    targets = {target for _, target, _ in moves.values()}
    assert len(targets) == len(moves) == 833
    filled = [k for k in state if k.startswith(("backbone.", "decoder.", "memory", "pixel_head.",
                                                "mask_", "class_feature"))]  # fmt: skip
    filled += [k for k in state if ".pixel_block." in k or ".global_path." in k]
    filled = [k for k in filled if not k.endswith("num_batches_tracked")]
    assert set(filled) <= targets
    new = {k for k in state if k not in targets and not k.endswith("num_batches_tracked")}
    assert all(k.split(".")[0] in ("latent_memory", "semantic_head", "class_head")
               or ".latent." in k for k in new)  # fmt: skip
    assert set(reinitialised) == {"class_head.weight", "class_head.bias"}  # COCO's 135 outputs
    assert sum(why == "COCO auxiliary semantic decoder" for why in unused.values()) == 72


def test_unknown_and_misshapen_variables_stop_with_their_names():
    with torch.device("meta"):
        state = AxialResNet(**SMALL, num_heads=2).state_dict()
    shapes = {"encoder/_stem/_conv1_bn_act/_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE": (3, 3, 3, 8)}
    assert len(C.plan(shapes, state, backbone_only=True)[0]) == 1
    with pytest.raises(C.ConversionError, match="encoder/stem/conv9_bn_act/conv/kernel"):
        C.plan({"encoder/_stem/_conv9_bn_act/_conv/kernel": (3, 3, 3, 8)}, state, True)
    with pytest.raises(C.ConversionError, match=r"encoder/stem/conv1_bn_act/conv/kernel .*shape"):
        C.plan({"encoder/_stem/_conv1_bn_act/_conv/kernel": (3, 3, 3, 16)}, state, True)
    with pytest.raises(C.ConversionError, match="ckpt-1: 159 variables minivseg does not know"):
        C.convert(BACKBONE, AxialResNet(), backbone_only=False)  # TubeFormer keys, bare backbone


def test_cli_writes_the_init_file_and_training_loads_it(tmp_path, monkeypatch, capsys):
    def small_tubeformer(model, activation):  # the fixture's backbone inside a tiny TubeFormer
        return build_model("tiny", **SMALL, axial_heads=2, activation=activation)

    monkeypatch.setattr(C, "build_target", small_tubeformer)
    out = tmp_path / "init.pt"
    assert C.main(["--checkpoint", BACKBONE, "--out", str(out), "--model", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "optimizer state" in printed and "blocks.1.pixel_block" in printed  # new: not in it
    payload = torch.load(out, weights_only=True)
    assert len(payload["state_dict"]) == 159 and payload["activation"] == "relu"

    cfg = parse_args(["--preset=demo", *SMALL_FLAGS, f"--init={out}"])
    model, _ = tasks.build_task(cfg)
    slow = train.load_init(model, str(out))
    state = model.state_dict()
    for key, value in payload["state_dict"].items():
        assert torch.equal(state[key], value), key
    backbone = {id(p) for p in model.resnet_view().parameters()}
    loaded = {id(p) for k, p in model.named_parameters() if k in payload["state_dict"]}
    assert slow == loaded & backbone and slow  # only loaded backbone weights learn slowly
    groups = train.param_groups(model, dataclasses.replace(cfg, backbone_lr_multiplier=0.1), slow)
    assert [g["lr"] for g in groups] == [cfg.lr, pytest.approx(cfg.lr * 0.1)]

    run = dataclasses.replace(cfg, data=str(SAMPLES), out_dir=str(tmp_path / "run"), max_steps=1,
                              batch_size=1, num_workers=0, crop_size=(65, 97), warmup_steps=1,
                              log_every=1, checkpoint_every=1, device="cpu")  # fmt: skip
    assert train.main(run)["step"] == 1
    assert f"init {out}: loaded 159 tensors" in capsys.readouterr().out

    gelu = parse_args(["--preset=demo", *SMALL_FLAGS, "--model.activation=gelu"])
    with pytest.raises(ValueError, match="--model.activation=relu"):
        train.load_init(tasks.build_task(gelu)[0], str(out))
    wrong = parse_args(["--preset=demo"])  # the tiny preset's own, wider backbone
    with pytest.raises(ValueError, match="does not fit the model"):
        train.load_init(tasks.build_task(wrong)[0], str(out))


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    assert C.main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pt"),
                   "--model", "backbone"]) == 2  # fmt: skip
    assert "nothing" in capsys.readouterr().err
