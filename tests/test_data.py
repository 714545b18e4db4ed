"""`minivseg.data` on a small hand-made KITTI-STEP folder (`write_toy_dataset`).

Clips without augmentation are exact; the first frame repeats at a sequence start; scale, crop
and flip are one draw for all T frames, keep frames and labels aligned, replay per key, and pad
with void and the image mean; collate and worker seeding; every bad file (missing, corrupt or
truncated label, size mismatch, bad class id, label without image, empty or missing split) raises
naming the file; unlabelled splits; the ``--check`` CLI and its unpadded-name warning; numeric
frame order; 16-bit grayscale frames; `ResumableSampler` order, resume and ranks. Depth
(``ROOT/depth``): read exactly; a gradient depth map follows the frames through scale, crop and
flip, with values divided by the scale and padding 0; nearest resampling never mixes two
objects' depths and keeps unknown as 0; clip-paste pastes depth with the pixels; collate stacks
it; ``--check`` names a missing, misshapen or 8-bit depth file and prints the depth share.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from minivseg import data as D
from minivseg.panoptic import LABEL_DIVISOR, VOID_ID, write_depth_png, write_kitti_step_png

H, W = 33, 49


def label_clip(num_frames, offset=0):
    """Panoptic frames: road/sky/building blocks, a moving car (id 3) and a person (id 1)."""
    frames = []
    for t in range(num_frames):
        pan = np.full((H, W), 0 * LABEL_DIVISOR, dtype=np.int64)  # road
        pan[:10] = 10 * LABEL_DIVISOR  # sky
        pan[10:18, :20] = 2 * LABEL_DIVISOR  # building
        x = 5 + 3 * t + offset
        pan[18:28, x : x + 12] = 13 * LABEL_DIVISOR + 3  # car track 3
        pan[12:30, 40:45] = 11 * LABEL_DIVISOR + 1  # person track 1
        pan[0:3, 0:3] = VOID_ID
        frames.append(pan)
    return np.stack(frames)


def image_of(pan):
    """An image whose colour is a function of the label, so alignment can be checked exactly."""
    sem, inst = pan // LABEL_DIVISOR, pan % LABEL_DIVISOR
    return np.stack([sem % 256, inst * 40 % 256, np.full_like(sem, 7)], axis=-1).astype(np.uint8)


def depth_of(image):
    """A depth map that is a function of the image colour (0 = unknown on void), in metres."""
    image = np.asarray(image, dtype=np.float64)
    return np.where(image[..., 0] == 255, 0.0, 1 + image[..., 0] / 2 + image[..., 1] / 20)


def write_toy_dataset(root, splits=(("train", ["0000", "0001"]), ("val", ["0002"])), num_frames=4,
                      depth=False):  # fmt: skip
    for split, seqs in splits:
        for k, seq in enumerate(seqs):
            clip = label_clip(num_frames, offset=k)
            for t in range(num_frames):
                path = root / "images" / split / seq / f"{t:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image_of(clip[t])).save(path)
                write_kitti_step_png(root / "panoptic_maps" / split / seq / f"{t:06d}.png", clip[t])
                if depth:
                    write_depth_png(root / "depth" / split / seq / f"{t:06d}.png",
                                    depth_of(image_of(clip[t])))  # fmt: skip
    return root


@pytest.fixture()
def root(tmp_path):
    return write_toy_dataset(tmp_path / "kitti")


def test_clips_without_augmentation_are_exact(root):
    ds = D.KittiStepClips(root, "train", clip_length=3)
    assert len(ds) == 8  # one clip ends at every frame
    item = ds[2]
    assert item["frames"].shape == (3, 3, H, W) and item["frames"].dtype == torch.float32
    assert item["panoptic"].dtype == torch.int64
    np.testing.assert_array_equal(item["panoptic"].numpy(), label_clip(4)[0:3])
    assert item["frame_ids"] == ["000000", "000001", "000002"] and item["sequence"] == "0000"
    image = item["frames"][1].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(image, image_of(label_clip(4)[1]))


def test_first_frame_repeated_at_sequence_start(root):
    item = D.KittiStepClips(root, "train", clip_length=3)[0]
    assert item["frame_ids"] == ["000000"] * 3
    assert torch.equal(item["panoptic"][0], item["panoptic"][2])


def interior(pan):
    """Pixels whose 3x3 neighbourhood has one label (bilinear resize keeps their colour exact).

    Crop borders are excluded: their true neighbours lie outside the crop.
    """
    padded = np.pad(pan, 1, constant_values=-1)
    same = np.ones_like(pan, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= padded[1 + dy : 1 + dy + pan.shape[0], 1 + dx : 1 + dx + pan.shape[1]] == pan
    return same


@pytest.mark.parametrize("key", range(6))
def test_augmentation_keeps_frames_and_labels_aligned(root, key):
    ds = D.KittiStepClips(root, "train", 2, crop_size=(41, 41), scale_range=(0.5, 2.0), flip=True)
    item = ds[key]
    frames, pan = item["frames"], item["panoptic"]
    assert frames.shape == (2, 3, 41, 41) and pan.shape == (2, 41, 41)
    for t in range(2):
        p = pan[t].numpy()
        labelled = interior(p) & (p != VOID_ID)
        expected = image_of(p).astype(np.float32)
        got = frames[t].permute(1, 2, 0).numpy()
        assert labelled.sum() > 200
        np.testing.assert_allclose(got[labelled], expected[labelled], atol=1e-3)


def test_one_augmentation_for_all_frames(root):
    ds = D.KittiStepClips(root, "train", 2, crop_size=(33, 49), scale_range=(1.0, 1.0), flip=True)
    flipped = [
        k
        for k in range(20)
        if ds[k]["panoptic"][0, 20, 30] == 13 * LABEL_DIVISOR + 3
        or ds[k]["panoptic"][0, 20, 46] == 11 * LABEL_DIVISOR + 1
    ]
    for k in range(20):
        item = ds[k]
        static = item["panoptic"][:, 12:30, :]  # the person does not move: both frames agree on it
        person = static == 11 * LABEL_DIVISOR + 1
        assert torch.equal(person[0], person[1])
    assert 0 < len(flipped) < 20  # both flipped and unflipped clips occur


def test_augmentation_is_reproducible_per_key(root):
    ds = D.KittiStepClips(root, "train", 2, crop_size=(30, 30), scale_range=(0.5, 2.0), flip=True)
    assert torch.equal(ds[5]["panoptic"], ds[5]["panoptic"])
    later_epochs = [ds[5 + len(ds) * epoch]["panoptic"] for epoch in (1, 2, 3)]
    assert not all(torch.equal(ds[5]["panoptic"], other) for other in later_epochs)


def test_padding_is_void_and_mean(root):
    ds = D.KittiStepClips(root, "val", 1, crop_size=(40, 60), random_crop=False)
    item = ds[0]
    assert (item["panoptic"][:, H:, :] == VOID_ID).all()
    assert (item["panoptic"][:, :, W:] == VOID_ID).all()
    assert (item["frames"][:, :, H:, :] == D.IMAGE_PAD_VALUE).all()
    np.testing.assert_array_equal(item["panoptic"][0, :H, :W].numpy(), label_clip(4)[0])


def test_collate_and_worker_seed(root):
    ds = D.KittiStepClips(root, "train", 2)
    batch = D.collate_clips([ds[0], ds[1]])
    assert batch["frames"].shape == (2, 2, 3, H, W) and batch["panoptic"].shape == (2, 2, H, W)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=0, collate_fn=D.collate_clips, worker_init_fn=D.worker_init_fn
    )
    assert len(list(loader)) == 4
    torch.manual_seed(123)
    D.worker_init_fn(0)
    a = np.random.rand()
    torch.manual_seed(123)
    D.worker_init_fn(0)
    assert np.random.rand() == a


# --- bad input: each case raises at construction and names the offending file -------------------


def test_missing_label_names_image(root):
    (root / "panoptic_maps" / "train" / "0001" / "000002.png").unlink()
    with pytest.raises(ValueError, match=r"0001[/\\]000002\.png.*no panoptic map"):
        D.KittiStepClips(root, "train", 2)


def test_corrupt_png_names_file(root):
    (root / "images" / "train" / "0000" / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"0000[/\\]000001\.png"):
        D.KittiStepClips(root, "train", 2)


def test_truncated_label_names_file(root):
    path = root / "panoptic_maps" / "train" / "0000" / "000003.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"panoptic_maps.*0000[/\\]000003\.png"):
        D.KittiStepClips(root, "train", 2)


def test_size_mismatch_names_file(root):
    path = root / "panoptic_maps" / "val" / "0002" / "000000.png"
    write_kitti_step_png(path, np.zeros((H, W + 1), dtype=np.int64))
    with pytest.raises(ValueError, match=r"0002[/\\]000000\.png.*size"):
        D.KittiStepClips(root, "val", 2)


def test_bad_semantic_id_names_file(root):
    path = root / "panoptic_maps" / "val" / "0002" / "000001.png"
    pan = label_clip(4)[1]
    pan[5, 5] = 42 * LABEL_DIVISOR
    write_kitti_step_png(path, pan)
    with pytest.raises(ValueError, match=r"0002[/\\]000001\.png.*42"):
        D.KittiStepClips(root, "val", 2)


def test_empty_or_missing_split(root, tmp_path):
    (root / "images" / "test").mkdir()
    with pytest.raises(ValueError, match="empty"):
        D.KittiStepClips(root, "test", 2, labels=False)
    with pytest.raises(ValueError, match="nowhere: no such dataset folder"):
        D.KittiStepClips(tmp_path / "nowhere", "train", 2)


def test_label_without_image(root):
    extra = root / "panoptic_maps" / "train" / "0000" / "000009.png"
    write_kitti_step_png(extra, label_clip(1)[0])
    with pytest.raises(ValueError, match=r"000009\.png.*without an image"):
        D.KittiStepClips(root, "train", 2)


def test_unlabelled_split(root):
    ds = D.KittiStepClips(root, "train", 2, labels=False)
    assert (ds[0]["panoptic"] == VOID_ID).all()


def test_check_cli(root, capsys):
    D.main(["--check", str(root)])
    out = capsys.readouterr().out
    assert "train: 2 sequences, 8 frames" in out and "val: 1 sequences, 4 frames" in out
    assert "car" in out and "OK" in out
    (root / "images" / "val" / "0002" / "000000.png").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"0002[/\\]000000\.png"):
        D.main(["--check", str(root)])


def test_resumable_sampler_order_resume_and_ranks():
    import itertools

    def take(sampler, n):
        return list(itertools.islice(iter(sampler), n))

    stream = take(D.ResumableSampler(5, seed=3), 20)
    epochs = [sorted(k % 5 for k in stream[e * 5 : (e + 1) * 5]) for e in range(4)]
    assert epochs == [[0, 1, 2, 3, 4]] * 4  # each epoch is a permutation of the clips
    assert [k // 5 for k in stream] == [
        e for e in range(4) for _ in range(5)
    ]  # keys carry the epoch
    assert stream[:5] != stream[5:10]  # a fresh order every epoch
    assert take(D.ResumableSampler(5, seed=3, start=7), 13) == stream[7:]  # resume mid-epoch
    rank0 = take(D.ResumableSampler(5, seed=3, rank=0, world=2), 10)
    rank1 = take(D.ResumableSampler(5, seed=3, rank=1, world=2), 10)
    assert [k for pair in zip(rank0, rank1) for k in pair] == stream  # K ranks = one global stream


def test_frames_are_read_in_numeric_order_and_check_warns_when_names_are_not_padded(root, capsys):
    sequence = root / "images" / "val" / "0002"
    labels = root / "panoptic_maps" / "val" / "0002"
    for t, path in enumerate(sorted(sequence.glob("*.png"))):  # 000000..000003 -> 0, 1, 2, 10
        name = f"{(0, 1, 2, 10)[t]}.png"
        path.rename(sequence / name)
        (labels / path.name).rename(labels / name)
    sequences, _ = D.index_split(root, "val")
    assert sequences["0002"] == ["0", "1", "2", "10"]  # as text: 0, 1, 10, 2
    D.main(["--check", str(root)])
    assert "val/0002: frame names are numbers of different lengths" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such file or directory"):
        D.main(["--check", str(root / "missing")])


def test_a_16_bit_grayscale_frame_is_scaled_not_white(tmp_path):
    gray = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (4, 1))
    Image.fromarray(gray).save(tmp_path / "frame.png")  # mode I;16
    image = D.read_image(tmp_path / "frame.png")
    assert image.shape == (4, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, :, 0], gray[0] >> 8)  # PIL's convert gives 255


def test_frame_tensor_raises_no_warning(root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = D.frame_tensor(next((root / "images" / "val" / "0002").glob("*.png")))
    assert frame.shape[0] == 3 and frame.dtype == torch.float32


# --- depth ---------------------------------------------------------------------------------------


@pytest.fixture()
def depth_root(tmp_path):
    return write_toy_dataset(tmp_path / "dvps", depth=True)


def test_depth_is_read_exactly_and_collated(depth_root, root):
    ds = D.KittiStepClips(depth_root, "train", clip_length=3)
    assert ds.has_depth
    item = ds[2]
    assert item["depth"].shape == (3, H, W) and item["depth"].dtype == torch.float32
    expected = depth_of(image_of(label_clip(4)[1]))
    np.testing.assert_allclose(item["depth"][1].numpy(), expected, atol=1 / 512)
    assert (item["depth"][1][0:3, 0:3] == 0).all()  # void: unknown depth
    batch = D.collate_clips([ds[0], ds[1]])
    assert batch["depth"].shape == (2, 3, H, W)
    plain = D.KittiStepClips(root, "train", clip_length=3)  # no depth/ folder: no depth key
    assert not plain.has_depth and "depth" not in plain[0]
    assert "depth" not in D.collate_clips([plain[0], plain[1]])


def write_gradient_dataset(root, height=33, width=49):
    """One 2-frame sequence: image R = column, G = row; depth = 1 + 0.1 column + 5 row, so every
    pixel's depth names its source position."""
    rows, cols = np.mgrid[:height, :width]
    image = np.stack([cols, rows, np.full_like(cols, 7)], axis=-1).astype(np.uint8)
    for t in range(2):
        path = root / "images" / "train" / "0000" / f"{t:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        write_kitti_step_png(root / "panoptic_maps" / "train" / "0000" / f"{t:06d}.png",
                             np.full((height, width), 2000))  # fmt: skip
        write_depth_png(
            root / "depth" / "train" / "0000" / f"{t:06d}.png", 1 + 0.1 * cols + 5 * rows
        )
    return root


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("key", range(3))
def test_gradient_depth_follows_frames_through_scale_crop_and_flip(tmp_path, scale, key):
    root = write_gradient_dataset(tmp_path / "gradient")
    ds = D.KittiStepClips(root, "train", 2, crop_size=(41, 41), scale_range=(scale, scale),
                          flip=True, seed=key)  # fmt: skip
    flips = set()
    for k in range(8):
        item = ds[k]
        frames, depth = item["frames"].numpy(), item["depth"].numpy()
        assert depth.shape == (2, 41, 41)
        pad = frames[:, 2] == D.IMAGE_PAD_VALUE  # padding (the image's B channel is 7)
        assert (depth[pad] == 0).all() and (item["panoptic"].numpy()[pad] == VOID_ID).all()
        z = depth[~pad] * scale - 1  # undo the deeplab2 depth / scale, then decode the position
        row = np.floor(z / 5 + 1e-3)
        col = (z - 5 * row) / 0.1
        np.testing.assert_allclose(col, np.round(col), atol=0.05)  # depths are source values
        # nearest-neighbour depth comes from the source pixel nearest to the bilinear position
        assert np.abs(col - frames[:, 0][~pad]).max() <= 0.5 + 0.05
        assert np.abs(row - frames[:, 1][~pad]).max() <= 0.5 + 0.05
        assert (~pad).sum() > 300
        y = np.flatnonzero((~pad[0]).sum(1) > 1)[0]
        x = np.flatnonzero(~pad[0, y])
        flips.add(bool(frames[0, 0, y, x[-1]] < frames[0, 0, y, x[0]]))  # columns run backwards
        assert np.array_equal(depth[0], depth[1])  # one augmentation for the clip
    assert flips == {False, True}


@pytest.mark.parametrize("key", range(6))
def test_depth_never_mixes_objects_and_unknown_stays_unknown(depth_root, key):
    ds = D.KittiStepClips(depth_root, "train", 2, crop_size=(41, 41), scale_range=(0.5, 2.0),
                          flip=True)  # fmt: skip
    item = ds[key]
    pan, depth = item["panoptic"].numpy(), item["depth"].numpy()
    scales = np.linspace(0.5, 2.0, 16)
    # every depth, times the clip's one scale, is the depth of its own (nearest) label's colour
    expected = depth_of(image_of(pan))
    ratio = expected[depth > 0] / depth[depth > 0]
    assert np.ptp(ratio) < 1e-2 and np.min(np.abs(scales - ratio.mean())) < 1e-2
    assert (depth[pan == VOID_ID] == 0).all()  # void (unknown) and padding stay 0
    assert (depth[pan != VOID_ID] > 0).all()


def test_clip_paste_pastes_depth_with_the_pixels(depth_root):
    ds = D.KittiStepClips(depth_root, "train", 2, crop_size=(33, 49), flip=True, clip_paste=1.0)
    plain = D.KittiStepClips(depth_root, "train", 2, crop_size=(33, 49), flip=True)
    changed = 0
    for key in range(8):
        item = ds[key]
        frames = item["frames"].permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(item["depth"].numpy(), depth_of(frames), atol=1 / 256)
        changed += int((item["frames"] != plain[key]["frames"]).any(1).sum())
    assert changed > 100  # pixels were pasted, and their depth came along


def test_check_validates_depth_naming_the_file(depth_root, capsys):
    D.main(["--check", str(depth_root)])
    out = capsys.readouterr().out
    assert "depth: 99.44 % of pixels" in out and "OK" in out  # all but the 3x3 void corner
    path = depth_root / "depth" / "val" / "0002" / "000001.png"
    write_depth_png(path, np.ones((H, W + 1)))
    with pytest.raises(SystemExit, match=r"0002[/\\]000001\.png.*depth size"):
        D.main(["--check", str(depth_root)])
    Image.fromarray(np.ones((H, W), np.uint8)).save(path)  # 8-bit: cannot hold depth * 256
    with pytest.raises(SystemExit, match=r"0002[/\\]000001\.png.*16-bit"):
        D.main(["--check", str(depth_root)])
    with pytest.raises(ValueError, match=r"0002[/\\]000001\.png.*16-bit"):
        D.KittiStepClips(depth_root, "val", 2)
    path.unlink()
    with pytest.raises(SystemExit, match=r"0002[/\\]000001\.png: no depth map"):
        D.main(["--check", str(depth_root)])
    write_depth_png(depth_root / "depth" / "val" / "0002" / "000009.png", np.ones((H, W)))
    with pytest.raises(SystemExit, match=r"000009\.png: depth map without an image"):
        D.main(["--check", str(depth_root), "--splits", "val"])
