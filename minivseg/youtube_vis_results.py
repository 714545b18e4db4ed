"""YouTube-VIS results: the ``results.json`` a benchmark server scores, written and scored here.

`ResultsWriter` builds the results list while predictions stream out of
`minivseg.tasks.predict_frames` (one entry per predicted track: ``video_id``, ``category_id``,
``score`` and a compressed RLE per frame, null where the track is absent; only RLEs are kept in
memory). `score_results` scores a results list or file against a labelled split
(`minivseg.youtube_vis.YouTubeVISSplit`) with `minivseg.video_ap.VideoAP`, which equals the
official ``ytvoseval.py`` to 3.3e-16 on 1000 random datasets
(``tests/benchmarks/check_youtube_vis_official.py``; the differences are listed in
`minivseg.youtube_vis`). ``python -m minivseg.youtube_vis_results RESULTS --data ROOT --split
train`` prints the scores (the servers keep valid's and test's labels: zip ``results.json``
without folders and upload it there).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from minivseg.panoptic import LABEL_DIVISOR, VIDEO_LABEL_DIVISOR, relabel
from minivseg.splits import DatasetError
from minivseg.video_ap import YTVIS_AREA_LIMITS, VideoAP
from minivseg.youtube_vis import (
    YouTubeVISSplit,
    decode,
    encode_mask,
    fields,
    load_json,
    to_rle,
    write_json,
)

RESULT_KEYS = ("video_id", "category_id", "score", "segmentations")


class ResultsWriter:
    """The results list of a split, built from streamed predictions (only RLEs are kept):
    ``start_video(sequence)``; ``add_frame(panoptic)`` per frame (``(H, W)`` stitched ids ``class
    * 65536 + track``; thing classes with track > 0 are tracks); ``end_video(scores)`` with
    ``{track id: score}`` for every track seen; ``results``; ``write(path)``."""

    def __init__(self, split: YouTubeVISSplit):
        self.split, self.results, self._sequence = split, [], None

    def start_video(self, sequence: str) -> None:
        self._sequence, self._length, self._tracks = sequence, 0, {}  # track -> RLE per frame

    def add_frame(self, panoptic: np.ndarray) -> None:
        panoptic = np.asarray(panoptic, dtype=np.int64)
        size = self.split.video_sizes[self._sequence]
        if panoptic.shape != tuple(size):
            raise ValueError(f"{self._sequence}: frame {self._length} has shape"
                             f" {panoptic.shape}, the video {size}")  # fmt: skip
        ids = np.unique(panoptic)
        things = np.isin(ids // VIDEO_LABEL_DIVISOR, self.split.thing_classes)
        for track in ids[things & (ids % VIDEO_LABEL_DIVISOR > 0)].tolist():
            segmentations = self._tracks.setdefault(track, [None] * self._length)
            segmentations.append(encode_mask(panoptic == track))
        self._length += 1
        for segmentations in self._tracks.values():  # absent in this frame: null
            segmentations.extend([None] * (self._length - len(segmentations)))

    def end_video(self, scores: dict) -> None:
        length = len(self.split.sequences[self._sequence])
        scores = {int(track): float(score) for track, score in scores.items()}
        missing = sorted(set(self._tracks) - set(scores))
        if self._length != length or missing:
            raise ValueError(f"{self._sequence}: {self._length} of {length} frames added; tracks"
                             f" without a score: {missing}")  # fmt: skip
        for track, segmentations in sorted(self._tracks.items()):
            category = self.split.category_ids[track // VIDEO_LABEL_DIVISOR]
            self.results.append({"video_id": self.split.video_ids[self._sequence],
                                 "category_id": category, "score": scores[track],
                                 "segmentations": segmentations})  # fmt: skip
        self._sequence = None

    def write(self, path) -> Path:
        return write_json(path, self.results)


def score_results(results, split: YouTubeVISSplit) -> dict:
    """`VideoAP` of a results list (or a ``results.json`` path) against a labelled split: AP,
    AP50, AP75, APs, APm, APl, AR1, AR10, AR100 (YouTube-VIS's area ranges; NaN where no GT).
    A video without results has its GT missed; errors name the results file and entry."""
    source = "results"
    if isinstance(results, str | os.PathLike):
        source, results = str(results), load_json(results)
    if not split.labels:
        raise DatasetError(f"{split.json_path}: split {split.split!r} has no labels to score")
    if not isinstance(results, list):
        raise DatasetError(f"{source}: expected a JSON list of results")
    sequence_of = {video_id: sequence for sequence, video_id in split.video_ids.items()}
    class_of = {category: c for c, category in enumerate(split.category_ids)}
    tracks = {video_id: [] for video_id in sequence_of}
    for k, result in enumerate(results):
        where = f"{source}: results[{k}]"
        video_id, category, score, segmentations = fields(result, RESULT_KEYS, where)
        if video_id not in sequence_of or category not in class_of:
            raise DatasetError(f"{where}: video_id {video_id} or category_id {category} is not"
                               f" in {split.json_path}")  # fmt: skip
        length = len(split.sequences[sequence_of[video_id]])
        if not isinstance(segmentations, list) or len(segmentations) != length:
            raise DatasetError(f"{where}: segmentations must be a list of {length} entries")
        tracks[video_id].append((segmentations, class_of[category], float(score), where))
    metric = VideoAP(split.num_classes, split.thing_classes, VIDEO_LABEL_DIVISOR,
                     area_limits=YTVIS_AREA_LIMITS)  # fmt: skip
    for video_id in sorted(sequence_of):  # ytvoseval's video order: equal scores keep it
        sequence = sequence_of[video_id]
        frames, (height, width) = split.sequences[sequence], split.video_sizes[sequence]
        gt = [relabel(split.read_panoptic(sequence, f), LABEL_DIVISOR, VIDEO_LABEL_DIVISOR)
              for f in frames]  # fmt: skip
        tubes = []
        for segmentations, class_id, score, where in tracks[video_id]:
            masks = np.zeros((len(frames), height, width), dtype=bool)  # (F, H, W)
            for t, segmentation in enumerate(segmentations):
                counts = to_rle(segmentation, height, width, f"{where} frame {t}")
                if counts is not None:
                    masks[t] = decode([counts], height, width, f"{where} frame {t}")[..., 0]
            tubes.append((masks, class_id, score))
        metric.update(np.stack(gt), tubes)
    return metric.result()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Score a YouTube-VIS results.json.")
    parser.add_argument("results", help="results.json (a list of per-track results)")
    parser.add_argument("--data", required=True, metavar="ROOT", help="the dataset root")
    parser.add_argument("--split", required=True, help="a split with annotations, e.g. train")
    args = parser.parse_args(argv)
    try:
        scores = score_results(args.results, YouTubeVISSplit(args.data, args.split, labels=True))
    except (DatasetError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    print("\n".join(f"{name:>6s} {100 * value:6.2f}" for name, value in scores.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
