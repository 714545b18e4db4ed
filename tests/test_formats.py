"""Dataset layouts end to end: detection, clips, the model built for the dataset's classes, and
evaluation with each layout's metrics and prediction files (synthetic data in each layout)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minivseg import data as D
from minivseg import evaluate as E
from minivseg import train as train_module
from minivseg import vspw
from minivseg.clip_paste import clip_paste
from minivseg.config import TrainConfig, demo
from minivseg.formats import detect_format, open_split
from minivseg.panoptic import CLASS_NAMES, LABEL_DIVISOR, THING_CLASSES, VOID_ID
from minivseg.splits import DatasetError
from minivseg.synthetic import generate_sequence, sequence_seed, write_in_format
from minivseg.tasks import with_dataset_classes

SMALL = dict(max_steps=2, batch_size=1, num_workers=0, crop_size=(33, 97), checkpoint_every=2,
             device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def vspw_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vspw")
    write_in_format(root, "vspw", 1, 1, 18, seed=3, height=33, width=97)
    return root


def test_detect_format(vspw_root, tmp_path):
    assert detect_format(vspw_root) == "vspw"
    (tmp_path / "k" / "images").mkdir(parents=True)
    (tmp_path / "y" / "train" / "JPEGImages").mkdir(parents=True)
    assert detect_format(tmp_path / "k") == "kitti-step"
    assert detect_format(tmp_path / "y") == "youtube-vis"
    with pytest.raises(DatasetError, match="not a dataset root"):
        detect_format(tmp_path)
    with pytest.raises(DatasetError, match="no such dataset folder"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown data format 'coco'"):
        open_split(vspw_root, "train", "coco")


def test_vspw_clips_are_the_synthetic_semantics(vspw_root):
    """The synthetic video written in VSPW's layout reads back as the same semantic labels."""
    clips = D.KittiStepClips(vspw_root, "train", 2)
    assert clips.source.format == "vspw" and clips.source.thing_classes == ()
    assert clips.source.num_classes == len(CLASS_NAMES)
    item = clips[5]
    _, panoptic = generate_sequence(sequence_seed(3, 0), 18, 33, 97)
    expected = np.where(panoptic // LABEL_DIVISOR == 255, VOID_ID,
                        panoptic // LABEL_DIVISOR * LABEL_DIVISOR)  # fmt: skip
    assert item["frame_ids"] == ["00000005", "00000006"]
    assert np.array_equal(item["panoptic"].numpy(), expected[4:6])  # integer labels: exact
    assert item["frames"].shape == (2, 3, 33, 97)


def test_model_classes_come_from_the_dataset(vspw_root):
    split = open_split(vspw_root, "train")
    cfg = with_dataset_classes(TrainConfig(), split)
    assert cfg.model_overrides == {"num_classes": "19", "thing_classes": ""}
    user = TrainConfig(model_overrides={"num_classes": "12"})
    assert with_dataset_classes(user, split).model_overrides["num_classes"] == "12"
    stt = with_dataset_classes(TrainConfig(task="stt"), split)
    assert stt.model_overrides == {"num_classes": "19"}
    kitti = open_split(Path(__file__).resolve().parents[1] / "data_samples", "train")
    assert with_dataset_classes(TrainConfig(), kitti) == TrainConfig()  # KITTI: the defaults


@pytest.mark.parametrize("task", ["tubeformer", "stt"])
def test_vspw_train_and_evaluate(vspw_root, tmp_path, task):
    """VSS on VSPW's layout: TubeFormer with semantic-only tubes, and STT; evaluation reports
    mIoU, mVC8, mVC16 (no STQ), writes VSPW masks that VSPW's scoring reads back equal."""
    preset = dataclasses.replace(demo(), task="stt", clip_length=3) if task == "stt" else demo()
    cfg = dataclasses.replace(preset, data=str(vspw_root), out_dir=str(tmp_path / "run"), **SMALL)
    train_module.main(cfg)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["model_overrides"]["num_classes"] == "19"
    metrics = E.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--data", str(vspw_root),
                      "--split", "val", "--out", str(tmp_path / "eval")])  # fmt: skip
    assert {"mIoU", "mVC8", "mVC16", "flicker"} <= set(metrics) and "STQ" not in metrics
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("mIoU", "mVC8", "mVC16"))
    masks = tmp_path / "eval" / "masks" / "0001"
    assert len(list(masks.glob("*.png"))) == 18
    scored = vspw.score_predictions(tmp_path / "eval" / "masks", open_split(vspw_root, "val"))
    # no "others" in the synthetic data: the two VC definitions coincide; same pixels, one sum
    assert scored["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-12)
    assert scored["mVC8"] == pytest.approx(metrics["mVC8"], abs=1e-12)
    assert scored["mVC16"] == pytest.approx(metrics["mVC16"], abs=1e-12)


def test_check_cli_dispatches_by_layout(vspw_root, capsys):
    D.main(["--check", str(vspw_root)])
    assert f"{vspw_root}: OK" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a dataset root"):
        D.main(["--check", str(vspw_root / "data")])


def test_clip_paste_uses_the_dataset_thing_classes():
    """YouTube-VIS-like classes: things 0 and 1, stuff 2; the pasted tracks are the source's."""
    target = torch.full((1, 4, 4), 2 * LABEL_DIVISOR)
    source = target.clone()
    source[0, :2, :2] = 1 * LABEL_DIVISOR + 1
    frames = torch.zeros(1, 3, 4, 4)
    _, pasted = clip_paste(frames, target, frames + 1, source, np.random.default_rng(0),
                           mode="thing", thing_classes=(0, 1))  # fmt: skip
    assert (pasted[0, :2, :2] // LABEL_DIVISOR == 1).all() and (pasted[0, :2, :2] % 1000 > 0).all()
    assert THING_CLASSES != (0, 1)


@pytest.fixture(scope="module")
def ytvis_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ytvis")
    write_in_format(root, "youtube-vis", 1, 1, 6, seed=3, height=33, width=97)
    return root


def test_youtube_vis_clips_and_classes(ytvis_root):
    """Person and car are the categories (things 0, 1), everything else background (stuff 2)."""
    clips = D.KittiStepClips(ytvis_root, "train", 5)
    split = clips.source
    assert split.format == "youtube-vis" and split.thing_classes == (0, 1)
    assert split.class_names == ("person", "car", "background") and split.num_classes == 3
    _, panoptic = generate_sequence(sequence_seed(3, 0), 6, 33, 97)
    semantic = panoptic // LABEL_DIVISOR
    expected = np.select([semantic == 11, semantic == 13], [0, 1], 2)  # person, car, the rest
    item = clips[5]
    assert item["frames"].shape == (5, 3, 33, 97)
    assert np.array_equal(item["panoptic"].numpy() // LABEL_DIVISOR, expected[1:6])
    tracked = (panoptic % LABEL_DIVISOR > 0) & np.isin(semantic, THING_CLASSES)
    assert np.array_equal(item["panoptic"].numpy() % LABEL_DIVISOR > 0, tracked[1:6])
    cfg = with_dataset_classes(TrainConfig(task="vistr"), split)
    assert cfg.model_overrides == {"num_classes": "3", "thing_classes": "0,1"}


@pytest.mark.parametrize("task", ["tubeformer", "vistr"])
def test_youtube_vis_train_evaluate_and_results(ytvis_root, tmp_path, task):
    """VIS on YouTube-VIS's layout with T = 5: evaluation scores video mask AP and writes the
    results file, which the YouTube-VIS scoring reads back to the same numbers."""
    from minivseg.config import vistr_demo
    from minivseg.youtube_vis_results import score_results

    preset = vistr_demo() if task == "vistr" else demo()
    cfg = dataclasses.replace(preset, data=str(ytvis_root), out_dir=str(tmp_path / "run"),
                              clip_length=5, **SMALL)  # fmt: skip
    train_module.main(cfg)
    checkpoint, out = str(tmp_path / "run" / "last.pt"), str(tmp_path / "eval")
    metrics = E.main(["--checkpoint", checkpoint, "--data", str(ytvis_root), "--split", "valid",
                      "--out", out])  # fmt: skip
    mode = "mask" if task == "tubeformer" else "vistr"
    assert f"{mode}_AP" in metrics and "STQ" not in metrics and "mIoU" not in metrics
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert all(len(r["segmentations"]) == 6 and r["category_id"] in (1, 2) for r in results)
    scored = score_results(tmp_path / "eval" / "results.json", open_split(ytvis_root, "valid"))
    for key in ("AP", "AP50", "AR10"):  # the same tracks, scored from the file
        assert scored[key] == pytest.approx(metrics[f"{mode}_{key}"], abs=1e-12, nan_ok=True)
