"""The run log of a training run: ``log.jsonl``, ``loss_curve.png`` and the progress line.

``log.jsonl`` has one strict-JSON line per ``log_every`` steps (every loss term, ``grad_norm``, the
LR, the time; NaN and infinities, which JSON lacks, are written as ``null``) and one per in-training
evaluation (``eval`` or ``eval_error``). ``--resume`` cuts it back to the resumed step, so each step
appears once; a damaged line (a kill or a full disk mid-write) is dropped then and skipped by the
plot. ``loss_curve.png`` is redrawn at each checkpoint: every logged total loss, faint, under a
moving average over a tenth of the log lines (the legend gives the window). The progress line on
stderr shows the step, the loss, it/s and the time left (rewritten in place on a terminal, one line
per ``log_every`` steps otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from minivseg.config import TrainConfig
from minivseg.metrics import to_json


def log_line(row: dict) -> str:
    """A strict JSON line: NaN and infinities, which JSON lacks, become null."""
    return json.dumps(to_json(row), allow_nan=False) + "\n"


def read_log(log_path: Path) -> list[dict]:
    """The rows of the JSONL log; a malformed line (a kill or a full disk mid-write) is skipped."""
    rows = []
    for line in log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("step"), int)]


def cut_log(log_path: Path, step: int) -> None:
    """Keep the well-formed rows up to ``step``: a resumed run logs the later steps again."""
    kept = [log_line(row) for row in read_log(log_path) if row["step"] <= step]
    log_path.with_suffix(".tmp").write_text("".join(kept))
    os.replace(log_path.with_suffix(".tmp"), log_path)


def plot_losses(log_path: Path, out_path: Path) -> None:
    """Loss-curve PNG: logged losses faint, a moving average on top (bare Figure, no pyplot)."""
    from matplotlib.figure import Figure

    rows = [r for r in read_log(log_path) if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return
    steps, losses = np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
    window = max(1, len(rows) // 10)
    average = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax = Figure(figsize=(7, 4)).subplots()
    ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=1, label="total loss")
    ax.plot(steps[window - 1 :], average, "C0", label=f"moving average of {window} log lines")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=log_path.parent.name)
    ax.legend()
    ax.figure.savefig(out_path, dpi=100, bbox_inches="tight")


def progress(step: int, cfg: TrainConfig, loss: float, start_time: float, start_step: int) -> None:
    """Print the progress line of ``step``: loss, steps per second since the start, time left."""
    rate = (step - start_step) / max(time.time() - start_time, 1e-9)
    eta = (cfg.max_steps - step) / max(rate, 1e-9)
    line = f"step {step}/{cfg.max_steps} loss {loss:.4f} {rate:.2f} it/s ETA {eta / 60:.1f} min"
    if sys.stderr.isatty():
        print(f"\r{line}   ", end="", file=sys.stderr, flush=True)
    elif step % cfg.log_every == 0 or step == cfg.max_steps:
        print(line, file=sys.stderr, flush=True)
