"""TubeFormer's VPQ-style tube loss: GT tubes, Hungarian matching, PQ-style and auxiliary terms.

TubeFormer-DeepLab §3.3 trains with the PQ-style loss of MaX-DeepLab (§3.2, Eq. (10): class term +
Dice term) lifted from masks to tubes: sim(y_i, ŷ_j) = p̂_j(c_i) × Dice(m_i, m̂_j) where m is a
(T, h, w) tube, so every mask, Dice and cross-entropy below runs over the T·h·w pixels of a clip.
Auxiliary terms (§3.3, from MaX-DeepLab): tube-ID cross-entropy, video semantic cross-entropy,
video instance discrimination (or CMT-DeepLab's pixel-wise contrastive loss, §3.4 Eq. (14)),
optional deep supervision with the final matching; and the temporal consistency loss (§3.3; not
in deeplab2). With the clustering update, CMT-DeepLab's mask approximation loss (§3.3 Eq. (13),
weight 1.0 as in its §4) pulls every layer's reference points to the matched tube's extremes.
Numbers follow deeplab2 model/loss/max_deeplab_loss.py (``_pre_process_ground_truth``,
``_mask_similarity``, the ``_call_*`` losses), base_loss.py (FocalCrossEntropyLoss, MaskDiceLoss,
TopKCrossEntropyLoss), matchers_ops.py, and model/utils.py ``strided_downsample`` (`subsample`).
Lesson 04 rebuilds every term; its last section lists them and the measurements.

Differences from deeplab2:
- stuff tubes go to the reserved last |C_stuff| slots ("global memory with split thing and
  stuff", TubeFormer §3.2); only thing tubes are Hungarian-matched, among the other slots;
- matching is a rectangular scipy assignment over real tubes (deeplab2 pads with ±999: same result);
  thing tubes left over when they outnumber the thing slots get no Dice or tube-ID loss;
- the loss runs per clip, then averages over the batch; no TPU padding to 128 thing ids;
- deep supervision is an option (off, as in deeplab2's MaX-DeepLab); instance discrimination is
  computed once on the shared pixel embedding. Targets are built on the host, and the matchings
  of a batch cost one device-to-host transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from scipy.optimize import linear_sum_assignment
from torch import nn

from minivseg.clustering import mask_approximation_loss
from minivseg.panoptic import (
    IGNORE_LABEL,
    LABEL_DIVISOR,
    NUM_CLASSES,
    THING_CLASSES,
    thing_stuff_class_ids,
)

EPS = 1e-5  # deeplab2's floor for weights and denominators


@dataclass
class TubeLossConfig:
    pq_style_weight: float = 3.0  # weight of both PQ-style terms (class and Dice), deeplab2 3.0
    tube_id_weight: float = 0.3  # tube-ID (mask-ID) cross-entropy over slots per pixel
    instance_disc_weight: float = 1.0  # video instance discrimination (or pixel contrastive)
    semantic_weight: float = 1.0  # video semantic cross-entropy on the semantic head
    alpha: float = 0.75  # PQ-style weight of matched slots; unmatched get 1 - alpha
    temperature: float = 0.3  # instance discrimination softmax temperature tau
    semantic_top_k: float = 1.0  # fraction of hardest pixels in the semantic loss (KITTI DL2: 0.2)
    contrastive_sample_k: int = 0  # 0: MaX instance discrimination; >0: CMT Eq. (14) on k pixels
    contrastive_sample_temperature: float = 0.6  # sampling bias towards small tubes (deeplab2 0.6)
    split_thing_stuff: bool = True  # stuff tubes go to the reserved last |C_stuff| slots
    mask_approx_weight: float = 1.0  # CMT Eq. (13) on reference points (clustering only), CMT 1.0
    deep_supervision: bool = False  # also supervise the model's aux heads (earlier layers)


def default_loss_config(memory_update: str = "dual_path") -> TubeLossConfig:
    """The loss defaults of a model's global layers: MaX-DeepLab's for dual-path layers; with the
    clustering update, CMT-DeepLab's pixel-wise contrastive loss (Eq. 14, 4096 sampled pixels,
    the kMaX/deeplab2 Cityscapes setting) and deep supervision of every layer's assignment."""
    if memory_update == "clustering":
        return TubeLossConfig(contrastive_sample_k=4096, deep_supervision=True)
    return TubeLossConfig()


def subsample(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) -> (..., h, w) at rows/cols round(linspace(0, H-1, h)): [::4] for 16k+1 sizes."""
    rows, cols = (
        torch.linspace(0, n - 1, m, dtype=torch.float64).round().long().to(labels.device)
        for n, m in zip(labels.shape[-2:], size)
    )
    return labels[..., rows[:, None], cols]


def semantic_target(panoptic: torch.Tensor, size, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(..., H, W) panoptic ids -> (..., h, w) subsampled class ids, IGNORE_LABEL for void."""
    semantic = subsample(panoptic, size) // LABEL_DIVISOR
    return torch.where(semantic < num_classes, semantic, IGNORE_LABEL)


def tubes_from_panoptic(
    panoptic: torch.Tensor, size, num_classes: int = NUM_CLASSES, thing_classes=THING_CLASSES
) -> dict[str, torch.Tensor]:
    """Ground-truth tubes of one clip (TubeFormer §3.1: masks linked over T), at output size.

    panoptic (T, H, W) int64 ids -> dict with M tubes: one per thing track id (the same id in all
    frames is one tube), then one per present stuff class, ascending. Crowd (thing, instance 0)
    and void pixels are in no tube; crowd stays semantically valid. A tube that vanishes in the
    subsampling does not exist.
      masks (M, T, h, w) float; channels (M,) class-head channel (thing_stuff_class_ids order);
      tube_index (T, h, w) long, -1 outside tubes; valid (T, h, w) non-void pixels; thing
      (T, h, w) pixels of thing tubes.
    """
    panoptic = subsample(panoptic, size)
    semantic = panoptic // LABEL_DIVISOR
    valid = semantic < num_classes
    thing = valid & torch.isin(semantic, torch.tensor(thing_classes, device=panoptic.device))
    in_tube = valid & ~(thing & (panoptic % LABEL_DIVISOR == 0))
    key = torch.where(thing, panoptic, semantic * LABEL_DIVISOR)  # stuff ignores instance ids
    ids, inverse = torch.unique(key[in_tube], return_inverse=True)
    channel_of = torch.empty(num_classes, dtype=torch.long, device=panoptic.device)
    head_order = list(thing_stuff_class_ids(num_classes, thing_classes))
    channel_of[head_order] = torch.arange(num_classes, device=panoptic.device)
    channels = channel_of[ids // LABEL_DIVISOR]
    channels, order = torch.sort(channels, stable=True)  # things first, stuff ascending
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    tube_index = torch.full_like(panoptic, -1)
    tube_index[in_tube] = rank[inverse]
    masks = tube_index == torch.arange(len(ids), device=panoptic.device)[:, None, None, None]
    return dict(masks=masks.float(), channels=channels, tube_index=tube_index, valid=valid,
                thing=thing & in_tube)  # fmt: skip


def to_device(tensors: dict, device: torch.device) -> dict:
    """Copy a dict of host tensors to ``device`` without making the host wait (pinned on CUDA)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    pinned = {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in tensors.items()}
    return {k: v.to(device, non_blocking=True) for k, v in pinned.items()}


@torch.no_grad()
def matching_similarity(class_logits, mask_logits, tubes: dict) -> dict[str, torch.Tensor]:
    """VPQ-style similarities of one clip's M GT tubes to its N slots (stop-grad), on the device.

    Returns ``dice`` (M, N), ``class_prob`` (M, N) and their product ``similarity`` (M, N),
    TubeFormer §3.3 sim(y_i, ŷ_j) = p̂_j(c_i) × Dice(m_i, m̂_j), which the matching maximises.
    """
    gt = rearrange(tubes["masks"], "m t h w -> m (t h w)")
    # Softmax over slots, then drop void pixels; this Dice has no +1 smoothing (deeplab2).
    probs = rearrange(mask_logits.float().softmax(0) * tubes["valid"], "n t h w -> n (t h w)")
    overlap = einsum(gt, probs, "m p, n p -> m n")
    dice = overlap / ((gt.sum(1)[:, None] + probs.sum(1)[None]) / 2 + EPS)
    # The class softmax includes void before the void column is dropped (deeplab2).
    class_prob = class_logits.float().softmax(-1)[:, tubes["channels"]].T  # (M, N)
    return dict(dice=dice, class_prob=class_prob, similarity=dice * class_prob)


def assign_slots(similarity: np.ndarray, channels: np.ndarray, num_classes: int, num_stuff: int):
    """Hungarian assignment on the host (deeplab2 ``nonsquare_hungarian_matching``): (M, N)
    similarity, (M,) tube channels -> slot, tube index arrays (numpy).

    With num_stuff = S > 0 the stuff tube of channel c takes its reserved slot N - K + c and thing
    tubes are matched among slots 0..N-S-1; with S = 0 all tubes are matched among all slots.
    Pairs are sorted by tube. Non-finite similarities (a diverged model) count as no match.
    """
    N, K = similarity.shape[1], num_classes
    fixed = channels >= K - num_stuff
    free = np.flatnonzero(~fixed)
    cost = -np.nan_to_num(similarity[free, : N - num_stuff], nan=0.0, posinf=0.0, neginf=0.0)
    rows, cols = linear_sum_assignment(cost)
    slot = np.concatenate([cols, N - K + channels[fixed]])
    tube = np.concatenate([free[rows], np.flatnonzero(fixed)])
    order = np.argsort(tube, kind="stable")
    return slot[order], tube[order]


def match_tubes(class_logits, mask_logits, tubes: dict, num_stuff: int) -> dict[str, torch.Tensor]:
    """Hungarian matching of one clip's GT tubes to slots by VPQ-style similarity (stop-grad).

    class_logits (N, K+1) in thing_stuff_class_ids order + void; mask_logits (N, T, h, w); tubes
    from `tubes_from_panoptic`. See `assign_slots` for the rule. Returns index pairs `slot`,
    `tube` (sorted by tube) and the similarities `dice` (M, N) and `class_prob` (M, N).
    `TubeLoss` does the same for a whole batch with one device-to-host transfer.
    """
    scores = matching_similarity(class_logits, mask_logits, tubes)
    slot, tube = assign_slots(
        scores["similarity"].cpu().numpy(), tubes["channels"].cpu().numpy(),
        class_logits.shape[1] - 1, num_stuff,
    )  # fmt: skip
    return matched_pairs(slot, tube, scores, mask_logits.device)


def matched_pairs(slot: np.ndarray, tube: np.ndarray, scores: dict, device) -> dict:
    """The matching as `match_tubes` returns it: index pairs on ``device`` plus the similarities."""
    index = to_device({"slot": torch.from_numpy(slot), "tube": torch.from_numpy(tube)}, device)
    return dict(**index, dice=scores["dice"], class_prob=scores["class_prob"])


def mean_nonzero(loss: torch.Tensor) -> torch.Tensor:
    """Sum over the number of nonzero entries; 0 when there are none (deeplab2's reduction)."""
    return loss.sum() / (loss != 0).sum().clamp_min(1)


def temporal_consistency_loss(mask_logits_a, mask_logits_b, overlap: int) -> torch.Tensor:
    """L1 between the N tube logits two clips predict for their shared frames (TubeFormer §3.3).

    mask_logits_a, mask_logits_b (B, N, T, h, w): the last `overlap` frames of clip a are the
    first `overlap` frames of clip b. Gradients flow into both clips.
    """
    T = mask_logits_a.shape[2]
    if not 1 <= overlap <= min(T, mask_logits_b.shape[2]):
        raise ValueError(f"overlap must be in 1..{T}, got {overlap}")
    return F.l1_loss(
        mask_logits_a[:, :, T - overlap :].float(), mask_logits_b[:, :, :overlap].float()
    )


class TubeLoss(nn.Module):
    """TubeFormer training loss: `forward(outputs, batch) -> (total, terms)`."""

    def __init__(self, num_classes: int = NUM_CLASSES, thing_classes=THING_CLASSES,
                 num_slots: int = 128, config: TubeLossConfig | None = None):  # fmt: skip
        super().__init__()
        self.config = config or TubeLossConfig()
        self.num_classes, self.thing_classes, self.num_slots = num_classes, thing_classes, num_slots
        self.thing_stuff_class_ids = thing_stuff_class_ids(num_classes, thing_classes)
        self.num_stuff = (num_classes - len(thing_classes)) if self.config.split_thing_stuff else 0
        if num_slots <= self.num_stuff:
            raise ValueError(f"num_slots={num_slots} must exceed the {self.num_stuff} stuff slots")
        cfg = self.config
        self.weights = dict(
            pq_class=cfg.pq_style_weight, pq_dice=cfg.pq_style_weight, tube_id=cfg.tube_id_weight,
            instance_disc=cfg.instance_disc_weight, semantic=cfg.semantic_weight,
            mask_approx=cfg.mask_approx_weight,
        )  # fmt: skip

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """outputs: the model dict, class_logits (B, N, K+1), mask_logits (B, N, T, h, w),
        semantic_logits (B, K, T, h, w), pixel_embedding (B, D, T, h, w) and reference_points
        (list of (B, N, R, 2)) optional, aux list; batch["panoptic"] (B, T, H, W) int64 ids,
        best left on the host (the targets are built there). Returns the weighted total and the
        unweighted terms (pq_class, pq_dice, tube_id, instance_disc, semantic, mask_approx, and
        aux{i}_... with deep supervision), batch means."""
        return self.losses([(outputs, batch)])[0]

    def losses(self, pairs) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """`forward` of several (outputs, batch) pairs, e.g. the two clips of temporal
        consistency. The matchings of all their clips cost one device-to-host transfer, and
        nothing else here waits for the device."""
        clips = []  # (pair, outputs, b, tube channels, device tubes) for every clip of every pair
        for pair, (outputs, batch) in enumerate(pairs):
            mask_logits = outputs["mask_logits"]
            if mask_logits.shape[1] != self.num_slots:
                raise ValueError(f"expected {self.num_slots} slots, got {mask_logits.shape[1]}")
            for b, panoptic in enumerate(batch["panoptic"]):
                channels, tubes = self._tubes(panoptic, mask_logits.shape[-2:], mask_logits.device)
                clips.append((pair, outputs, b, channels, tubes))
        with torch.autocast(clips[0][1]["mask_logits"].device.type, enabled=False):
            scores = [
                matching_similarity(o["class_logits"][b], o["mask_logits"][b], tubes)
                for _, o, b, _, tubes in clips
            ]
            # The one transfer: every clip's (M, N) similarities, flattened, to the host.
            flat = torch.cat([s["similarity"].flatten() for s in scores]).cpu().numpy()
            per_pair, offset = [{} for _ in pairs], 0
            for (pair, outputs, b, channels, tubes), score in zip(clips, scores):
                M, N = score["similarity"].shape
                similarity = flat[offset : offset + M * N].reshape(M, N)
                offset += M * N
                slot, tube = assign_slots(similarity, channels, self.num_classes, self.num_stuff)
                match = matched_pairs(slot, tube, score, tubes["channels"].device)
                for name, value in self._clip_terms(outputs, b, tubes, match).items():
                    per_pair[pair].setdefault(name, []).append(value)
        results = []
        for per_clip in per_pair:
            terms = {name: torch.stack(values).mean() for name, values in per_clip.items()}
            results.append((sum(self.weight(n) * t for n, t in terms.items()), terms))
        return results

    def _tubes(self, panoptic: torch.Tensor, size, device: torch.device):
        """GT tubes and semantic target of one clip, built where the labels are (the host in
        training: labels on the device cost syncs here), and their copy on ``device``, where the
        (M, T, h, w) masks are made. Returns (tube channels as a numpy array, device tubes)."""
        host = tubes_from_panoptic(panoptic, size, self.num_classes, self.thing_classes)
        host["semantic"] = semantic_target(panoptic, size, self.num_classes)
        channels = host["channels"].numpy(force=True)
        if panoptic.device == device:
            return channels, host
        tubes = to_device({k: v for k, v in host.items() if k != "masks"}, device)
        slots = torch.arange(len(channels), device=device)[:, None, None, None]
        tubes["masks"] = (tubes["tube_index"] == slots).float()
        return channels, tubes

    def _clip_terms(self, outputs, b, tubes, match) -> dict[str, torch.Tensor]:
        """Every unweighted term of clip b, given its tubes and matching."""
        heads = [outputs, *outputs.get("aux", [])] if self.config.deep_supervision else [outputs]
        prefixes = ["", *(f"aux{i}_" for i in range(len(heads) - 1))]
        targets = self._targets(outputs["mask_logits"][b], tubes, match)
        terms = {}
        for prefix, head in zip(prefixes, heads):
            for name, value in self._head_terms(head, b, tubes, match, targets).items():
                terms[prefix + name] = value
        if "pixel_embedding" in outputs:  # one pixel embedding, shared by every head: once
            terms["instance_disc"] = self._instance_disc(outputs["pixel_embedding"][b], tubes)
        if "semantic_logits" in outputs:
            terms["semantic"] = self._semantic(outputs["semantic_logits"][b], tubes["semantic"])
        if "reference_points" in outputs:
            terms["mask_approx"] = self._mask_approx(outputs["reference_points"], b, tubes, match)
        return terms

    def weight(self, name: str) -> float:
        """Config weight of a term; aux{i}_X terms share the weight of X."""
        return self.weights[name.split("_", 1)[1] if name.startswith("aux") else name]

    @torch.no_grad()
    def _targets(self, mask_logits, tubes, match) -> dict[str, torch.Tensor]:
        """Stop-grad class targets and weights from the final output, reused by every head."""
        N, slot, tube, alpha = mask_logits.shape[0], match["slot"], match["tube"], self.config.alpha
        probs = rearrange(mask_logits.float().softmax(0), "n t h w -> n (t h w)")
        void = ~rearrange(tubes["valid"], "t h w -> (t h w)")
        # Unmatched slots are weighted by their mass share on void pixels (deeplab2), not by 1.
        void_ratio = (probs * void).sum(1) / (probs.sum(1) + EPS)
        class_weight = (1 - alpha) * void_ratio.clamp_min(EPS)
        class_weight[slot] = alpha * match["dice"][tube, slot].clamp_min(EPS)
        class_target = torch.full((N,), len(self.thing_stuff_class_ids), device=probs.device)
        class_target[slot] = tubes["channels"][tube]
        slot_of_tube = torch.full((len(tubes["channels"]) + 1,), -1, device=probs.device)
        slot_of_tube[tube] = slot  # the extra last entry maps tube_index -1 to slot -1
        index = rearrange(tubes["tube_index"], "t h w -> (t h w)")
        return dict(
            class_target=class_target,
            class_weight=class_weight,
            dice_weight=match["class_prob"][tube, slot].clamp_min(EPS),
            pixel_slot=slot_of_tube[index],
            in_tube=(index >= 0).float(),
            no_target=(rearrange(tubes["valid"], "t h w -> (t h w)") & (slot_of_tube[index] < 0)),
        )

    def _head_terms(self, head, b, tubes, match, targets) -> dict[str, torch.Tensor]:
        """PQ-style class and Dice terms (MaX-DeepLab Eq. (10)) and tube-ID CE of one head."""
        slot, tube = match["slot"], match["tube"]
        N = head["class_logits"].shape[1]
        # MaX-DeepLab Eq. (10), class term: alpha-weighted CE against matched class or void.
        class_ce = F.cross_entropy(
            head["class_logits"][b].float(), targets["class_target"], reduction="none"
        )
        terms = dict(pq_class=mean_nonzero(targets["class_weight"] * class_ce))
        log_probs = rearrange(head["mask_logits"][b].float().log_softmax(0), "n t h w -> n (t h w)")
        gt = rearrange(tubes["masks"], "m t h w -> m (t h w)")[tube]
        # Dice term (+1 smoothing): only pixels inside some GT tube count (no void, no crowd).
        pred = log_probs[slot].exp() * targets["in_tube"]
        dice = 1 - (2 * (pred * gt).sum(1) + 1) / (pred.sum(1) + gt.sum(1) + 1)
        terms["pq_dice"] = (targets["dice_weight"] * dice).sum() * self.config.alpha / N
        # Tube-ID CE: each tube pixel should pick its matched slot among all N.
        pixel_slot = targets["pixel_slot"]
        pixel_ce = -log_probs.gather(0, pixel_slot.clamp_min(0)[None])[0] * (pixel_slot >= 0)
        # deeplab2 weights this CE by the non-void mask: a pixel with no target slot (crowd)
        # adds 0 to the loss and its count, but its all-zero target still pulls with softmax(z).
        lse = rearrange(head["mask_logits"][b].float(), "n t h w -> n (t h w)").logsumexp(0)
        pixel_ce = pixel_ce + (lse - lse.detach()) * targets["no_target"]
        terms["tube_id"] = mean_nonzero(pixel_ce)
        return terms

    def _instance_disc(self, embedding, tubes) -> torch.Tensor:
        """MaX instance discrimination on thing pixels, or CMT-DeepLab Eq. (14) when sampling."""
        cfg = self.config
        features = rearrange(embedding.float(), "d t h w -> (t h w) d")
        gt = rearrange(tubes["masks"], "m t h w -> (t h w) m")
        index = rearrange(tubes["tube_index"], "t h w -> (t h w)")
        if cfg.contrastive_sample_k == 0:
            centers = einsum(features, gt, "p d, p m -> m d") / gt.sum(0)[:, None].clamp_min(1)
            logits = features @ F.normalize(centers, dim=1).T / cfg.temperature  # (P, M)
            thing_pixel = rearrange(tubes["thing"], "t h w -> (t h w)")
            if gt.shape[1] == 0:  # no tube at all (a shape, known without the device)
                return features.sum() * 0
            ce = F.cross_entropy(logits, index.clamp_min(0), reduction="none") * thing_pixel
            return mean_nonzero(ce)
        # Eq. (14): sample pixels, biased towards small tubes (Gumbel top-k), void never first.
        area = gt @ gt.sum(0)  # (P,) area of each pixel's tube, 0 outside tubes
        logits = cfg.contrastive_sample_temperature * torch.log(len(area) / area.clamp_min(1))
        logits = logits.masked_fill(~rearrange(tubes["valid"], "t h w -> (t h w)"), -99999.0)
        gumbel = -torch.empty_like(logits).exponential_().log()
        sample = torch.topk(logits + gumbel, min(cfg.contrastive_sample_k, len(logits))).indices
        same = gt[sample] @ gt[sample].T  # (k, k) 1 where both pixels share a tube
        target = same / same.sum(1, keepdim=True).clamp_min(1)  # 1/|P(a)| over positives
        similarity = features[sample] @ features[sample].T / cfg.temperature
        return mean_nonzero(-(target * similarity.log_softmax(1)).sum(1))

    def _mask_approx(self, reference_points, b, tubes, match) -> torch.Tensor:
        """CMT Eq. (13), L_ext + L_cen, of every layer's (B, N, R, 2) points, summed over layers;
        thing and stuff slots with the final matching, GT tubes pooled over the clip's frames."""
        pairs = [(match["slot"], match["tube"])]
        losses = [
            mask_approximation_loss(points[b : b + 1], [tubes["masks"]], pairs)
            for points in reference_points
        ]
        return sum(loss["extreme"] + loss["center"] for loss in losses)

    def _semantic(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Video semantic CE of one clip, logits (K, T, h, w) vs `semantic_target` (T, h, w)
        class ids (dataset order): void ignored, mean over the top-k% pixels."""
        ce = F.cross_entropy(
            logits.float()[None], target[None], ignore_index=IGNORE_LABEL, reduction="none"
        )
        ce = ce.flatten()
        k = round(self.config.semantic_top_k * len(ce))
        return mean_nonzero(torch.topk(ce, k).values if k < len(ce) else ce)
