"""Memory and time of streaming evaluation against the length of a sequence.

Writes one synthetic KITTI-STEP sequence per length (default 100 and 1000 frames of 375x1242,
KITTI's size) and runs ``python -m minivseg.evaluate`` on each in a fresh process, with labels
(STQ, VPQ, mIoU, flicker, per-pixel and per-mask video AP) and with the PNGs and GIF written.
Reports wall time, CPU time (user + system of that process: fair on a shared machine), frames per
second and the peak resident set size (``ru_maxrss`` of the process). Memory should not grow with
the length.

The model is a ``tiny`` TubeFormer: ``--checkpoint`` (e.g. ``runs/demo/last.pt`` after
``make demo``), else a randomly initialised one saved next to the data.

Run: python tests/benchmarks/bench_evaluate.py [--frames 100,1000] [--size 375x1242]
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minivseg.config import demo
from minivseg.synthetic import write_dataset


def tiny_checkpoint(path: Path) -> Path:
    from minivseg.tasks import build_task

    cfg = dataclasses.replace(demo(), data="")
    model, _ = build_task(cfg)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, path)
    return path


def run(checkpoint: Path, data: Path, out: Path) -> dict:
    """One evaluation in a fresh process; its own wall time, CPU time and peak RSS."""
    command = [sys.executable, "-m", "minivseg.evaluate", "--checkpoint", str(checkpoint)]
    command += ["--data", str(data), "--split", "val", "--out", str(out), "--device", "cpu"]
    start = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - start
    if status != 0:
        raise SystemExit(f"evaluation failed:\n{output}")
    stq = next(line.split()[-1] for line in output.splitlines() if line.split()[:1] == ["STQ"])
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall": wall, "cpu": cpu, "rss_gb": usage.ru_maxrss / 1e6, "STQ": stq}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="100,1000", help="sequence lengths, comma-separated")
    parser.add_argument("--size", default="375x1242", help="frame size HxW")
    parser.add_argument("--checkpoint", help="tiny TubeFormer checkpoint (default: random init)")
    parser.add_argument("--work", default="/tmp/minivseg-bench-evaluate", help="data and outputs")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(work / "tiny.pt")
    print(f"streaming evaluation, {height}x{width}, checkpoint {checkpoint}, "
          f"{os.cpu_count()} CPUs, torch threads as the checkpoint's config says")  # fmt: skip
    print(f"{'frames':>7} {'wall s':>8} {'CPU s':>8} {'frames/s':>9} {'CPU s/frame':>12} "
          f"{'peak RSS GB':>12} {'STQ':>7}")  # fmt: skip
    for frames in (int(n) for n in args.frames.split(",")):
        data = work / f"data_{frames}_{height}x{width}"
        if not (data / "panoptic_maps" / "val").is_dir():
            write_dataset(data, 0, 1, frames, seed=0, height=height, width=width)
        r = run(checkpoint, data, work / f"out_{frames}")
        row = f"{frames:>7} {r['wall']:>8.0f} {r['cpu']:>8.0f} {frames / r['wall']:>9.2f} "
        row += f"{r['cpu'] / frames:>12.2f} {r['rss_gb']:>12.2f} {r['STQ']:>7}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
