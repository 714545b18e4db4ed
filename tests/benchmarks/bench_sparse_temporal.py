"""Sparse vs dense temporal attention at STT's Cityscapes setting (§3.2, Tables 3-4).

T = 7 key frames, d_t = 512 reduced to 128, 8 heads, 50% of the queries, key windows s=1, e=5,
eps=1 (527 keys per query), feature maps of h x w from 8 x 16 up to 64 x 128 (a 1024 x 2048 frame
at stride 16, `build_stt("paper")`). Every run uses the same inputs, in the same process.

- "attention": Eq. (6) on projected q, k, v, four ways.
  sparse: `tiled_attention`, the layer's default (selected queries, their key windows);
  gather: `windowed_attention`, the per-query gather it is checked against (same work);
  dense sel.: `dense_attention` of the same selected queries on all T*h*w keys;
  dense all: `dense_attention` of every position on every key (no selection at all).
  all/sel. is what query selection buys (2x at 50%), sel./sparse what key selection buys, and
  all/sparse = their product. The selected queries are a random half of the map, the worst case
  for tiles (every tile holds some); NSM selection clusters them. A dense attention larger than
  --dense-limit-gb runs query chunk by query chunk (same arithmetic, less memory), once, after
  a warm-up on one chunk ("chunked"); its memory is then only the analytic size.
- "layer": the whole `SparseTemporalTransformer` forward (reduction MLP of all T+1 maps, NSM,
  selection, Eq. 6-10, scatter): tiled (sparse), tiled=False (gather), dense=True (dense all).
  The dense layer is not run above the limit; its time there is EXTRAPOLATED from a power law
  through the two largest measured sizes, and marked so.
- Time: best of --repeats, CPU seconds of this process (fair on a shared machine) / wall seconds;
  on an idle machine with one thread the two agree. On CUDA, wall time only. Ratios are of CPU
  times measured in this one run.
- Memory of one attention call: growth of the peak resident set (VmHWM, reset through
  /proc/self/clear_refs) in a fresh process on CPU, torch.cuda.max_memory_allocated on CUDA;
  printed beside the analytic float32 size of the tensors alive at once.

Run (part of `make bench`; about 4 min on one thread, `--size 64x128` alone 2-3 min):

    .venv/bin/python tests/benchmarks/bench_sparse_temporal.py
        [--threads 1] [--repeats 3] [--size HxW] [--dense-limit-gb 4]

Measured on this project's 2-core x86 CPU machine, shared with other jobs (load 2-3.5), with
--threads 1 --repeats 3: CPU seconds (wall times were within about 5% of them); at 64 x 128 both
dense attentions ran in query chunks, once. Memory: measured peak growth (analytic size), GB.

    h x w     sparse   gather   dense,     dense,    sparse        dense (all)
                                selected   all       memory        memory
    8 x 16    0.008 s  0.026 s  0.001 s    0.001 s   0.03 (0.02)   0.01 (0.01)
    16 x 32   0.013 s  0.057 s  0.017 s    0.059 s   0.04 (0.03)   0.12 (0.12)
    32 x 64   0.060 s  0.250 s  0.77 s     1.52 s    0.07 (0.05)   1.89 (1.88)
    64 x 128  0.24 s   1.03 s   14.8 s     27.7 s    0.27 (0.12)   not run (30 analytic)

    h x w     all /    selected / sparse   all / selected      gather /   multiply-adds
              sparse   (key selection)     (query selection)   sparse     all / sparse
    8 x 16    0.2x     0.1x                1.7x                3.1x       3x
    16 x 32   4.5x     1.3x                3.6x                4.4x       14x
    32 x 64   25x      13x                 2.0x                4.2x       54x
    64 x 128  114x     61x                 1.9x                4.2x       218x

- At the paper's size (64 x 128) the sparse attention is 101-114x faster than dense attention
  over all queries and keys (CPU time, two runs; the wall-time ratios agree to within 1%). Query
  selection gives 1.9-2.2x, as expected for 50% of the queries; key selection gives the other
  46-61x. The tiled form is 4.0-4.2x faster than the gather: both do the same attention, but the
  gather of 527 keys and values per query is memory-bound, while the tiled form runs matrix
  products over each tile's union of windows (1.8x more multiply-adds than needed, and 2x more
  again when half of a tile's queries are selected).
- On small maps dense attention is a few small matrix products and wins; the sparse form pays a
  fixed cost for building indices and masks.
- Whole layer (reduction MLP of all 8 maps, NSM, selection, Eq. 6-10): 0.59-0.62 s sparse at
  64 x 128 (1.4-1.5 s with the gather). The dense layer there was not run (30 GB);
  extrapolating the 16 x 32 and 32 x 64 dense layer times gives 22-39 s over two runs, so
  35-47x. The attention is less than half of the sparse layer; the rest is the reduction of 8
  maps of 512 channels and the NSM. `STTSegmenter.semantic_frames` reduces one map per frame,
  not 8.
- Fitted scaling of CPU time with h*w: sparse attention ~ (hw)^0.84-0.92, dense ~
  (hw)^2.36-2.42 (expected: 1 and 2).
- Memory: 0.27 GB against 30 GB. The measured sparse figure is above the analytic one because
  it also counts index tensors and allocator slack.
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
    tiled_attention,
    windowed_attention,
)

T, CHANNELS, WIDTH, HEADS, RATIO, CHUNK, GROUP = 7, 512, 128, 8, 0.5, 64, 8
SIZES = [(8, 16), (16, 32), (32, 64), (64, 128)]
MODES = ("sparse", "gather", "dense_selected", "dense")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RADII = key_window_radii(T)
NUM_KEYS = sum((2 * r + 1) ** 2 for r in RADII)  # 527 per query
UNION_KEYS = sum((4 + 2 * r) ** 2 for r in RADII)  # 932 per 4 x 4 tile


def parse_size(text: str) -> tuple[int, int]:
    """ "64x128" -> (64, 128)."""
    h, w = text.lower().split("x")
    return int(h), int(w)


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
        return tiled_attention(q, k, v, selected, h, w, RADII, HEADS, group_size=GROUP)
    if mode == "gather":
        index, inside = key_window_index(selected, h, w, RADII)
        return windowed_attention(q, k, v, index, inside, HEADS, chunk_size=CHUNK)
    queries = q if mode == "dense_selected" else q_all
    chunk = dense_chunk or queries.shape[1]
    parts = [queries[:, i : i + chunk] for i in range(0, queries.shape[1], chunk)]
    return torch.cat([dense_attention(part, k, v, HEADS) for part in parts], dim=1)


def num_queries(mode: str, h: int, w: int) -> int:
    return h * w if mode == "dense" else round(RATIO * h * w)


def analytic_gb(mode: str, h: int, w: int) -> float:
    """Float32 size of the tensors alive at once. Dense: logits and probabilities (h, N, T*h*w).
    Gather: gathered k, v (N_c, n_k, C), a product of the same size and logits and probabilities
    (N_c, n_k, h) for a chunk of N_c queries. Sparse: k, v padded (2 T h w C, about), the additive
    mask of the tiles (n_t, 16, M) and, per group of g tiles, k, v (g, M, C) and logits and
    probabilities (g, h, 16, M), M = 932 union keys."""
    if mode.startswith("dense"):
        return 2 * HEADS * num_queries(mode, h, w) * (T * h * w) * 4 / 1e9
    if mode == "gather":
        return min(num_queries(mode, h, w), CHUNK) * NUM_KEYS * (3 * WIDTH + 2 * HEADS) * 4 / 1e9
    tiles = math.ceil(h / 4) * math.ceil(w / 4)
    padded = 2 * T * (4 * math.ceil(h / 4) + 10) * (4 * math.ceil(w / 4) + 10) * WIDTH
    group = min(GROUP, tiles) * UNION_KEYS * (2 * WIDTH + 2 * HEADS * 16)
    return (padded + tiles * 16 * UNION_KEYS + group) * 4 / 1e9


def attention_gmac(mode: str, h: int, w: int) -> float:
    """Multiply-adds of q.k and attention.v: 2 * queries * keys * C (the tiled form does more:
    16 slots x 932 union keys per tile)."""
    keys = NUM_KEYS if mode in ("sparse", "gather") else T * h * w
    return 2 * num_queries(mode, h, w) * keys * WIDTH / 1e9


def seconds(fn, repeats: int, warmup=None) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds), each the best of `repeats`, after a warm-up
    run of `warmup` (default: `fn`)."""
    (warmup or fn)()
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


def cell(seconds: tuple[float, float]) -> str:
    """(cpu, wall) -> "cpu/wall", or "-" where not run."""
    return "-" if math.isnan(seconds[0]) else f"{seconds[0]:7.3f}/{seconds[1]:<7.3f}"


def ratio(slow: tuple[float, float], fast: tuple[float, float], index: int = 0) -> str:
    """slow / fast of the CPU (index 0) or wall (1) seconds, or "-" where one was not run."""
    value = slow[index] / fast[index]
    return "-" if math.isnan(value) else f"{value:.1f}"


def fit_power_law(points):
    """Least-squares fit of log(time) = a + b log(h*w) to [(h*w, time)]; returns (a, b)."""
    xs, ys = [math.log(p) for p, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def time_size(h: int, w: int, layers: dict, args) -> dict:
    """{(what, mode): (cpu s, wall s)} at one map size; NaN where a dense layer is not run."""
    inputs = attention_inputs(h, w)
    query = torch.randn(1, CHANNELS, h, w, device=DEVICE)
    keys = torch.randn(1, T, CHANNELS, h, w, device=DEVICE)
    times = {}
    with torch.no_grad():
        for mode in MODES:
            fits = analytic_gb(mode, h, w) <= args.dense_limit_gb
            chunk = None if fits else round(num_queries(mode, h, w) * args.dense_limit_gb
                                            / analytic_gb(mode, h, w))  # fmt: skip
            attention = functools.partial(run_attention, mode, h, w, inputs, chunk)
            # a chunked run warms up on its first chunk (the first touch of its memory is slow)
            first = functools.partial(
                run_attention, mode, h, w, [x[:, :chunk] for x in inputs[:2]] + inputs[2:], chunk
            )
            times["attention", mode] = seconds(attention, args.repeats if fits else 1,
                                               None if fits else first)  # fmt: skip
            if mode in layers and (fits or not mode.startswith("dense")):
                times["layer", mode] = seconds(functools.partial(layers[mode], query, keys),
                                               args.repeats)  # fmt: skip
            else:
                times["layer", mode] = (math.nan,) * 2
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit-gb", type=float, default=4.0)
    parser.add_argument("--size", type=parse_size, action="append", metavar="HxW",
                        help="feature map size, e.g. 64x128 (repeatable; default all)")  # fmt: skip
    parser.add_argument("--memory-probe", nargs=3, metavar=("MODE", "H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        mode, h, w = args.memory_probe
        return memory_probe(mode, int(h), int(w))
    sizes = args.size or SIZES
    torch.manual_seed(0)
    options = {"sparse": {}, "gather": {"tiled": False}, "dense": {"dense": True}}
    layers = {
        mode: SparseTemporalTransformer(CHANNELS, T, HEADS, **kw).to(DEVICE).eval()
        for mode, kw in options.items()
    }
    for mode in ("gather", "dense"):
        layers[mode].load_state_dict(layers["sparse"].state_dict())
    print(f"device {DEVICE}, threads {args.threads}, torch {torch.__version__}")
    print(f"T={T} key frames, d_t={CHANNELS} -> {WIDTH}, {HEADS} heads, {RATIO:.0%} queries, "
          f"radii {RADII} ({NUM_KEYS} keys per query, {UNION_KEYS} per 4x4 tile)")  # fmt: skip
    print("seconds: best of repeats, CPU time of this process / wall; ratios of CPU times. "
          "memory: measured peak growth of one attention call (analytic size), GB")  # fmt: skip
    header = ("h x w   | what      | sparse          | gather          | dense sel.      "
              "| dense all       | all/sparse (wall) | sel./sparse | all/sel. | gather/sparse "
              "| MACs all/sparse | sparse GB     | dense all GB")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    times = {size: time_size(*size, layers, args) for size in sizes}
    for h, w in sizes:
        fits = analytic_gb("dense", h, w) <= args.dense_limit_gb
        sparse_gb = peak_memory_gb("sparse", h, w, args.threads)
        dense_gb = peak_memory_gb("dense", h, w, args.threads) if fits else math.nan
        for what in ("attention", "layer"):
            t = {mode: times[h, w][what, mode] for mode in MODES}
            gmac = memory = ""
            if what == "attention":
                gmac = f"{attention_gmac('dense', h, w) / attention_gmac('sparse', h, w):.0f}"
                memory = (f"{sparse_gb:5.2f} ({analytic_gb('sparse', h, w):5.2f}) | "
                          f"{dense_gb:5.2f} ({analytic_gb('dense', h, w):5.2f})"
                          + ("" if fits else " chunked"))  # fmt: skip
            total = f"{ratio(t['dense'], t['sparse'])} ({ratio(t['dense'], t['sparse'], 1)})"
            print(f"{h:3d}x{w:<4d}| {what:9s} | {cell(t['sparse']):15s} | {cell(t['gather']):15s} "
                  f"| {cell(t['dense_selected']):15s} | {cell(t['dense']):15s} | {total:17s} | "
                  f"{ratio(t['dense_selected'], t['sparse']):11s} | "
                  f"{ratio(t['dense'], t['dense_selected']):8s} | "
                  f"{ratio(t['gather'], t['sparse']):13s} | {gmac:15s} | {memory}")  # fmt: skip
    if len(sizes) < 2:
        return
    print("\nScaling of CPU time with h*w (power-law exponent over the measured sizes):")
    for what in ("attention", "layer"):
        points = {
            mode: [(h * w, times[h, w][what, mode][0]) for h, w in sizes
                   if not math.isnan(times[h, w][what, mode][0])]
            for mode in ("sparse", "dense")
        }  # fmt: skip
        print(f"  {what:9s}: sparse ~ (hw)^{fit_power_law(points['sparse'])[1]:.2f}, "
              f"dense all ~ (hw)^{fit_power_law(points['dense'])[1]:.2f}")  # fmt: skip
        if len(points["dense"]) < 2:
            continue
        a, b = fit_power_law(points["dense"][-2:])
        for h, w in sizes:
            sparse, dense = times[h, w][what, "sparse"][0], times[h, w][what, "dense"][0]
            if math.isnan(dense):
                dense = math.exp(a + b * math.log(h * w))
                print(f"  EXTRAPOLATED {h}x{w} {what}: dense all ~{dense:.0f} CPU s (not run: "
                      f"{analytic_gb('dense', h, w):.0f} GB of attention) vs sparse {sparse:.2f} "
                      f"CPU s measured -> ~{dense / sparse:.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
