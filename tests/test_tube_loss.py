"""Tests for minivseg.tube_loss: GT tubes, matching vs brute force, invariances, stop-grad weights,
naive reference losses, empty clips, temporal consistency.

`OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_tube_loss.py -q` (27 tests). Matching
against brute force over permutations (with and without the stuff split, and with more thing tubes
than thing slots); invariance to permuting thing slots; near-zero PQ terms for a perfect prediction;
value and gradient equality with a loop-by-loop reference whose matching weights are constants
(crowd gradient included); CMT-DeepLab Eq. (14) against a naive version; semantic top-k; crowd
handling; empty clips; reuse of the final matching by aux heads; temporal consistency; float32 under
bf16 autocast; NaN outputs; one device-to-host transfer and no syncing call in loss and backward.
The mask approximation term (CMT Eq. (13)): about 0 when each matched slot's points sit on its
tube's extremes and centre; equal to a naive Eq. (13) summed over layers; in the total with weight
1.0, and only matched slots get a gradient; 0 and finite on all-void and crowd-only clips.
"""

import dataclasses
import itertools
import math

import pytest
import torch

from minivseg.tube_loss import (
    TubeLoss,
    TubeLossConfig,
    match_tubes,
    subsample,
    temporal_consistency_loss,
    tubes_from_panoptic,
)

K, S = 19, 17  # KITTI-STEP: 19 classes, 17 stuff
T, H, W = 2, 17, 21  # 16k+1 sizes -> (5, 6) at stride 4
SIZE = (5, 6)


def make_clip() -> torch.Tensor:
    """Road below sky, one car track moving right, one person, a crowd car strip, void corner."""
    pan = torch.zeros(T, H, W, dtype=torch.long)  # road
    pan[:, :5] = 10_000  # sky
    pan[0, 5:12, 0:9] = 13_001  # car track 1, frame 0
    pan[1, 5:12, 4:13] = 13_001  # the same track in frame 1
    pan[:, 12:, 12:] = 11_002  # person track 2
    pan[:, 16, 0:9] = 13_000  # crowd cars (instance 0)
    pan[:, 0:5, 16:] = 255_000  # void
    return pan


def random_outputs(B=2, N=21, D=8, seed=0, aux=1):
    g = torch.Generator().manual_seed(seed)

    def head(embedding=True):
        out = dict(
            class_logits=torch.randn(B, N, K + 1, generator=g),
            mask_logits=2 * torch.randn(B, N, T, *SIZE, generator=g),
        )
        if embedding:
            out["pixel_embedding"] = torch.nn.functional.normalize(
                torch.randn(B, D, T, *SIZE, generator=g), dim=1
            )
        return out

    out = head()
    out["semantic_logits"] = torch.randn(B, K, T, *SIZE, generator=g)
    out["aux"] = [head() for _ in range(aux)]
    for tensor in [out["class_logits"], out["mask_logits"], out["semantic_logits"]]:
        tensor.requires_grad_(True)
    return out


def clip_batch(B=2):
    return dict(panoptic=make_clip()[None].repeat(B, 1, 1, 1))


def test_subsample_takes_rounded_linspace_rows():
    x = torch.arange(11 * 10).reshape(11, 10)
    y = subsample(x, (4, 4))
    assert y[:, 0].tolist() == [0, 30, 70, 100]  # rows 0, 3.33->3, 6.67->7, 10
    assert y[0].tolist() == [0, 3, 6, 9]
    big = torch.arange(129 * 417).reshape(129, 417)
    assert torch.equal(subsample(big, (33, 105)), big[::4, ::4])


def test_tubes_from_hand_made_clip():
    pan = make_clip()
    tubes = tubes_from_panoptic(pan, SIZE)
    sub = pan[:, ::4, ::4]
    # person (channel 0), car (1), road (channel of class 0 = 2), sky (channel of class 10 = 12)
    assert tubes["channels"].tolist() == [0, 1, 2, 12]
    for i, pan_id in enumerate([11_002, 13_001]):  # one tube per track over both frames
        assert torch.equal(tubes["masks"][i].bool(), sub == pan_id)
        assert tubes["masks"][i].sum(dim=(1, 2)).min() > 0
    assert torch.equal(tubes["masks"][2].bool(), sub == 0)
    crowd = sub == 13_000
    assert crowd.any() and (tubes["tube_index"][crowd] == -1).all() and tubes["valid"][crowd].all()
    void = sub == 255_000
    assert void.any() and not tubes["valid"][void].any() and (tubes["tube_index"][void] == -1).all()
    assert torch.equal(tubes["thing"], (sub == 11_002) | (sub == 13_001))
    assert tubes["masks"].sum(0).max() == 1  # tubes do not overlap
    # A car visible only on rows the subsampling skips vanishes: no tube at all.
    pan[:, 1:3, 1:3] = 13_005
    assert len(tubes_from_panoptic(pan, SIZE)["channels"]) == 4


def naive_similarity(class_logits, mask_logits, tubes):
    """dice[i][n], class_prob[i][n] with explicit loops (deeplab2's matching formulas)."""
    probs = mask_logits.exp() / mask_logits.exp().sum(0)
    valid = tubes["valid"].float()
    M, N = len(tubes["channels"]), class_logits.shape[0]
    dice, prob = torch.zeros(M, N), torch.zeros(M, N)
    for i in range(M):
        g = tubes["masks"][i]
        for n in range(N):
            p = probs[n] * valid
            dice[i, n] = (g * p).sum() / ((g.sum() + p.sum()) / 2 + 1e-5)
            prob[i, n] = class_logits[n].exp()[tubes["channels"][i]] / class_logits[n].exp().sum()
    return dice, prob


def brute_force(sim, free_tubes, free_slots):
    """Best total similarity over every injective pairing of free tubes and free slots, its
    pairing, and the runner-up total (the matching is compared only where the best is unique)."""
    if len(free_tubes) <= len(free_slots):
        pairings = (zip(free_tubes, p) for p in itertools.permutations(free_slots, len(free_tubes)))
    else:
        pairings = (zip(p, free_slots) for p in itertools.permutations(free_tubes, len(free_slots)))
    best, runner_up, best_option = -math.inf, -math.inf, None
    for pairing in pairings:
        option = dict(pairing)
        score = sum(sim[i, n].item() for i, n in option.items())
        if score > best:
            best, runner_up, best_option = score, best, option
        elif score > runner_up:
            runner_up = score
    return best, best_option, runner_up


@pytest.mark.parametrize("num_stuff, num_slots, extra_cars", [(3, 6, 0), (0, 6, 0), (3, 5, 1)])
def test_matching_equals_brute_force(num_stuff, num_slots, extra_cars):
    # 4 classes, class 1 is the thing: head order (1, 0, 2, 3); stuff channels 1..3.
    pan = torch.zeros(T, 9, 9, dtype=torch.long)
    pan[:, :3] = 2000
    pan[:, 4:6, 0:4], pan[:, 6:9, 5:9] = 1001, 1002
    if extra_cars:
        pan[:, 0:2, 6:9] = 1003  # 3 thing tubes for 2 thing slots
    tubes = tubes_from_panoptic(pan, (5, 5), num_classes=4, thing_classes=(1,))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        class_logits = 2 * torch.randn(num_slots, 5, generator=g)
        mask_logits = 3 * torch.randn(num_slots, T, 5, 5, generator=g)
        match = match_tubes(class_logits, mask_logits, tubes, num_stuff)
        dice, prob = naive_similarity(class_logits, mask_logits, tubes)
        torch.testing.assert_close(match["dice"], dice)
        torch.testing.assert_close(match["class_prob"], prob)
        sim = dice * prob
        channels = tubes["channels"].tolist()
        fixed = {i: num_slots - 4 + c for i, c in enumerate(channels) if c >= 4 - num_stuff}
        free = [i for i in range(len(channels)) if i not in fixed]
        best, option, runner_up = brute_force(sim, free, list(range(num_slots - num_stuff)))
        assert best - runner_up > 1e-5  # a unique optimum (smallest here: 3.3e-5)
        got = dict(zip(match["tube"].tolist(), match["slot"].tolist()))
        assert got == {**option, **fixed}
        assert math.isclose(sum(sim[i, n].item() for i, n in option.items()), best)


def test_stuff_always_lands_in_its_reserved_slot():
    tubes = tubes_from_panoptic(make_clip(), SIZE)
    N = 21
    class_logits = torch.zeros(N, K + 1)
    mask_logits = torch.zeros(N, T, *SIZE)
    # Make slot 0 a perfect "road" prediction: matching by similarity alone would pick it.
    road = tubes["masks"][2]
    mask_logits[0] = 10 * road
    class_logits[0, 2] = 10
    match = match_tubes(class_logits, mask_logits, tubes, S)
    got = dict(zip(match["tube"].tolist(), match["slot"].tolist()))
    assert got[2] == N - K + 2 and got[3] == N - K + 12
    assert got[0] < N - S and got[1] < N - S
    unsplit = match_tubes(class_logits, mask_logits, tubes, 0)
    assert dict(zip(unsplit["tube"].tolist(), unsplit["slot"].tolist()))[2] == 0


def test_loss_invariant_to_thing_slot_permutation():
    loss = TubeLoss(num_slots=21)
    out = random_outputs()
    _, terms = loss(out, clip_batch())
    perm = torch.cat(
        [torch.randperm(4, generator=torch.Generator().manual_seed(3)), torch.arange(4, 21)]
    )
    assert not torch.equal(perm[:4], torch.arange(4))

    def permuted(head):
        new = dict(head)
        new["class_logits"], new["mask_logits"] = (
            head["class_logits"][:, perm],
            head["mask_logits"][:, perm],
        )
        return new

    shuffled = permuted(out)
    shuffled["aux"] = [permuted(a) for a in out["aux"]]
    _, terms_p = loss(shuffled, clip_batch())
    for name in terms:
        torch.testing.assert_close(terms_p[name], terms[name])
    # Swapping two stuff slots is not a symmetry: stuff slots have fixed meanings.
    swap = torch.arange(21)
    swap[[4, 5]] = swap[[5, 4]]  # the road slot and the (absent) sidewalk slot
    stuff_swapped = dict(
        out, class_logits=out["class_logits"][:, swap], mask_logits=out["mask_logits"][:, swap]
    )
    _, terms_s = loss(stuff_swapped, clip_batch())
    assert abs(terms_s["pq_class"] - terms["pq_class"]) > 1e-4


def perfect_outputs(N=21):
    tubes = tubes_from_panoptic(make_clip(), SIZE)
    class_logits = torch.zeros(1, N, K + 1)
    class_logits[0, :, K] = 20.0  # unmatched slots: void
    mask_logits = torch.zeros(1, N, T, *SIZE)
    things = 0
    for i, c in enumerate(tubes["channels"].tolist()):
        slot = N - K + c if c >= 2 else things
        things += c < 2
        class_logits[0, slot] = 0
        class_logits[0, slot, c] = 20.0
        mask_logits[0, slot] = 20.0 * tubes["masks"][i]
    return dict(class_logits=class_logits, mask_logits=mask_logits)


def test_perfect_prediction_gives_near_zero_pq_terms_random_does_not():
    loss = TubeLoss(num_slots=21)
    batch = clip_batch(1)
    _, perfect = loss(perfect_outputs(), batch)
    _, random = loss(random_outputs(B=1), batch)
    for name in ["pq_class", "pq_dice", "tube_id"]:
        assert perfect[name] < 1e-5, (name, perfect[name])
        assert random[name] > 1e-3, (name, random[name])


def naive_terms(out, tubes, slot_of, alpha=0.75, tau=0.3):
    """Loop-by-loop PQ class/Dice, tube-ID CE and instance discrimination for clip 0, with every
    matching-derived weight computed as a plain Python float (i.e. a constant)."""
    cl, ml, emb = out["class_logits"][0], out["mask_logits"][0], out["pixel_embedding"][0]
    N = cl.shape[0]
    dice_m, prob_m = naive_similarity(cl.detach(), ml.detach(), tubes)
    probs_const = ml.detach().softmax(0)
    valid = tubes["valid"]
    class_losses, dice_sum = [], 0
    matched = {n: i for i, n in slot_of.items()}
    for n in range(N):
        if n in matched:
            i = matched[n]
            target, w = tubes["channels"][i].item(), alpha * max(dice_m[i, n].item(), 1e-5)
        else:
            void_ratio = (probs_const[n] * ~valid).sum().item() / (
                probs_const[n].sum().item() + 1e-5
            )
            target, w = K, (1 - alpha) * max(void_ratio, 1e-5)
        class_losses.append(w * -torch.log_softmax(cl[n], 0)[target])
    probs = ml.softmax(0)
    in_tube = (tubes["tube_index"] >= 0).float()
    for i, n in slot_of.items():
        p, g = probs[n] * in_tube, tubes["masks"][i]
        w = max(prob_m[i, n].item(), 1e-5)
        dice_sum = dice_sum + w * (1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1))
    pixel_ce, insdis, crowd_pull = [], [], 0
    features = emb
    centers = []
    for i in range(len(tubes["channels"])):
        g = tubes["masks"][i]
        c = (features * g).sum(dim=(1, 2, 3)) / g.sum()
        centers.append(c / c.norm())
    log_probs = ml.log_softmax(0)
    for t, y, x in itertools.product(range(T), range(SIZE[0]), range(SIZE[1])):
        i = tubes["tube_index"][t, y, x].item()
        if i < 0:
            if valid[t, y, x]:  # crowd: loss 0, not counted, gradient softmax (deeplab2)
                lse = torch.logsumexp(ml[:, t, y, x], 0)
                crowd_pull = crowd_pull + lse - lse.detach()
            continue
        pixel_ce.append(-log_probs[slot_of[i], t, y, x])
        if tubes["thing"][t, y, x]:
            logits = torch.stack([features[:, t, y, x] @ c / tau for c in centers])
            insdis.append(-torch.log_softmax(logits, 0)[i])
    return dict(
        pq_class=sum(class_losses) / N,
        pq_dice=dice_sum * alpha / N,
        tube_id=(sum(pixel_ce) + crowd_pull) / len(pixel_ce),
        instance_disc=sum(insdis) / len(insdis),
    )


def test_matches_naive_reference_and_weights_are_constants():
    loss = TubeLoss(num_slots=21)
    out = random_outputs(B=1, aux=0)
    out["pixel_embedding"].requires_grad_(True)
    leaves = [out["class_logits"], out["mask_logits"], out["pixel_embedding"]]
    _, terms = loss(out, clip_batch(1))
    tubes = tubes_from_panoptic(make_clip(), SIZE)
    match = match_tubes(out["class_logits"][0], out["mask_logits"][0], tubes, S)
    naive = naive_terms(out, tubes, dict(zip(match["tube"].tolist(), match["slot"].tolist())))
    for name, value in naive.items():
        torch.testing.assert_close(terms[name], value)
        got = torch.autograd.grad(terms[name], leaves, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
        for a, b in zip(got, want):
            if b is None:
                assert a is None or a.abs().max() == 0
            else:
                torch.testing.assert_close(a, b)
    # The class term sees masks only through stop-grad weights, the Dice term classes likewise.
    (g_mask,) = torch.autograd.grad(
        terms["pq_class"], out["mask_logits"], retain_graph=True, allow_unused=True
    )
    assert g_mask is None or g_mask.abs().max() == 0
    (g_cls,) = torch.autograd.grad(terms["pq_dice"], out["class_logits"], allow_unused=True)
    assert g_cls is None or g_cls.abs().max() == 0


def test_semantic_term_matches_naive_top_k_and_counts_crowd():
    pan = make_clip()
    out = random_outputs(B=1, aux=0)
    sem = pan[:, ::4, ::4] // 1000
    for top_k in [1.0, 0.2]:
        loss = TubeLoss(num_slots=21, config=TubeLossConfig(semantic_top_k=top_k))
        _, terms = loss(out, dict(panoptic=pan[None]))
        losses = []
        for t, y, x in itertools.product(range(T), range(SIZE[0]), range(SIZE[1])):
            c = sem[t, y, x].item()
            logits = out["semantic_logits"][0, :, t, y, x]
            losses.append(-torch.log_softmax(logits, 0)[c] if c < K else torch.tensor(0.0))
        values = torch.stack(losses).sort(descending=True).values[: round(top_k * len(losses))]
        torch.testing.assert_close(terms["semantic"], values.sum() / (values != 0).sum())
    # Crowd pixels: semantically counted, in no tube.
    crowd = (pan[:, ::4, ::4] == 13_000).nonzero()[0].tolist()
    loss = TubeLoss(num_slots=21)
    _, before = loss(out, dict(panoptic=pan[None]))
    changed = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}
    changed["semantic_logits"][(0, slice(None), *crowd)] += torch.randn(K)
    changed["mask_logits"][(0, slice(None), *crowd)] += 5 * torch.randn(21)
    _, after = loss(changed, dict(panoptic=pan[None]))
    assert abs(after["semantic"] - before["semantic"]) > 1e-4
    torch.testing.assert_close(after["tube_id"], before["tube_id"].detach())


def naive_contrastive(features, tubes, pixels, tau=0.3):
    """CMT-DeepLab Eq. (14) over the sampled pixel set A, averaged over pixels with positives."""
    flat_index = tubes["tube_index"].flatten()
    f = features.flatten(1)
    losses = []
    for a in pixels:
        if flat_index[a] < 0:
            continue
        positives = [p for p in pixels if flat_index[p] == flat_index[a]]
        log_denominator = torch.logsumexp(torch.stack([f[:, a] @ f[:, b] / tau for b in pixels]), 0)
        losses.append(
            -sum(f[:, a] @ f[:, p] / tau - log_denominator for p in positives) / len(positives)
        )
    return sum(losses) / len(losses)


def test_pixel_contrastive_variant_is_eq14():
    out = random_outputs(B=1, aux=0)
    tubes = tubes_from_panoptic(make_clip(), SIZE)
    num_pixels = T * SIZE[0] * SIZE[1]
    valid = tubes["valid"].flatten().nonzero()[:, 0].tolist()
    # k = P samples every pixel; k = #valid samples exactly the non-void ones (void never first).
    for k, pixels in [(num_pixels, list(range(num_pixels))), (len(valid), valid)]:
        loss = TubeLoss(num_slots=21, config=TubeLossConfig(contrastive_sample_k=k))
        _, terms = loss(out, clip_batch(1))
        want = naive_contrastive(out["pixel_embedding"][0], tubes, pixels)
        torch.testing.assert_close(terms["instance_disc"], want)


@pytest.mark.parametrize(
    "fill", [None, 255_000, 13_000], ids=["no_things", "all_void", "no_tubes_only_crowd"]
)
@pytest.mark.parametrize("sample_k", [0, 16])
def test_empty_clips_give_finite_losses(fill, sample_k):
    pan = make_clip()
    if fill is None:
        pan[pan // 1000 >= 11] = 2000  # things -> building: stuff only
    else:
        pan[:] = fill
    out = random_outputs(B=1)
    loss = TubeLoss(num_slots=21, config=TubeLossConfig(contrastive_sample_k=sample_k))
    total, terms = loss(out, dict(panoptic=pan[None]))
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    total.backward()
    assert all(torch.isfinite(out[k].grad).all() for k in ["class_logits", "mask_logits"])
    if fill is None:
        # MaX instance discrimination uses thing pixels only; Eq. (14) uses stuff pixels too.
        assert (terms["instance_disc"] == 0) == (sample_k == 0) and terms["tube_id"] > 0
    else:
        assert terms["pq_dice"] == 0 and terms["tube_id"] == 0 and terms["pq_class"] > 0


def test_aux_terms_reuse_the_final_matching():
    loss = TubeLoss(num_slots=21, config=TubeLossConfig(deep_supervision=True))
    out = random_outputs(B=1, aux=0)
    same = dict(out, aux=[{k: out[k] for k in ["class_logits", "mask_logits", "pixel_embedding"]}])
    _, terms = loss(same, clip_batch(1))
    for name in ["pq_class", "pq_dice", "tube_id"]:
        torch.testing.assert_close(terms[f"aux0_{name}"], terms[name])
    # Every head shares the final pixel embedding: instance discrimination is computed once.
    assert "aux0_instance_disc" not in terms and "instance_disc" in terms
    # A slot-permuted aux head would score the same if re-matched; with the final matching it
    # does not.
    perm = torch.tensor([1, 0, 3, 2, *range(4, 21)])
    aux = dict(
        same["aux"][0],
        mask_logits=out["mask_logits"][:, perm],
        class_logits=out["class_logits"][:, perm],
    )
    _, shuffled = loss(dict(out, aux=[aux]), clip_batch(1))
    assert abs(shuffled["aux0_tube_id"] - terms["tube_id"]) > 1e-3


def test_total_is_weighted_sum_of_named_terms_and_optional_heads():
    cfg = TubeLossConfig(
        pq_style_weight=2.0, tube_id_weight=0.5, instance_disc_weight=0.7, semantic_weight=1.3
    )
    loss = TubeLoss(num_slots=21, config=dataclasses.replace(cfg, deep_supervision=True))
    total, terms = loss(random_outputs(), clip_batch())
    assert set(terms) == {
        *(f"{p}{n}" for p in ["", "aux0_"] for n in ["pq_class", "pq_dice", "tube_id"]),
        "instance_disc",
        "semantic",
    }
    weights = dict(pq_class=2.0, pq_dice=2.0, tube_id=0.5, instance_disc=0.7, semantic=1.3)
    want = sum(weights[n.removeprefix("aux0_")] * v for n, v in terms.items())
    torch.testing.assert_close(total, want)
    bare = {k: v for k, v in random_outputs().items() if k in ("class_logits", "mask_logits")}
    _, bare_terms = loss(bare, clip_batch())
    assert set(bare_terms) == {"pq_class", "pq_dice", "tube_id"}
    # Without deep supervision (the default, as deeplab2's MaX-DeepLab) aux heads are ignored.
    _, final_only = TubeLoss(num_slots=21, config=cfg)(random_outputs(), clip_batch())
    assert set(final_only) == {"pq_class", "pq_dice", "tube_id", "instance_disc", "semantic"}
    for name, value in final_only.items():
        torch.testing.assert_close(value, terms[name])
    with pytest.raises(ValueError, match="slots"):
        TubeLoss(num_slots=17)
    with pytest.raises(ValueError, match="expected 30 slots"):
        TubeLoss(num_slots=30)(random_outputs(), clip_batch())


def test_temporal_consistency_loss():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 5, 4, 3, 3, generator=g)  # logits of a 4-frame stretch
    a = video[:, :, 0:3].clone().requires_grad_(True)
    b = video[:, :, 1:4].clone().requires_grad_(True)
    assert temporal_consistency_loss(a, b, overlap=2) == 0
    b2 = (
        b.detach() + torch.where(torch.rand(b.shape, generator=g) > 0.5, 1.0, -1.0)
    ).requires_grad_(True)
    lost = temporal_consistency_loss(a, b2, overlap=2)
    torch.testing.assert_close(lost, torch.tensor(1.0))  # every shared logit is off by exactly 1
    lost.backward()
    assert a.grad[:, :, 1:].abs().min() > 0 and a.grad[:, :, 0].abs().max() == 0
    assert b2.grad[:, :, :2].abs().min() > 0 and b2.grad[:, :, 2].abs().max() == 0
    with pytest.raises(ValueError):
        temporal_consistency_loss(a, b, overlap=0)


def test_loss_runs_in_float32_under_bf16_autocast():
    loss = TubeLoss(num_slots=21)
    out = random_outputs(B=1)
    half = {k: v.detach().bfloat16() for k, v in out.items() if torch.is_tensor(v)}
    half["aux"] = [{k: v.detach().bfloat16() for k, v in a.items()} for a in out["aux"]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = loss(half, clip_batch(1))
    upcast = {k: v.float() for k, v in half.items() if k != "aux"}
    upcast["aux"] = [{k: v.float() for k, v in a.items()} for a in half["aux"]]
    _, want = loss(upcast, clip_batch(1))
    for name in want:
        assert terms[name].dtype == torch.float32
        torch.testing.assert_close(terms[name], want[name], rtol=0, atol=0)


def gt_extremes_and_mean(mask: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """Naive: (y, x) min, max and mean over every pixel of a (T, h, w) tube, i / (n - 1)."""
    Tm, h, w = mask.shape
    pixels = [(y / (h - 1), x / (w - 1)) for t in range(Tm) for y in range(h) for x in range(w)
              if mask[t, y, x] > 0]  # fmt: skip
    lows = [min(p[a] for p in pixels) for a in (0, 1)]
    highs = [max(p[a] for p in pixels) for a in (0, 1)]
    means = [sum(p[a] for p in pixels) / len(pixels) for a in (0, 1)]
    return lows, highs, means


def points_on_extremes_and_centre(mask: torch.Tensor, R: int = 8) -> torch.Tensor:
    """R (y, x) points: the tube's top/bottom/left/right extremes, the other R - 4 at one point
    placed so that the mean of all R is the tube's centre (inside the tube's box)."""
    (y0, x0), (y1, x1), (ym, xm) = gt_extremes_and_mean(mask)
    ay, ax = (R * ym - y0 - y1) / (R - 2), (R * xm - x0 - x1) / (R - 2)
    assert y0 <= ay <= y1 and x0 <= ax <= x1  # the extremes stay the extremes
    points = torch.tensor([[y0, ax], [y1, ax], [ay, x0], [ay, x1]] + [[ay, ax]] * (R - 4))
    return points


def test_mask_approx_on_reference_points_with_the_final_matching():
    """Points on each matched tube's extremes and centre (stride-4, frames pooled) give ~0; the
    term is Eq. (13) summed over layers, weight 1.0, only matched slots get gradient."""
    out = random_outputs(B=2, aux=1)
    pan = make_clip()
    pan2 = pan.clone()
    pan2[pan2 // 1000 == 11] = 0  # clip 2: the person becomes road
    batch = dict(panoptic=torch.stack([pan, pan2]))
    loss = TubeLoss(num_slots=21)
    points = torch.rand(2, 21, 8, 2)
    matched = torch.zeros(2, 21, dtype=torch.bool)
    for b in range(2):
        tubes = tubes_from_panoptic(batch["panoptic"][b], SIZE)
        match = match_tubes(out["class_logits"][b], out["mask_logits"][b], tubes, S)
        assert len(match["tube"]) == len(tubes["masks"]) == 4 - b  # things and stuff
        for slot, tube in zip(match["slot"], match["tube"]):
            points[b, slot] = points_on_extremes_and_centre(tubes["masks"][tube])
            matched[b, slot] = True
    layers = [points.clone().requires_grad_(True), points.clone().requires_grad_(True)]
    total, terms = loss(dict(out, reference_points=layers), batch)
    assert terms["mask_approx"].item() == pytest.approx(0, abs=1e-6)
    # Random points: Eq. (13) written out per clip and layer, summed over layers.
    layers = [torch.rand(2, 21, 8, 2, requires_grad=True) for _ in range(2)]
    base, base_terms = loss(out, batch)
    total, terms = loss(dict(out, reference_points=layers), batch)
    assert "mask_approx" not in base_terms and set(terms) == {*base_terms, "mask_approx"}
    want = 0.0
    for b in range(2):
        tubes = tubes_from_panoptic(batch["panoptic"][b], SIZE)
        match = match_tubes(out["class_logits"][b], out["mask_logits"][b], tubes, S)
        for layer in layers:
            extreme = center = 0.0
            for slot, tube in zip(match["slot"], match["tube"]):
                lows, highs, means = gt_extremes_and_mean(tubes["masks"][tube])
                r = layer[b, slot].detach()
                for a in (0, 1):
                    extreme += abs(r[:, a].min() - lows[a]) + abs(r[:, a].max() - highs[a])
                    center += abs(r[:, a].mean() - means[a])
            K_b = len(match["tube"])
            want += (extreme / (4 * K_b) + center / (2 * K_b)) / 2  # mean over the 2 clips
    assert terms["mask_approx"].item() == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(total, base + 1.0 * terms["mask_approx"])
    terms["mask_approx"].backward()
    for layer in layers:
        assert torch.equal(layer.grad.abs().sum((2, 3)) > 0, matched)


@pytest.mark.parametrize("fill", [255_000, 13_000], ids=["all_void", "only_crowd"])
def test_mask_approx_finite_on_empty_clips(fill):
    pan = torch.full((T, H, W), fill, dtype=torch.long)
    points = [torch.rand(1, 21, 8, 2, requires_grad=True)]
    cfg = TubeLossConfig(mask_approx_weight=2.0)
    total, terms = TubeLoss(num_slots=21, config=cfg)(
        dict(random_outputs(B=1), reference_points=points), dict(panoptic=pan[None])
    )
    assert terms["mask_approx"] == 0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(points[0].grad).all() and points[0].grad.abs().sum() == 0


# Operators whose output size or value the host must read from the device (a CUDA sync).
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
               "masked_select", "is_nonzero", "equal"}  # fmt: skip


class SyncSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operator that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put_") and any(
            t is not None and t.dtype == torch.bool for t in args[1]
        )
        if name in SYNCING_OPS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def count_host_work(monkeypatch, run):
    """Run ``run()`` with the target building (host work in training) outside the spy; return
    the syncing operators seen and the number of device-to-host transfers (``Tensor.cpu``)."""
    spy, transfers = SyncSpy(), []
    real_tubes, real_cpu = TubeLoss._tubes, torch.Tensor.cpu

    def tubes_on_host(self, *args):
        with torch.utils._python_dispatch._disable_current_modes():
            return real_tubes(self, *args)

    def counted_cpu(self, *args, **kwargs):
        transfers.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(TubeLoss, "_tubes", tubes_on_host)
    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    with spy:
        run()
    monkeypatch.undo()
    return spy.seen, transfers


@pytest.mark.parametrize("sample_k", [0, 16])
def test_loss_and_backward_wait_for_the_device_once(monkeypatch, sample_k):
    """All clips of all pairs are matched with one transfer; nothing else syncs (loss or
    backward), with deep supervision, crowd, void and an empty clip in the batch."""
    cfg = TubeLossConfig(deep_supervision=True, contrastive_sample_k=sample_k)
    loss = TubeLoss(num_slots=21, config=cfg)
    a, b = random_outputs(B=3, seed=1), random_outputs(B=3, seed=2)
    batch = clip_batch(3)
    batch["panoptic"][2] = 255_000  # an all-void clip: no tubes

    def run():
        results = loss.losses([(a, batch), (b, batch)])
        sum(total for total, _ in results).backward()

    seen, transfers = count_host_work(monkeypatch, run)
    assert seen == [] and len(transfers) == 1
    _, single = count_host_work(monkeypatch, lambda: loss(a, batch))
    assert len(single) == 1


def test_nonfinite_outputs_give_a_nonfinite_loss_not_an_error():
    """A diverged model must reach the training loop's non-finite guard: the matching does not
    raise on NaN/inf similarities."""
    loss = TubeLoss(num_slots=21)
    out = random_outputs(B=2)
    out["mask_logits"] = out["mask_logits"].detach() * float("nan")
    out["class_logits"] = out["class_logits"].detach().clone()
    out["class_logits"][1] = float("inf")
    total, _ = loss(out, clip_batch())
    assert not torch.isfinite(total)
