"""Training checkpoints on disk: atomic save, resume from the newest complete one, clear errors.

A checkpoint is a dict (model, optimizer, schedule, step, skipped steps, the RNG states of every
process, config) saved with `torch.save` into ``OUT_DIR`` in this order:

1. write ``last.tmp`` and fsync it; a kill here leaves a partial ``last.tmp`` beside an intact
   ``last.pt`` and ``prev.pt``;
2. rename ``last.pt`` to ``prev.pt``; a kill before or after leaves a complete ``last.tmp``, the
   newest checkpoint, beside the older one (as ``last.pt`` or as ``prev.pt``);
3. rename ``last.tmp`` to ``last.pt``, then fsync the folder so the renames survive a power cut.

A rename replaces a name atomically, so at every instant each name holds a whole file, and the
newest complete checkpoint is the complete file among ``last.pt``, ``last.tmp`` and ``prev.pt``
with the highest stored step. `find_resume` picks it (it loads each candidate; one that fails
to load, or lacks our keys, is reported in one line and never chosen). `adopt` then finishes
the interrupted write order (``last.tmp`` to ``last.pt``, the older ``last.pt`` to ``prev.pt``),
removes a leftover ``last.tmp`` and moves an unreadable file aside as ``NAME.bad``, so the next
save moves the newest checkpoint, never an older or unreadable file, over ``prev.pt``. A fresh
run into a folder that holds another run's files refuses (`start_fresh`) unless told to remove
them, for the same reason.

``--resume`` prints which file it continues from and why, e.g. ``resuming from runs/demo/prev.pt
(step 60): last.pt is truncated (... bytes, no zip end) (kept as last.pt.bad)``; when no file
loads, the run stops with one line per file saying what is wrong (empty, truncated, not a PyTorch
file, a plain state dict), and ``python -m minivseg.evaluate --checkpoint`` and
`minivseg.tasks.load_model` explain a bad file the same way. A run without ``--resume`` refuses an
``OUT_DIR`` that holds a checkpoint or log of another run; ``--overwrite`` deletes those files
(``last.pt``, ``last.tmp``, ``prev.pt``, their ``.bad`` copies, ``log.jsonl``, ``loss_curve.png``;
other files stay) and starts over, and does nothing with ``--resume``. ``make demo`` passes
``--overwrite`` (``make demo ARGS=--resume`` continues the last demo run). tests/test_checkpoint.py
kills a save at every point, twice, and resumes.

Loads use ``weights_only=True``. Errors are our own one-line messages, not torch's, because its
message for a file it cannot unpickle suggests turning that safety off.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

LAST, TMP, PREV = "last.pt", "last.tmp", "prev.pt"
TRAINING_KEYS = ("model", "optimizer", "schedule", "step", "rng", "config", "skipped_steps")
MODEL_KEYS = ("model", "config")  # all that evaluation needs
RUN_FILES = (LAST, TMP, PREV, f"{LAST}.bad", f"{PREV}.bad", "log.jsonl", "loss_curve.png")
LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # pickle protocol 2 + 10-byte long: torch's pre-1.6 format
FILE_KINDS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
              b"\x1f\x8b": "a gzip file", b"{": "text (JSON?)"}  # fmt: skip


class CheckpointError(ValueError):
    """A file that is not a complete checkpoint, or a folder that holds another run."""


def save_checkpoint(out_dir: Path, checkpoint: dict) -> None:
    """Write ``out_dir/last.pt`` in the order of the module docstring (the old one -> prev.pt)."""
    out_dir = Path(out_dir)
    with open(out_dir / TMP, "wb") as file:
        torch.save(checkpoint, file)
        file.flush()
        os.fsync(file.fileno())  # the data is on disk before a rename makes it last.pt
    if (out_dir / LAST).exists():
        os.replace(out_dir / LAST, out_dir / PREV)
    os.replace(out_dir / TMP, out_dir / LAST)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the renames durable too
        folder = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def rng_state() -> dict:
    """The torch, CUDA, NumPy and Python RNG states, as tensors and plain types."""
    state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def problem_with(path: Path) -> str | None:
    """What the file's bytes say is wrong before unpickling anything, or None."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as file:
        head = file.read(8)
        file.seek(max(0, size - 65_558))  # a zip archive ends with its end record (max 65557 B)
        tail = file.read()
    end = tail.rfind(b"PK\x05\x06")  # the end record: signature + 18 bytes
    if head.startswith(b"PK\x03\x04"):  # torch's zip format
        return None if 0 <= end <= len(tail) - 22 else f"is truncated ({size:,} bytes, no zip end)"
    if head.startswith(LEGACY_MAGIC):
        return None
    kind = next((name for magic, name in FILE_KINDS.items() if head.startswith(magic)), None)
    return f"is not a PyTorch checkpoint ({kind or 'it starts with bytes ' + head.hex(' ')})"


def read_checkpoint(path: Path, keys: tuple[str, ...]) -> dict:
    """The checkpoint, or a CheckpointError whose message says what is wrong (without the path)."""
    problem, checkpoint = problem_with(path), None
    if problem is None:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's message here suggests the unsafe way round it
            problem = "is not a minivseg checkpoint (it holds Python objects, unsafe to load)"
        except EOFError:
            problem = f"is truncated ({path.stat().st_size:,} bytes)"
        except Exception as error:  # noqa: BLE001  (a damaged file fails in many ways)
            problem = f"is corrupt (PyTorch cannot read it: {type(error).__name__})"
    problem = problem or content_problem(checkpoint, keys)
    if problem:
        raise CheckpointError(problem)
    return checkpoint


def content_problem(checkpoint, keys: tuple[str, ...]) -> str | None:
    """Why a loaded object is not one of our checkpoints, or None."""
    if not isinstance(checkpoint, dict):
        return f"is not a minivseg checkpoint (it holds a {type(checkpoint).__name__})"
    missing = [k for k in keys if k not in checkpoint]
    if missing and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return f"is a plain state dict of {len(checkpoint)} tensors, not a minivseg checkpoint"
    if missing:
        return f"is not a minivseg checkpoint (no {', '.join(map(repr, missing))})"
    kinds = {"step": int, "model": dict, "config": dict}
    for key in (k for k in keys if k in kinds and not isinstance(checkpoint[k], kinds[k])):
        return f"is not a minivseg checkpoint ({key!r} is a {type(checkpoint[key]).__name__})"
    return None


def load_checkpoint(path, keys: tuple[str, ...] = TRAINING_KEYS) -> dict:
    """Load a checkpoint file; a CheckpointError (a ValueError) names the file and its problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return read_checkpoint(path, keys)
    except CheckpointError as error:
        raise CheckpointError(f"{path} {error}") from None


@dataclass
class Resume:
    """What `find_resume` found in a folder: the chosen checkpoint and what to say about it."""

    out_dir: Path
    name: str | None = None  # LAST, TMP or PREV; None: start from scratch
    checkpoint: dict | None = None
    steps: dict[str, int] = field(default_factory=dict)  # complete candidates -> stored step
    problems: dict[str, str] = field(default_factory=dict)  # unreadable candidates -> why

    @property
    def step(self) -> int:
        return self.checkpoint["step"] if self.checkpoint else 0

    def restore(self, model, optimizer, schedule, rank: int = 0) -> tuple[int, int]:
        """Load the states (this process's RNG states); the step and the skipped steps."""
        if self.checkpoint is None:
            return 0, 0
        model.load_state_dict(self.checkpoint["model"])
        optimizer.load_state_dict(self.checkpoint["optimizer"])
        schedule.load_state_dict(self.checkpoint["schedule"])
        states = self.checkpoint["rng"]
        set_rng_state(states[rank] if rank < len(states) else states[0])
        return self.step, self.checkpoint["skipped_steps"]

    def message(self) -> str:
        """One line: the file resumed from and why that one."""
        notes = [f"{name} {problem} ({'removed' if name == TMP else f'kept as {name}.bad'})"
                 for name, problem in self.problems.items()]  # fmt: skip
        if self.name is None:
            return f"--resume: no complete checkpoint in {self.out_dir}, starting from scratch" + (
                f": {'; '.join(notes)}" if notes else "")  # fmt: skip
        if self.name == TMP:
            notes.insert(0, "the run stopped before renaming it to last.pt")
        if self.name != LAST and LAST in self.steps:
            notes.append(f"last.pt is older (step {self.steps[LAST]})")
        if self.name == PREV and LAST not in self.steps and LAST not in self.problems:
            notes.append("there is no last.pt")
        where = f"resuming from {self.out_dir / self.name} (step {self.step})"
        return where + (f": {'; '.join(notes)}" if notes else "")


def find_resume(out_dir: Path) -> Resume:
    """The newest complete checkpoint in ``out_dir``: the highest step that loads, ties to
    last.pt. Reads only. A CheckpointError when last.pt or prev.pt exist and none loads."""
    found = Resume(Path(out_dir))
    for name in (LAST, TMP, PREV):
        path = found.out_dir / name
        if not path.is_file():
            continue
        try:
            checkpoint = read_checkpoint(path, TRAINING_KEYS)
        except CheckpointError as error:
            found.problems[name] = str(error)
            continue
        found.steps[name] = checkpoint["step"]
        if found.checkpoint is None or checkpoint["step"] > found.step:
            found.name, found.checkpoint = name, checkpoint
    if found.name is None and set(found.problems) - {TMP}:
        problems = "; ".join(f"{name} {why}" for name, why in found.problems.items())
        raise CheckpointError(f"--resume: no complete checkpoint in {out_dir}: {problems}")
    return found


def adopt(found: Resume) -> str:
    """Make last.pt the chosen checkpoint and prev.pt an older complete one (or nothing), as
    if the last save had finished; remove last.tmp, move unreadable files aside. The line that
    says which file the run resumes from, and why."""
    message = found.message()
    out_dir = found.out_dir
    for name in found.problems:
        if name == TMP:
            (out_dir / TMP).unlink()
        else:
            os.replace(out_dir / name, out_dir / f"{name}.bad")
    if found.name == TMP and LAST in found.steps:
        os.replace(out_dir / LAST, out_dir / PREV)  # step 2 of the write order
    if found.name in (TMP, PREV):
        os.replace(out_dir / found.name, out_dir / LAST)
    if (out_dir / TMP).exists():  # complete but not the newest
        (out_dir / TMP).unlink()
    return message


def start_fresh(out_dir: Path, overwrite: bool, remove: bool) -> str | None:
    """A run without --resume: refuse a folder that holds another run's checkpoints or log
    (a new run would rotate them away), or with ``overwrite`` remove them (when ``remove``: on
    the main process). The line to print, or None."""
    used = [name for name in RUN_FILES if (Path(out_dir) / name).exists()]
    if used and not overwrite:
        raise CheckpointError(f"{out_dir} holds another run ({', '.join(used)}): pass --resume to "
                              "continue it or --overwrite to delete it and start over")  # fmt: skip
    if not used or not remove:
        return None
    for name in used:
        (Path(out_dir) / name).unlink()
    return f"--overwrite: removed {', '.join(used)} from {out_dir}"
