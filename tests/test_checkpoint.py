"""Checkpoint files: a kill at any point of a save keeps the newest complete checkpoint, resume
finds it, and files that are not checkpoints get one-line messages of our own."""

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from minivseg import checkpoint as C
from minivseg import evaluate, tasks

KILL_POINTS = 13  # 3 saves: 2 kill points in each write, 1 or 2 renames (before each)


class Killed(BaseException):
    """Stands for ``kill -9``: nothing in the save catches it, the files stay as they are."""


def fake(step: int) -> dict:
    """A checkpoint with every training key; its tensor repeats the step."""
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "schedule": {},
            "step": step, "rng": [], "config": {}, "skipped_steps": 0}  # fmt: skip


def step_of(path: Path) -> int:
    checkpoint = C.load_checkpoint(path)
    assert checkpoint["model"]["w"][0].item() == checkpoint["step"]
    return checkpoint["step"]


def saves_killed_at(monkeypatch, out_dir: Path, first_step: int, kill: int) -> int:
    """Save steps first_step..first_step+2, killed at the ``kill``-th point: after 0 bytes or
    half of a write, or before a rename (no kill when ``kill`` is past the last point). The
    newest step whose write completed (first_step - 1 if none)."""
    real_save, real_replace = torch.save, os.replace
    points, completed = iter(range(10**6)), [first_step - 1]

    def save(obj, file):
        for fraction in (0.0, 0.5):
            if next(points) == kill:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                file.write(buffer.getvalue()[: int(fraction * buffer.tell())])
                raise Killed
        real_save(obj, file)
        completed[0] = obj["step"]

    def replace(source, target):
        if next(points) == kill:
            raise Killed
        real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        patch.setattr(os, "replace", replace)
        try:
            for step in range(first_step, first_step + 3):
                C.save_checkpoint(out_dir, fake(step))
        except Killed:
            pass
    return completed[0]


def resume(out_dir: Path) -> int:
    """find_resume + adopt, then check the files: last.pt the resumed step, prev.pt older."""
    found = C.find_resume(out_dir)
    C.adopt(found)
    names = sorted(p.name for p in out_dir.iterdir())
    assert C.TMP not in names  # a leftover temp file is removed
    if found.checkpoint is None:
        assert names == []
        return 0
    assert step_of(out_dir / C.LAST) == found.step
    if C.PREV in names:
        assert step_of(out_dir / C.PREV) < found.step
    return found.step


def test_a_kill_at_any_point_of_two_runs_resumes_from_the_newest_complete_step(
    tmp_path, monkeypatch
):
    """A run killed at each point of its saves, resumed, killed again at each point: every
    resume continues from the newest checkpoint whose write completed (a complete last.tmp
    included), and no save ever rotates an older or broken file over a newer one."""
    for first in range(KILL_POINTS):
        for second in range(KILL_POINTS):
            out_dir = tmp_path / f"{first}-{second}"
            out_dir.mkdir()
            newest = saves_killed_at(monkeypatch, out_dir, 1, first)
            assert resume(out_dir) == newest, (first, second)
            newest = saves_killed_at(monkeypatch, out_dir, newest + 1, second)
            assert resume(out_dir) == newest, (first, second)
    assert newest == 6 and step_of(out_dir / C.PREV) == 5  # the last pair: never killed


def test_a_kill_between_the_renames_resumes_from_last_tmp(tmp_path, monkeypatch):
    C.save_checkpoint(tmp_path, fake(40))
    C.save_checkpoint(tmp_path, fake(60))
    assert saves_killed_at(monkeypatch, tmp_path, 80, 3) == 80  # before last.tmp -> last.pt
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.TMP, C.PREV]
    found = C.find_resume(tmp_path)
    assert (found.name, found.step) == (C.TMP, 80)
    assert C.adopt(found) == (
        f"resuming from {tmp_path / C.TMP} (step 80): the run stopped before renaming it to last.pt"
    )
    assert [step_of(tmp_path / name) for name in (C.LAST, C.PREV)] == [80, 60]


def test_resume_falls_back_past_a_truncated_last_pt_and_a_leftover_tmp(tmp_path):
    C.save_checkpoint(tmp_path, fake(60))
    C.save_checkpoint(tmp_path, fake(80))
    data = (tmp_path / C.LAST).read_bytes()
    (tmp_path / C.LAST).write_bytes(data[: len(data) // 2])
    (tmp_path / C.TMP).write_bytes(data[:100])
    found = C.find_resume(tmp_path)
    message = C.adopt(found)
    assert message.startswith(f"resuming from {tmp_path / C.PREV} (step 60): last.pt is truncated")
    assert "last.tmp is truncated" in message and "(removed)" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.LAST, "last.pt.bad"]
    assert step_of(tmp_path / C.LAST) == 60
    C.save_checkpoint(tmp_path, fake(70))  # the resumed run's next save
    assert [step_of(tmp_path / name) for name in (C.LAST, C.PREV)] == [70, 60]


def damaged_files(tmp_path) -> dict[str, tuple[Path, str]]:
    """Files that are not checkpoints, each with the words its message must have."""
    good = io.BytesIO()
    torch.save(fake(3), good)
    state_dict = io.BytesIO()
    torch.save({"conv.weight": torch.ones(2, 2), "conv.bias": torch.zeros(2)}, state_dict)
    # torch's legacy format (its magic number) around an arbitrary object: a safe load refuses it
    legacy = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + pickle.dumps(os.getcwd, protocol=2)
    contents = {
        "empty": (b"", "is empty"),
        "truncated": (good.getvalue()[: good.tell() // 2], "is truncated"),
        "png": (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
        "random": (bytes(range(7, 256)), "is not a PyTorch checkpoint"),
        "state_dict": (state_dict.getvalue(), "plain state dict of 2 tensors"),
        "pickle": (legacy, "Python objects"),
    }
    files = {}
    for name, (data, words) in contents.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
        files[name] = (tmp_path / f"{name}.pt", words)
    return files


@pytest.mark.parametrize(
    "kind", ["empty", "truncated", "png", "random", "state_dict", "pickle"]
)  # fmt: skip
def test_a_damaged_or_foreign_file_gets_one_line_of_our_own(tmp_path, capsys, kind):
    """load_checkpoint, tasks.load_model and `python -m minivseg.evaluate --checkpoint`:
    one line naming the file and what is wrong, never torch's hint to load unsafely."""
    path, words = damaged_files(tmp_path)[kind]
    for load in (C.load_checkpoint, tasks.load_model):
        with pytest.raises(ValueError) as error:
            load(path)
        message = str(error.value)
        assert message.startswith(f"{path} ") and words in message, message
        assert "weights_only" not in message and "\n" not in message
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--checkpoint", str(path), "--data", "unused"])
    assert str(exit_.value) == f"error: {message}"
    assert "weights_only" not in capsys.readouterr().err


def test_resume_with_no_checkpoint_that_loads_stops_with_one_line(tmp_path):
    damaged = damaged_files(tmp_path)
    os.replace(damaged["png"][0], tmp_path / C.LAST)
    os.replace(damaged["state_dict"][0], tmp_path / C.PREV)
    with pytest.raises(C.CheckpointError) as error:
        C.find_resume(tmp_path)
    message = str(error.value)
    assert "last.pt is not a PyTorch checkpoint (a PNG image)" in message
    assert "prev.pt is a plain state dict" in message and "weights_only" not in message
    (tmp_path / C.LAST).unlink()
    (tmp_path / C.PREV).unlink()
    os.replace(damaged["truncated"][0], tmp_path / C.TMP)  # only a partial temp file: from scratch
    found = C.find_resume(tmp_path)
    assert found.checkpoint is None and "starting from scratch" in C.adopt(found)
    assert not (tmp_path / C.TMP).exists()


def test_a_fresh_run_refuses_a_used_folder_unless_overwrite(tmp_path):
    assert C.start_fresh(tmp_path, overwrite=False, remove=True) is None  # empty: fine
    C.save_checkpoint(tmp_path, fake(1))
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(C.CheckpointError, match=r"holds another run \(last.pt, log.jsonl\)"):
        C.start_fresh(tmp_path, overwrite=False, remove=True)
    assert C.start_fresh(tmp_path, overwrite=True, remove=False) is None  # not the main process
    assert (tmp_path / C.LAST).exists()
    assert C.start_fresh(tmp_path, overwrite=True, remove=True) == (
        f"--overwrite: removed last.pt, log.jsonl from {tmp_path}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
