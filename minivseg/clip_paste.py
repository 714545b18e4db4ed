"""Clip-level copy-paste ("clip-paste", TubeFormer-DeepLab §3.3).

Image copy-paste pastes object masks from one image onto another. Clip-paste does the same with
*tubes*: the pixels of a thing track (or of a stuff class) in every frame of a source clip are
pasted onto the same frames of a target clip, so the pasted object keeps its motion. TubeFormer
pastes "either thing or stuff (or both)" regions with probability 0.5. The paper describes it in
one paragraph, without an equation, and no reference code was available to check against.
Use it as ``KittiStepClips(..., crop_size=..., clip_paste=0.5)`` or ``--clip_paste=0.5``.

Choices the paper leaves open (ours): the source is another random clip of the same dataset, after
its own augmentation; in "thing" mode every thing tube of the source is pasted (crowd regions come
along and stay crowd); in "stuff" mode a random non-empty subset of the source's stuff classes is
pasted; pasted thing tracks get fresh instance ids above the target's largest id, so every tube id
stays unique within the clip.
"""

from __future__ import annotations

import numpy as np
import torch

from minivseg.panoptic import IGNORE_LABEL, LABEL_DIVISOR, THING_CLASSES, instance_of, semantic_of

MODES = ("thing", "stuff", "both")


def paste_mask(
    source_panoptic: np.ndarray, mode: str, rng: np.random.Generator, thing_classes=THING_CLASSES
) -> np.ndarray:
    """Boolean ``(T, H, W)`` mask of the source pixels to paste in the given mode."""
    if mode not in MODES:
        raise ValueError(f"clip-paste mode must be one of {MODES}, got {mode!r}")
    semantic = semantic_of(source_panoptic)
    mask = np.zeros(source_panoptic.shape, dtype=bool)
    if mode in ("thing", "both"):
        mask |= np.isin(semantic, thing_classes)
    if mode in ("stuff", "both"):
        present = [c for c in np.unique(semantic) if c != IGNORE_LABEL and c not in thing_classes]
        if present:
            keep = rng.random(len(present)) < 0.5
            keep[rng.integers(len(present))] = True  # at least one stuff tube
            mask |= np.isin(semantic, np.asarray(present)[keep])
    return mask


def clip_paste(
    target_frames: torch.Tensor,
    target_panoptic: torch.Tensor,
    source_frames: torch.Tensor,
    source_panoptic: torch.Tensor,
    rng: np.random.Generator,
    mode: str | None = None,
    thing_classes=THING_CLASSES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste tubes of a source clip onto a target clip of the same shape.

    Args:
        target_frames, source_frames: ``(T, 3, H, W)`` float frames.
        target_panoptic, source_panoptic: ``(T, H, W)`` int64 panoptic ids.
        rng: numpy generator (drives the mode and the stuff subset).
        mode: "thing", "stuff" or "both"; ``None`` picks one uniformly.
    Returns:
        ``(frames, panoptic)`` of the target with the source tubes on top. Pasted thing tracks
        get new ids, so no id of the result is shared by a target and a source tube.
    """
    if target_panoptic.shape != source_panoptic.shape:
        raise ValueError(
            f"clip-paste needs clips of one shape, got {tuple(target_panoptic.shape)} and "
            f"{tuple(source_panoptic.shape)} (set a crop size)"
        )
    mode = mode if mode is not None else MODES[rng.integers(len(MODES))]
    source = source_panoptic.numpy()
    mask = paste_mask(source, mode, rng, thing_classes)
    if not mask.any():
        return target_frames, target_panoptic

    # Fresh ids: source track k -> target max id + rank of k, identical in every frame (a tube).
    pasted = source.copy()
    is_track = mask & np.isin(semantic_of(source), thing_classes) & (instance_of(source) > 0)
    tracks = np.unique(source[is_track])
    first_new = int(instance_of(target_panoptic.numpy()).max(initial=0)) + 1
    if first_new + len(tracks) > LABEL_DIVISOR:
        return target_frames, target_panoptic  # no free ids left: skip rather than collide
    new_ids = semantic_of(tracks) * LABEL_DIVISOR + first_new + np.arange(len(tracks))
    pasted[is_track] = new_ids[np.searchsorted(tracks, source[is_track])]

    mask_t = torch.from_numpy(mask)
    panoptic = torch.where(mask_t, torch.from_numpy(pasted), target_panoptic)
    frames = torch.where(mask_t[:, None], source_frames, target_frames)
    return frames, panoptic
