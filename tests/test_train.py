"""Training loop: smoke runs of every preset, exact resume, DDP equivalence, failure handling."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

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
    single = train_module.main(small("demo", tmp_path / "one", batch_size=2, **common))
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
