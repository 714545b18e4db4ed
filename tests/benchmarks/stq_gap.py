"""Where a checkpoint's STQ goes: the same predictions scored three ways, on one split.

    python tests/benchmarks/stq_gap.py --checkpoint runs/demo/last.pt \
        --data data/synthetic_heldout [--split val] [--fill-void]

One inference pass per sequence (`minivseg.tasks.predict_frames`, the evaluation's own
post-processing), then STQ (Weber et al. 2021, Eq. 5: STQ = sqrt(AQ x SQ)) three ways:

- **video**: as `minivseg.evaluate` scores it (tracks must last over the whole sequence);
- **oracle association**: every predicted thing segment (class, instance > 0) of every frame
  takes the id of the ground-truth track of its class that it overlaps most in that frame (a
  fresh id if it overlaps none). Masks and classes are unchanged, so this is what the same
  per-frame predictions would score with perfect linking across frames and clips: the gap to
  "video" is what association costs, the gap to 1 is the masks' own quality;
- **per frame**: every frame its own sequence, so nothing has to be linked at all (AQ then
  measures only how well each frame's instances are segmented and separated).

SQ is the same in all three (it ignores ids). ``--fill-void`` scores the predictions with void
pixels given their unthresholded class, as ``evaluate --fill-void``. Prints one line per way and
returns {way: STQ result}. Not part of ``make bench``: it needs a trained checkpoint
(tests/test_evaluate.py runs it on a two-step one).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minivseg.formats import open_split  # noqa: E402
from minivseg.panoptic import LABEL_DIVISOR, VIDEO_LABEL_DIVISOR, relabel  # noqa: E402
from minivseg.splits import frame_tensor  # noqa: E402
from minivseg.stq import STQ  # noqa: E402
from minivseg.tasks import load_model, predict_frames, task_classes  # noqa: E402


def oracle_ids(prediction: np.ndarray, truth: np.ndarray, thing_classes, fresh: list) -> np.ndarray:
    """(H, W) video ids -> the same segments with ground-truth track ids (see the module doc).

    ``fresh``: a one-element list holding the next unused instance id, shared over a sequence.
    """
    out = prediction.copy()
    for segment in np.unique(prediction):
        semantic, instance = divmod(int(segment), VIDEO_LABEL_DIVISOR)
        if semantic not in thing_classes or instance == 0:  # stuff, crowd, void: unchanged
            continue
        pixels = prediction == segment
        ids, counts = np.unique(truth[pixels], return_counts=True)
        tracks = (ids // VIDEO_LABEL_DIVISOR == semantic) & (ids % VIDEO_LABEL_DIVISOR > 0)
        if tracks.any():
            out[pixels] = ids[tracks][np.argmax(counts[tracks])]
        else:
            out[pixels] = semantic * VIDEO_LABEL_DIVISOR + fresh[0]
            fresh[0] += 1
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--fill-void", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.checkpoint)
    num_classes, thing_classes = task_classes(model)
    split = open_split(args.data, args.split, decode=False)
    meters = {way: STQ(num_classes, thing_classes, VIDEO_LABEL_DIVISOR)
              for way in ("video", "oracle association", "per frame")}  # fmt: skip
    for sequence, names in split.sequences.items():
        frames = (frame_tensor(split.image_path(sequence, name)) for name in names)
        fresh = [VIDEO_LABEL_DIVISOR // 2]  # above every ground-truth track id
        with torch.no_grad():
            results = predict_frames(model, cfg, frames, len(names), fill_void=args.fill_void)
            for t, result in enumerate(results):
                truth = relabel(split.read_panoptic(sequence, names[t]), LABEL_DIVISOR,
                                VIDEO_LABEL_DIVISOR)  # fmt: skip
                prediction = result["panoptic"]
                oracle = oracle_ids(prediction, truth, thing_classes, fresh)
                meters["video"].update(truth, prediction, sequence_id=sequence)
                meters["oracle association"].update(truth, oracle, sequence_id=sequence)
                meters["per frame"].update(truth, prediction, sequence_id=f"{sequence}/{t}")
    print(f"{args.checkpoint} on {args.data} ({args.split}, {len(split.sequences)} sequences"
          f"{', void filled' if args.fill_void else ''}):")  # fmt: skip
    results = {way: meter.result() for way, meter in meters.items()}
    for way, result in results.items():
        print(f"  {way:<20} STQ {result['STQ']:.4f}  AQ {result['AQ']:.4f}  SQ {result['SQ']:.4f}")
    return results


if __name__ == "__main__":
    main()
