"""`minivseg.youtube_vis_results.score_results` against the official YouTube-VIS evaluation.

The official evaluation is youtubevos/cocoapi (``PythonAPI/pycocotools/ytvos.py`` and
``ytvoseval.py``, COCO's API per video; not part of minivseg). Get it and run::

    git clone https://github.com/youtubevos/cocoapi /tmp/ytvos
    python tests/benchmarks/check_youtube_vis_official.py --cocoapi /tmp/ytvos/PythonAPI --cases 200

Its two files are loaded as modules of a temporary package whose ``mask`` module is PyPI's
``pycocotools.mask`` (the fork's C extension has the same Python API and is not built), and
ytvoseval sees numpy through a shim that restores ``np.float`` and accepts a float count in
``np.linspace``, as the numpy of 2019 did. Each case writes random videos (random sizes, from a
few pixels to large enough for APm/APl, 1-5 frames) with `minivseg.youtube_vis.write_split`:
moving boxes and blobs as tracks of 1-4 categories, absent frames, crowd regions, void. Results
are, in shuffled order: `ResultsWriter` output of a perturbed panoptic prediction (shifted masks,
identity switches, wrong classes); overlapping tubes written directly (eroded, dilated or cut
copies of GT tracks, duplicates, random boxes, empty tubes and empty RLEs); scores with ties.
The official YTVOS/YTVOSeval (evaluate, accumulate, summarize: ``stats[:9]``) and our
`score_results` score the same files; the script prints the largest difference per metric
(the official -1, "no GT", must be our NaN).
"""

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from minivseg.youtube_vis import YouTubeVISSplit, encode_mask, write_split
from minivseg.youtube_vis_results import ResultsWriter, score_results

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")  # stats[:9]


class NumpyOf2019(types.ModuleType):
    """numpy as ytvoseval.py expects it: ``np.float`` and ``np.linspace(a, b, 10.0)``."""

    float = float

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def linspace(start, stop, num=50, **kwargs):
        return np.linspace(start, stop, int(num), **kwargs)


def load_official(cocoapi: Path):
    """``(YTVOS, YTVOSeval)`` of the fork in ``cocoapi`` (its ``pycocotools`` folder)."""
    package = types.ModuleType("ytvos_official")
    package.__path__ = []
    sys.modules["ytvos_official"], sys.modules["ytvos_official.mask"] = package, coco_mask
    modules = {}
    for name in ("ytvos", "ytvoseval"):
        path = cocoapi / "pycocotools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"ytvos_official.{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]
        spec.loader.exec_module(modules[name])
    modules["ytvoseval"].np = NumpyOf2019("numpy")
    return modules["ytvos"].YTVOS, modules["ytvoseval"].YTVOSeval


def random_mask(rng, height, width, length):
    """``(F, H, W)`` bool: a moving box or a blob of random size, absent in some frames."""
    low = (height // 2, width // 2) if rng.random() < 0.5 else (1, 1)  # large or any size
    h, w = rng.integers(low[0], height + 1), rng.integers(low[1], width + 1)
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    step = rng.integers(-3, 4, size=2)
    masks = np.zeros((length, height, width), dtype=bool)
    for t in range(length):
        if rng.random() < 0.2:
            continue
        y, x = np.clip(top + t * step[0], 0, height - h), np.clip(left + t * step[1], 0, width - w)
        masks[t, y : y + h, x : x + w] = True
        if rng.random() < 0.3:  # a blob: keep a random part of the box
            masks[t] &= rng.random((height, width)) < 0.7
    return masks


def random_video(rng, num_categories):
    """``(frames, panoptic)`` with 0-6 tracks or crowd regions painted in order, and void."""
    length = int(rng.integers(1, 6))
    low, high = (130, 420) if rng.random() < 0.3 else (4, 48)  # big ones: APm and APl
    height, width = (int(n) for n in rng.integers(low, high, size=2))
    panoptic = np.full((length, height, width), num_categories * 1000, dtype=np.int64)
    for k in range(int(rng.integers(0, 7))):
        crowd = rng.random() < 0.15
        panoptic[random_mask(rng, height, width, length)] = int(
            rng.integers(num_categories)
        ) * 1000 + (0 if crowd else k + 1)
    panoptic[rng.random(panoptic.shape) < 0.01] = 255000
    return np.zeros((length, height, width, 3), dtype=np.uint8), panoptic


def score(rng):
    return float(np.round(rng.random(), 1) if rng.random() < 0.3 else rng.random())  # ties


def random_results(rng, split):
    """Results of ``split``: a perturbed panoptic prediction and overlapping tubes."""
    writer, tubes = ResultsWriter(split), []
    for sequence, frames in split.sequences.items():
        gt = np.stack([split.read_panoptic(sequence, f) for f in frames])
        pred = gt // 1000 * 65536 + gt % 1000
        if rng.random() < 0.3:  # the whole prediction one pixel off
            pred = np.roll(pred, 1, axis=int(rng.integers(1, 3)))
        tracks = [
            int(v) for v in np.unique(pred) if v % 65536 and v // 65536 < split.num_classes - 1
        ]
        if len(tracks) > 1 and len(frames) > 1 and rng.random() < 0.5:  # identity switch
            half = pred[len(frames) // 2 :]
            a, b = rng.choice(tracks, 2, replace=False)
            is_a, is_b = half == a, half == b
            half[is_a], half[is_b] = b, a
        if tracks and rng.random() < 0.3:  # a wrong class
            pred[pred == tracks[0]] = int(rng.integers(split.num_classes - 1)) * 65536 + 999
        writer.start_video(sequence)
        for frame in pred:
            writer.add_frame(frame)
        ids = {int(v) for v in np.unique(pred) if v % 65536 and v // 65536 < split.num_classes - 1}
        writer.end_video({track: score(rng) for track in ids})
        height, width = split.video_sizes[sequence]
        for value in np.unique(gt[gt % 1000 > 0]).tolist():
            masks = gt == value
            for _ in range(int(rng.integers(0, 3))):  # eroded, dilated or cut copies
                copy = masks.copy()
                if rng.random() < 0.5:
                    copy = np.roll(copy, int(rng.integers(-2, 3)), axis=int(rng.integers(1, 3)))
                copy[rng.random(len(frames)) < 0.2] = False
                tubes.append((sequence, copy, value // 1000, score(rng)))
        for _ in range(int(rng.integers(0, 3))):  # false positives, sometimes empty
            masks = random_mask(rng, height, width, len(frames)) & (rng.random() < 0.9)
            tubes.append((sequence, masks, int(rng.integers(split.num_classes - 1)), score(rng)))
    results = list(writer.results)
    for sequence, masks, class_id, value in tubes:
        empty_rle = rng.random() < 0.5  # an empty frame as null or as an RLE of no pixel
        segmentations = [encode_mask(m) if m.any() or empty_rle else None for m in masks]
        category = split.category_ids[class_id]
        results.append({"video_id": split.video_ids[sequence], "category_id": category,
                        "score": value, "segmentations": segmentations})  # fmt: skip
    if not results:  # loadRes needs one result
        sequence = next(iter(split.sequences))
        results.append({"video_id": split.video_ids[sequence], "category_id": 1, "score": 0.5,
                        "segmentations": [None] * len(split.sequences[sequence])})  # fmt: skip
    return [results[i] for i in rng.permutation(len(results))]


def official_scores(YTVOS, YTVOSeval, gt_path, results_path) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress and the table
        gt = YTVOS(str(gt_path))
        evaluation = YTVOSeval(gt, gt.loadRes(str(results_path)), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return np.asarray(evaluation.stats[:9], dtype=np.float64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cocoapi", type=Path, required=True, help="the fork's PythonAPI folder")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    YTVOS, YTVOSeval = load_official(args.cocoapi)
    differences, undefined_mismatch, defined = np.zeros(9), np.zeros(9, int), np.zeros(9, int)
    worst, total, start = np.zeros(9, int), np.zeros(9), time.time()
    for case in range(args.cases):
        rng = np.random.default_rng((args.seed, case))
        num_categories = int(rng.integers(1, 5))
        videos = []
        while not any((panoptic // 1000 < num_categories).any() for *_, panoptic in videos):
            count = rng.integers(1, 4)  # videos; at least one object in one of them
            videos = [(f"video{v}", *random_video(rng, num_categories)) for v in range(count)]
        with tempfile.TemporaryDirectory() as folder:
            names = {c: f"category{c}" for c in range(num_categories)}
            gt_path = write_split(folder, "train", videos, names)
            split = YouTubeVISSplit(folder, "train")
            results_path = Path(folder) / "results.json"
            results_path.write_text(json.dumps(random_results(rng, split)))
            ours = np.array([score_results(results_path, split)[m] for m in METRICS])
            official = official_scores(YTVOS, YTVOSeval, gt_path, results_path)
        official_nan = official == -1
        undefined_mismatch += official_nan != np.isnan(ours)
        both = ~official_nan & ~np.isnan(ours)
        defined += both
        total += np.where(both, official, 0.0)
        gap = np.where(both, np.abs(ours - official), 0.0)
        worst = np.where(gap > differences, case, worst)
        differences = np.maximum(differences, gap)
    print(f"{args.cases} random cases (seed {args.seed}) in {time.time() - start:.0f} s")
    print("metric  max |ours - official|  worst case  defined  mean  -1/NaN mismatches")
    for k, name in enumerate(METRICS):
        mean = total[k] / max(defined[k], 1)
        print(f"{name:>6s}  {differences[k]:21.3g}  {worst[k]:10d}  {defined[k]:7d}  {mean:.2f}"
              f"  {undefined_mismatch[k]:17d}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
