"""Clip inference (minivseg.inference): thresholds (class 0.69 dropped / 0.71 kept, pixel 0.39
void / 0.41 kept), the raw-argmax rule, slot+1 ids constant over frames, stuff instance 0, logits
upsampled before the softmax (a case where the other order gives another class), per-frame area
limits, and mask-wise ranking against a plain-Python reference."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivseg.inference import (
    clip_inference,
    filter_small_segments,
    mask_wise_inference,
    panoptic_inference,
    semantic_inference,
)
from minivseg.panoptic import VOID_ID, thing_stuff_class_ids

CLASS_IDS = thing_stuff_class_ids()  # (11, 13, 0, 1, ..., 10, 12, 14, ..., 18)
K = len(CLASS_IDS)
PERSON, CAR, ROAD, BUILDING, SKY = (CLASS_IDS.index(c) for c in (11, 13, 0, 2, 10))


def class_logits_for(rows):
    """(N, K+1) logits whose softmax gives probability ``p`` to channel ``k``, the rest to void."""
    logits = torch.full((len(rows), K + 1), -30.0)
    for n, (k, p) in enumerate(rows):
        logits[n, k], logits[n, K] = math.log(p), math.log(1 - p)
    return logits


def test_class_threshold_069_dropped_071_kept():
    # Slot 0 (car, 0.69) and slot 1 (car, 0.71) each own one pixel; slot 2 (road, 0.99) the rest.
    classes = class_logits_for([(CAR, 0.69), (CAR, 0.71), (ROAD, 0.99)])
    masks = torch.zeros(3, 1, 2, 2)
    masks[0, 0, 0, 0] = masks[1, 0, 0, 1] = 10.0
    masks[2, 0, 1, :] = 10.0
    out = panoptic_inference(classes, masks, (2, 2), CLASS_IDS)
    # Pixel (0,0): its raw argmax (slot 0) is undetected -> void. Pixel (0,1): car, id slot 1 + 1.
    assert out.tolist() == [[[VOID_ID, 13002], [0, 0]]]
    assert out.dtype == torch.int64


def test_pixel_threshold_039_void_041_kept():
    classes = class_logits_for([(ROAD, 0.9), (SKY, 0.9), (CAR, 0.9)])
    probs = torch.tensor([[0.39, 0.41], [0.305, 0.295], [0.305, 0.295]])  # (N, pixels)
    masks = probs.log().reshape(3, 1, 1, 2)
    out = panoptic_inference(classes, masks, (1, 2), CLASS_IDS)
    assert out.tolist() == [[[VOID_ID, 0]]]


def test_raw_argmax_must_be_a_detected_slot():
    # Slot 0 is undetected but has the largest logit at pixel 0; among the detected slots,
    # slot 1 would get e^3 / (e^3 + 1) = 0.95 > 0.4 there, but the pixel is still void.
    classes = class_logits_for([(SKY, 0.5), (ROAD, 0.9), (SKY, 0.9)])
    masks = torch.tensor([[5.0, 0.0], [3.0, 3.0], [0.0, 0.0]]).reshape(3, 1, 1, 2)
    out = panoptic_inference(classes, masks, (1, 2), CLASS_IDS)
    assert out.tolist() == [[[VOID_ID, 0]]]
    # With slot 0 detected the same pixel goes to slot 0 (sky).
    classes = class_logits_for([(SKY, 0.8), (ROAD, 0.9), (SKY, 0.9)])
    assert panoptic_inference(classes, masks, (1, 2), CLASS_IDS).tolist() == [[[10000, 0]]]


def test_tube_ids_are_slot_plus_one_on_every_frame_and_stuff_is_instance_0():
    torch.manual_seed(0)
    N, T = 6, 3
    slots = [(CAR, 0.9), (PERSON, 0.9), (ROAD, 0.9), (CAR, 0.9), (PERSON, 0.95), (SKY, 0.9)]
    classes = class_logits_for(slots)
    # Slot n owns a moving block of columns in every frame.
    masks = torch.full((N, T, 4, 6 * N), -5.0)
    for n in range(N):
        for t in range(T):
            masks[n, t, :, 6 * n + t : 6 * n + t + 4] = 5.0
    out = panoptic_inference(classes, masks, (4, 6 * N), CLASS_IDS)
    expected = {0: 13001, 1: 11002, 2: 0, 3: 13004, 4: 11005, 5: 10000}
    for n, pan_id in expected.items():
        for t in range(T):
            assert set(out[t, :, 6 * n + t : 6 * n + t + 4].unique().tolist()) == {pan_id}


def naive_pixelwise(class_logits, mask_logits, out_size, class_ids, probs_first=False):
    """deeplab2's pixelwise post-processing written pixel by pixel, things (11, 13)."""
    probs = class_logits.softmax(-1)[:, :-1]
    conf, label = probs.max(-1)
    detected = conf >= 0.7
    x = mask_logits.permute(1, 0, 2, 3)
    if probs_first:  # the wrong order, kept to show that the order matters
        x = F.interpolate(x.softmax(1), size=out_size, mode="bilinear", align_corners=True).log()
    else:
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=True)
    T, N = x.shape[:2]
    out = torch.empty(T, *out_size, dtype=torch.long)
    for t in range(T):
        for i in range(out_size[0]):
            for j in range(out_size[1]):
                logit = x[t, :, i, j]
                det = [n for n in range(N) if detected[n]]
                if not det or not detected[int(logit.argmax())]:
                    out[t, i, j] = VOID_ID
                    continue
                p = logit[det].softmax(0)
                n = det[int(p.argmax())]
                sem = class_ids[int(label[n])]
                out[t, i, j] = (
                    VOID_ID if p.max() <= 0.4 else sem * 1000 + (n + 1) * (sem in (11, 13))
                )
    return out


def clear_pixels(class_logits, mask_logits, out_size, margin=1e-4):
    """(T, H, W) True where the per-pixel rules cannot flip under float error (~1e-6).

    Checked on the upsampled logits in float64: the raw top-2 gap (raw-argmax rule) and the
    detected top-2 gap (the slot) exceed ``margin`` and the pixel confidence is more than
    ``margin`` from 0.4, or the pixel is void by confidence whichever slot wins. The package and
    the naive loop compute the softmax over detected tubes in different ways, so only such
    pixels must agree exactly. The class confidences must be clear of 0.7 too.
    """
    confidence = class_logits.double().softmax(-1)[:, :-1].amax(-1)
    assert ((confidence - 0.7).abs() > margin).all()
    x = F.interpolate(
        mask_logits.double().permute(1, 0, 2, 3), size=out_size, mode="bilinear", align_corners=True
    )  # (T, N, H, W)
    detected = x[:, confidence >= 0.7]
    if detected.shape[1] == 0:  # nothing detected: every pixel is void
        return torch.ones(x.shape[0], *out_size, dtype=torch.bool)

    def top2_gap(logits):
        if logits.shape[1] == 1:
            return torch.full(logits[:, 0].shape, torch.inf, dtype=logits.dtype)
        top2 = logits.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]

    p = detected.softmax(1).amax(1)
    slot_is_clear = (top2_gap(detected) > margin) & (top2_gap(x) > margin)
    return ((p - 0.4).abs() > margin) & ((p < 0.4) | slot_is_clear)


def test_upsampling_logits_before_softmax():
    # Corners of a 2x2 map; the centre of the 3x3 upsampled map averages all four.
    classes = class_logits_for([(CAR, 0.9), (ROAD, 0.9)])
    masks = torch.zeros(2, 1, 2, 2)
    masks[0, 0, 0, 0] = 20.0
    masks[1, 0] = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    out = panoptic_inference(classes, masks, (3, 3), CLASS_IDS)
    # Logits first: centre logits (5, 0.75) -> the car. Probabilities first: mean car probability
    # (1 + 3 * 0.269) / 4 = 0.45 < road's 0.55 -> road.
    assert out[0, 1, 1].item() == 13001
    assert clear_pixels(classes, masks, (3, 3)).all()  # hand-made: no near-ties anywhere
    torch.testing.assert_close(out, naive_pixelwise(classes, masks, (3, 3), CLASS_IDS))
    assert naive_pixelwise(classes, masks, (3, 3), CLASS_IDS, probs_first=True)[0, 1, 1] == 0


def test_matches_naive_reference_on_random_logits():
    torch.manual_seed(1)
    N, T = 7, 2
    classes = torch.randn(N, K + 1) * 3
    classes[:4, [CAR, ROAD, PERSON, SKY]] += 8 * torch.eye(4)
    masks = torch.randn(N, T, 3, 4) * 3
    out = panoptic_inference(classes, masks, (5, 7), CLASS_IDS)
    clear = clear_pixels(classes, masks, (5, 7))
    assert clear.float().mean() > 0.9  # near-tie pixels are left out, not the whole clip
    naive = naive_pixelwise(classes, masks, (5, 7), CLASS_IDS)
    torch.testing.assert_close(out[clear], naive[clear])
    assert (out == VOID_ID).any() and (out != VOID_ID).any()


def test_no_detection_gives_all_void():
    classes = class_logits_for([(CAR, 0.5), (ROAD, 0.6)])
    out = panoptic_inference(classes, torch.randn(2, 2, 3, 3), (5, 5), CLASS_IDS)
    assert (out == VOID_ID).all() and out.shape == (2, 5, 5)


def test_area_limits_are_counted_per_frame():
    pan = torch.full((2, 1, 12), 2000)  # building everywhere
    pan[0, 0, :3] = 13001  # tube 1 has 3 pixels in frame 0 and 6 in frame 1
    pan[1, 0, :6] = 13001
    pan[1, 0, 6:8] = 0  # 2 road pixels in frame 1
    expected = [[[VOID_ID] * 3 + [2000] * 9], [[13001] * 6 + [VOID_ID] * 2 + [2000] * 4]]
    out = filter_small_segments(pan, thing_area_limit=4, stuff_area_limit=3)
    assert out.tolist() == expected
    assert filter_small_segments(pan).tolist() == pan.tolist()
    # Through panoptic_inference: the same limits void the same segments.
    classes = class_logits_for([(CAR, 0.9), (BUILDING, 0.9), (ROAD, 0.9)])
    masks = torch.stack([(pan == v).float() * 10 for v in (13001, 2000, 0)])  # (3, 2, 1, 12)
    limits = {"thing_area_limit": 4, "stuff_area_limit": 3}
    assert panoptic_inference(classes, masks, (1, 12), CLASS_IDS, **limits).tolist() == expected


def test_semantic_inference_has_no_thresholds():
    classes = class_logits_for([(CAR, 0.3), (ROAD, 0.2), (SKY, 0.25)])
    masks = torch.tensor([[2.0, 0.1, 0.0], [1.9, 2.0, 0.0], [0.0, 1.95, 0.5]]).reshape(3, 1, 1, 3)
    assert semantic_inference(classes, masks, (1, 3), CLASS_IDS).tolist() == [[[13, 0, 10]]]
    assert (panoptic_inference(classes, masks, (1, 3), CLASS_IDS) == VOID_ID).all()


def naive_mask_wise(class_logits, mask_logits, class_ids, overlap=0.8):
    """Mask-wise merging in plain Python: rank by conf * mean prob, paste onto free pixels."""
    probs = class_logits.softmax(-1)[:, :-1]
    conf, label = probs.max(-1)
    p = mask_logits.softmax(0).numpy()
    N = p.shape[0]
    masks = p > 0.4
    score = [conf[n].item() * (p[n][masks[n]].mean() if masks[n].any() else 0.0) for n in range(N)]
    out = np.full(p.shape[1:], VOID_ID)
    taken = np.zeros(p.shape[1:], bool)
    for n in sorted(range(N), key=lambda n: -score[n]):
        sem = class_ids[int(label[n])]
        if conf[n] < (0.7 if sem in (11, 13) else 0.5):
            continue
        free = masks[n] & ~taken
        if free.sum() > overlap * masks[n].sum():
            out[free] = sem * 1000 + (n + 1) * (sem in (11, 13))
            taken |= free
    return out


def assert_mask_wise_is_unambiguous(class_logits, mask_logits, margin=1e-4):
    """The package (torch) and `naive_mask_wise` (numpy) compute the ranking scores in different
    ways: no mask probability may sit within float error of 0.4, no class confidence of its
    threshold (0.7 or 0.5), and no two ranking scores of each other."""
    probs = mask_logits.double().softmax(0)
    assert ((probs - 0.4).abs() > margin).all()
    confidence = class_logits.double().softmax(-1)[:, :-1].amax(-1)
    assert ((confidence - 0.7).abs() > margin).all() and ((confidence - 0.5).abs() > margin).all()
    masks = (probs > 0.4).flatten(1)
    mean_prob = (probs.flatten(1) * masks).sum(1) / masks.sum(1).clamp(min=1)
    scores = (confidence * mean_prob).sort().values
    assert (scores[1:] - scores[:-1]).min() > margin


def test_mask_wise_ranking_and_overlap():
    # Two car tubes overlap on pixel 1 (both p = 0.45 there). Tube 1 has the higher
    # class confidence x mask score, so it is pasted first and wins the shared pixel.
    classes = class_logits_for([(CAR, 0.8), (CAR, 0.95), (ROAD, 0.9)])
    probs = torch.tensor(
        [
            [0.9, 0.45, 0.05, 0.05, 0.05, 0.05],
            [0.05, 0.45, 0.9, 0.9, 0.05, 0.05],
            [0.05, 0.1, 0.05, 0.05, 0.9, 0.9],
        ]
    )
    masks = probs.log().reshape(3, 1, 1, 6)
    assert_mask_wise_is_unambiguous(classes, masks)
    out = mask_wise_inference(classes, masks, (1, 6), CLASS_IDS)
    # Tube 0 keeps 1 of its 2 pixels: 1 > 0.8 * 2 is false, so it is dropped entirely.
    assert out.tolist() == [[[VOID_ID, 13002, 13002, 13002, 0, 0]]]
    np.testing.assert_array_equal(out.numpy(), naive_mask_wise(classes, masks, CLASS_IDS))
    # With a looser overlap rule tube 0 keeps its free pixel.
    out = mask_wise_inference(classes, masks, (1, 6), CLASS_IDS, overlap_threshold=0.4)
    assert out.tolist() == [[[13001, 13002, 13002, 13002, 0, 0]]]
    # Ranking uses the mask score too: a tube with lower confidence but a sharper mask goes first.
    # Scores: tube 0 0.99 * 0.475 = 0.47, tube 1 0.9 * 0.75 = 0.675, tube 2 0.85 * 0.75 = 0.64.
    classes = class_logits_for([(CAR, 0.99), (CAR, 0.9), (ROAD, 0.85)])
    probs[0] = torch.tensor([0.5, 0.45, 0.05, 0.05, 0.05, 0.05])
    probs[2, 0] = 0.45
    masks = probs.log().reshape(3, 1, 1, 6)
    assert_mask_wise_is_unambiguous(classes, masks)
    out = mask_wise_inference(classes, masks, (1, 6), CLASS_IDS)
    assert out.tolist() == [[[0, 13002, 13002, 13002, 0, 0]]]
    np.testing.assert_array_equal(out.numpy(), naive_mask_wise(classes, masks, CLASS_IDS))


def test_mask_wise_matches_naive_on_random_logits():
    torch.manual_seed(2)
    classes = torch.randn(8, K + 1) * 3
    classes[:5, [CAR, PERSON, ROAD, SKY, BUILDING]] += 7 * torch.eye(5)
    masks = torch.randn(8, 2, 4, 5) * 2
    assert_mask_wise_is_unambiguous(classes, masks)
    out = mask_wise_inference(classes, masks, (4, 5), CLASS_IDS)
    np.testing.assert_array_equal(out.numpy(), naive_mask_wise(classes, masks, CLASS_IDS))
    assert len(out.unique()) > 2


@pytest.mark.parametrize("mode", ["pixel", "mask", "semantic"])
def test_clip_inference_batches(mode):
    torch.manual_seed(3)
    outputs = {
        "class_logits": torch.randn(2, 5, K + 1) * 4,
        "mask_logits": torch.randn(2, 5, 2, 3, 3),
    }
    single = {
        "pixel": panoptic_inference,
        "mask": mask_wise_inference,
        "semantic": semantic_inference,
    }
    results = clip_inference(outputs, (5, 5), CLASS_IDS, mode=mode)
    assert len(results) == 2
    for b in range(2):
        expected = single[mode](
            outputs["class_logits"][b], outputs["mask_logits"][b], (5, 5), CLASS_IDS
        )
        torch.testing.assert_close(results[b], expected)
        assert results[b].shape == (2, 5, 5)


def test_bf16_logits_are_accepted():
    torch.manual_seed(4)
    classes = torch.randn(4, K + 1) * 4
    masks = torch.randn(4, 2, 3, 3)
    out = panoptic_inference(classes.bfloat16(), masks.bfloat16(), (5, 5), CLASS_IDS)
    ref = panoptic_inference(
        classes.bfloat16().float(), masks.bfloat16().float(), (5, 5), CLASS_IDS
    )
    torch.testing.assert_close(out, ref)
