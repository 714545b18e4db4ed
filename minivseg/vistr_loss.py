"""VisTR instance sequence matching and sequence loss (VisTR §3.2-3.3, Eq. 2-9) on panoptic labels.

One Hungarian assignment per clip gives each ground-truth track (a sequence over the T frames) one
slot sequence of `minivseg.vistr.VisTR`; the loss then supervises the pair in every frame where the
track is present. The parts and the official file (Epiphqny/VisTR @445c9e4) each follows:

- `targets_from_panoptic`: the ground-truth sequences of Eq. (3), in the official instance-major
  layout, entry ``j·T + t`` is track ``j`` in frame ``t`` (datasets/ytvos.py
  ConvertCocoPolysToMask);
- `sequence_cost`, `SequenceMatcher`: Eq. (2), (4)-(6), (8) (models/matcher.py; `box_iou` is
  util/box_ops.py ``multi_iou``);
- `VisTRLoss`, `focal_and_dice`, `generalized_box_iou`: Eq. (7)-(9) (models/vistr.py SetCriterion;
  models/segmentation.py dice_loss, sigmoid_focal_loss; util/box_ops.py).

Usage::

    criterion = VisTRLoss(model.cfg)
    total, terms = criterion(outputs, {"panoptic": panoptic})  # (B, T, H, W); terms unweighted
    targets = targets_from_panoptic(panoptic[0])  # labels, boxes, masks, valid; entry j·T + t

Where the official code differs from the paper, we follow the code:

- matcher: the box cost is a mean over frames *and* the 4 coordinates (Eq. 8 sums coordinates);
  the "giou" cost is plain IoU smoothed by 1e-6; costs average over all T frames, frames where the
  track is absent included (target box 0); no mask cost; weights class 1, L1 5, IoU 2;
- loss: every term is divided by ``num_boxes`` = tracks × T, absent frames counted (the paper
  says "number of instances"); the focal loss is a per-mask pixel mean; box losses are L1 + real
  GIoU; the intermediate decoder layers get class and box losses only, each with its own matching.

Deliberate differences from the official code:

- in absent frames the target class is no-object (index K): the official label 0 is an unused
  YouTube-VIS id, here it would be "person". Only the matcher's class cost reads it;
- matched pairs are emitted for the valid frames of the *matched* track (the official code reads
  the valid flags of the j-th track in assignment order, which differ when tracks are permuted).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import nn

from minivseg.panoptic import LABEL_DIVISOR, THING_CLASSES
from minivseg.vistr import VisTRConfig


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, ...]:
    """Element-wise (broadcast) IoU of xyxy boxes, smoothed as the official ``multi_iou``."""
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter[..., 0] * inter[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return (inter + eps) / (union + eps), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of xyxy boxes (Rezatofighi et al.)."""
    iou, union = box_iou(a, b)
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull[..., 0] * hull[..., 1]
    return iou - (hull - union) / hull.clamp(min=1e-6)


def targets_from_panoptic(panoptic, thing_classes=THING_CLASSES) -> dict:
    """(T, H, W) panoptic ids -> VIS targets, instance-major: entry ``j·T + t``.

    Tracks are thing pixels with instance id > 0, ordered by panoptic id; crowd is not a track.
    Returns ``labels (M·T,)`` class index (K = no object where the track is absent), ``boxes
    (M·T, 4)`` normalised cxcywh (zeros where absent), ``masks (M·T, H, W)`` float and ``valid
    (M·T,)`` bool.
    """
    if not torch.is_tensor(panoptic):
        panoptic = torch.from_numpy(np.asarray(panoptic, dtype=np.int64))
    T, H, W = panoptic.shape
    classes = torch.tensor(thing_classes, device=panoptic.device)
    semantic, instance = panoptic // LABEL_DIVISOR, panoptic % LABEL_DIVISOR
    track_ids = torch.unique(panoptic[torch.isin(semantic, classes) & (instance > 0)])
    masks = panoptic[None] == track_ids[:, None, None, None]  # (M, T, H, W)
    valid = masks.flatten(2).any(-1)  # (M, T)
    class_index = (track_ids[:, None] // LABEL_DIVISOR == classes).int().argmax(-1)  # (M,)
    labels = torch.where(valid, class_index[:, None], len(thing_classes))
    rows, cols = masks.any(-1), masks.any(-2)  # (M, T, H), (M, T, W)
    ys, xs = torch.arange(H, device=panoptic.device), torch.arange(W, device=panoptic.device)
    y0, y1 = torch.where(rows, ys, H).amin(-1), torch.where(rows, ys + 1, 0).amax(-1)
    x0, x1 = torch.where(cols, xs, W).amin(-1), torch.where(cols, xs + 1, 0).amax(-1)
    boxes = torch.stack(
        [(x0 + x1) / (2 * W), (y0 + y1) / (2 * H), (x1 - x0) / W, (y1 - y0) / H], -1
    )
    boxes = boxes * valid[..., None]  # (M, T, 4)
    return {
        "labels": rearrange(labels, "M T -> (M T)"),
        "boxes": rearrange(boxes.float(), "M T C -> (M T) C"),
        "masks": rearrange(masks.float(), "M T H W -> (M T) H W"),
        "valid": rearrange(valid, "M T -> (M T)"),
    }


def sequence_cost(probs, boxes, labels, target_boxes, weights=(1.0, 5.0, 2.0)) -> torch.Tensor:
    """Matching cost (n, M) between slot sequences and track sequences (Eq. 6, 8, official form).

    probs (T, n, K+1) softmax, boxes (T, n, 4) cxcywh, labels (M, T), target_boxes (M, T, 4).
    """
    T = probs.shape[0]
    # Eq. (4), (6): -mean_t p_(i,t)(c_j,t)
    class_cost = -probs[torch.arange(T, device=probs.device)[None, :], :, labels].mean(1)  # (M, n)
    # Eq. (8), L1 term: mean over frames and coordinates
    bbox_cost = (boxes[None] - target_boxes[:, :, None]).abs().mean((1, 3))  # (M, n)
    # Eq. (8), "giou" term: the official code uses plain IoU
    iou, _ = box_iou(box_cxcywh_to_xyxy(boxes)[None], box_cxcywh_to_xyxy(target_boxes)[:, :, None])
    cost = weights[0] * class_cost + weights[1] * bbox_cost - weights[2] * iou.mean(1)
    return cost.T


class SequenceMatcher:
    """Hungarian matching of n slot sequences to M track sequences per clip (Eq. 2)."""

    def __init__(self, num_frames: int, cost_class=1.0, cost_bbox=5.0, cost_iou=2.0):
        self.num_frames, self.weights = num_frames, (cost_class, cost_bbox, cost_iou)

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, ...]]:
        """Per clip: (query indices ``t·n + i``, target indices ``j·T + t``) over valid frames."""
        T = self.num_frames
        probs = rearrange(outputs["pred_logits"].float().softmax(-1), "B (T N) K -> B T N K", T=T)
        boxes = rearrange(outputs["pred_boxes"].float(), "B (T N) C -> B T N C", T=T)
        n, indices = probs.shape[2], []
        for b, target in enumerate(targets):
            labels = rearrange(target["labels"], "(M T) -> M T", T=T)
            target_boxes = rearrange(target["boxes"], "(M T) C -> M T C", T=T)
            valid = rearrange(target["valid"], "(M T) -> M T", T=T).cpu()
            cost = sequence_cost(probs[b], boxes[b], labels, target_boxes, self.weights)
            slots, tracks = linear_sum_assignment(cost.cpu().numpy())  # Eq. (2): Hungarian
            frames = [valid[j].nonzero()[:, 0] for j in tracks]
            query = [t * n + i for i, t in zip(slots, frames)]
            target_index = [j * T + t for j, t in zip(tracks, frames)]
            empty = torch.zeros(0, dtype=torch.long)
            device = outputs["pred_logits"].device
            indices.append(
                (
                    torch.cat([empty, *query]).to(device),
                    torch.cat([empty, *target_index]).to(device),
                )
            )
        return indices


def focal_and_dice(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float):
    """(P, pixels) mask logits/targets -> per-mask focal loss (pixel mean) and Dice loss (Eq. 9)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    focal = (alpha_t * ce * (1 - p_t) ** gamma).mean(1)
    dice = 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)
    return focal, dice


class VisTRLoss(nn.Module):
    """Sequence loss of Eq. (7): CE + box L1 + GIoU + focal + Dice, normalised per track-frame."""

    def __init__(self, cfg: VisTRConfig):
        super().__init__()
        self.cfg = cfg
        self.matcher = SequenceMatcher(cfg.num_frames, cfg.cost_class, cfg.cost_bbox, cfg.cost_iou)
        class_weight = torch.ones(len(cfg.thing_classes) + 1)
        class_weight[-1] = cfg.no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.weights = {
            "ce": cfg.ce_weight, "bbox": cfg.bbox_weight, "giou": cfg.giou_weight,
            "focal": cfg.focal_weight, "dice": cfg.dice_weight,
        }  # fmt: skip

    def class_box_terms(self, outputs, targets, indices, num_boxes) -> dict:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query = torch.cat([q for q, _ in indices])
        classes = torch.full(logits.shape[:2], len(self.cfg.thing_classes), device=logits.device)
        classes[batch, query] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        pred = boxes[batch, query]
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target_boxes))
        return {
            # Eq. (7): -log p̂(c) over all T·n queries, unmatched ones towards no-object
            "ce": F.cross_entropy(logits.transpose(1, 2), classes, self.class_weight),
            # Eq. (8): λ_L1 ||b - b̂||_1 + λ_iou L_iou per matched frame, summed / num_boxes
            "bbox": (pred - target_boxes).abs().sum() / num_boxes,
            "giou": (1 - giou).sum() / num_boxes,
        }

    def mask_terms(self, outputs, targets, indices, num_boxes) -> dict:
        pred = torch.cat([m[q] for m, (q, _) in zip(outputs["pred_masks"].float(), indices)])
        target = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])
        if len(pred) == 0:  # keep the mask head in the graph
            zero = outputs["pred_masks"].sum() * 0
            return {"focal": zero, "dice": zero}
        pred = F.interpolate(
            pred[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False
        )
        focal, dice = focal_and_dice(  # Eq. (9): Dice + focal per matched frame
            pred.flatten(1), target.flatten(1), self.cfg.focal_alpha, self.cfg.focal_gamma
        )
        return {"focal": focal.sum() / num_boxes, "dice": dice.sum() / num_boxes}

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """outputs of `VisTR`; ``batch["panoptic"]`` (B, T, H, W) -> (weighted total, terms)."""
        device = outputs["pred_logits"].device
        targets = [
            {k: v.to(device) for k, v in targets_from_panoptic(p, self.cfg.thing_classes).items()}
            for p in batch["panoptic"]
        ]
        # official normalisation: all target entries (tracks × T), averaged over workers
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_boxes = num_boxes.to(device)
            torch.distributed.all_reduce(num_boxes)
            num_boxes = num_boxes / torch.distributed.get_world_size()
        num_boxes = num_boxes.clamp(min=1).item()
        indices = self.matcher(outputs, targets)  # Eq. (2)
        terms = self.class_box_terms(outputs, targets, indices, num_boxes)
        terms.update(self.mask_terms(outputs, targets, indices, num_boxes))
        for aux in outputs.get("aux_outputs", []):
            aux_indices = self.matcher(aux, targets)
            for name, value in self.class_box_terms(aux, targets, aux_indices, num_boxes).items():
                terms[f"aux_{name}"] = terms.get(f"aux_{name}", 0) + value
        total = sum(self.weights[name.removeprefix("aux_")] * v for name, v in terms.items())
        return total, terms
