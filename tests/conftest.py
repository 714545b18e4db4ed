"""Shared test set-up: headless matplotlib, one thread (CI has 2 cores), deterministic torch."""

# Numerics rule for every test (and every lesson check). BLAS/oneDNN kernels differ between x86
# CPUs and between batch sizes, so results of two different computation paths (batched vs
# unbatched, batch 1 vs batch 3, cached vs fresh, chunked vs whole, sparse vs dense, einsum vs
# loop, float64 naive vs float32 real, a lesson's from-scratch module vs the package's) agree
# only to rounding:
# - compare their float values with a tolerance (torch.testing.assert_close with rtol/atol);
# - compare argmax labels only where the top-2 logit gap is clearly larger than that (e.g.
#   > 1e-4): mask out the near-tie pixels, and assert that most pixels (>= 90%) survive the mask
#   so the test cannot pass vacuously; likewise for a ranking or a matching (assert a clear gap
#   to the runner-up) and for a threshold on a value computed two ways (e.g. p > 0.4: leave out
#   or rule out values within the tolerance of the threshold);
# - exact equality (torch.equal, rtol=0 atol=0, ==) only for the same computation repeated on
#   the same machine (resume vs uninterrupted run, determinism checks) and for integer logic
#   (ids, counts, index arithmetic on integer inputs).

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
