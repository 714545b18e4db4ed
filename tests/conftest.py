"""Shared test set-up: headless matplotlib, one thread (CI has 2 cores), deterministic torch."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
