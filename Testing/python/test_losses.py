"""VoCo loss terms against hand arithmetic, explicit loops and numerical gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from voco import losses
from voco.losses import (EPS, assign, inter_volume_loss, positive_loss, regulariser, voco_loss,
                         zero_overlap_loss)

LABELS = [[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]]
LOGITS = [[0.6, 0.3, 0.1], [0.2, 0.4, 0.7]]


def tensor(values, **kwargs):
    return torch.tensor(values, dtype=torch.float64, **kwargs)


# -- hand-worked values ---------------------------------------------------------------------------

def test_positive_loss_matches_hand_arithmetic():
    # |y - p| where y > 0: 0.15, 0.05 (target 0); 0.1, 0.2 (target 1). Label sum 2.
    expected = -(0.75 * math.log(1 - 0.15 + EPS) + 0.25 * math.log(1 - 0.05 + EPS)
                 + 0.5 * math.log(1 - 0.1 + EPS) + 0.5 * math.log(1 - 0.2 + EPS)) / (2.0 + EPS)
    got = positive_loss(tensor([LOGITS]), tensor([LABELS]))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.1495, abs=1e-4)


def test_zero_overlap_loss_matches_hand_arithmetic():
    # Zero labels at (0, 2) with p = 0.1 and (1, 0) with p = 0.2.
    square = (0.1 ** 2 + 0.2 ** 2) / (2 + EPS)
    log = (-math.log(1 - 0.1 + EPS) - math.log(1 - 0.2 + EPS)) / (2 + EPS)
    logits, labels = tensor([LOGITS]), tensor([LABELS])
    assert zero_overlap_loss(logits, labels, "square").item() == pytest.approx(square, abs=1e-6)
    assert zero_overlap_loss(logits, labels, "log").item() == pytest.approx(log, abs=1e-6)
    assert square == pytest.approx(0.025, abs=1e-6)
    with pytest.raises(ValueError):
        zero_overlap_loss(logits, labels, "cube")


def test_regulariser_matches_hand_arithmetic():
    # cos(b0, b1) = 24/25; cos(b0, b2) = -1/(5 sqrt 3) -> ReLU 0; cos(b1, b2) = 1/(5 sqrt 3).
    bases = tensor([[[3.0, 4.0, 0.0], [4.0, 3.0, 0.0], [1.0, -1.0, 1.0]]])
    expected = ((24 / 25) ** 2 + 0.0 + (1 / (5 * math.sqrt(3))) ** 2) / 3
    assert regulariser(bases).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx((0.9216 + 1 / 75) / 3, abs=1e-12)


def test_assign_matches_hand_arithmetic():
    targets = tensor([[[1.0, 0.0], [1.0, 1.0]]])
    bases = tensor([[[0.0, 2.0], [3.0, 4.0], [-1.0, 0.0]]])
    expected = [[0.0, 0.6, 0.0], [1 / math.sqrt(2), 7 / (5 * math.sqrt(2)), 0.0]]
    torch.testing.assert_close(assign(targets, bases), tensor([expected]), rtol=0, atol=1e-6)


def test_voco_loss_terms_match_hand_arithmetic_and_sum():
    logits, labels = tensor([LOGITS]), tensor([LABELS])
    bases = tensor([[[3.0, 4.0, 0.0], [4.0, 3.0, 0.0], [1.0, -1.0, 1.0]]])
    terms = voco_loss(logits, labels, bases, "square")
    assert set(terms) == {"loss", "loss_pos", "loss_neg", "loss_reg"}
    assert terms["loss_neg"].item() == pytest.approx(0.05 / (2 + EPS), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(
        terms["loss_pos"].item() + terms["loss_neg"].item() + terms["loss_reg"].item(), abs=1e-12)


def test_terms_are_averaged_per_volume_then_over_volumes():
    torch.manual_seed(0)
    logits = torch.rand(2, 3, 4, dtype=torch.float64) * 0.9
    labels = torch.zeros(2, 3, 4, dtype=torch.float64)
    labels[0, :, :2] = 0.5       # volume 0: label mass 3, six zeros
    labels[1, 0, 0] = 1.0        # volume 1: label mass 1, eleven zeros
    for fn in (positive_loss, lambda p, y: zero_overlap_loss(p, y, "log")):
        per_volume = [fn(logits[i:i + 1], labels[i:i + 1]) for i in range(2)]
        torch.testing.assert_close(fn(logits, labels), (per_volume[0] + per_volume[1]) / 2)
    pooled = -(labels * torch.log(1 - (labels - logits).abs() + EPS)).sum() / labels.sum()
    assert abs(positive_loss(logits, labels).item() - pooled.item()) > 1e-3


# -- explicit loops -------------------------------------------------------------------------------

def loop_regulariser(bases):
    values = []
    for b in range(bases.shape[0]):
        for i in range(bases.shape[1]):
            for j in range(i + 1, bases.shape[1]):
                values.append(F.relu(F.cosine_similarity(bases[b, i], bases[b, j].detach(), dim=0)) ** 2)
    return torch.stack(values).mean()


def test_regulariser_equals_a_loop_over_pairs_with_the_same_gradient():
    torch.manual_seed(1)
    bases = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    value = regulariser(bases)
    (grad,) = torch.autograd.grad(value, bases)
    reference = loop_regulariser(bases)
    (reference_grad,) = torch.autograd.grad(reference, bases)
    torch.testing.assert_close(value, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-10)
    # Only the first argument of each pair is differentiated: the last base is never one.
    assert torch.count_nonzero(grad[:, -1]) == 0
    # ... which differs from differentiating both sides.
    unit = F.normalize(bases, dim=-1)
    both = F.relu(unit @ unit.transpose(-1, -2)).pow(2)[:, torch.ones(5, 5, dtype=torch.bool).triu(1)].mean()
    (both_grad,) = torch.autograd.grad(both, bases)
    torch.testing.assert_close(both, value)
    assert (both_grad - grad).abs().max() > 1e-3


def test_regulariser_gradient_equals_finite_differences_with_the_second_argument_frozen():
    # gradcheck cannot test the stop-gradient directly (a perturbation moves both sides), so
    # differentiate numerically the function of the first argument with the second held fixed.
    torch.manual_seed(2)
    frozen = torch.randn(2, 4, 3, dtype=torch.float64)
    upper = torch.ones(4, 4, dtype=torch.bool).triu(1)

    def first_argument_only(x):
        sim = F.relu(F.normalize(x, dim=-1) @ F.normalize(frozen, dim=-1).transpose(-1, -2)).pow(2)
        return sim[:, upper].mean()

    assert torch.autograd.gradcheck(first_argument_only, (frozen.clone().requires_grad_(),))
    bases = frozen.clone().requires_grad_()
    (grad,) = torch.autograd.grad(regulariser(bases), bases)
    numerical = torch.zeros_like(frozen)
    h = 1e-6
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in frozen.shape)):
        idx = tuple(idx.tolist())
        plus, minus = frozen.clone(), frozen.clone()
        plus[idx] += h
        minus[idx] -= h
        numerical[idx] = (first_argument_only(plus) - first_argument_only(minus)) / (2 * h)
    torch.testing.assert_close(grad, numerical, rtol=1e-5, atol=1e-7)


def test_nnssl_regulariser_equals_a_loop_over_pairs_differentiating_both_sides():
    torch.manual_seed(9)
    bases = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    value = regulariser(bases, "nnssl")
    reference = torch.stack([torch.stack([F.relu(F.cosine_similarity(bases[b, i], bases[b, j], dim=0))
                                          for i in range(5) for j in range(i + 1, 5)]).mean() for b in range(2)]).mean()
    torch.testing.assert_close(value, reference, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(value, bases)
    (reference_grad,) = torch.autograd.grad(reference, bases)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: regulariser(x, "nnssl"), (bases.detach().abs().requires_grad_(),))
    with pytest.raises(ValueError):
        regulariser(bases, "cube")


def test_assign_equals_a_loop_of_cosine_similarities():
    torch.manual_seed(3)
    targets, bases = torch.randn(2, 3, 6), torch.randn(2, 4, 6)
    expected = torch.zeros(2, 3, 4)
    for b in range(2):
        for t in range(3):
            for k in range(4):
                expected[b, t, k] = F.relu(F.cosine_similarity(targets[b, t], bases[b, k], dim=0))
    got = assign(targets, bases)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got == 0).any() and (got > 0).any()


def loop_inter_volume(s_targets, s_bases, t_targets, t_bases, form):
    """The reference's shape: for each volume i, the student's targets of i against its bases of
    the next volume (i + 1, wrapping round), labelled by the teacher's detached prediction for the
    same pair; the mean over volumes."""
    values = []
    b = s_targets.shape[0]
    for i in range(b):
        j = (i + 1) % b
        predicted = torch.stack([F.relu(F.cosine_similarity(s_targets[i, u][None], s_bases[j], dim=1))
                                 for u in range(s_targets.shape[1])])
        soft = torch.stack([F.relu(F.cosine_similarity(t_targets[i, u][None], t_bases[j], dim=1))
                            for u in range(t_targets.shape[1])]).detach()
        pos = -(soft * torch.log(1 - (soft - predicted).abs() + EPS)).sum() / (soft.sum() + EPS)
        zero = (soft == 0).to(predicted.dtype)
        neg_values = predicted.pow(2) if form == "square" else -torch.log(1 - predicted + EPS)
        values.append((pos, (zero * neg_values).sum() / (zero.sum() + EPS)))
    return torch.stack([p for p, _ in values]).mean() + torch.stack([n for _, n in values]).mean()


def test_inter_volume_loss_pairs_a_single_volume_with_itself():
    torch.manual_seed(8)
    student = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    s_bases, t_targets, t_bases = (torch.randn(1, n, 5, dtype=torch.float64) for n in (3, 2, 3))
    value = inter_volume_loss(student, s_bases, t_targets, t_bases, "log")
    torch.testing.assert_close(value, loop_inter_volume(student, s_bases, t_targets, t_bases, "log"), rtol=0, atol=1e-12)
    soft = assign(t_targets, t_bases)
    predicted = assign(student, s_bases)
    torch.testing.assert_close(value, positive_loss(predicted, soft) + zero_overlap_loss(predicted, soft, "log"))
    value.backward()
    assert torch.count_nonzero(student.grad) > 0


@pytest.mark.parametrize("form", ["square", "log"])
def test_inter_volume_loss_equals_a_loop_over_next_volumes(form):
    torch.manual_seed(4)
    s_targets = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    s_bases = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    t_targets, t_bases = torch.randn(3, 2, 7, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64)
    value = inter_volume_loss(s_targets, s_bases, t_targets, t_bases, form)
    reference = loop_inter_volume(s_targets, s_bases, t_targets, t_bases, form)
    torch.testing.assert_close(value, reference, rtol=0, atol=1e-10)
    grads = torch.autograd.grad(value, (s_targets, s_bases))
    reference_grads = torch.autograd.grad(reference, (s_targets, s_bases))
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-10)
    assert value.item() > 0


# -- gradcheck ------------------------------------------------------------------------------------

def away_from_kinks():
    labels = tensor([[[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]], [[0.3, 0.0, 0.7], [0.6, 0.4, 0.0]]])
    logits = tensor([[[0.6, 0.3, 0.1], [0.2, 0.4, 0.7]], [[0.45, 0.15, 0.5], [0.35, 0.55, 0.3]]])
    assert (labels - logits).abs().min() > 0.04
    return logits, labels


def test_gradcheck_positive_loss():
    logits, labels = away_from_kinks()
    assert torch.autograd.gradcheck(positive_loss, (logits.requires_grad_(), labels.requires_grad_()))


@pytest.mark.parametrize("form", ["square", "log"])
def test_gradcheck_zero_overlap_loss(form):
    logits, labels = away_from_kinks()
    assert torch.autograd.gradcheck(lambda p: zero_overlap_loss(p, labels, form), (logits.requires_grad_(),))


def test_gradcheck_assign_and_regulariser_of_non_negative_pairs():
    torch.manual_seed(5)
    targets = torch.randn(2, 3, 4, dtype=torch.float64)
    bases = torch.randn(2, 3, 4, dtype=torch.float64)
    cos = F.normalize(targets, dim=-1) @ F.normalize(bases, dim=-1).transpose(-1, -2)
    assert cos.abs().min() > 1e-3
    assert torch.autograd.gradcheck(assign, (targets.requires_grad_(), bases.requires_grad_()))
    # With all bases in one orthant every pair is counted; still only the first side is
    # differentiated, so the numerical check runs on the frozen-second-side function above.
    positive = bases.abs() + 0.1
    assert torch.autograd.gradcheck(
        lambda x: (F.relu(F.normalize(x, dim=-1) @ F.normalize(positive, dim=-1).transpose(-1, -2)).pow(2)
                   [:, torch.ones(3, 3, dtype=torch.bool).triu(1)].mean()), (positive.clone().requires_grad_(),))
    x = positive.clone().requires_grad_()
    (grad,) = torch.autograd.grad(regulariser(x), x)
    (ref,) = torch.autograd.grad(loop_regulariser(x), x)
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10)


def test_gradcheck_inter_volume_loss():
    torch.manual_seed(6)
    s_targets, s_bases = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 3, 5, dtype=torch.float64)
    t_targets, t_bases = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 3, 5, dtype=torch.float64)
    cos = F.normalize(s_targets, dim=-1)[:, None] @ F.normalize(s_bases, dim=-1)[None].transpose(-1, -2)
    soft = assign(t_targets[:, None], t_bases[None])
    # Away from the ReLU kink, and from the |y - p| kink wherever the prediction is not clamped.
    assert cos.abs().min() > 1e-3
    assert (soft - cos)[cos > 0].abs().min() > 1e-3
    assert torch.autograd.gradcheck(lambda s, b: inter_volume_loss(s, b, t_targets, t_bases, "log"),
                                    (s_targets.requires_grad_(), s_bases.requires_grad_()))


# -- voco_loss ------------------------------------------------------------------------------------

def test_voco_loss_total_is_the_sum_of_its_terms():
    torch.manual_seed(7)
    logits = torch.rand(2, 2, 9)
    labels = torch.rand(2, 2, 9) * (torch.rand(2, 2, 9) > 0.5)
    bases = torch.randn(2, 9, 16)
    inter = torch.tensor(0.37)
    with_inter = voco_loss(logits, labels, bases, "log", inter)
    assert set(with_inter) == {"loss", "loss_pos", "loss_neg", "loss_reg", "loss_inter"}
    torch.testing.assert_close(with_inter["loss_pos"], positive_loss(logits, labels))
    torch.testing.assert_close(with_inter["loss_neg"], zero_overlap_loss(logits, labels, "log"))
    torch.testing.assert_close(with_inter["loss_reg"], regulariser(bases))
    assert with_inter["loss_inter"] is inter
    total = sum(with_inter[k].item() for k in ("loss_pos", "loss_neg", "loss_reg", "loss_inter"))
    assert with_inter["loss"].item() == pytest.approx(total, abs=1e-6)
    without = voco_loss(logits, labels, bases, "square")
    assert "loss_inter" not in without
    assert without["loss"].item() == pytest.approx(
        sum(without[k].item() for k in ("loss_pos", "loss_neg", "loss_reg")), abs=1e-6)
    assert losses.EPS == 1e-6
