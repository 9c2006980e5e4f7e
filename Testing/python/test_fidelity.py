"""Each preset's objective against the official code's, in float64: every loss term, its value
and its gradient, the projection head, the feature dropout, the optimiser and the augmentation.

The official formulas are written out below in our own words from reading the sources:
v1: Luffy03/VoCo ``models/voco_head.py`` (VoCoHead.forward, online_assign, ce_loss,
regularization_loss) and ``voco_train.py``; v2: Luffy03/Large-Scale-Medical
``Self-supervised/models/voco_head.py`` (VoCoHead.forward, inter_volume) and ``voco_train.py``;
nnssl: MIC-DKFZ/nnssl ``training/loss/voco_loss.py`` (VoCoLoss), ``architectures/voco_architecture.py``
and ``ssl_data/dataloading/voco_transform.py``. Each loops over volumes, targets and pairs the way
those sources do, so that the vectorised engine is checked against a different computation.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from voco.cli import _preset, build_parser
from voco.data.crops import augment, draw_augmentation
from voco.models.voco import ProjectionHead, batch_keep_mask, feature_keep_mask, voco_forward
from voco.presets import PRESETS, resolve_preset
from voco.errors import VocoInputError
from voco.training.schedules import build_optimizer

OFFICIAL_EPS = 1e-6  # the constant inside every log and denominator of the official losses


def relu_cos(a, b):
    """One target (D,) against bases (K, D): ReLU of the cosine similarity with each base."""
    return torch.stack([F.relu(F.cosine_similarity(a, base, dim=0)) for base in b])


def prediction_matrix(targets, bases):
    return torch.stack([relu_cos(t, bases) for t in targets])   # (T, K)


def voco_ce(labels, logits, zero_term):
    """v1/v2 ce_loss of one volume: the overlap-weighted -log(1 - |y - p|) over the label mass,
    plus the mean over the zero labels of ``zero_term(p)``."""
    pos = 0.0
    for y, p in zip(labels.flatten(), logits.flatten()):
        pos = pos - y * torch.log(1 - (y - p).abs() + OFFICIAL_EPS)
    pos = pos / (labels.sum() + OFFICIAL_EPS)
    zeros = [zero_term(p) for y, p in zip(labels.flatten(), logits.flatten()) if y == 0]
    neg = sum(zeros) / (len(zeros) + OFFICIAL_EPS)
    return pos, neg


def voco_pairs_regulariser(bases):
    """v1/v2: over pairs i < j, ReLU(cos(b_i, b_j with no gradient))^2, averaged."""
    values = [F.relu(F.cosine_similarity(bases[i], bases[j].detach(), dim=0)) ** 2
              for i in range(len(bases)) for j in range(i + 1, len(bases))]
    return sum(values) / len(values)


def square(p):
    return p ** 2


def minus_log(p):
    return -torch.log(1 - p + OFFICIAL_EPS)


def official_v1(s_bases, s_targets, t_bases, t_targets, labels):
    """Per volume: the student's targets against the teacher's bases and the teacher's targets
    against the student's bases, averaged; p^2 for zero labels; the regulariser on the student's
    bases; each term summed over volumes and divided by their number."""
    b = len(labels)
    pos = neg = reg = 0.0
    for i in range(b):
        logits = 0.5 * (prediction_matrix(s_targets[i], t_bases[i]) + prediction_matrix(t_targets[i], s_bases[i]))
        p, n = voco_ce(labels[i], logits, square)
        pos, neg, reg = pos + p, neg + n, reg + voco_pairs_regulariser(s_bases[i])
    return {"loss_pos": pos / b, "loss_neg": neg / b, "loss_reg": reg / b}


def official_v2(s_bases, s_targets, t_bases, t_targets, labels):
    """Per volume i: its student targets against its teacher bases (-log(1 - p) for zero labels);
    the inter-volume term against volume j = (i + 1) mod B, the student's prediction scored
    against the teacher's detached one; the regulariser on the student's bases; all / B."""
    b = len(labels)
    pos = neg = inter = reg = 0.0
    for i in range(b):
        p, n = voco_ce(labels[i], prediction_matrix(s_targets[i], t_bases[i]), minus_log)
        j = (i + 1) % b
        soft = prediction_matrix(t_targets[i], t_bases[j]).detach()
        ip, ineg = voco_ce(soft, prediction_matrix(s_targets[i], s_bases[j]), minus_log)
        pos, neg, inter, reg = pos + p, neg + n, inter + ip + ineg, reg + voco_pairs_regulariser(s_bases[i])
    return {"loss_pos": pos / b, "loss_neg": neg / b, "loss_inter": inter / b, "loss_reg": reg / b}


def official_nnssl(bases, targets, labels):
    """nnssl's VoCoLoss: predictions from the detached bases; both ratios pooled over the whole
    batch (the label mass without eps; the zero count with eps added once per element); p^2 for
    zero labels; regulariser ReLU(cos) (not squared, gradient through both) over the upper
    triangle, averaged per volume and then over volumes."""
    logits = torch.stack([prediction_matrix(t, b.detach()) for t, b in zip(targets, bases)])
    zero = (labels == 0).to(logits.dtype)
    pos = (-torch.log(1 - (labels - logits).abs() + OFFICIAL_EPS) * labels).sum() / labels.sum()
    neg = (logits ** 2 * zero).sum() / (zero + OFFICIAL_EPS).sum()
    k = bases.shape[1]
    reg = sum(sum(F.relu(F.cosine_similarity(vol[i], vol[j], dim=0)) for i in range(k) for j in range(i + 1, k))
              * 2 / (k * (k - 1)) for vol in bases) / len(bases)
    return {"loss_pos": pos, "loss_neg": neg, "loss_reg": reg}


def overlap_like_labels(b, t, k, seed, zeros_per_target=None):
    """Labels as the geometry gives them: each target's row sums to 1, some entries are 0."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(b, t, k, dtype=torch.float64)
    for i in range(b):
        for u in range(t):
            zeros = zeros_per_target or int(torch.randint(1, k - 1, (1,), generator=gen))
            touched = torch.randperm(k, generator=gen)[:k - zeros]
            weights = torch.rand(len(touched), generator=gen, dtype=torch.float64) + 0.1
            labels[i, u, touched] = weights / weights.sum()
    return labels


def projections(b, k, t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, k + t, d, generator=gen, dtype=torch.float64).requires_grad_()


def engine_terms(preset, projected, t_projected, labels):
    """The engine's voco_forward with the networks replaced by the given projections."""
    student = lambda crops, keep: (projected.detach(), projected)  # noqa: E731
    teacher = (lambda x: (None, t_projected)) if preset.teacher == "full" else (lambda x: t_projected)
    crops = torch.zeros(projected.shape[:2])
    return voco_forward(student, teacher if preset.teacher != "none" else None, preset, crops, labels)[1]


def assert_terms_and_gradients_equal(ours, official, leaf, rtol=1e-10, atol=1e-12):
    for name, value in official.items():
        torch.testing.assert_close(ours[name], value, rtol=rtol, atol=atol, msg=name)
        (grad,) = torch.autograd.grad(ours[name], leaf, retain_graph=True, allow_unused=True)
        (expected,) = torch.autograd.grad(value, leaf, retain_graph=True, allow_unused=True)
        grad = torch.zeros_like(leaf) if grad is None else grad
        expected = torch.zeros_like(leaf) if expected is None else expected
        torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol, msg=f"gradient of {name}")
    torch.testing.assert_close(ours["loss"], sum(official.values()), rtol=rtol, atol=atol)


# -- loss terms, per preset -------------------------------------------------------------------------

def test_v1_terms_and_gradients_equal_the_official_formulas():
    preset = resolve_preset("v1", grid="2,2,1", crop_edge=32)
    b, k, t = 2, preset.num_bases, preset.num_targets
    student, teacher = projections(b, k, t, 6, 0), projections(b, k, t, 6, 1).detach()
    labels = overlap_like_labels(b, t, k, 2)
    ours = engine_terms(preset, student, teacher, labels)
    official = official_v1(student[:, :k], student[:, k:], teacher[:, :k], teacher[:, k:], labels)
    assert set(ours) == {"loss", *official}
    assert_terms_and_gradients_equal(ours, official, student)


@pytest.mark.parametrize("name", ["v2", "demo"])
@pytest.mark.parametrize("volumes", [1, 2, 3])
def test_v2_and_demo_terms_and_gradients_equal_the_official_formulas(name, volumes):
    # Three volumes: the official pairs volume i with i + 1 only; one: a volume with itself.
    preset = PRESETS[name]
    b, k, t = volumes, preset.num_bases, preset.num_targets
    student, teacher = projections(b, k, t, 6, 3), projections(b, k, t, 6, 4).detach()
    labels = overlap_like_labels(b, t, k, 5)
    ours = engine_terms(preset, student, teacher, labels)
    official = official_v2(student[:, :k], student[:, k:], teacher[:, :k], teacher[:, k:], labels)
    assert set(ours) == {"loss", *official}
    assert_terms_and_gradients_equal(ours, official, student)
    assert ours["loss_inter"].item() > 0


@pytest.mark.parametrize("volumes", [1, 2])
def test_nnssl_terms_and_gradients_equal_the_official_formulas(volumes):
    # Same number of zero labels in every volume, so nnssl's batch-pooled ratios equal the
    # per-volume means the engine takes; what remains is where the 1e-6 sits in the
    # denominators (relative effect below 1e-6).
    preset = resolve_preset("nnssl", grid="2,2,1", crop_edge=32)
    b, k, t = volumes, preset.num_bases, preset.num_targets
    student = projections(b, k, t, 6, 6)
    labels = overlap_like_labels(b, t, k, 7, zeros_per_target=2)
    ours = engine_terms(preset, student, None, labels)
    official = official_nnssl(student[:, :k], student[:, k:], labels)
    assert set(ours) == {"loss", *official}
    assert_terms_and_gradients_equal(ours, official, student, rtol=1e-5, atol=1e-9)


def test_nnssl_prediction_sends_no_gradient_to_the_bases_and_its_regulariser_reaches_both_sides():
    preset = resolve_preset("nnssl", grid="2,2,1", crop_edge=32)
    k = preset.num_bases
    student = projections(1, k, preset.num_targets, 6, 8)
    terms = engine_terms(preset, student, None, overlap_like_labels(1, preset.num_targets, k, 9))
    (prediction_grad,) = torch.autograd.grad(terms["loss_pos"] + terms["loss_neg"], student, retain_graph=True)
    assert torch.count_nonzero(prediction_grad[:, :k]) == 0 and torch.count_nonzero(prediction_grad[:, k:]) > 0
    # Both sides of each pair are differentiated: with all bases positive every pair counts and
    # the last base, never the first of a pair, gets a gradient too (v1/v2 would give it none).
    positive = projections(1, k, 0, 6, 10).detach().abs().requires_grad_()
    (reg_grad,) = torch.autograd.grad(engine_terms(preset, torch.cat([positive, student[:, k:]], 1), None,
                                                   overlap_like_labels(1, preset.num_targets, k, 9))["loss_reg"], positive)
    assert torch.count_nonzero(reg_grad[0, -1]) > 0


def test_nnssl_pools_the_zero_overlap_ratio_over_the_batch_where_the_engine_averages_volumes():
    # The one deliberate difference in nnssl's loss: with different zero counts per volume the
    # batch-pooled ratio differs from the mean of per-volume ratios (which keeps DDP exact).
    preset = resolve_preset("nnssl", grid="2,2,1", crop_edge=32)
    k, t = preset.num_bases, preset.num_targets
    student = projections(2, k, t, 6, 11)
    labels = torch.cat([overlap_like_labels(1, t, k, 12, zeros_per_target=1),
                        overlap_like_labels(1, t, k, 13, zeros_per_target=3)])
    ours, official = engine_terms(preset, student, None, labels), official_nnssl(student[:, :k], student[:, k:], labels)
    torch.testing.assert_close(ours["loss_pos"], official["loss_pos"], rtol=1e-5, atol=0)
    assert abs(ours["loss_neg"].item() - official["loss_neg"].item()) > 1e-4


# -- projection head, feature dropout ---------------------------------------------------------------

def official_head(ours: ProjectionHead, norm) -> nn.Sequential:
    """The official head: Linear, norm without affine or running statistics, ReLU (twice), Linear;
    the same weights as ``ours``."""
    width = ours.layer1.out_features
    official = nn.Sequential(ours.layer1, norm(width, affine=False, track_running_stats=False), nn.ReLU(),
                             ours.layer2, norm(width, affine=False, track_running_stats=False), nn.ReLU(), ours.layer3)
    return official.double()


def test_batch_scope_head_is_the_official_batchnorm_over_all_crops_and_volume_scope_per_volume():
    torch.manual_seed(14)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    for scope in ("batch", "volume"):
        head = ProjectionHead(12, 16, "batch", scope).double()
        official = official_head(head, nn.BatchNorm1d)
        if scope == "batch":   # v1/v2: one forward over the crops of every volume in the process
            expected = official(x.flatten(0, 1)).view(3, 5, 16)
        else:
            expected = torch.stack([official(volume) for volume in x])
        torch.testing.assert_close(head(x), expected, rtol=1e-10, atol=1e-10)


def test_instance_head_is_nnssls_instancenorm1d_on_a_crops_by_features_matrix():
    torch.manual_seed(15)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    head = ProjectionHead(12, 16, "instance").double()
    official = official_head(head, nn.InstanceNorm1d)
    # nnssl passes (crops, features): InstanceNorm1d reads it as one unbatched (channels, length)
    # sample and normalises each crop's vector; it warns that num_features is not the channel count.
    with pytest.warns(UserWarning):
        expected = torch.stack([official(volume) for volume in x])
    torch.testing.assert_close(head(x), expected, rtol=1e-10, atol=1e-10)


def test_feature_dropout_silences_whole_crop_embeddings_as_the_official_dropout1d():
    # The official nn.Dropout1d(0.2) on a (crops, D) matrix: each row all zero or all 1 / 0.8.
    official = nn.Dropout1d(0.2)(torch.ones(4000, 8, dtype=torch.float64))
    assert set(official.unique(dim=1).flatten().tolist()) <= {0.0, 1.25}
    assert ((official == 0).all(dim=1) | (official == 1.25).all(dim=1)).all()
    mask = torch.cat([feature_keep_mask(torch.Generator().manual_seed(s), 100, 0.2) for s in range(40)])
    assert mask.shape == (4000, 1) and set(mask.unique().tolist()) == {0.0, 1.25}
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - 0.2) < 0.03 and abs(dropped - (official == 0).all(dim=1).double().mean().item()) < 0.04
    preset = PRESETS["v2"]
    keep = batch_keep_mask([torch.Generator().manual_seed(s) for s in range(2)], preset, "cpu")
    assert keep.shape == (2, preset.num_bases + preset.num_targets, 1)
    assert batch_keep_mask([torch.Generator()], PRESETS["v1"], "cpu") is None


# -- optimiser, presets, switch ----------------------------------------------------------------------

def test_optimisers_use_the_official_weight_decay_per_preset():
    torch_adamw_default = torch.optim.AdamW([nn.Parameter(torch.zeros(1))]).defaults["weight_decay"]
    assert torch_adamw_default == 0.01
    for name, preset in PRESETS.items():
        optimizer, _ = build_optimizer(preset.optimizer, [nn.Parameter(torch.zeros(1))], preset.lr, 100,
                                       preset.warmup_steps, preset.weight_decay)
        group = optimizer.param_groups[0]
        if preset.optimizer == "adamw":   # v1, v2 (and demo): AdamW(lr, amsgrad=True), no weight decay given
            assert isinstance(optimizer, torch.optim.AdamW) and group["amsgrad"], name
            assert group["weight_decay"] == torch_adamw_default, name
        else:                             # nnssl: nnU-Net's SGD
            assert isinstance(optimizer, torch.optim.SGD), name
            assert (group["weight_decay"], group["momentum"], group["nesterov"]) == (3e-5, 0.99, True), name


def test_presets_carry_the_official_settings():
    official = {  # head width, zero-overlap term, regulariser, bases detached in the prediction
        "v1": (2048, "square", "voco", False, 0.1),
        "v2": (1024, "log", "voco", False, 0.5),
        "nnssl": (2048, "square", "nnssl", True, 0.0),
        "demo": (256, "log", "voco", False, 0.5),
    }
    got = {name: (p.head_dim, p.neg_loss, p.regulariser, p.detach_bases, p.shift_prob) for name, p in PRESETS.items()}
    assert got == official
    assert all(p.norm_scope == "volume" for p in PRESETS.values())


def test_norm_scope_switch_selects_the_official_batch_normalisation():
    assert resolve_preset("v2", norm_scope="batch").norm_scope == "batch"
    assert resolve_preset("v2").norm_scope == "volume"
    with pytest.raises(VocoInputError, match="--norm-scope"):
        resolve_preset("v2", norm_scope="global")
    args = build_parser().parse_args(["pretrain", "--out", "run", "--preset", "v1", "--norm-scope", "batch"])
    preset = _preset(args, "v2")
    assert (preset.name, preset.norm_scope) == ("v1", "batch")


# -- augmentation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, flip_p, rot_p, shift_p", [("v1", 0.2, 0.2, 0.1), ("v2", 0.2, 0.2, 0.5),
                                                          ("demo", 0.2, 0.2, 0.5), ("nnssl", 0.5, 0.3, 0.0)])
def test_augmentation_draws_the_official_probabilities_and_quarter_turns(name, flip_p, rot_p, shift_p):
    preset = PRESETS[name]
    params = draw_augmentation(torch.Generator().manual_seed(16), 20000, 4, preset.augment, preset.shift_prob)
    n = 20000
    tolerance = 4 * math.sqrt(0.25 / n)
    assert (params["flip"].double().mean(dim=0) - flip_p).abs().max() < tolerance
    turned = params["rot90"] > 0
    assert abs(turned.double().mean().item() - rot_p) < tolerance
    # MONAI's RandRotate90(max_k=3) and batchgenerators' Rot90Transform: 1, 2 or 3 quarter turns.
    counts = torch.bincount(params["rot90"][turned], minlength=4)
    assert counts[0] == 0 and (counts[1:].double() / turned.sum() - 1 / 3).abs().max() < 0.05
    assert abs((params["shift"] != 0).double().mean().item() - shift_p) < tolerance
    assert params["shift"].abs().max() <= 0.1


def test_augment_turns_each_crop_by_its_drawn_quarter_turns():
    crops = torch.randn((4, 1, 3, 3, 3), generator=torch.Generator().manual_seed(17))
    params = {"flip": torch.zeros(4, 3, dtype=torch.bool), "rot90": torch.tensor([0, 1, 2, 3]), "shift": torch.zeros(4)}
    got = augment(crops, params)
    for i in range(4):
        torch.testing.assert_close(got[i], torch.rot90(crops[i], i, (1, 2)), rtol=0, atol=0)


def test_nnssl_gamma_keeps_mean_and_spread_and_contrast_keeps_the_range():
    # batchgenerators' GammaTransform(retain_stats=True) and ContrastAugmentationTransform(preserve_range=True).
    crops = torch.rand((3, 1, 6, 6, 6), generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    dims = (1, 2, 3, 4)
    for gamma_key in ("gamma", "inverted_gamma"):
        got = augment(crops, nnssl_params(3, (6, 6, 6), **{gamma_key: [1.0, 0.7, 1.5]}))
        torch.testing.assert_close(got[0], crops[0], rtol=0, atol=0)       # not chosen: untouched
        torch.testing.assert_close(got.mean(dim=dims), crops.mean(dim=dims), rtol=0, atol=1e-12)
        torch.testing.assert_close(got.std(dim=dims), crops.std(dim=dims), rtol=1e-6, atol=0)
        assert (got[1:] - crops[1:]).abs().max() > 1e-2
    got = augment(crops, nnssl_params(3, (6, 6, 6), contrast=[1.0, 1.25, 0.75]))
    assert (got.amax(dim=dims) <= crops.amax(dim=dims)).all() and (got.amin(dim=dims) >= crops.amin(dim=dims)).all()
    mean = crops[2].mean()
    torch.testing.assert_close(got[2], (crops[2] - mean) * 0.75 + mean, rtol=0, atol=1e-12)


def scipy_gaussian_filter(volume: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter as batchgenerators calls it, written out with numpy: along
    each axis, a normalised Gaussian cut at int(4 sigma + 0.5) voxels, the edges padded
    symmetrically (scipy's "reflect": the edge voxel repeated)."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in range(volume.ndim):
        volume = np.apply_along_axis(
            lambda line: np.convolve(np.pad(line, radius, mode="symmetric"), kernel, mode="valid"), axis, volume)
    return volume


def nnssl_params(n, edge, **changes):
    """Augmentation parameters that change nothing but ``changes`` (per-crop values)."""
    ones = torch.ones(n, dtype=torch.float64)
    params = {"flip": torch.zeros(n, 3, dtype=torch.bool), "rot90": torch.zeros(n, dtype=torch.long),
              "shift": torch.zeros(n, dtype=torch.float64), "noisy": torch.zeros(n, dtype=torch.bool),
              "noise": torch.zeros(0, 1, *edge, dtype=torch.float64), "blur": torch.zeros(n), "brightness": ones,
              "contrast": ones, "low_resolution": ones, "inverted_gamma": ones, "gamma": ones}
    return {**params, **{k: torch.tensor(v, dtype=torch.float64) for k, v in changes.items()}}


def test_nnssl_blur_is_scipys_gaussian_filter_with_each_crops_sigma():
    crops = torch.rand((4, 1, 6, 7, 8), generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    sigmas = [0.0, 0.5, 0.8, 1.0]   # radius 2, 3 and 4 voxels; the first crop is not chosen
    got = augment(crops, nnssl_params(4, (6, 7, 8), blur=sigmas))
    torch.testing.assert_close(got[0], crops[0], rtol=0, atol=0)
    for i in range(1, 4):
        expected = scipy_gaussian_filter(crops[i, 0].numpy(), sigmas[i])
        np.testing.assert_allclose(got[i, 0].numpy(), expected, rtol=0, atol=1e-12)


def test_nnssl_low_resolution_coarsens_only_the_chosen_crops():
    crops = torch.rand((2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    got = augment(crops, nnssl_params(2, (8, 8, 8), low_resolution=[1.0, 0.5]))
    torch.testing.assert_close(got[0], crops[0], rtol=0, atol=0)
    assert got.shape == crops.shape and (got[1] - crops[1]).abs().max() > 1e-2
    assert crops[1].min() <= got[1].min() and got[1].max() <= crops[1].max()   # interpolation stays in range
    # Nearest-neighbour down to 4^3 keeps one voxel of each 2^3 block: only 64 values survive.
    down = torch.nn.functional.interpolate(crops[1:], size=(4, 4, 4), mode="nearest-exact")
    np.testing.assert_array_equal(down[0, 0].numpy(), crops[1, 0, 1::2, 1::2, 1::2].numpy())


def test_nnssl_blur_and_low_resolution_are_drawn_with_batchgenerators_probabilities():
    params = draw_augmentation(torch.Generator().manual_seed(21), 20000, 4, "nnssl")
    for name, p, lo, unchosen in (("blur", 0.1, 0.5, 0.0), ("low_resolution", 0.05, 0.5, 1.0)):
        chosen = params[name] != unchosen
        assert abs(chosen.double().mean().item() - p) < 0.015, name
        assert params[name][chosen].min() >= lo and params[name][chosen].max() <= 1.0, name
