"""Clip-level panoptic inference for a mask transformer: argmax twice, then two thresholds.

TubeFormer-DeepLab §3.4 ("Clip-level inference"): every tube gets a class
ĉ_i = argmax_c p̂_i(c), every pixel a tube ẑ_{t,h,w} = argmax_i m̂_{i,t,h,w}, and tubes whose class
confidence is below 0.7 become void. The details are those of deeplab2's MaX-DeepLab
post-processor (model/post_processor/max_deeplab.py, 'pixelwise'):

- the class softmax runs over K+1 classes, then the void column is dropped; a tube is *detected*
  when its best non-void probability is ≥ ``class_threshold`` (0.7);
- mask logits are upsampled bilinearly with align_corners=True *before* the softmax over tubes;
- a pixel is kept when its probability under the softmax over detected tubes is
  > ``pixel_threshold`` (0.4) and its raw argmax over all tubes is a detected tube;
- thing pixels get instance id slot + 1 (the same id on every frame of the clip: a tube id),
  stuff pixels instance 0, every other pixel is void (``ignore_label * label_divisor``);
- optional area limits void the segments smaller than a limit, counted per frame.

``semantic_inference`` is deeplab2's second post-processor, with both thresholds 0 (for mIoU).
``mask_wise_inference`` is the per-mask variant that TubeFormer §3.4 explores for video
instance segmentation ("treats the prediction of each object query as one object mask
proposal"; used for YouTube-VIS in §4.3 and §5): each tube's mask is ``{p > 0.4}``, tubes are
ranked by class confidence × mean mask probability and pasted onto free pixels (class
thresholds 0.7 thing / 0.5 stuff; a tube is skipped unless more than 80% of its mask is still
free), as deeplab2's 'maskwise' does.

Usage (``thing_stuff_class_ids`` is in `minivseg.panoptic`)::

    outputs = model(frames)               # class_logits (B, N, K+1), mask_logits (B, N, T, h, w)
    class_ids = thing_stuff_class_ids()   # channel order: things, stuff ascending, then void
    panoptic = clip_inference(outputs, (H, W), class_ids)              # B x (T, H, W) int64
    semantic = clip_inference(outputs, (H, W), class_ids, "semantic")  # no thresholds, for mIoU
    vis = clip_inference(outputs, (H, W), class_ids, "mask")           # per-mask (VIS) variant

The paper does not number these equations; comments cite them as §3.4.

Differences from deeplab2: the mask-wise variant names a tube slot + 1 like the per-pixel one
(deeplab2 uses its rank + 1); there is no width-wise splitting into "pieces".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from minivseg.panoptic import IGNORE_LABEL, LABEL_DIVISOR, THING_CLASSES


def upsample_mask_logits(mask_logits: torch.Tensor, out_size) -> torch.Tensor:
    """Bilinear (align_corners=True) resize of tube logits: (N, T, h, w) -> (N, T, H, W) float32."""
    x = rearrange(mask_logits.float(), "N T H W -> T N H W")
    x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=True)
    return rearrange(x, "T N H W -> N T H W")


def class_predictions(class_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K+1) class logits -> (class index (N,), confidence (N,)) over the K non-void classes."""
    probs = class_logits.float().softmax(-1)[:, :-1]  # softmax includes void, then void is dropped
    # §3.4 (first argmax): ĉ_i = argmax_c p̂_i(c), confidence max_c p̂_i(c).
    confidence, label = probs.max(-1)
    return label, confidence


def _slot_panoptic(slot, keep, label, class_ids, thing_classes, label_divisor, ignore_label):
    """Per-pixel slot (T, H, W) and keep mask -> panoptic ids: thing slot+1, stuff 0, else void."""
    class_table = torch.as_tensor(class_ids, device=slot.device)
    slot_semantic = class_table[label]  # (N,) dataset class of each tube
    slot_is_thing = torch.isin(slot_semantic, torch.as_tensor(thing_classes, device=slot.device))
    instance = torch.where(slot_is_thing[slot], slot + 1, 0)  # tube id, constant over the clip
    panoptic = slot_semantic[slot] * label_divisor + instance
    return torch.where(keep, panoptic, ignore_label * label_divisor)


def filter_small_segments(
    panoptic: torch.Tensor,
    thing_area_limit: int = 0,
    stuff_area_limit: int = 0,
    thing_classes=THING_CLASSES,
    label_divisor: int = LABEL_DIVISOR,
    ignore_label: int = IGNORE_LABEL,
) -> torch.Tensor:
    """Void every segment of a (T, H, W) panoptic map whose area in a frame is below its limit.

    Thing segments are tubes (one id per slot); stuff segments are whole classes, so two stuff
    tubes of one class are counted together, as deeplab2's ``_filter_by_count`` does.
    """
    if max(thing_area_limit, stuff_area_limit) <= 0:
        return panoptic
    void = ignore_label * label_divisor
    frame = torch.arange(panoptic.shape[0], device=panoptic.device)[:, None, None]
    key = frame * (void + label_divisor) + panoptic  # (T, H, W) one key per (frame, segment)
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    area = counts[inverse]  # (T, H, W) area of the pixel's segment in its own frame
    thing_table = torch.as_tensor(thing_classes, device=panoptic.device)
    limit = torch.where(
        torch.isin(panoptic // label_divisor, thing_table), thing_area_limit, stuff_area_limit
    )
    return torch.where(area < limit, void, panoptic)


@torch.no_grad()
def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    out_size,
    class_ids,
    thing_classes=THING_CLASSES,
    class_threshold: float = 0.7,
    pixel_threshold: float = 0.4,
    label_divisor: int = LABEL_DIVISOR,
    ignore_label: int = IGNORE_LABEL,
    thing_area_limit: int = 0,
    stuff_area_limit: int = 0,
) -> torch.Tensor:
    """Per-pixel clip inference (TubeFormer §3.4): one clip's logits -> (T, H, W) panoptic ids.

    class_logits: (N, K+1), channel k is dataset class ``class_ids[k]``, the last one is void.
    mask_logits: (N, T, h, w). out_size: (H, W). Returns int64 on the logits' device.
    """
    label, confidence = class_predictions(class_logits)
    detected = confidence >= class_threshold  # (N,) §3.4: "class confidence below 0.7 to void"
    logits = upsample_mask_logits(mask_logits, out_size)  # (N, T, H, W), before any softmax
    detected_logits = torch.where(
        detected[:, None, None, None], logits, torch.finfo(logits.dtype).min
    )
    # §3.4 (second argmax): ẑ_{t,h,w} = argmax_i m̂_{i,t,h,w} over detected tubes, with its
    # probability under the softmax over detected tubes (the pixel confidence).
    slot = detected_logits.argmax(0)  # (T, H, W), the same argmax as `semantic_inference`
    pixel_confidence = detected_logits.softmax(0).amax(0)
    raw_argmax_is_detected = logits.amax(0) == detected_logits.amax(0)
    keep = (pixel_confidence > pixel_threshold) & raw_argmax_is_detected
    panoptic = _slot_panoptic(
        slot, keep, label, class_ids, thing_classes, label_divisor, ignore_label
    )
    return filter_small_segments(
        panoptic, thing_area_limit, stuff_area_limit, thing_classes, label_divisor, ignore_label
    )


@torch.no_grad()
def semantic_inference(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, out_size, class_ids
) -> torch.Tensor:
    """Semantic map for mIoU: argmax twice with no thresholds (deeplab2's semantic post-processor).

    (N, K+1), (N, T, h, w) -> (T, H, W) int64 dataset class ids; no pixel is void.
    """
    label, _ = class_predictions(class_logits)
    slot = upsample_mask_logits(mask_logits, out_size).argmax(0)  # (T, H, W)
    return torch.as_tensor(class_ids, device=slot.device)[label][slot]


@torch.no_grad()
def mask_wise_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    out_size,
    class_ids,
    thing_classes=THING_CLASSES,
    class_threshold: float = 0.7,
    stuff_class_threshold: float = 0.5,
    pixel_threshold: float = 0.4,
    overlap_threshold: float = 0.8,
    class_weight: float = 1.0,
    mask_weight: float = 1.0,
    label_divisor: int = LABEL_DIVISOR,
    ignore_label: int = IGNORE_LABEL,
    thing_area_limit: int = 0,
    stuff_area_limit: int = 0,
) -> torch.Tensor:
    """Per-mask clip inference: (N, K+1), (N, T, h, w) -> (T, H, W) panoptic ids.

    Each tube's mask is {p > pixel_threshold} under the softmax over tubes (masks may overlap);
    its mask score is the mean probability inside it. Tubes are pasted onto free pixels in order
    of confidence^class_weight · mask_score^mask_weight; a tube is skipped when its class
    confidence is below its threshold (things ``class_threshold``, stuff
    ``stuff_class_threshold``) or when no more than ``overlap_threshold`` of its mask is free.
    """
    label, confidence = class_predictions(class_logits)
    probs = upsample_mask_logits(mask_logits, out_size).softmax(0)  # (N, T, H, W)
    masks = probs > pixel_threshold
    area = masks.sum((1, 2, 3))  # (N,) over the whole clip
    mask_score = (probs * masks).sum((1, 2, 3)) / area.clamp(min=1)
    order = torch.argsort(
        confidence**class_weight * mask_score**mask_weight, descending=True, stable=True
    )
    slot_is_thing = torch.isin(
        torch.as_tensor(class_ids, device=label.device)[label],
        torch.as_tensor(thing_classes, device=label.device),
    )
    passes_class = confidence >= torch.where(slot_is_thing, class_threshold, stuff_class_threshold)
    slot = torch.zeros(probs.shape[1:], dtype=torch.long, device=probs.device)  # (T, H, W)
    keep = torch.zeros(probs.shape[1:], dtype=torch.bool, device=probs.device)
    for n in order[passes_class[order]].tolist():
        free = masks[n] & ~keep
        if free.sum() > overlap_threshold * area[n]:
            slot[free] = n
            keep |= free
    panoptic = _slot_panoptic(
        slot, keep, label, class_ids, thing_classes, label_divisor, ignore_label
    )
    return filter_small_segments(
        panoptic, thing_area_limit, stuff_area_limit, thing_classes, label_divisor, ignore_label
    )


def clip_inference(outputs: dict, out_size, class_ids, mode: str = "pixel", **options) -> list:
    """Inference on a batch of model outputs -> list over B of (T, H, W) int64 maps.

    outputs: the model dict, ``class_logits (B, N, K+1)`` and ``mask_logits (B, N, T, h, w)``.
    mode: "pixel" (`panoptic_inference`), "mask" (`mask_wise_inference`) or "semantic"
    (`semantic_inference`, class ids instead of panoptic ids); options go to that function.
    """
    infer = {
        "pixel": panoptic_inference,
        "mask": mask_wise_inference,
        "semantic": semantic_inference,
    }[mode]
    pairs = zip(outputs["class_logits"], outputs["mask_logits"])
    return [infer(c, m, out_size, class_ids, **options) for c, m in pairs]
