"""`minivseg.dvps_format` on tiny DVPS folders that the tests write themselves.

ViP-DeepLab's SemKITTI-DVPS naming (``_gtFine_class`` + ``_gtFine_instance``, ``_depth_{focal}``)
and deeplab2's (RGB ``_gtFine_instanceTrainIds``, ``_depth.png``) convert into minivseg's layout:
images and depth are links to (or copies of) the source bytes, labels are re-encoded with tracks
renumbered consistently per sequence (stuff loses its instance, void stays void, crowd stays
crowd), and `KittiStepClips` and ``--check`` read the result. A synthetic video written as
deeplab2's DVPS layout round-trips. Unknown classes, missing depth and too many tracks raise
naming the file; ``--chunk`` splits sequences; the CLI prints the training command.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from minivseg import data as D
from minivseg import dvps_format as DF
from minivseg.panoptic import (
    LABEL_DIVISOR,
    VOID_ID,
    read_depth_png,
    read_kitti_step_png,
    write_depth_png,
)
from minivseg.synthetic import generate_sequence

H, W = 12, 20


def semkitti_frame(t, offset=0):
    """Class and instance maps of one frame: road (8), a car (0) with a big SemanticKITTI id that
    moves, a person (5), building (12) with a stray instance id, void (255), crowd car."""
    semantic = np.full((H, W), 8)
    instance = np.zeros((H, W), np.int64)
    semantic[:4] = 12
    instance[:4] = 7  # stuff with an instance id: dropped
    semantic[6:10, 2 + t + offset : 7 + t + offset] = 0
    instance[6:10, 2 + t + offset : 7 + t + offset] = 40000
    semantic[5:11, 15:17], instance[5:11, 15:17] = 5, 123
    semantic[0:2, 0:2] = 255
    semantic[10:12, 10:12] = 0  # crowd: a car without instance id
    return semantic, instance


def write_semkitti(root, sequences=(("train", "000003", 3), ("train", "000004", 2),
                                    ("val", "000008", 3))):  # fmt: skip
    """ViP-DeepLab's SemKITTI-DVPS release: ``video_sequence/SPLIT/{seq}_{frame}_*.png``."""
    for split, sequence, frames in sequences:
        folder = root / "video_sequence" / split
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            prefix = folder / f"{sequence}_{t:06d}"
            image = np.full((H, W, 3), 10 * t + int(sequence), np.uint8)
            Image.fromarray(image).save(f"{prefix}_leftImg8bit.png")
            semantic, instance = semkitti_frame(t)
            Image.fromarray(semantic.astype(np.uint8)).save(f"{prefix}_gtFine_class.png")
            Image.fromarray(instance.astype(np.uint16)).save(f"{prefix}_gtFine_instance.png")
            depth = np.where(semantic == 255, 0.0, 2.0 + t + np.arange(W) / 4.0)
            write_depth_png(f"{prefix}_depth_718.8560180664062.png", depth)
    test = root / "video_sequence" / "test"
    test.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(test / "000011_000000_leftImg8bit.png")
    return root


def test_semkitti_dvps_converts_and_loads(tmp_path, capsys):
    src = write_semkitti(tmp_path / "semkitti-dvps")
    out = tmp_path / "minivseg"
    assert DF.main(["--src", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train: 2 sequences, 5 frames, 4 tracks, labels: True, depth: True" in printed
    assert "test: 1 sequences, 1 frames, 0 tracks, labels: False, depth: False" in printed
    assert "--model.num_classes=19 --model.thing_classes=0,1,2,3,4,5,6,7" in printed
    image = out / "images" / "train" / "000003" / "000001.png"
    source = src / "video_sequence" / "train" / "000003_000001_leftImg8bit.png"
    assert image.is_symlink() and image.resolve() == source.resolve()
    depth = out / "depth" / "train" / "000003" / "000001.png"
    assert (
        depth.read_bytes()
        == (
            src / "video_sequence" / "train" / "000003_000001_depth_718.8560180664062.png"
        ).read_bytes()
    )
    for t in range(3):
        pan = read_kitti_step_png(out / "panoptic_maps" / "val" / "000008" / f"{t:06d}.png")
        semantic, _ = semkitti_frame(t)
        expected = np.where(semantic == 255, VOID_ID, semantic * LABEL_DIVISOR)
        expected[6:10, 2 + t : 7 + t] = 0 * LABEL_DIVISOR + 1  # car 40000 -> car track 1
        expected[5:11, 15:17] = 5 * LABEL_DIVISOR + 1  # person 123 -> person track 1
        np.testing.assert_array_equal(pan, expected)  # crowd car stays 0, building loses its 7
    assert not (out / "panoptic_maps" / "test").exists()
    D.main(["--check", str(out)])
    assert "depth:" in capsys.readouterr().out
    ds = D.KittiStepClips(out, "train", 2, crop_size=(17, 33), scale_range=(0.5, 2.0), flip=True)
    batch = D.collate_clips([ds[k] for k in range(len(ds))])
    assert batch["depth"].shape == (5, 2, 17, 33) and batch["depth"].max() > 2
    assert torch.all((batch["depth"] > 0) | (batch["panoptic"] == VOID_ID))


def test_copy_writes_files(tmp_path):
    src = write_semkitti(tmp_path / "s", sequences=(("train", "000001", 2),))
    DF.convert(src, tmp_path / "out", copy=True)
    image = tmp_path / "out" / "images" / "train" / "000001" / "000000.png"
    assert image.is_file() and not image.is_symlink()


def test_a_synthetic_video_round_trips_through_deeplab2_dvps_naming(tmp_path):
    frames, panoptic, depth = generate_sequence(2, 6, 33, 105, depth=True)
    split = tmp_path / "dvps" / "val"
    split.mkdir(parents=True)
    for t in range(6):  # deeplab2 build_dvps_data.py input: RGB labels, _depth.png
        prefix = split / f"000002_{t:06d}"
        Image.fromarray(frames[t]).save(f"{prefix}_leftImg8bit.png")
        semantic, instance = np.divmod(panoptic[t], LABEL_DIVISOR)
        rgb = np.stack([semantic, instance // 256, instance % 256], -1).astype(np.uint8)
        Image.fromarray(rgb).save(f"{prefix}_gtFine_instanceTrainIds.png")
        write_depth_png(f"{prefix}_depth.png", depth[t])
    summary = DF.convert(tmp_path / "dvps", tmp_path / "out", dataset="cityscapes-dvps")
    assert summary["val"]["frames"] == 6 and summary["val"]["depth"]
    got = np.stack([read_kitti_step_png(tmp_path / "out" / "panoptic_maps" / "val" / "000002" /
                                        f"{t:06d}.png") for t in range(6)])  # fmt: skip
    got_depth = np.stack([read_depth_png(tmp_path / "out" / "depth" / "val" / "000002" /
                                         f"{t:06d}.png") for t in range(6)])  # fmt: skip
    np.testing.assert_allclose(got_depth, depth, atol=1 / 512 + 1e-6)
    np.testing.assert_array_equal(got // LABEL_DIVISOR, panoptic // LABEL_DIVISOR)
    pairs = np.unique(np.stack([panoptic.ravel(), got.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]  # a bijection
    assert ((pairs[0] % LABEL_DIVISOR == 0) == (pairs[1] % LABEL_DIVISOR == 0)).all()


def test_single_channel_labels_and_cityscapes_void(tmp_path):
    split = tmp_path / "dvps" / "train"
    split.mkdir(parents=True)
    values = np.array([[7, 32, 13005, 11002], [0, 255, 13005, 13000]], np.uint16)
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(split / "000000_000000_leftImg8bit.png")
    Image.fromarray(values).save(split / "000000_000000_gtFine_instanceTrainIds.png")
    DF.convert(tmp_path / "dvps", tmp_path / "out", dataset="cityscapes-dvps")
    pan = read_kitti_step_png(
        tmp_path / "out" / "panoptic_maps" / "train" / "000000" / "000000.png"
    )
    # a value below 1000 is a class alone (Cityscapes style); 32 and 255 are void; tracks renumbered
    np.testing.assert_array_equal(pan, [[7000, VOID_ID, 13001, 11001], [0, VOID_ID, 13001, 13000]])


def test_errors_name_the_file_and_chunk_splits_sequences(tmp_path):
    src = write_semkitti(tmp_path / "s", sequences=(("train", "000001", 4),))
    folder = src / "video_sequence" / "train"
    (folder / "000001_000002_depth_718.8560180664062.png").unlink()
    with pytest.raises(ValueError, match=r"000001_000002_leftImg8bit\.png: no depth map"):
        DF.convert(src, tmp_path / "out")
    write_depth_png(folder / "000001_000002_depth.png", np.ones((H, W)))
    semantic, instance = semkitti_frame(3)
    semantic[0, 5] = 40
    Image.fromarray(semantic.astype(np.uint8)).save(folder / "000001_000003_gtFine_class.png")
    with pytest.raises(ValueError, match=r"000001_000003_gtFine_class\.png: class ids \[40\]"):
        DF.convert(src, tmp_path / "out")
    assert DF.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 2  # CLI: error, rc 2
    semantic[0, 5] = 8
    instance[6:10] = np.arange(W)[None] + 5000  # 20 new car tracks in one frame
    semantic[6:10] = 0
    Image.fromarray(semantic.astype(np.uint8)).save(folder / "000001_000003_gtFine_class.png")
    Image.fromarray(instance.astype(np.uint16)).save(folder / "000001_000003_gtFine_instance.png")
    ids = {0 * 65536 + k: k for k in range(1, LABEL_DIVISOR - 10)}  # 989 car tracks so far
    with pytest.raises(ValueError, match=r"more than 999 tracks of class 0.*--chunk"):
        DF.encode_panoptic(semantic, instance, folder / "x.png", DF.DATASETS["semkitti-dvps"], ids)
    summary = DF.convert(src, tmp_path / "chunks", chunk=2)
    assert summary["train"]["sequences"] == 2
    names = sorted(p.name for p in (tmp_path / "chunks" / "images" / "train").iterdir())
    assert names == ["000001_0000", "000001_0001"]
    second = tmp_path / "chunks" / "images" / "train" / names[1]
    assert sorted(p.name for p in second.iterdir()) == ["000002.png", "000003.png"]
