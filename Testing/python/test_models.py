"""Backbones, student/teacher networks, the VoCo forward pass and crop sampling.

Published model sizes are counted on the meta device (no memory is allocated); forward passes
use the tiny SwinUNETR on 32^3 crops so the whole file runs in seconds on a CPU.
"""

import dataclasses
import re

import numpy as np
import pytest
import torch

from voco.data.crops import augment, extract_crops, sample_batch, sample_generator, base_tiles
from voco.geometry import base_grid, overlap_labels
from voco.models.backbones import SWIN_SIZES, build_backbone
from voco.models.voco import (EmaTeacher, ProjectionHead, Student, build_teacher, feature_keep_mask,
                              teacher_source, voco_forward)
from voco.presets import PRESETS, resolve_preset

MONAI_ENCODER_KEY = re.compile(r"^(swinViT|encoder(1|2|3|4|10))\.")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def meta(monkeypatch):
    """Build modules on the meta device. MONAI's SwinTransformer turns a ``torch.linspace`` of
    drop-path rates into floats with ``.item()``, which meta tensors refuse; keep that on CPU."""
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        yield


def monai_swinunetr(feature_size: int):
    from monai.networks.nets import SwinUNETR
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size, use_v2=True)


# -- sizes of the published models ----------------------------------------------------------------

def test_swinunetr_b_backbone_has_the_published_encoder_size(meta):
    ours = build_backbone("swinunetr-b")
    assert all(p.is_meta for p in ours.parameters())
    assert count(ours) == 53_164_146
    reference = monai_swinunetr(48)
    assert sum(p.numel() for k, p in reference.named_parameters() if MONAI_ENCODER_KEY.match(k)) == 53_164_146


@pytest.mark.parametrize("feature_size, published", [(48, 72e6), (96, 290e6), (192, 1.16e9)])
def test_full_swinunetr_sizes_match_vocomni_b_l_h(meta, feature_size, published):
    network = monai_swinunetr(feature_size)
    assert abs(count(network) - published) / published < 0.02


def test_swinunetr_b_state_dict_keys_and_shapes_are_monais(meta):
    ours = {k: tuple(v.shape) for k, v in build_backbone("swinunetr-b").state_dict().items()}
    monai = {k: tuple(v.shape) for k, v in monai_swinunetr(48).state_dict().items() if MONAI_ENCODER_KEY.match(k)}
    assert ours == monai


def test_embedding_dims_of_the_swin_backbones(meta):
    dims = {name: build_backbone(name).embedding_dim for name in SWIN_SIZES}
    assert dims == {"swinunetr-tiny": 288, "swinunetr-b": 1152, "swinunetr-l": 2304, "swinunetr-h": 4608}


def test_resencl_embedding_and_state_dict_names():
    torch.manual_seed(0)
    backbone = build_backbone("resencl")
    assert backbone.embedding_dim == 1120
    keys = list(backbone.state_dict())
    assert keys and all(k.startswith(("encoder.stem", "encoder.stages")) for k in keys)
    assert any(k.startswith("encoder.stem") for k in keys) and any(k.startswith("encoder.stages.5") for k in keys)
    captured = {}
    backbone.encoder.register_forward_hook(lambda module, inputs, output: captured.update(skips=output))
    with torch.no_grad():
        # Edges must be multiples of 32 (the strided convolutions and the pooled residual paths
        # must agree) and the 32x-downsampled stage needs more than one voxel for instance norm:
        # 64 x 32 x 32 is the cheapest such input (a 64^3 pair takes seconds on a CPU).
        embedding = backbone(torch.randn(2, 1, 64, 32, 32))
    assert embedding.shape == (2, 1120) and torch.isfinite(embedding).all()
    skips = captured["skips"]
    assert [s.shape[1] for s in skips] == [32, 64, 128, 256, 320, 320]
    torch.testing.assert_close(embedding, torch.cat([s.mean(dim=(2, 3, 4)) for s in skips], dim=1))


# -- student, head and teacher --------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_student():
    torch.manual_seed(0)
    return Student("swinunetr-tiny", PRESETS["demo"]).eval()


def test_student_returns_embeddings_and_per_volume_normalised_projections(demo_student):
    torch.manual_seed(1)
    crops = torch.randn(2, 5, 1, 32, 32, 32)
    with torch.no_grad():
        embeddings, projected = demo_student(crops)
        changed = crops.clone()
        changed[1] = torch.randn(5, 1, 32, 32, 32)
        embeddings2, projected2 = demo_student(changed)
    assert embeddings.shape == (2, 5, 288) and projected.shape == (2, 5, PRESETS["demo"].head_dim)
    torch.testing.assert_close(embeddings2[0], embeddings[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(projected2[0], projected[0], rtol=0, atol=1e-5)
    assert (projected2[1] - projected[1]).abs().max() > 1e-2


def test_batch_head_normalises_over_the_crops_of_one_volume_and_instance_head_per_vector():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 16)
    changed = x.clone()
    changed[0, 4] += 3.0
    for norm, crop_zero_moves in (("batch", True), ("instance", False)):
        torch.manual_seed(3)
        head = ProjectionHead(16, 8, norm)
        with torch.no_grad():
            before, after = head(x), head(changed)
        torch.testing.assert_close(after[1], before[1])                   # other volume untouched
        assert ((after[0, 0] - before[0, 0]).abs().max() > 1e-3) == crop_zero_moves
        hidden = head._normalise(head.layer1(x))
        dim = 1 if norm == "batch" else -1
        torch.testing.assert_close(hidden.mean(dim=dim), torch.zeros_like(hidden.mean(dim=dim)), atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden.var(dim=dim, unbiased=False), torch.ones_like(hidden.mean(dim=dim)),
                                   atol=1e-3, rtol=0)


@pytest.mark.parametrize("momentum", [0.9, 0.996])
def test_ema_teacher_update_is_the_moving_average(momentum):
    torch.manual_seed(4)
    source = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    teacher = EmaTeacher(source, momentum)
    assert all(not p.requires_grad for p in teacher.parameters())
    for _ in range(2):
        old = [p.clone() for p in teacher.module.parameters()]
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p))
        teacher.update(source)
        for t, t_old, s in zip(teacher.module.parameters(), old, source.parameters()):
            # Equal up to float32 rounding (the fused multiply-add may round once less).
            torch.testing.assert_close(t, momentum * t_old + (1 - momentum) * s, rtol=1e-6, atol=1e-7)
    assert all(t.data_ptr() != s.data_ptr() for t, s in zip(teacher.module.parameters(), source.parameters()))


# -- voco_forward ---------------------------------------------------------------------------------

def volumes_for(preset, volumes=2):
    gen = torch.Generator().manual_seed(5)
    return [torch.rand((1, *(e + 3 for e in preset.patch_shape)), generator=gen) for _ in range(volumes)]


FORWARD_PRESETS = {
    "demo": lambda: resolve_preset("demo"),
    "v1": lambda: resolve_preset("v1", grid="2,2,1", crop_edge=32),
    "nnssl": lambda: resolve_preset("nnssl", grid="2,2,1", crop_edge=32, num_targets=2),
}


@pytest.mark.parametrize("name", list(FORWARD_PRESETS))
def test_voco_forward_gives_overlaps_and_trains_only_the_student(name):
    preset = FORWARD_PRESETS[name]()
    torch.manual_seed(6)
    student = Student("swinunetr-tiny", preset)
    teacher = build_teacher(student, preset)
    assert (teacher is None) == (preset.teacher == "none")
    if teacher is not None:
        assert teacher_source(student, preset) is (student if preset.teacher == "full" else student.head)
    batch = sample_batch(volumes_for(preset), preset, seed=0, step=0, indices=[0, 1])
    keep = None
    if preset.feature_dropout > 0:
        keep = torch.stack([feature_keep_mask(g, preset.num_bases + preset.num_targets, preset.feature_dropout)
                            for g in batch.generators])
        # Dropout1d as in VoCo-v2: whole crop embeddings, kept ones rescaled by 1 / (1 - p).
        assert (keep == 0).any() and set(keep.unique().tolist()) == {0.0, 1 / (1 - preset.feature_dropout)}
    logits, terms = voco_forward(student, teacher, preset, batch.crops, batch.labels, keep)
    b, t, k = 2, preset.num_targets, preset.num_bases
    assert logits.shape == (b, t, k) and logits.min() >= 0 and logits.max() <= 1
    expected = {"loss", "loss_pos", "loss_neg", "loss_reg"} | ({"loss_inter"} if preset.inter_volume else set())
    assert set(terms) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    assert (batch.labels == 0).any()  # so the zero-overlap term is exercised
    assert terms["loss"].item() == pytest.approx(sum(terms[n].item() for n in expected - {"loss"}), abs=1e-5)
    terms["loss"].backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(p.grad.abs().sum()) for p in student.backbone.parameters()) > 0
    if teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


# -- crops ----------------------------------------------------------------------------------------

def test_extract_crops_equals_slicing_crop_by_crop():
    gen = torch.Generator().manual_seed(7)
    patches = torch.randn((2, 2, 20, 18, 16), generator=gen)
    edge = 5
    starts = torch.stack([torch.randint(0, n - edge + 1, (2, 4), generator=gen) for n in (20, 18, 16)], dim=-1)
    crops = extract_crops(patches, starts, edge)
    assert crops.shape == (2, 4, 2, edge, edge, edge)
    for b in range(2):
        for n in range(4):
            x, y, z = starts[b, n].tolist()
            torch.testing.assert_close(crops[b, n], patches[b, :, x:x + edge, y:y + edge, z:z + edge], rtol=0, atol=0)


def test_base_tiles_equal_gathering_the_base_grid():
    patches = torch.randn((2, 1, 3 * 4, 2 * 4, 1 * 4), generator=torch.Generator().manual_seed(3))
    bases = torch.from_numpy(base_grid((3, 2, 1), 4)[:, :3])
    expected = extract_crops(patches, bases.expand(2, -1, -1), 4)
    tiles = base_tiles(patches, (3, 2, 1), 4)
    assert tiles.data_ptr() == patches.data_ptr()  # a view: no copy
    torch.testing.assert_close(tiles.flatten(1, 3), expected, rtol=0, atol=0)


SAMPLE_PRESETS = {
    "demo": lambda: PRESETS["demo"],
    "nnssl": lambda: resolve_preset("nnssl", grid="2,2,1", crop_edge=32),
    # v1 resizes its crops (here 48 -> 32) before the network sees them.
    "v1-resized": lambda: dataclasses.replace(PRESETS["v1"], grid=(2, 2, 1), crop_edge=48, input_edge=32),
}


def assert_same_batch(a, b):
    torch.testing.assert_close(a.crops, b.crops, rtol=0, atol=0)
    torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    np.testing.assert_array_equal(a.patch_starts, b.patch_starts)
    np.testing.assert_array_equal(a.target_boxes, b.target_boxes)


@pytest.mark.parametrize("name", list(SAMPLE_PRESETS))
def test_sample_batch_is_deterministic_and_independent_of_batch_composition(name):
    preset = SAMPLE_PRESETS[name]()
    gen = torch.Generator().manual_seed(8)
    shape_a = [n + 5 for n in preset.patch_shape]
    shape_b = [n + d for n, d in zip(preset.patch_shape, (2, 9, 4))]
    va, vb = torch.rand((1, *shape_a), generator=gen), torch.rand((1, *shape_b), generator=gen)
    pair = sample_batch([va, vb], preset, seed=3, step=17, indices=[4, 5])
    e = preset.input_edge
    assert pair.crops.shape == (2, preset.num_bases + preset.num_targets, 1, e, e, e)
    assert pair.labels.shape == (2, preset.num_targets, preset.num_bases)
    assert_same_batch(pair, sample_batch([va, vb], preset, seed=3, step=17, indices=[4, 5]))
    alone_a = sample_batch([va], preset, seed=3, step=17, indices=[4])
    alone_b = sample_batch([vb], preset, seed=3, step=17, indices=[5])
    torch.testing.assert_close(pair.crops, torch.cat([alone_a.crops, alone_b.crops]), rtol=0, atol=0)
    torch.testing.assert_close(pair.labels, torch.cat([alone_a.labels, alone_b.labels]), rtol=0, atol=0)
    np.testing.assert_array_equal(pair.patch_starts, np.concatenate([alone_a.patch_starts, alone_b.patch_starts]))
    np.testing.assert_array_equal(pair.target_boxes, np.concatenate([alone_a.target_boxes, alone_b.target_boxes]))
    # Another step or seed draws something else; the labels are the overlaps of the drawn boxes.
    other = sample_batch([va, vb], preset, seed=3, step=18, indices=[4, 5])
    assert not torch.equal(other.crops, pair.crops)
    np.testing.assert_allclose(pair.labels.numpy(),
                               overlap_labels(pair.target_boxes, base_grid(preset.grid, preset.crop_edge),
                                              preset.label_dims), atol=1e-7)
    assert (pair.patch_starts >= 0).all()
    assert (pair.patch_starts[1] + np.array(preset.patch_shape) <= np.array(shape_b)).all()


def test_sample_generator_depends_on_seed_step_and_index():
    draw = [torch.rand(4, generator=sample_generator(*key)) for key in [(0, 1, 2), (0, 1, 2), (0, 1, 3), (0, 2, 2), (1, 1, 2)]]
    assert torch.equal(draw[0], draw[1])
    assert all(not torch.equal(draw[0], d) for d in draw[2:])


def test_augment_flips_and_rotates_only_the_masked_crops():
    gen = torch.Generator().manual_seed(9)
    crops = torch.randn((6, 2, 5, 5, 5), generator=gen)
    flip = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    rot90 = torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.bool)
    shift = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.05])
    got = augment(crops, {"flip": flip, "rot90": rot90, "shift": shift})
    for i in range(6):
        expected = crops[i]
        for axis in range(3):
            if flip[i, axis]:
                expected = expected.flip(1 + axis)
        if rot90[i]:
            expected = torch.rot90(expected, 1, (1, 2))
        expected = expected + shift[i]
        torch.testing.assert_close(got[i], expected, rtol=0, atol=0)
    torch.testing.assert_close(got[5], crops[5] + 0.05, rtol=0, atol=0)
    assert not torch.equal(got[0], crops[0])  # a flipped random crop is a different array
