"""VisTR: 3-D position encoding, VIS targets, sequence matching, sequence loss, model, inference.

Covers minivseg.vistr (model, inference) and minivseg.vistr_loss (targets, matching, loss).
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivseg.panoptic import VIDEO_LABEL_DIVISOR, VOID_ID
from minivseg.vistr import (
    SequenceHead,
    build_vistr,
    instance_frames,
    instance_video,
    predict_tubes,
    sine_position_encoding_3d,
    tubes_to_panoptic,
    vistr_config,
)
from minivseg.vistr_loss import (
    SequenceMatcher,
    VisTRLoss,
    focal_and_dice,
    sequence_cost,
    targets_from_panoptic,
)

# --- 3-D positional encoding -------------------------------------------------------------------


def test_position_encoding_hand_values():
    # dim 6: one sin/cos pair per axis, period 1; positions (k+1)/L * 2π
    pe = sine_position_encoding_3d(2, 1, 2, 6)
    assert pe.shape == (2, 1, 2, 6)
    pi = math.pi
    expected_t = {0: [math.sin(pi), math.cos(pi)], 1: [math.sin(2 * pi), math.cos(2 * pi)]}
    for t, x in itertools.product(range(2), range(2)):
        angle_x = (x + 1) / 2 * 2 * pi
        expected = [*expected_t[t], 0.0, 1.0, math.sin(angle_x), math.cos(angle_x)]
        torch.testing.assert_close(pe[t, 0, x], torch.tensor(expected), atol=1e-5, rtol=0)


def test_position_encoding_frequencies_and_layout():
    T, H, W = 3, 4, 5
    pe = sine_position_encoding_3d(T, H, W, 12)  # 4 channels per axis: periods 1, 1, 100, 100
    angle = 1 / 3 * 2 * math.pi  # frame 0 of 3
    torch.testing.assert_close(
        pe[0, 0, 0, :4],
        torch.tensor(
            [math.sin(angle), math.cos(angle), math.sin(angle / 100), math.cos(angle / 100)]
        ),
        atol=1e-5,
        rtol=0,
    )
    # [t | y | x] thirds: each depends on its own axis only
    assert torch.equal(pe[:, :1, :1, :4].expand(T, H, W, 4), pe[..., :4])
    assert torch.equal(pe[:1, :, :1, 4:8].expand(T, H, W, 4), pe[..., 4:8])
    assert torch.equal(pe[:1, :1, :, 8:].expand(T, H, W, 4), pe[..., 8:])
    assert not torch.equal(pe[0, ..., :4], pe[1, ..., :4])
    with pytest.raises(ValueError):
        sine_position_encoding_3d(2, 2, 2, 8)


# --- targets ---------------------------------------------------------------------------------


def tiny_panoptic():
    """T=2, 4x6: a car (13002) in both frames, a person (11001) in frame 1 only, crowd, void."""
    pan = np.zeros((2, 4, 6), dtype=np.int64)  # road
    pan[0, 1:3, 2:5] = 13002
    pan[1, 0:2, 3:6] = 13002
    pan[1, 3, 0:2] = 11001
    pan[0, 3, 0] = 13000  # crowd: not a track
    pan[1, 0, 0] = VOID_ID
    return pan


def test_targets_from_panoptic_instance_major():
    targets = targets_from_panoptic(tiny_panoptic())
    # tracks sorted by id: person (j=0), car (j=1); entry j*T + t; absent -> no-object (K=2)
    assert targets["labels"].tolist() == [2, 0, 1, 1]
    assert targets["valid"].tolist() == [False, True, True, True]
    expected_boxes = [
        [0, 0, 0, 0],
        [1 / 6, 3.5 / 4, 2 / 6, 1 / 4],  # person: rows 3..3, cols 0..1
        [3.5 / 6, 2 / 4, 3 / 6, 2 / 4],  # car frame 0: rows 1..2, cols 2..4
        [4.5 / 6, 1 / 4, 3 / 6, 2 / 4],  # car frame 1: rows 0..1, cols 3..5
    ]
    torch.testing.assert_close(targets["boxes"], torch.tensor(expected_boxes).float())
    assert targets["masks"].shape == (4, 4, 6)
    assert targets["masks"][0].sum() == 0 and targets["masks"][1].sum() == 2
    assert targets["masks"][2].sum() == 6 and targets["masks"][2, 3, 0] == 0  # crowd excluded


# --- matching --------------------------------------------------------------------------------


def naive_cost(probs, boxes, labels, target_boxes, weights=(1.0, 5.0, 2.0)):
    """Loop version of the official matcher cost: (n, M)."""
    T, n, _ = probs.shape
    M = labels.shape[0]
    cost = torch.zeros(n, M)
    for i, j in itertools.product(range(n), range(M)):
        total = 0.0
        for t in range(T):
            p, g = boxes[t, i].tolist(), target_boxes[j, t].tolist()
            px0, py0, px1, py1 = p[0] - p[2] / 2, p[1] - p[3] / 2, p[0] + p[2] / 2, p[1] + p[3] / 2
            gx0, gy0, gx1, gy1 = g[0] - g[2] / 2, g[1] - g[3] / 2, g[0] + g[2] / 2, g[1] + g[3] / 2
            inter = max(min(px1, gx1) - max(px0, gx0), 0) * max(min(py1, gy1) - max(py0, gy0), 0)
            union = p[2] * p[3] + g[2] * g[3] - inter
            iou = (inter + 1e-6) / (union + 1e-6)
            l1 = sum(abs(a - b) for a, b in zip(p, g)) / 4
            total += -weights[0] * probs[t, i, labels[j, t]] + weights[1] * l1 - weights[2] * iou
        cost[i, j] = total / T
    return cost


def random_case(seed, T=3, n=4, M=3, K=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, T * n, K + 1, generator=g) * 2
    boxes = torch.rand(1, T * n, 4, generator=g) * 0.5 + 0.2
    valid = torch.rand(M, T, generator=g) > 0.3
    valid[:, 0] = True
    labels = torch.where(valid, torch.randint(0, K, (M, 1), generator=g), K)
    target_boxes = (torch.rand(M, T, 4, generator=g) * 0.5 + 0.2) * valid[..., None]
    targets = {
        "labels": labels.flatten(),
        "boxes": target_boxes.flatten(0, 1),
        "valid": valid.flatten(),
    }
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("seed", range(6))
def test_matching_equals_brute_force(seed):
    T, n, M = 3, 4, 3
    outputs, target = random_case(seed, T, n, M)
    probs = outputs["pred_logits"][0].softmax(-1).view(T, n, -1)
    boxes = outputs["pred_boxes"][0].view(T, n, 4)
    labels, target_boxes = target["labels"].view(M, T), target["boxes"].view(M, T, 4)
    cost = sequence_cost(probs, boxes, labels, target_boxes)
    torch.testing.assert_close(cost, naive_cost(probs, boxes, labels, target_boxes))
    totals = {
        s: sum(cost[s[j], j].item() for j in range(M)) for s in itertools.permutations(range(n), M)
    }
    best, runner_up = sorted(totals, key=totals.get)[:2]
    # A unique optimum (float error is ~1e-7): the matcher cannot pick another assignment.
    assert totals[runner_up] - totals[best] > 1e-4
    query, target_index = SequenceMatcher(T)(outputs, [target])[0]
    expected = sorted(
        (t * n + best[j], j * T + t)
        for j in range(M)
        for t in range(T)
        if target["valid"][j * T + t]
    )
    assert sorted(zip(query.tolist(), target_index.tolist())) == expected


def test_matching_keeps_identity_where_per_frame_matching_swaps():
    # two cars; slot 0 follows car A and slot 1 car B, but in frame 1 slot 1's box sits on A
    T, n = 3, 2
    a = [[0.3, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.7, 0.5, 0.2, 0.2]]
    b = [[0.7, 0.5, 0.2, 0.2], [0.5, 0.6, 0.2, 0.2], [0.3, 0.5, 0.2, 0.2]]
    slot0 = [a[0], [0.5, 0.62, 0.2, 0.2], a[2]]
    slot1 = [b[0], [0.5, 0.48, 0.2, 0.2], b[2]]
    boxes = torch.tensor([[slot0[t], slot1[t]] for t in range(T)]).view(1, T * n, 4)
    logits = torch.tensor([0.0, 5.0, 0.0]).expand(1, T * n, 3)  # all say "car"
    target = {
        "labels": torch.ones(2 * T, dtype=torch.long),
        "boxes": torch.tensor([a, b]).view(2 * T, 4),
        "valid": torch.ones(2 * T, dtype=torch.bool),
    }
    query, target_index = SequenceMatcher(T)(
        {"pred_logits": logits, "pred_boxes": boxes}, [target]
    )[0]
    slot_of_track = {j // T: q % n for q, j in zip(query.tolist(), target_index.tolist())}
    pairs = {(q % n, j // T) for q, j in zip(query.tolist(), target_index.tolist())}
    assert pairs == {(0, 0), (1, 1)} and slot_of_track == {0: 0, 1: 1}
    # per-frame (DETR-style) matching on the same costs swaps identities in frame 1
    frame1 = sequence_cost(
        logits[0, n : 2 * n].softmax(-1)[None], boxes[0, n : 2 * n][None],
        target["labels"].view(2, T)[:, 1:2], target["boxes"].view(2, T, 4)[:, 1:2],
    )  # fmt: skip
    assert frame1[0, 1] + frame1[1, 0] < frame1[0, 0] + frame1[1, 1]


def test_matched_pairs_use_the_matched_tracks_valid_frames():
    # track 0 is present only in frame 0 and matched to slot 1; track 1 everywhere, slot 0
    T, n = 2, 2
    track0 = [[0.2, 0.2, 0.1, 0.1], [0, 0, 0, 0]]
    track1 = [[0.7, 0.7, 0.3, 0.3], [0.7, 0.7, 0.3, 0.3]]
    boxes = torch.tensor([[track1[0], track0[0]], [track1[1], [0.2, 0.2, 0.1, 0.1]]])
    target = {
        "labels": torch.tensor([0, 2, 1, 1]),
        "boxes": torch.tensor([*track0, *track1]).float(),
        "valid": torch.tensor([True, False, True, True]),
    }
    outputs = {"pred_logits": torch.zeros(1, T * n, 3), "pred_boxes": boxes.view(1, T * n, 4)}
    query, target_index = SequenceMatcher(T)(outputs, [target])[0]
    assert sorted(zip(query.tolist(), target_index.tolist())) == [(0, 2), (1, 0), (2, 3)]


# --- loss ------------------------------------------------------------------------------------


def perfect_outputs(panoptic, n, slot_of_track, upsample=1):
    """Logits, boxes and mask logits that reproduce the targets exactly (frame-major queries)."""
    targets = targets_from_panoptic(panoptic)
    T, H, W = panoptic.shape
    K = 2
    logits = torch.full((T * n, K + 1), -30.0)
    logits[:, K] = 30.0
    boxes = torch.full((T * n, 4), 0.5)
    masks = torch.full((T * n, H, W), -30.0)
    for j, i in slot_of_track.items():
        for t in range(T):
            q, e = t * n + i, j * T + t
            logits[q] = -30.0
            logits[q, targets["labels"][e]] = 30.0
            if targets["valid"][e]:
                boxes[q] = targets["boxes"][e]
            masks[q] = targets["masks"][e] * 60 - 30
    out = {"pred_logits": logits[None], "pred_boxes": boxes[None], "pred_masks": masks[None]}
    out["aux_outputs"] = [{"pred_logits": logits[None], "pred_boxes": boxes[None]}]
    return out


def test_loss_is_zero_on_perfect_predictions_and_normalised_per_track_frame():
    panoptic = tiny_panoptic()
    cfg = vistr_config("tiny", num_frames=2, num_slots=3)
    criterion = VisTRLoss(cfg)
    outputs = perfect_outputs(panoptic, n=3, slot_of_track={0: 2, 1: 0})
    batch = {"panoptic": torch.as_tensor(panoptic)[None]}
    total, terms = criterion(outputs, batch)
    assert set(terms) == {"ce", "bbox", "giou", "focal", "dice", "aux_ce", "aux_bbox", "aux_giou"}
    assert total < 1e-4 and all(v < 1e-4 for v in terms.values())
    # shift one matched box by 0.1 in x: L1 = 0.1 / (tracks x T = 4, the absent frame counted)
    outputs["pred_boxes"][0, 0 * 3 + 0, 0] += 0.1  # car (slot 0), frame 0
    _, terms = criterion(outputs, batch)
    torch.testing.assert_close(terms["bbox"], torch.tensor(0.1 / 4))
    assert terms["giou"] > 1e-3


def test_class_loss_is_weighted_cross_entropy_over_all_queries():
    cfg = vistr_config("tiny", num_frames=2, num_slots=3)
    criterion = VisTRLoss(cfg)
    g = torch.Generator().manual_seed(0)
    panoptic = torch.as_tensor(tiny_panoptic())[None]
    outputs = {
        "pred_logits": torch.randn(1, 6, 3, generator=g),
        "pred_boxes": torch.rand(1, 6, 4, generator=g) * 0.5 + 0.25,
        "pred_masks": torch.randn(1, 6, 2, 3, generator=g),
    }
    _, terms = criterion(outputs, {"panoptic": panoptic})
    targets = targets_from_panoptic(panoptic[0])
    query, target_index = criterion.matcher(outputs, [targets])[0]
    classes = [2] * 6
    for q, e in zip(query.tolist(), target_index.tolist()):
        classes[q] = int(targets["labels"][e])
    log_p = outputs["pred_logits"][0].log_softmax(-1)
    weight = [1.0, 1.0, 0.1]
    nll = -sum(weight[c] * log_p[q, c] for q, c in enumerate(classes))
    torch.testing.assert_close(terms["ce"], nll / sum(weight[c] for c in classes))
    # masks: upsampled (2x3 -> 4x6) then focal/Dice over pixels, summed / (tracks x T)
    pred = F.interpolate(outputs["pred_masks"][0, query][:, None], size=(4, 6), mode="bilinear")
    focal, dice = focal_and_dice(
        pred.flatten(1), targets["masks"][target_index].flatten(1), 0.25, 2
    )
    torch.testing.assert_close(terms["focal"], focal.sum() / 4)
    torch.testing.assert_close(terms["dice"], dice.sum() / 4)


def test_focal_and_dice_hand_values():
    focal, dice = focal_and_dice(torch.zeros(1, 1), torch.ones(1, 1), alpha=0.25, gamma=2)
    torch.testing.assert_close(focal, torch.tensor([0.25 * 0.25 * math.log(2)]))
    torch.testing.assert_close(dice, torch.tensor([1 - 2 / 2.5]))


# --- model -----------------------------------------------------------------------------------


def test_model_contract_and_two_training_steps():
    torch.manual_seed(0)
    cfg = vistr_config("tiny", num_slots=4)
    model, criterion = build_vistr("tiny", num_slots=4), VisTRLoss(cfg)
    frames = torch.rand(2, 2, 3, 64, 96) * 255
    panoptic = torch.zeros(2, 2, 64, 96, dtype=torch.int64)
    panoptic[:, :, 10:30, 20:50] = 13001
    panoptic[1, 1, 40:60, 60:90] = 11002
    outputs = model(frames)
    assert outputs["pred_logits"].shape == (2, 8, 3)
    assert outputs["pred_boxes"].shape == (2, 8, 4)
    assert outputs["pred_masks"].shape == (2, 8, 16, 24)
    assert len(outputs["aux_outputs"]) == cfg.decoder_layers - 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        total, terms = criterion(model(frames), {"panoptic": panoptic})
        optimizer.zero_grad()
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
        assert all(p.grad is not None for p in model.parameters())  # every parameter is used
        optimizer.step()
    for name in [
        "query_embed.weight",
        "backbone.stem.0.conv.weight",
        "sequence_head.layers.0.weight",
    ]:
        assert not torch.equal(before[name], model.state_dict()[name]), name
    with pytest.raises(ValueError):
        model(frames[:, :1])


def test_clip_without_tracks_gives_zero_box_and_mask_terms_and_full_graph():
    torch.manual_seed(0)
    model = build_vistr("tiny", num_slots=3, decoder_layers=1)
    panoptic = torch.zeros(1, 2, 32, 48, dtype=torch.int64)
    panoptic[0, :, :4, :4] = 11000  # crowd only: no track
    total, terms = VisTRLoss(model.cfg)(
        model(torch.rand(1, 2, 3, 32, 48) * 255), {"panoptic": panoptic}
    )
    total.backward()
    assert terms["bbox"] == 0 and terms["giou"] == 0 and terms["dice"] == 0
    assert terms["ce"] > 0 and torch.isfinite(total)
    assert all(p.grad is not None for p in model.parameters())


def test_sequence_head_convolutions_mix_frames_of_the_same_parity():
    # dilation 2 in time: taps at t-2, t, t+2, so the convs never carry frame 1 into frame 0;
    # only the GroupNorm statistics (over C/G x T x H x W) couple all frames
    torch.manual_seed(0)
    head = SequenceHead(4, 4, 2).eval()
    x = torch.randn(1, 4, 3, 5, 5)
    odd, even = x.clone(), x.clone()
    odd[:, :, 1] += 1.0
    even[:, :, 2] += 1.0
    assert not torch.allclose(head(odd)[:, 0], head(x)[:, 0])  # through GroupNorm statistics
    for k in (1, 4, 7):
        head.layers[k] = torch.nn.Identity()
    base = head(x)
    torch.testing.assert_close(head(odd)[:, 0], base[:, 0])
    assert not torch.allclose(head(even)[:, 0], base[:, 0])


# --- inference -------------------------------------------------------------------------------


def test_predict_tubes_mean_score_majority_vote_threshold():
    T, n = 4, 3
    probs = torch.full((T, n, 3), 1 / 3)
    probs[:, 0] = torch.tensor([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.1, 0.8, 0.1]])
    probs[:, 1] = torch.tensor(
        [[0.5, 0.1, 0.4], [0.1, 0.4, 0.5], [0.2, 0.3, 0.5], [5e-4, 4e-4, 0.9991]]
    )  # classes person, car, car, person (tie -> person); frame 3 scores below 0.001
    masks = torch.full((T, n, 2, 3), -1.0)
    masks[:, 0, 0, 0] = 0.01  # sigmoid just above 0.5 -> kept
    masks[:, 0, 1, 2] = 0.0  # sigmoid exactly 0.5 -> not kept
    masks[:, 1, 1, :] = 1.0
    outputs = {
        "pred_logits": probs.log().reshape(1, T * n, 3),
        "pred_masks": masks.reshape(1, T * n, 2, 3),
        "num_frames": T,
    }
    tubes = predict_tubes(outputs, (2, 3))[0]
    assert len(tubes) == 2  # slot 2 has empty masks
    (mask0, class0, score0), (mask1, class1, score1) = tubes
    assert (class0, class1) == (13, 11)
    assert score0 == pytest.approx((0.7 + 0.6 + 0.5 + 0.8) / 4)
    assert score1 == pytest.approx((0.5 + 0.4 + 0.3 + 5e-4) / 4)
    expected0 = np.zeros((T, 2, 3), dtype=bool)
    expected0[:, 0, 0] = True
    np.testing.assert_array_equal(mask0, expected0)
    assert mask1[:3, 1].all() and not mask1[3].any() and not mask1[:, 0].any()


def test_tubes_to_panoptic_pastes_in_score_order():
    a = np.zeros((2, 2, 3), dtype=bool)
    b = np.zeros((2, 2, 3), dtype=bool)
    a[:, 0, :2] = True
    b[:, 0, 1:] = True
    pan = tubes_to_panoptic([(a, 11, 0.3), (b, 13, 0.9)], 2, 2, 3)
    expected = np.full((2, 2, 3), VOID_ID)
    expected[:, 0] = [11002, 13001, 13001]
    np.testing.assert_array_equal(pan, expected)


class SquareModel(torch.nn.Module):
    """Stand-in VisTR: slot 0 is a car whose mask is the bright pixels of each frame."""

    def __init__(self, num_frames):
        super().__init__()
        self.cfg = vistr_config("tiny", num_frames=num_frames, num_slots=2)

    def forward(self, frames):
        B, T = frames.shape[:2]
        logits = torch.tensor([-9.0, 9.0, 0.0]).repeat(B, T * 2, 1)
        masks = torch.full((B, T, 2, *frames.shape[-2:]), -5.0)
        masks[:, :, 0] = frames[:, :, 0] - 128
        return {"pred_logits": logits, "pred_masks": masks.flatten(1, 2), "num_frames": T}


@pytest.mark.parametrize("length,T,stride", [(5, 2, 1), (4, 3, 2), (2, 3, 1)])
def test_instance_video_covers_every_frame_with_one_track(length, T, stride):
    frames = torch.zeros(length, 3, 6, 8)
    for t in range(length):
        frames[t, :, 1:4, t : t + 3] = 255
    video = instance_video(SquareModel(T), frames, stride=stride)
    car, void = 13 * VIDEO_LABEL_DIVISOR + 1, 255 * VIDEO_LABEL_DIVISOR
    expected = np.where(frames[:, 0].numpy() > 128, car, void)
    np.testing.assert_array_equal(video, expected)


def test_padding_frames_are_cut_before_the_score_and_the_vote():
    # One real frame and two repeated ones: the slot says "car" (0.9) on the real frame and
    # "person" (0.99) on the padded ones; cut first, the tube is a car of score 0.9.
    T, probs = 3, torch.tensor([[0.05, 0.9, 0.05], [0.99, 0.005, 0.005], [0.99, 0.005, 0.005]])
    outputs = {"pred_logits": probs.log()[None], "num_frames": T,
               "pred_masks": torch.full((1, T, 4, 4), 5.0)}  # fmt: skip
    (tube,) = predict_tubes(outputs, (4, 4), (11, 13), valid=[1])[0]
    assert tube[0].shape == (1, 4, 4) and tube[1] == 13 and tube[2] == pytest.approx(0.9)
    (uncut,) = predict_tubes(outputs, (4, 4), (11, 13))[0]
    assert uncut[1] == 11 and uncut[2] == pytest.approx((0.9 + 0.99 + 0.99) / 3)
    scores = {}
    stream = instance_frames(SquareModel(T), iter(torch.zeros(2, 3, 6, 8)), 2, scores=scores)
    assert len(list(stream)) == 2 and set(scores) == {"vistr"}


class TwoSlots(torch.nn.Module):
    """Stand-in VisTR: a car (score 0.9) on the top rows and a person (0.6) on the bottom rows."""

    def __init__(self, num_frames):
        super().__init__()
        self.cfg = vistr_config("tiny", num_frames=num_frames, num_slots=2)

    def forward(self, frames):
        B, T, _, H, W = frames.shape
        probs = torch.tensor([[0.05, 0.9, 0.05], [0.6, 0.1, 0.3]])  # (person, car, no object)
        masks = torch.full((B, T, 2, H, W), -5.0)
        masks[:, :, 0, : H // 2], masks[:, :, 1, H // 2 :] = 5.0, 5.0
        logits = probs.log().repeat(B, T, 1)  # (B, T*2, 3), entry t*2 + slot
        return {"pred_logits": logits, "pred_masks": masks.flatten(1, 2), "num_frames": T}


def test_instance_frames_scores_each_track_with_its_tubes_score():
    scores = {}
    video = np.stack(list(instance_frames(TwoSlots(2), iter(torch.zeros(3, 3, 4, 6)), 3,
                                         scores=scores)))  # fmt: skip
    car, person = 13 * VIDEO_LABEL_DIVISOR + 1, 11 * VIDEO_LABEL_DIVISOR + 1
    assert (video[:, :2] == car).all() and (video[:, 2:] == person).all()
    assert scores == {"vistr": {car: pytest.approx(0.9), person: pytest.approx(0.6)}}
