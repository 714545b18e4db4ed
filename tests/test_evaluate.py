"""Video evaluation: sliding windows, stitching, metrics, exported predictions and overlays."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minivseg import evaluate as E
from minivseg import train as train_module
from minivseg.config import demo
from minivseg.panoptic import read_kitti_step_png

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    small = dict(max_steps=2, batch_size=1, num_workers=0, crop_size=(65, 97), checkpoint_every=2)
    cfg = dataclasses.replace(demo(), data=str(SAMPLES), out_dir=str(out), device="cpu", **small)
    train_module.main(cfg)
    return out / "last.pt"


def test_windows_and_padding():
    assert E.clip_windows(4, 2) == [[0, 1], [1, 2], [2, 3]]
    assert E.clip_windows(1, 3) == [[0, 0, 0]]
    assert E.clip_windows(2, 3) == [[0, 0, 1]]
    assert [E.padded_size(n) for n in (128, 129, 375, 1242, 416)] == [129, 129, 385, 1249, 417]


def test_evaluate_writes_metrics_predictions_and_overlays(checkpoint, tmp_path):
    metrics = E.main(["--checkpoint", str(checkpoint), "--data", str(SAMPLES), "--split", "val",
                      "--out", str(tmp_path)])  # fmt: skip
    stored = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("STQ", "AQ", "SQ", "VPQ", "mIoU"):
        assert key in stored and 0.0 <= stored[key] <= (100.0 if key.startswith("VPQ") else 1.0)
    assert stored == pytest.approx(metrics)
    sequence = next((SAMPLES / "images" / "val").iterdir()).name
    frames = sorted((SAMPLES / "images" / "val" / sequence).glob("*.png"))
    predicted = tmp_path / "panoptic_maps" / "val" / sequence
    assert sorted(p.name for p in predicted.glob("*.png")) == [p.name for p in frames]
    pan = read_kitti_step_png(predicted / frames[0].name)
    assert (
        pan.shape
        == read_kitti_step_png(SAMPLES / "panoptic_maps" / "val" / sequence / frames[0].name).shape
    )
    assert (tmp_path / "overlays" / f"{sequence}.gif").stat().st_size > 0


def test_predictions_have_consistent_ids_over_the_video(checkpoint):
    model, cfg = E.load_model(checkpoint)
    frames = torch.rand(5, 3, 40, 60) * 255
    panoptic, semantic = E.predict_video(model, cfg, frames)
    assert panoptic.shape == (5, 40, 60) and semantic.shape == (5, 40, 60)
    assert np.array_equal(panoptic[panoptic != 255000] // 1000, semantic[panoptic != 255000])


def test_frames_folder_without_labels(checkpoint, tmp_path):
    folder = tmp_path / "my_video"
    folder.mkdir()
    sequence = next((SAMPLES / "images" / "val").iterdir())
    for path in sorted(sequence.glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    E.main(["--checkpoint", str(checkpoint), "--frames", str(folder), "--out", str(tmp_path / "o")])
    assert len(list((tmp_path / "o" / "panoptic_maps" / "frames" / "my_video").glob("*.png"))) == 3
    assert (tmp_path / "o" / "overlays" / "my_video.gif").exists()


def test_clear_errors(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="no such checkpoint"):
        E.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(SAMPLES)])
    with pytest.raises(SystemExit, match="not found"):
        E.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path), "--split", "val"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .png or .jpg"):
        E.main(["--checkpoint", str(checkpoint), "--frames", str(tmp_path / "empty")])


def test_fill_void_and_thresholds(checkpoint):
    model, cfg = E.load_model(checkpoint)
    frames = torch.rand(3, 3, 33, 49) * 255
    kept, semantic = E.predict_video(model, cfg, frames, fill_void=False)
    filled, _ = E.predict_video(model, cfg, frames, fill_void=True)
    assert (filled != 255000).all()  # every pixel gets a class
    void = kept == 255000
    assert void.any()  # an untrained model is unsure almost everywhere
    np.testing.assert_array_equal(filled[void], semantic[void] * 1000)
    np.testing.assert_array_equal(filled[~void], kept[~void])
    strict = {"class_threshold": 1.0, "pixel_threshold": 1.0}
    nothing, _ = E.predict_video(model, cfg, frames, fill_void=False, thresholds=strict)
    assert (nothing == 255000).all()  # no slot passes a class confidence of 1.0


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
    real_stitch = stitching.stitch_clips

    def stitch_spy(clips, stride=1, thing_classes=None, **kw):
        seen["stitch"] = tuple(thing_classes)
        return real_stitch(clips, stride, thing_classes, **kw)

    monkeypatch.setattr(stitching, "stitch_clips", stitch_spy)
    result = E.evaluate_model(model, cfg, SAMPLES, "val", max_sequences=1, gifs=False)
    assert seen == {"STQ": (14, (11, 13, 12)), "VPQ": (14, (11, 13, 12)), "stitch": (11, 13, 12)}
    assert 0 <= result["STQ"] <= 1 and 0 <= result["mIoU"] <= 1
