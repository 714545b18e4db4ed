"""Clip-paste (`minivseg.clip_paste`): in every mode, frames and labels come from the same clip
at every pixel, and a pasted track gets one fresh id in every frame, shared with no target tube;
stuff mode pastes no things; clips of different shapes raise; the `KittiStepClips` option pastes
and needs a crop size.
"""

import numpy as np
import pytest
import torch

from minivseg.clip_paste import clip_paste, paste_mask
from minivseg.panoptic import LABEL_DIVISOR, THING_CLASSES, instance_of, semantic_of
from tests.test_data import label_clip, write_toy_dataset


def clips():
    target = torch.from_numpy(label_clip(3))
    source = torch.from_numpy(label_clip(3, offset=6))
    return (
        target.float()[:, None].repeat(1, 3, 1, 1),
        target,
        -source.float()[:, None].repeat(1, 3, 1, 1),
        source,
    )


@pytest.mark.parametrize("mode", ["thing", "stuff", "both"])
def test_paste_keeps_ids_unique_and_masks_consistent(mode):
    tf, tp, sf, sp = clips()
    rng = np.random.default_rng(0)
    frames, pan = clip_paste(tf, tp, sf, sp, rng, mode=mode)
    mask = paste_mask(sp.numpy(), mode, np.random.default_rng(0))
    pasted = torch.from_numpy(mask)
    # frames and labels come from the same clip at every pixel
    assert torch.equal(frames[:, 0][pasted], sf[:, 0][pasted])
    assert torch.equal(frames[:, 0][~pasted], tf[:, 0][~pasted])
    assert torch.equal(semantic_of(pan)[pasted], semantic_of(sp)[pasted])
    assert torch.equal(pan[~pasted], tp[~pasted])
    if mode != "stuff":
        # the source car (id 3) is pasted under a new id: the target car keeps id 3 where visible
        src_car = sp == 13 * LABEL_DIVISOR + 3
        new_ids = torch.unique(pan[src_car])
        assert len(new_ids) == 1 and int(new_ids[0]) % LABEL_DIVISOR > 3
        # a pasted tube keeps one id in every frame where it appears
        assert all((pan[t][src_car[t]] == new_ids[0]).all() for t in range(3))
        target_ids = set(torch.unique(tp[~pasted]).tolist())
        assert int(new_ids[0]) not in target_ids


def test_stuff_mode_pastes_no_things():
    _, _, _, sp = clips()
    mask = paste_mask(sp.numpy(), "stuff", np.random.default_rng(1))
    assert mask.any()
    assert not np.isin(semantic_of(sp.numpy())[mask], THING_CLASSES).any()


def test_shape_mismatch_raises():
    tf, tp, sf, sp = clips()
    with pytest.raises(ValueError, match="one shape"):
        clip_paste(tf, tp, sf[..., :-1], sp[..., :-1], np.random.default_rng(0))


def test_dataset_option(tmp_path):
    from minivseg.data import KittiStepClips

    root = write_toy_dataset(tmp_path / "k")
    plain = KittiStepClips(root, "train", 2, crop_size=(33, 49), random_crop=False)
    pasted = KittiStepClips(root, "train", 2, crop_size=(33, 49), random_crop=False, clip_paste=1.0)
    changed = sum(not torch.equal(plain[k]["panoptic"], pasted[k]["panoptic"]) for k in range(8))
    assert changed >= 4
    for k in range(8):
        pan = pasted[k]["panoptic"]
        ids = torch.unique(pan[(semantic_of(pan) == 13) & (instance_of(pan) > 0)])
        assert len(ids) >= 1
    with pytest.raises(ValueError, match="crop_size"):
        KittiStepClips(root, "train", 2, clip_paste=0.5)
