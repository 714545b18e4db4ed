"""Video evaluation: sliding windows, stitching, metrics, exported predictions and overlays,
streamed frame by frame."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minivseg import evaluate as E
from minivseg import tasks
from minivseg import train as train_module
from minivseg.config import demo
from minivseg.panoptic import VIDEO_LABEL_DIVISOR, read_kitti_step_png
from minivseg.stitching import clip_starts, sliding_clips

VOID = 255 * VIDEO_LABEL_DIVISOR

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    small = dict(max_steps=2, batch_size=1, num_workers=0, crop_size=(65, 97), checkpoint_every=2)
    cfg = dataclasses.replace(demo(), data=str(SAMPLES), out_dir=str(out), device="cpu", **small)
    train_module.main(cfg)
    return out / "last.pt"


def test_windows_and_padding():
    assert clip_starts(4, 2) == [0, 1, 2] and clip_starts(1, 3) == [0]
    assert clip_starts(7, 3, stride=2) == [0, 2, 4] and clip_starts(6, 3, stride=2) == [0, 2, 4]
    frames = [torch.full((1,), float(t)) for t in range(2)]
    ((starts, clips, valid),) = sliding_clips(frames, 2, 3)  # shorter than T: last frame repeated
    assert starts == [0] and clips.flatten().tolist() == [0, 1, 1] and valid == [2]
    assert [tasks.padded_size(n) for n in (128, 129, 375, 1242, 416)] == [129, 129, 385, 1249, 417]


def test_evaluate_writes_metrics_predictions_and_overlays(checkpoint, tmp_path):
    metrics = E.main(["--checkpoint", str(checkpoint), "--data", str(SAMPLES), "--split", "val",
                      "--out", str(tmp_path)])  # fmt: skip
    stored = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("STQ", "AQ", "SQ", "VPQ", "mIoU"):
        assert key in stored and 0.0 <= stored[key] <= (100.0 if key.startswith("VPQ") else 1.0)
    assert stored == pytest.approx({k: None if np.isnan(v) else v for k, v in metrics.items()})
    sequence = next((SAMPLES / "images" / "val").iterdir()).name
    frames = sorted((SAMPLES / "images" / "val" / sequence).glob("*.png"))
    predicted = tmp_path / "panoptic_maps" / "val" / sequence
    assert sorted(p.name for p in predicted.glob("*.png")) == [p.name for p in frames]
    pan = read_kitti_step_png(predicted / frames[0].name, VIDEO_LABEL_DIVISOR)
    assert (
        pan.shape
        == read_kitti_step_png(SAMPLES / "panoptic_maps" / "val" / sequence / frames[0].name).shape
    )
    assert (tmp_path / "overlays" / f"{sequence}.gif").stat().st_size > 0
    with Image.open(tmp_path / "overlays" / f"{sequence}.gif") as gif:  # GT above prediction
        height, width = pan.shape
        assert gif.size == (width, 2 * height + 4)


def test_predictions_have_consistent_ids_over_the_video(checkpoint):
    model, cfg = tasks.load_model(checkpoint)
    frames = torch.rand(5, 3, 40, 60) * 255
    panoptic, semantic = tasks.predict_video(model, cfg, frames)
    assert panoptic.shape == (5, 40, 60) and semantic.shape == (5, 40, 60)
    kept = panoptic != VOID
    assert np.array_equal(panoptic[kept] // VIDEO_LABEL_DIVISOR, semantic[kept])
    short, _ = tasks.predict_video(model, cfg, frames[:1])  # shorter than T
    assert short.shape == (1, 40, 60)


def test_frames_folder_without_labels(checkpoint, tmp_path):
    folder = tmp_path / "my_video"
    folder.mkdir()
    sequence = next((SAMPLES / "images" / "val").iterdir())
    for path in sorted(sequence.glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    E.main(["--checkpoint", str(checkpoint), "--frames", str(folder), "--out", str(tmp_path / "o")])
    assert len(list((tmp_path / "o" / "panoptic_maps" / "frames" / "my_video").glob("*.png"))) == 3
    with Image.open(tmp_path / "o" / "overlays" / "my_video.gif") as gif:  # no labels: prediction
        assert gif.size == Image.open(sorted(folder.glob("*.png"))[0]).size


def test_clear_errors(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="no such checkpoint"):
        E.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(SAMPLES)])
    with pytest.raises(SystemExit, match="not a dataset root: expected images/"):
        E.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--split", "val"])
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit, match="split 'val' not found"):
        E.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--split", "val"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .png or .jpg"):
        E.main(["--checkpoint", str(checkpoint), "--frames", str(tmp_path / "empty")])


def test_fill_void_and_thresholds(checkpoint):
    model, cfg = tasks.load_model(checkpoint)
    frames = torch.rand(3, 3, 33, 49) * 255
    kept, semantic = tasks.predict_video(model, cfg, frames)  # deeplab2's output by default
    filled, _ = tasks.predict_video(model, cfg, frames, fill_void=True)
    assert (filled != VOID).all()  # every pixel gets a class
    void = kept == VOID
    assert void.any()  # an untrained model is unsure almost everywhere
    np.testing.assert_array_equal(filled[void], semantic[void] * VIDEO_LABEL_DIVISOR)
    np.testing.assert_array_equal(filled[~void], kept[~void])
    strict = {"class_threshold": 1.0, "pixel_threshold": 1.0}
    nothing, _ = tasks.predict_video(model, cfg, frames, thresholds=strict)
    assert (nothing == VOID).all()  # no slot passes a class confidence of 1.0


def test_evaluation_takes_classes_from_the_model(tmp_path, monkeypatch):
    """Inference, stitching, video AP and the metrics use the checkpoint's class set."""
    from minivseg import metrics, stitching

    cfg = dataclasses.replace(
        demo(), data=str(SAMPLES), out_dir=str(tmp_path), device="cpu", max_steps=1,
        batch_size=1, num_workers=0, crop_size=(65, 97),
        model_overrides={"num_classes": "14", "thing_classes": "11,13,12"},
    )  # fmt: skip
    model = train_module.main(cfg)["model"]
    seen = {}
    for name, cls in (("STQ", metrics.STQ), ("VPQ", metrics.VPQ)):
        real_init = cls.__init__

        def spy(self, num_classes, thing_classes, *args, _name=name, _init=real_init, **kw):
            seen[_name] = (num_classes, tuple(thing_classes))
            _init(self, num_classes, thing_classes, *args, **kw)

        monkeypatch.setattr(cls, "__init__", spy)
    real_stitcher = stitching.VideoStitcher.__init__

    def stitcher_spy(self, clip_length, stride=1, thing_classes=None, *args, **kw):
        seen["stitch"] = tuple(thing_classes)
        real_stitcher(self, clip_length, stride, thing_classes, *args, **kw)

    monkeypatch.setattr(stitching.VideoStitcher, "__init__", stitcher_spy)
    result = E.evaluate_model(model, cfg, SAMPLES, "val", max_sequences=1, gifs=False)
    assert seen == {"STQ": (14, (11, 13, 12)), "VPQ": (14, (11, 13, 12)), "stitch": (11, 13, 12)}
    assert 0 <= result["STQ"] <= 1 and 0 <= result["mIoU"] <= 1


def test_evaluation_streams_reads_each_frame_once_and_runs_the_model_once_per_window(
    checkpoint, tmp_path, monkeypatch
):
    """Frames are read as the windows need them and scored and written as soon as they are
    final: when the last frame is read, the first predictions are already on disk."""
    from minivseg.metrics import STQ
    from minivseg.synthetic import write_dataset

    write_dataset(tmp_path / "data", 0, 1, 24, seed=3, height=33, width=49)
    model, cfg = tasks.load_model(checkpoint)
    events, real_read, real_update = [], E.frame_tensor, STQ.update
    monkeypatch.setattr(E, "frame_tensor", lambda p, d="cpu": events.append(("read", p.stem))
                        or real_read(p, d))  # fmt: skip
    monkeypatch.setattr(STQ, "update", lambda self, *a, **k: events.append(("score", None))
                        or real_update(self, *a, **k))  # fmt: skip
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    out = tmp_path / "out"
    E.evaluate_model(model, cfg, tmp_path / "data", "val", out_dir=out, gifs=False)
    reads = [name for kind, name in events if kind == "read"]
    assert len(reads) == len(set(reads)) == 24  # each image decoded once
    assert len(calls) == 24 - cfg.clip_length + 1  # one model pass per stride-1 window
    first_score = [kind for kind, _ in events].index("score")
    assert first_score == cfg.clip_length  # the first window's T frames, no more
    assert len(list(out.rglob("*.png"))) == 24


def test_memory_does_not_grow_with_the_sequence(checkpoint, tmp_path):
    """Peak of the numpy memory traced while evaluating a 10- and a 60-frame sequence. (The
    metrics' id tables are allocated lazily: traced in full, touched only where ids occur.)"""
    import tracemalloc

    from minivseg.synthetic import write_dataset

    model, cfg = tasks.load_model(checkpoint)
    roots = {}
    for frames in (10, 60):
        roots[frames] = tmp_path / f"data{frames}"
        write_dataset(roots[frames], 0, 1, frames, seed=1, height=65, width=97)
    E.evaluate_model(model, cfg, roots[10], "val", gifs=False)  # warm-up: lazy first-use caches
    peaks = []
    for frames, root in roots.items():
        tracemalloc.start()
        E.evaluate_model(model, cfg, root, "val", out_dir=tmp_path / f"out{frames}", gifs=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 50 more frames: holding one int64 map per frame would add 2.5 MB (the old evaluation: 9 MB)
    assert peaks[1] - peaks[0] < 1e6, peaks


def test_frames_says_what_it_does_before_the_first_frame(checkpoint, tmp_path, capsys):
    folder = tmp_path / "clip"
    folder.mkdir()
    for path in sorted(next((SAMPLES / "images" / "val").iterdir()).glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    model, cfg = tasks.load_model(checkpoint)
    said = []
    model.register_forward_pre_hook(lambda *_: said.append(capsys.readouterr().out))
    E.predict_folder(model, cfg, folder, tmp_path / "o", "cpu")
    assert said and "predicting 3 frames of" in said[0]


def test_a_checkpoint_with_config_fields_this_version_lacks_still_loads(
    checkpoint, tmp_path, capsys
):
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stored["config"]["a_field_from_another_version"] = 3
    torch.save(stored, tmp_path / "other.pt")
    model, cfg = tasks.load_model(tmp_path / "other.pt")
    assert cfg.task == "tubeformer" and "a_field_from_another_version" in capsys.readouterr().out


class ThreeSlots(torch.nn.Module):
    """Stand-in TubeFormer: a car (confidence 0.9), a person (0.8) and road, in three columns."""

    def __init__(self):
        super().__init__()
        from minivseg.panoptic import thing_stuff_class_ids

        self.thing_stuff_class_ids = thing_stuff_class_ids()
        self.cfg = type("Config", (), {"thing_classes": (11, 13), "num_classes": 19})()
        probs = torch.full((3, 20), 0.01)
        for slot, (channel, confidence) in enumerate([(1, 0.9), (0, 0.8), (2, 0.95)]):
            probs[slot, channel] = confidence
            probs[slot] *= torch.where(torch.arange(20) == channel, 1.0, (1 - confidence) / 0.19)
        self.class_logits = probs.log()

    def forward(self, frames):
        B, T = frames.shape[:2]
        masks = torch.full((B, 3, T, 4, 9), -10.0)
        for slot in range(3):
            masks[:, slot, :, :, 3 * slot : 3 * slot + 3] = 10.0
        return {"class_logits": self.class_logits.expand(B, 3, 20), "mask_logits": masks}


def test_a_tracks_score_is_its_slots_class_confidence_in_both_modes():
    cfg = dataclasses.replace(demo(), clip_length=2)
    scores = {}
    frames = iter(torch.zeros(3, 3, 17, 33))
    out = list(tasks.predict_frames(ThreeSlots(), cfg, frames, 3, masks=True, scores=scores))
    car, person = 13 * VIDEO_LABEL_DIVISOR + 1, 11 * VIDEO_LABEL_DIVISOR + 1
    assert {car, person} <= set(np.unique(out[0]["panoptic"])) and len(out) == 3
    for mode in ("pixel", "mask"):
        assert scores[mode] == {car: pytest.approx(0.9), person: pytest.approx(0.8)}


def test_frames_with_fill_void_leaves_no_void_pixel(checkpoint, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for path in sorted(next((SAMPLES / "images" / "val").iterdir()).glob("*.png"))[:2]:
        shutil.copy(path, folder / path.name)
    E.main(["--checkpoint", str(checkpoint), "--frames", str(folder), "--out", str(tmp_path / "o"),
            "--fill-void"])  # fmt: skip
    for png in (tmp_path / "o" / "panoptic_maps" / "frames" / "clip").glob("*.png"):
        assert (read_kitti_step_png(png, VIDEO_LABEL_DIVISOR) // VIDEO_LABEL_DIVISOR != 255).all()


def test_frames_of_mixed_sizes_and_a_split_without_labels_are_explained(
    checkpoint, tmp_path, capsys
):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, size in (("0.png", (40, 30)), ("1.png", (40, 30)), ("2.png", (41, 30))):
        Image.new("RGB", size).save(folder / name)
    with pytest.raises(SystemExit, match=r"0\.png is 40x30, .*2\.png is 41x30"):
        E.main(["--checkpoint", str(checkpoint), "--frames", str(folder)])
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(SAMPLES / "images" / "val", unlabelled / "images" / "val")
    E.main(
        ["--checkpoint", str(checkpoint), "--data", str(unlabelled), "--out", str(tmp_path / "o")]
    )
    assert "no labels to score" in capsys.readouterr().out
    assert not (tmp_path / "o" / "metrics.json").exists()
    assert list((tmp_path / "o" / "panoptic_maps").rglob("*.png"))


def test_dvps_model_trains_with_depth_and_evaluation_scores_and_writes_depth(tmp_path):
    """dvps_demo: the depth loss enters training (both clips of temporal consistency), and
    evaluation adds DSTQ and the depth errors, depth PNGs and the depth picture in the GIF."""
    from minivseg.config import dvps_demo
    from minivseg.panoptic import read_depth_png

    small = dict(max_steps=2, batch_size=1, num_workers=0, crop_size=(65, 97), checkpoint_every=2,
                 temporal_consistency=1.0)  # fmt: skip
    cfg = dataclasses.replace(dvps_demo(), data=str(SAMPLES), out_dir=str(tmp_path / "run"),
                              device="cpu", **small)  # fmt: skip
    result = train_module.main(cfg)
    assert result["a_depth"] > 0 and result["b_depth"] > 0 and result["step"] == 2
    metrics = E.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--data", str(SAMPLES),
                      "--split", "val", "--out", str(tmp_path / "eval")])  # fmt: skip
    for key in ("DSTQ", "DQ", "STQ"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["DSTQ"] == pytest.approx((metrics["STQ"] ** 2 * metrics["DQ"]) ** (1 / 3))
    assert metrics["depth_abs_rel"] > 0 and metrics["depth_rmse"] > 0
    sequence = next((SAMPLES / "images" / "val").iterdir()).name
    frames = sorted((SAMPLES / "images" / "val" / sequence).glob("*.png"))
    depth = read_depth_png(tmp_path / "eval" / "depth" / "val" / sequence / frames[0].name)
    gt_depth = read_depth_png(SAMPLES / "depth" / "val" / sequence / frames[0].name)
    assert depth.shape == gt_depth.shape and 0 < depth.min() and depth.max() < 80
    with Image.open(tmp_path / "eval" / "overlays" / f"{sequence}.gif") as gif:
        width, height = gif.size  # GT above (overlay | depth): (2W + 4) x (2H + 4), resized
        (h, w) = gt_depth.shape
        assert width / height == pytest.approx((2 * w + 4) / (2 * h + 4), rel=0.02)


def test_a_depth_model_on_data_without_depth_stops_with_one_line(tmp_path):
    from minivseg.config import dvps_demo
    from minivseg.data import DatasetError
    from minivseg.synthetic import write_dataset

    write_dataset(tmp_path / "data", 1, 1, 3, depth=False, height=65, width=97)
    small = dict(max_steps=1, batch_size=1, num_workers=0, crop_size=(65, 97))
    cfg = dataclasses.replace(dvps_demo(), data=str(tmp_path / "data"),
                              out_dir=str(tmp_path / "r"), **small)  # fmt: skip
    with pytest.raises(DatasetError, match="needs depth labels"):
        train_module.main(cfg)


def _stq_gap():
    spec = importlib.util.spec_from_file_location(
        "stq_gap", Path(__file__).parent / "benchmarks" / "stq_gap.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_association_gives_segments_their_best_track_and_leaves_the_rest():
    """tests/benchmarks/stq_gap.py's oracle: swapped car ids get the ground truth's back, a segment
    on no track gets a fresh id, stuff / crowd / void stay, a person segment never takes a car."""
    car, person, road = 13 * VIDEO_LABEL_DIVISOR, 11 * VIDEO_LABEL_DIVISOR, 0
    truth = np.full((4, 6), road)
    truth[0, :3], truth[0, 3:], truth[3, :2] = car + 1, car + 2, person + 4
    prediction = truth.copy()
    prediction[0, :3], prediction[0, 3:] = car + 7, car + 5  # both cars, ids swapped and renamed
    prediction[2, :2], prediction[3, :2] = car + 9, person + 1  # a false car; the person
    prediction[2, 4:], prediction[1, 4:] = person, VOID  # crowd and void stay as they are
    fresh = [500]
    out = _stq_gap().oracle_ids(prediction, truth, (11, 13), fresh)
    assert (out[0] == truth[0]).all() and (out[3, :2] == person + 4).all()
    assert (out[2, :2] == car + 500).all() and fresh == [501]
    assert (out[2, 4:] == person).all() and (out[1, 4:] == VOID).all()
    assert (out[1, :4] == road).all()


def test_stq_gap_scores_as_the_evaluation_does(checkpoint, capsys):
    """The "video" way equals evaluate's STQ on the same checkpoint and split; SQ is the same in
    all three ways (ids do not enter it)."""
    results = _stq_gap().main(["--checkpoint", str(checkpoint), "--data", str(SAMPLES)])
    metrics = E.main(["--checkpoint", str(checkpoint), "--data", str(SAMPLES), "--split", "val"])
    assert results["video"]["STQ"] == pytest.approx(metrics["STQ"], abs=1e-9)
    sq = {way: result["SQ"] for way, result in results.items()}
    assert sq["oracle association"] == pytest.approx(sq["video"]) == sq["per frame"]
    assert "oracle association" in capsys.readouterr().out
