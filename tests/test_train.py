"""Training loop: smoke runs of every preset, exact resume, DDP equivalence, failure handling."""

import dataclasses
import json
import math
import os
import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minivseg import config as config_module
from minivseg import run_log, tasks
from minivseg import train as train_module
from minivseg.config import PRESETS

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


def small(preset: str, out_dir, **changes):
    """A preset shrunk to seconds on one CPU thread."""
    cfg = PRESETS[preset]()
    base = dict(data=str(SAMPLES), out_dir=str(out_dir), max_steps=2, batch_size=1, num_workers=0,
                crop_size=(65, 97), scale_range=(0.5, 1.0), warmup_steps=1, log_every=1,
                checkpoint_every=1, eval_every=0, device="cpu")  # fmt: skip
    return dataclasses.replace(cfg, **{**base, **changes})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_demo_preset_two_steps(tmp_path):
    result = train_module.main(small("demo", tmp_path, clip_paste=0.5, temporal_consistency=1.0))
    assert result["step"] == 2 and result["skipped_steps"] == 0
    assert "temporal_consistency" in result and result["loss"] > 0
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "schedule", "step", "rng", "config"} <= set(checkpoint)
    assert checkpoint["step"] == 2 and (tmp_path / "prev.pt").exists()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "a_pq_class" in rows[0]  # clip a of the pair
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


def test_kitti_preset_two_steps(tmp_path):
    """The kitti loop (Adam, accumulation, checkpointing, clip-paste, temporal consistency) on the
    tiny model; the full kitti model's forward+backward is tested in test_tubeformer.py."""
    cfg = small("kitti", tmp_path, model="tiny", accumulate=2)
    assert cfg.grad_checkpointing and cfg.clip_paste > 0 and cfg.temporal_consistency > 0
    result = train_module.main(cfg)
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert result["model"].cfg.gradient_checkpointing


@pytest.mark.parametrize("preset", ["stt_demo", "vistr_demo"])
def test_other_presets_two_steps(tmp_path, preset):
    result = train_module.main(small(preset, tmp_path))
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))


def test_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = small("demo", tmp_path / "full", max_steps=4, checkpoint_every=2)
    full = weights(train_module.main(cfg)["model"])

    killed = dataclasses.replace(cfg, out_dir=str(tmp_path / "killed"))
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # killed during the 3rd step, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_module.main(killed)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 2
    resumed = weights(train_module.main(dataclasses.replace(killed, resume=True))["model"])
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)


def test_nonfinite_losses_stop_with_clear_message(tmp_path, monkeypatch):
    def nan_loss(model, criterion, batch, cfg):
        out = model(batch["frames"])
        return out["class_logits"].sum() * float("nan"), {}

    monkeypatch.setattr(train_module, "compute_loss", nan_loss)
    with pytest.raises(RuntimeError, match="non-finite losses in a row"):
        train_module.main(small("demo", tmp_path, max_steps=10, max_nonfinite=3))


def ddp_worker(rank, cfg, port, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = train_module.main(cfg)
    torch.distributed.destroy_process_group()
    if rank == 0:
        queue.put(result["loss"])


def test_ddp_two_processes_match_one(tmp_path):
    common = dict(
        max_steps=1,
        freeze_batchnorm=True,
        grad_clip=0.0,
        checkpoint_every=100,
        temporal_consistency=1.0,
    )  # two forwards per step under DDP
    # One process accumulating the two clips runs each clip's forward and matching exactly as
    # its rank does (batch 1): only accumulation vs all-reduce differ, so 1e-5 is a fair bound.
    single = train_module.main(
        small("demo", tmp_path / "one", batch_size=1, accumulate=2, **common)
    )
    cfg = small("demo", tmp_path / "two", batch_size=1, **common)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    processes = [context.Process(target=ddp_worker, args=(r, cfg, port, queue)) for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in processes)
    loss = queue.get()
    assert loss == pytest.approx(single["loss"], rel=1e-5, abs=1e-6)


def test_pretrained_lr_applies_to_exactly_the_loaded_parameters(tmp_path):
    """deeplab2 puts its backbone multiplier on the restored variables only: the stem and axial
    blocks a torchvision ResNet-50 cannot fill start random and learn at the full LR."""
    from minivseg.tubeformer import build_model

    torch.manual_seed(0)
    view = build_model("tiny").resnet_view()
    ours = view.state_dict()
    fake = {  # torchvision names with our shapes: two convs, one BN, one BN statistic
        "layer1.0.conv1.weight": torch.randn(ours["stage2.0.conv1.conv.weight"].shape),
        "layer1.0.bn1.weight": torch.randn(ours["stage2.0.conv1.bn.weight"].shape),
        "layer1.0.bn1.running_mean": torch.randn(ours["stage2.0.conv1.bn.running_mean"].shape),
        "layer3.0.conv3.weight": torch.randn(ours["stage4.0.conv3.conv.weight"].shape),
    }
    path = tmp_path / "resnet50.pth"
    torch.save(fake, path)
    model = build_model("tiny")
    loaded = train_module.load_pretrained_backbone(model, str(path))
    expected = sum(v.numel() for k, v in fake.items() if "running" not in k)
    assert sum(p.numel() for p in model.parameters() if id(p) in loaded) == expected
    cfg = small("demo", tmp_path, pretrained=str(path), backbone_lr_multiplier=0.1)
    rest, low = train_module.param_groups(model, cfg, loaded)
    assert sum(p.numel() for p in low["params"]) == expected and low["lr"] == cfg.lr * 0.1
    assert sum(p.numel() for p in rest["params"]) + expected == sum(
        p.numel() for p in model.parameters()
    )
    assert sum(p.numel() for p in model.resnet_view().parameters()) > 10 * expected
    assert len(train_module.param_groups(model, cfg)) == 1  # nothing loaded: one group


def test_loss_and_evaluation_use_the_models_classes(tmp_path):
    """A model with another class set: the loss, inference and metrics follow its config."""
    cfg = small("demo", tmp_path, eval_every=2, eval_sequences=1,
                model_overrides={"thing_classes": "11,13,12"})  # fmt: skip
    model, criterion = tasks.build_task(cfg)
    assert criterion.thing_classes == (11, 13, 12) and criterion.num_stuff == model.num_stuff
    assert criterion.thing_stuff_class_ids == model.thing_stuff_class_ids
    result = train_module.main(cfg)
    assert result["step"] == 2 and math.isfinite(result["loss"])
    evaluations = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("eval" in row and "STQ" in row["eval"] for row in evaluations)

    few = small("demo", tmp_path / "twelve", eval_every=2, eval_sequences=1,
                model_overrides={"num_classes": "12", "thing_classes": "11"})  # fmt: skip
    model, criterion = tasks.build_task(few)
    assert criterion.num_classes == 12 and model.class_head.out_features == 13
    assert math.isfinite(train_module.main(few)["loss"])  # classes >= 12 are void to the loss
    with pytest.raises(ValueError, match="thing_classes=.* below num_classes=10"):
        tasks.build_task(dataclasses.replace(few, model_overrides={"num_classes": "10"}))


def test_loss_flags_reach_the_loss_and_the_checkpoint(tmp_path):
    cfg = config_module.parse_args(
        [
            "--preset=demo",
            "--loss.contrastive_sample_k=64",
            "--loss.deep_supervision",
            "--loss.tube_id_weight=0.5",
        ]  # fmt: skip
    )
    assert cfg.loss_overrides == {
        "contrastive_sample_k": "64", "deep_supervision": "true", "tube_id_weight": "0.5"
    }  # fmt: skip
    model, criterion = tasks.build_task(cfg)
    assert criterion.config.contrastive_sample_k == 64 and criterion.config.tube_id_weight == 0.5
    assert criterion.config.deep_supervision and model.cfg.aux_heads and len(model.aux_heads) == 1
    plain, plain_loss = tasks.build_task(config_module.parse_args(["--preset=demo"]))
    assert not plain_loss.config.deep_supervision and len(plain.aux_heads) == 0
    # CMT-DeepLab's defaults come with the clustering update, unless a flag says otherwise.
    clustering = config_module.parse_args(["--model.memory_update=clustering"])
    _, cmt = tasks.build_task(clustering)
    assert cmt.config.contrastive_sample_k == 4096 and cmt.config.deep_supervision
    no_ds = dataclasses.replace(clustering, loss_overrides={"deep_supervision": "false"})
    assert not tasks.build_task(no_ds)[1].config.deep_supervision
    with pytest.raises(ValueError, match="did you mean --loss.tube_id_weight"):
        tasks.build_task(dataclasses.replace(cfg, loss_overrides={"tube_id_weigh": "1"}))
    with pytest.raises(ValueError, match="--loss.deep_supervision"):
        tasks.build_task(dataclasses.replace(cfg, model_overrides={"aux_heads": "true"}))
    with pytest.raises(ValueError, match="tubeformer"):
        tasks.build_task(small("stt_demo", tmp_path, loss_overrides={"alpha": "0.5"}))
    run = small("demo", tmp_path, max_steps=1, loss_overrides={"tube_id_weight": "0.5"})
    train_module.main(run)
    stored = torch.load(tmp_path / "last.pt", weights_only=True)["config"]
    assert stored["loss_overrides"] == {"tube_id_weight": "0.5"}
    from minivseg.tasks import load_model

    assert load_model(tmp_path / "last.pt")[1].loss_overrides == {"tube_id_weight": "0.5"}


def test_nonfinite_output_skips_the_step_and_leaves_everything_as_it_was(tmp_path, monkeypatch):
    """A NaN in the model's outputs (not only in the loss) on step 2 of 2: no crash in the
    matching, and weights, optimizer state and BN statistics equal a run that stopped at 1."""
    from minivseg.tubeformer import TubeFormer

    one = train_module.main(small("demo", tmp_path / "one", max_steps=1))
    real_forward = TubeFormer.forward
    calls = {"n": 0}

    def forward_with_nan(self, frames):
        out = real_forward(self, frames)
        calls["n"] += 1
        if calls["n"] == 2:
            out["mask_logits"] = out["mask_logits"] * float("nan")
        return out

    monkeypatch.setattr(TubeFormer, "forward", forward_with_nan)
    two = train_module.main(small("demo", tmp_path / "two", max_steps=2))
    assert calls["n"] == 2 and two["skipped_steps"] == 1 and two["step"] == 1  # last applied
    for name, value in weights(one["model"]).items():  # parameters and BN statistics
        torch.testing.assert_close(weights(two["model"])[name], value, rtol=0, atol=0, msg=name)
    optimizers = [
        torch.load(tmp_path / run / "last.pt", weights_only=True)["optimizer"]["state"]
        for run in ("one", "two")
    ]
    for key, state in optimizers[0].items():
        for name, value in state.items():
            torch.testing.assert_close(optimizers[1][key][name], value, rtol=0, atol=0)


def test_nonfinite_stop_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    from minivseg.tubeformer import TubeFormer

    real_forward = TubeFormer.forward
    calls = {"n": 0}

    def diverging(self, frames):
        out = real_forward(self, frames)
        calls["n"] += 1
        if calls["n"] > 2:
            out["class_logits"] = out["class_logits"] * float("inf")
        return out

    monkeypatch.setattr(TubeFormer, "forward", diverging)
    with pytest.raises(RuntimeError, match=r"last good checkpoint: .*last.pt \(step 2\)"):
        train_module.main(small("demo", tmp_path, max_steps=10, max_nonfinite=2))


def test_freeze_batchnorm_survives_evaluation(tmp_path):
    cfg = small("demo", tmp_path, max_steps=2, eval_every=1, eval_sequences=1,
                freeze_batchnorm=True)  # fmt: skip
    model = train_module.main(cfg)["model"]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert model.training  # everything else trains


def test_kitti_preset_follows_deeplab2_where_it_can():
    kitti = PRESETS["kitti"]()
    assert kitti.grad_clip == 0 and kitti.batch_size * kitti.accumulate == 16
    _, criterion = tasks.build_task(dataclasses.replace(kitti, model="tiny"))
    assert not criterion.config.deep_supervision


@pytest.mark.parametrize("memory_update", ["dual_path", "clustering"])
def test_training_step_waits_for_the_device_once_per_micro_batch(monkeypatch, memory_update):
    """Forward + loss + backward of a step (temporal consistency: two clips per sample) make no
    syncing call and one device-to-host transfer, the Hungarian matching of all its clips."""
    from minivseg.data import KittiStepClips, collate_clips
    from tests.test_tube_loss import count_host_work

    cfg = small("demo", "unused", temporal_consistency=1.0,
                model_overrides={"memory_update": memory_update})  # fmt: skip
    torch.manual_seed(0)
    model, criterion = tasks.build_task(cfg)
    dataset = KittiStepClips(SAMPLES, "train", 3, crop_size=(65, 97))
    batch = collate_clips([dataset[0], dataset[5]])

    def step():
        loss, _ = train_module.compute_loss(model, criterion, batch, cfg)
        loss.backward()

    seen, transfers = count_host_work(monkeypatch, step)
    assert seen == [] and len(transfers) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_loss_backward_sync_once(tmp_path):
    """On a GPU, torch's sync debug mode sees exactly one sync in forward + loss + backward."""
    import warnings

    from minivseg.data import KittiStepClips, collate_clips

    cfg = small("demo", tmp_path, temporal_consistency=1.0, device="cuda")
    model, criterion = tasks.build_task(cfg)
    model.cuda().train()
    batch = collate_clips([KittiStepClips(SAMPLES, "train", 3, crop_size=(65, 97))[i]
                           for i in (0, 5)])  # fmt: skip
    batch["frames"] = batch["frames"].pin_memory().cuda(non_blocking=True)
    train_module.compute_loss(model, criterion, batch, cfg)[0].backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = train_module.compute_loss(model, criterion, batch, cfg)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_threads_flag_sets_the_training_threads(tmp_path):
    """`--threads=N` fixes torch's thread count: the CPU presets use 1, so no OpenMP thread
    spin-waits for a core that another job holds (5-40x slower steps on a loaded machine)."""
    assert all(PRESETS[p]().threads == 1 for p in ("demo", "stt_demo", "vistr_demo"))
    assert PRESETS["kitti"]().threads == 0  # a GPU machine: torch's default
    torch.set_num_threads(2)
    try:
        train_module.main(small("demo", tmp_path, max_steps=1, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)  # tests/conftest.py's setting


def test_a_failed_evaluation_is_logged_and_training_goes_on(tmp_path, monkeypatch, capsys):
    from minivseg import evaluate

    def broken(*args, **kwargs):
        raise ValueError("class 13 needs track id 65536")

    monkeypatch.setattr(evaluate, "evaluate_model", broken)
    result = train_module.main(small("demo", tmp_path, max_steps=2, eval_every=1))
    assert result["step"] == 2 and (tmp_path / "last.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "eval_error" in row] == [1, 2]
    assert "evaluation at step 1 failed" in capsys.readouterr().err


def test_vistr_official_recipe_and_step_decay(tmp_path):
    cfg = PRESETS["vistr_official"]()
    assert (cfg.task, cfg.optimizer, cfg.lr, cfg.weight_decay) == ("vistr", "adamw", 1e-4, 1e-4)
    assert (cfg.backbone_lr_multiplier, cfg.grad_clip, cfg.warmup_steps) == (0.1, 0.1, 0)
    assert cfg.lr_drop == 2 / 3  # StepLR after 12 of 18 epochs
    factors = [train_module.lr_factor(step, cfg) for step in (0, 1332, 1333, 1999)]
    assert factors == [1.0, 1.0, 0.1, 0.1]
    poly = PRESETS["vistr_demo"]()
    assert train_module.lr_factor(poly.max_steps - 1, poly) < 0.01  # poly decay to 0
    shorter = dataclasses.replace(cfg, max_steps=150)  # the drop follows --max_steps
    assert [train_module.lr_factor(step, shorter) for step in (99, 100)] == [1.0, 0.1]
    result = train_module.main(small("vistr_official", tmp_path, lr_drop=0.5))
    assert result["step"] == 2 and math.isfinite(result["loss"])


class Killed(BaseException):
    """Stands for ``kill -9`` inside a checkpoint write."""


def not_json(name):
    raise ValueError(f"{name} is not JSON")


def log_steps(out_dir) -> list[int]:
    """The steps of the log's rows, each of which must be strict JSON."""
    lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=not_json)["step"] for line in lines]


def run_cli(monkeypatch, *args):
    """``python -m minivseg.train ARGS`` in this process."""
    monkeypatch.setattr(sys, "argv", ["minivseg.train", *args])
    with warnings.catch_warnings():  # runpy: the module is already imported
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("minivseg.train", run_name="__main__")


def test_a_kill_between_the_checkpoint_renames_resumes_exactly(tmp_path, monkeypatch, capsys):
    """Killed after last.pt -> prev.pt and before last.tmp -> last.pt: --resume continues from
    the complete last.tmp (not from scratch, not from prev.pt), bit for bit, and logs each step
    once."""
    cfg = small("demo", tmp_path / "full", max_steps=4)
    full = weights(train_module.main(cfg)["model"])
    killed = dataclasses.replace(cfg, out_dir=str(tmp_path / "killed"))
    real_replace, renames = os.replace, []

    def dying_replace(source, target):
        renames.append(Path(target).name)
        if renames.count("last.pt") == 2:  # the step-2 save, after last.pt -> prev.pt
            raise Killed
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        train_module.main(killed)
    monkeypatch.setattr(os, "replace", real_replace)
    out_dir = tmp_path / "killed"
    assert (out_dir / "last.tmp").is_file() and not (out_dir / "last.pt").exists()
    capsys.readouterr()
    resumed = train_module.main(dataclasses.replace(killed, resume=True))
    assert f"resuming from {out_dir / 'last.tmp'} (step 2)" in capsys.readouterr().out
    for name, value in weights(resumed["model"]).items():
        torch.testing.assert_close(value, full[name], rtol=0, atol=0, msg=name)
    assert log_steps(out_dir) == [1, 2, 3, 4]
    steps = [torch.load(out_dir / n, weights_only=True)["step"] for n in ("last.pt", "prev.pt")]
    assert steps == [4, 3] and not (out_dir / "last.tmp").exists()


def test_resume_past_a_truncated_last_pt_cuts_the_log_back(tmp_path, capsys):
    cfg = small("demo", tmp_path, max_steps=2)
    uninterrupted = weights(train_module.main(cfg)["model"])
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    resumed = train_module.main(dataclasses.replace(cfg, resume=True))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"resuming from {tmp_path / 'prev.pt'} (step 1): last.pt is truncated")
    assert "weights_only" not in line and (tmp_path / "last.pt.bad").is_file()
    for name, value in weights(resumed["model"]).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0, msg=name)
    assert log_steps(tmp_path) == [1, 2]  # the step-2 row of the first run is gone


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(32)], ids=["empty", "png"])
def test_resume_from_a_file_that_is_no_checkpoint_stops_with_one_line(
    tmp_path, monkeypatch, capsys, content
):
    (tmp_path / "last.pt").write_bytes(content)
    args = [f"--data={SAMPLES}", f"--out_dir={tmp_path}", "--resume", "--device=cpu"]
    with pytest.raises(SystemExit) as error:
        run_cli(monkeypatch, *args)
    message = capsys.readouterr().err.strip()
    assert error.value.code == 2
    assert message.startswith(f"error: --resume: no complete checkpoint in {tmp_path}: last.pt ")
    assert ("is empty" if not content else "a PNG image") in message
    assert "weights_only" not in message and "\n" not in message


def test_a_fresh_run_into_a_used_out_dir_refuses_unless_overwrite(tmp_path, monkeypatch, capsys):
    cfg = small("demo", tmp_path, max_steps=2)
    train_module.main(cfg)
    capsys.readouterr()
    with pytest.raises(SystemExit) as error:
        run_cli(monkeypatch, f"--data={SAMPLES}", f"--out_dir={tmp_path}", "--device=cpu")
    assert error.value.code == 2
    assert re.match(r"error: .* holds another run \(last.pt, prev.pt, log", capsys.readouterr().err)
    with pytest.raises(ValueError, match="pass --resume to continue it or --overwrite"):
        train_module.main(cfg)
    capsys.readouterr()
    train_module.main(dataclasses.replace(cfg, max_steps=1, overwrite=True))
    assert "--overwrite: removed last.pt, prev.pt, log.jsonl" in capsys.readouterr().out
    assert log_steps(tmp_path) == [1] and not (tmp_path / "prev.pt").exists()


def test_checkpoint_before_the_first_log_line_and_a_truncated_log_line(tmp_path):
    cfg = small("demo", tmp_path, max_steps=2, log_every=25)  # checkpoint at step 1, no log yet
    train_module.main(cfg)
    assert log_steps(tmp_path) == [2]
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 0.5, "lr"')  # cut short by a full disk
    run_log.plot_losses(tmp_path / "log.jsonl", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    train_module.main(dataclasses.replace(cfg, max_steps=3, resume=True))
    assert log_steps(tmp_path) == [2, 3]


def test_the_log_is_strict_json_and_the_curve_is_smoothed(tmp_path, monkeypatch):
    line = run_log.log_line({"step": 1, "loss": math.nan, "eval": {"VPQ": math.inf}})
    assert json.loads(line) == {"step": 1, "loss": None, "eval": {"VPQ": None}}
    log = tmp_path / "log.jsonl"
    run_log.plot_losses(log, tmp_path / "curve.png")  # no log yet: nothing to draw
    assert not (tmp_path / "curve.png").exists()
    rows = [{"step": s, "loss": 1.0 + (s % 2)} for s in range(1, 41)]
    log.write_text("".join(map(run_log.log_line, rows)) + line + "not json\n")
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: drawn.append(figure))
    run_log.plot_losses(log, tmp_path / "curve.png")
    ((raw, average),) = [figure.axes[0].get_lines() for figure in drawn]
    assert len(raw.get_xdata()) == 40 and raw.get_alpha() < 1
    assert average.get_label() == "moving average of 4 log lines" and len(average.get_xdata()) == 37
    assert set(average.get_ydata()) == {1.5}  # the alternating loss, averaged


def test_a_data_error_in_training_is_one_line_with_exit_status_2(tmp_path):
    import shutil
    import subprocess
    import sys

    root = tmp_path / "data"
    shutil.copytree(SAMPLES, root, ignore=shutil.ignore_patterns("*.md"))
    broken = sorted((root / "images" / "train").rglob("*.png"))[3]
    broken.write_bytes(b"not a png")
    command = [sys.executable, "-m", "minivseg.train", "--preset=demo", f"--data={root}",
               f"--out_dir={tmp_path / 'run'}", "--max_steps=1", "--num_workers=0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken}: cannot read image")
