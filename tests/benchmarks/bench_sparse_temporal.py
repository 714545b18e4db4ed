"""Sparse vs dense temporal attention at STT's Cityscapes setting (§3.2, Tables 3-4).

T = 7 key frames, d_t = 512 reduced to 128, 8 heads, 50% of the queries, key windows s=1, e=5,
eps=1 (527 keys per query), feature maps of h x w from 8 x 16 up to 64 x 128 (1024 x 2048 input
at stride 16). Sparse and dense run on the same inputs in the same process.

- "attention": Eq. (6) on projected q, k, v: `windowed_attention` (window index and key gather
  included) vs `dense_attention` (the (h, N, T*h*w) attention formed). Where that attention would
  exceed --dense-limit-gb, dense is timed query chunk by query chunk (same arithmetic, less memory)
  and marked "chunked"; its memory is then only the analytic size.
- "layer": the whole `SparseTemporalTransformer` forward (reduction MLP of all T+1 maps, NSM,
  selection, Eq. 6-10, scatter), dense=False vs dense=True. Dense is not run above the limit; its
  time there is EXTRAPOLATED from a power law through the two largest measured sizes, marked so.
- Time: best of --repeats, as CPU seconds of this process (fair on a shared machine) and wall
  seconds; on an idle machine with one thread the two agree. On CUDA, wall time only.
- Memory of one attention call: growth of the peak resident set (VmHWM, reset through
  /proc/self/clear_refs) in a fresh process on CPU, torch.cuda.max_memory_allocated on CUDA;
  printed beside the analytic float32 size of the attention tensors alive at once.

Run: python tests/benchmarks/bench_sparse_temporal.py [--threads 1] [--repeats 3]
"""

import argparse
import functools
import math
import subprocess
import sys
import time

import torch

from minivseg.sparse_temporal import (
    SparseTemporalTransformer,
    dense_attention,
    key_window_index,
    key_window_radii,
    windowed_attention,
)

T, CHANNELS, WIDTH, HEADS, RATIO, CHUNK = 7, 512, 128, 8, 0.5, 64
SIZES = [(8, 16), (16, 32), (32, 64), (64, 128)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_KEYS = sum((2 * r + 1) ** 2 for r in key_window_radii(T))


def attention_inputs(h: int, w: int, seed: int = 0):
    """q of all positions, q of the selected ones, k, v of all key positions, selected positions."""
    g = torch.Generator().manual_seed(seed)
    q_all = torch.randn(1, h * w, WIDTH, generator=g)
    k, v = (torch.randn(1, T * h * w, WIDTH, generator=g) for _ in range(2))
    selected = torch.randperm(h * w, generator=g)[: round(RATIO * h * w)][None]
    return [x.to(DEVICE) for x in (q_all, q_all[:, selected[0]], k, v, selected)]


def run_attention(mode: str, h: int, w: int, inputs, dense_chunk: int | None = None):
    q_all, q, k, v, selected = inputs
    if mode == "sparse":
        index, inside = key_window_index(selected, h, w, key_window_radii(T))
        return windowed_attention(q, k, v, index, inside, HEADS, chunk_size=CHUNK)
    chunk = dense_chunk or q_all.shape[1]
    parts = [q_all[:, i : i + chunk] for i in range(0, q_all.shape[1], chunk)]
    return torch.cat([dense_attention(part, k, v, HEADS) for part in parts], dim=1)


def analytic_gb(mode: str, h: int, w: int) -> float:
    """Float32 size of the attention tensors alive at once. Dense: logits and probabilities
    (h, N, T*h*w). Sparse: gathered k, v (N_c, n_k, C), their products with q or the attention
    (N_c, n_k, C) and logits and probabilities (N_c, n_k, h), for one chunk of N_c queries."""
    if mode == "dense":
        return 2 * HEADS * (h * w) * (T * h * w) * 4 / 1e9
    chunk = min(round(RATIO * h * w), CHUNK)
    return chunk * NUM_KEYS * (3 * WIDTH + 2 * HEADS) * 4 / 1e9


def attention_gmac(mode: str, h: int, w: int) -> float:
    """Multiply-adds of q.k and attention.v: 2 * queries * keys * C."""
    if mode == "dense":
        return 2 * (h * w) * (T * h * w) * WIDTH / 1e9
    return 2 * round(RATIO * h * w) * NUM_KEYS * WIDTH / 1e9


def seconds(fn, repeats: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds), each the best of `repeats` after a warm-up."""
    fn()
    best_cpu = best_wall = math.inf
    for _ in range(repeats):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall


def peak_memory_gb(mode: str, h: int, w: int, threads: int) -> float:
    """Peak memory growth of one attention call: a fresh process on CPU, this one on CUDA."""
    if DEVICE == "cuda":
        inputs = attention_inputs(h, w)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            run_attention(mode, h, w, inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 1e9
    command = [sys.executable, __file__, f"--threads={threads}", "--memory-probe", mode, str(h)]
    result = subprocess.run([*command, str(w)], capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def status_kib(field: str) -> int:
    """A VmXXX field of /proc/self/status, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def memory_probe(mode: str, h: int, w: int) -> None:
    inputs = attention_inputs(h, w)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = status_kib("VmRSS")
    with torch.no_grad():
        run_attention(mode, h, w, inputs)
    print((status_kib("VmHWM") - before) * 1024 / 1e9)


def fit_power_law(points):
    """Least-squares fit of log(time) = a + b log(h*w) to [(h*w, time)]; returns (a, b)."""
    xs, ys = [math.log(p) for p, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def time_size(h: int, w: int, layers: dict, args) -> dict:
    """{(what, mode): (cpu s, wall s)} at one map size; NaN where dense is not run."""
    inputs = attention_inputs(h, w)
    query = torch.randn(1, CHANNELS, h, w, device=DEVICE)
    keys = torch.randn(1, T, CHANNELS, h, w, device=DEVICE)
    fits = analytic_gb("dense", h, w) <= args.dense_limit_gb
    dense_chunk = None if fits else round(h * w * args.dense_limit_gb / analytic_gb("dense", h, w))
    times = {}
    with torch.no_grad():
        for mode in layers:
            attention = functools.partial(run_attention, mode, h, w, inputs, dense_chunk)
            repeats = args.repeats if fits or mode == "sparse" else 1
            times["attention", mode] = seconds(attention, repeats)
            layer = functools.partial(layers[mode], query, keys)
            fits_layer = fits or mode == "sparse"
            times["layer", mode] = seconds(layer, args.repeats) if fits_layer else (math.nan,) * 2
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit-gb", type=float, default=4.0)
    parser.add_argument("--memory-probe", nargs=3, metavar=("MODE", "H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        mode, h, w = args.memory_probe
        return memory_probe(mode, int(h), int(w))
    torch.manual_seed(0)
    layers = {
        mode: SparseTemporalTransformer(CHANNELS, T, HEADS, dense=mode == "dense").to(DEVICE).eval()
        for mode in ("sparse", "dense")
    }
    layers["dense"].load_state_dict(layers["sparse"].state_dict())
    print(f"device {DEVICE}, threads {args.threads}, torch {torch.__version__}")
    print(f"T={T} key frames, d_t={CHANNELS} -> {WIDTH}, {HEADS} heads, {RATIO:.0%} queries, "
          f"radii {key_window_radii(T)} ({NUM_KEYS} keys per query)")  # fmt: skip
    print("seconds: best of repeats, CPU time of this process / wall. memory: measured peak growth "
          "of one attention call (analytic size of its attention tensors), GB")  # fmt: skip
    header = ("h x w    | what      | sparse cpu | dense cpu | ratio cpu | sparse wall | dense wall"
              " | ratio wall | GMAC ratio | sparse GB     | dense GB")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    times = {size: time_size(*size, layers, args) for size in SIZES}
    for h, w in SIZES:
        fits = analytic_gb("dense", h, w) <= args.dense_limit_gb
        sparse_gb = peak_memory_gb("sparse", h, w, args.threads)
        dense_gb = peak_memory_gb("dense", h, w, args.threads) if fits else math.nan
        for what in ("attention", "layer"):
            (sparse, sparse_wall), (dense, dense_wall) = (times[h, w][what, m] for m in layers)
            memory = gmac = ""
            if what == "attention":
                gmac = f"{attention_gmac('dense', h, w) / attention_gmac('sparse', h, w):10.0f}"
                memory = (f"{sparse_gb:5.2f} ({analytic_gb('sparse', h, w):5.2f}) | "
                          f"{dense_gb:5.2f} ({analytic_gb('dense', h, w):5.2f})"
                          + ("" if fits else " chunked"))  # fmt: skip
            print(f"{h:3d}x{w:<4d} | {what:9s} | {sparse:10.4f} | {dense:9.4f} | "
                  f"{dense / sparse:9.1f} | {sparse_wall:11.4f} | {dense_wall:10.4f} | "
                  f"{dense_wall / sparse_wall:10.1f} | {gmac:10s} | {memory}")  # fmt: skip
    print("\nScaling of CPU time with h*w (power-law exponent over the measured sizes):")
    for what in ("attention", "layer"):
        points = {
            mode: [(h * w, times[h, w][what, mode][0]) for h, w in SIZES
                   if not math.isnan(times[h, w][what, mode][0])]
            for mode in layers
        }  # fmt: skip
        print(f"  {what:9s}: sparse ~ (hw)^{fit_power_law(points['sparse'])[1]:.2f}, "
              f"dense ~ (hw)^{fit_power_law(points['dense'])[1]:.2f}")  # fmt: skip
        a, b = fit_power_law(points["dense"][-2:])
        for h, w in SIZES:
            sparse, dense = times[h, w][what, "sparse"][0], times[h, w][what, "dense"][0]
            if math.isnan(dense):
                dense = math.exp(a + b * math.log(h * w))
                print(f"  EXTRAPOLATED {h}x{w} {what}: dense ~{dense:.0f} CPU s (not run: "
                      f"{analytic_gb('dense', h, w):.0f} GB of attention) vs sparse {sparse:.2f} "
                      f"CPU s measured -> ~{dense / sparse:.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
