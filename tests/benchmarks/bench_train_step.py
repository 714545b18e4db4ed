"""The ``demo`` training step (forward + tube loss + backward) now vs a git revision, in one run.

    python tests/benchmarks/bench_train_step.py [--baseline REV] [--repeats 5] [--threads 1]

Exports ``minivseg/`` of ``REV`` (default: the commit before the axial-attention BN change) with
``git archive`` into a temporary folder and times both packages in alternating subprocesses, so
both see the same machine load: each subprocess builds the ``demo`` preset's model and loss (seed
0), takes 8 batches of the demo's crops (81x257, batch 2, T = 2) from ``data_samples/``, warms up
on 2 and times 8 steps. It prints the median seconds per step of each, their ratio, and where the
current step's time goes (forward, loss, backward). Needs a git checkout with ``REV`` in its
history.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "db1db5c"  # the last commit before the step's speed-ups

CHILD = r"""
import json, sys, time, collections
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[2]))
import minivseg
from minivseg.config import PRESETS
from minivseg.data import KittiStepClips, collate_clips
from minivseg.tasks import build_task
assert minivseg.__file__.startswith(sys.argv[1]), minivseg.__file__
cfg = PRESETS["demo"]()
data = KittiStepClips(sys.argv[3], "train", 2, crop_size=cfg.crop_size, scale_range=cfg.scale_range,
                      flip=True)
batches = [collate_clips([data[i], data[i + 1]]) for i in range(0, 16, 2)]
torch.manual_seed(0)
model, criterion = build_task(cfg)
model.train()
parts = collections.defaultdict(float)
def step(batch, record):
    start = time.perf_counter()
    outputs = model(batch["frames"])
    forward = time.perf_counter()
    loss, _ = criterion(outputs, batch)
    lossed = time.perf_counter()
    loss.backward()
    if record:
        parts["forward"] += forward - start
        parts["loss"] += lossed - forward
        parts["backward"] += time.perf_counter() - lossed
for batch in batches[:2]:
    step(batch, False)
start = time.perf_counter()
for batch in batches:
    step(batch, True)
seconds = (time.perf_counter() - start) / len(batches)
print(json.dumps({"step": seconds, **{k: v / len(batches) for k, v in parts.items()}}))
"""


def measure(package: Path, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(package), str(threads), str(ROOT / "data_samples")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo: 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "minivseg"],
                                 check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        runs = {"baseline": [], "current": []}
        for _ in range(args.repeats):
            runs["baseline"].append(measure(Path(folder), args.threads))
            runs["current"].append(measure(ROOT, args.threads))
    median = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
              for name, rows in runs.items()}  # fmt: skip
    print(f"demo training step, {args.threads} thread(s), medians of {args.repeats} runs of 8")
    print(f"{'':>10s} {'step':>8s} {'forward':>8s} {'loss':>8s} {'backward':>8s}")
    for name, row in median.items():
        label = name if name == "current" else args.baseline
        print(f"{label:>10s} " + " ".join(f"{row[k] * 1000:7.1f}ms" for k in
                                            ("step", "forward", "loss", "backward")))  # fmt: skip
    ratio = median["baseline"]["step"] / median["current"]["step"]
    print(f"speed-up of the step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
