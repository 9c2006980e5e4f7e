"""Crop geometry checked against brute force: painted voxel arrays, explicit corner lists,
nibabel's affine maths and a NIfTI file written and read back."""

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from voco.geometry import (base_grid, box_corners, boxes_to_ras, grid_index_map, map_boxes,
                           overlap_labels, sample_targets)


def paint(box, shape) -> np.ndarray:
    """Boolean voxel array of ``shape`` with the half-open integer ``box`` set."""
    array = np.zeros(shape, dtype=bool)
    x0, y0, z0, x1, y1, z1 = (int(v) for v in box)
    array[x0:x1, y0:y1, z0:z1] = True
    return array


def brute_force_labels(targets, bases, dims, canvas) -> np.ndarray:
    labels = np.zeros((len(targets), len(bases)))
    for t, target in enumerate(targets):
        painted_t = paint(target, canvas)
        if dims == 2:
            painted_t = painted_t.any(axis=2)  # the x-y footprint
        for k, base in enumerate(bases):
            painted_b = paint(base, canvas)
            if dims == 2:
                painted_b = painted_b.any(axis=2)
            labels[t, k] = (painted_t & painted_b).sum() / painted_t.sum()
    return labels


def rotation(axis, angle) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis`` (any direction) by ``angle`` radians."""
    u = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(u, u)


SPACING = np.array([0.7, 0.9, 2.5])
DIRECTION = rotation([1.0, 2.0, 3.0], 0.6)  # oblique: not about a coordinate axis, no shear
OFFSET = np.array([-12.5, 30.25, 7.0])


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = DIRECTION * SPACING  # columns scaled by the spacing
    affine[:3, 3] = OFFSET
    return affine


def explicit_index_corners(box) -> np.ndarray:
    """The 8 corners in index coordinates (edge - 0.5); bit 0 picks x, bit 1 y, bit 2 z."""
    x0, y0, z0, x1, y1, z1 = box
    corners = []
    for c in range(8):
        corners.append([(x1 if c & 1 else x0) - 0.5, (y1 if c & 2 else y0) - 0.5, (z1 if c & 4 else z0) - 0.5])
    return np.array(corners, dtype=np.float64)


def random_boxes(rng, count, canvas, max_edge=7) -> np.ndarray:
    size = rng.integers(1, max_edge + 1, size=(count, 3))
    start = rng.integers(0, np.asarray(canvas) - size + 1)
    return np.concatenate([start, start + size], axis=1)


# -- overlap_labels -------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_labels_equal_painted_overlaps_for_grids_and_sampled_targets(dims):
    rng = np.random.default_rng(1234)
    for case in range(25):
        grid = tuple(int(n) for n in rng.integers(1, 4, size=3))
        edge = int(rng.integers(2, 6))
        # Patches smaller or larger than the grid: targets may stick out of the base region.
        patch = tuple(int(max(edge, n * edge + d)) for n, d in zip(grid, rng.integers(-3, 4, size=3)))
        bases = base_grid(grid, edge)
        targets = sample_targets(torch.Generator().manual_seed(case), 4, patch, edge)
        canvas = tuple(max(a, b) for a, b in zip(patch, np.array(grid) * edge))
        expected = brute_force_labels(targets, bases, dims, canvas)
        np.testing.assert_allclose(overlap_labels(targets, bases, dims), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_labels_equal_painted_overlaps_for_arbitrary_boxes(dims):
    rng = np.random.default_rng(99)
    canvas = (14, 12, 10)
    for _ in range(10):
        targets = random_boxes(rng, 5, canvas)
        bases = random_boxes(rng, 6, canvas)
        expected = brute_force_labels(targets, bases, dims, canvas)
        got = overlap_labels(targets, bases, dims)
        assert got.shape == (5, 6)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_overlap_labels_2d_ignores_depth_and_3d_does_not():
    target = np.array([[0, 0, 0, 4, 4, 4]])
    base = np.array([[2, 0, 10, 6, 4, 14]])  # half the x-y footprint, no depth overlap
    assert overlap_labels(target, base, 2)[0, 0] == pytest.approx(0.5)
    assert overlap_labels(target, base, 3)[0, 0] == 0.0
    base_touching = np.array([[2, 0, 2, 6, 4, 6]])  # half in x, half in z
    assert overlap_labels(target, base_touching, 3)[0, 0] == pytest.approx(0.25)


def test_overlap_labels_broadcast_over_a_batch_of_volumes():
    rng = np.random.default_rng(5)
    targets = np.stack([random_boxes(rng, 3, (12, 12, 12)) for _ in range(4)])  # (B=4, T=3, 6)
    bases = base_grid((2, 2, 2), 6)
    got = overlap_labels(targets, bases, 3)
    assert got.shape == (4, 3, 8)
    for b in range(4):
        np.testing.assert_allclose(got[b], brute_force_labels(targets[b], bases, 3, (12, 12, 12)), atol=1e-12)


def test_overlap_labels_reject_other_dims():
    with pytest.raises(ValueError):
        overlap_labels(np.zeros((1, 6)), np.zeros((1, 6)), 1)


@pytest.mark.parametrize("grid, edge", [((3, 3, 1), 8), ((4, 4, 1), 5), ((2, 3, 1), 7)])
def test_labels_of_a_target_inside_a_tiling_grid_sum_to_one(grid, edge):
    bases = base_grid(grid, edge)
    patch = tuple(n * edge for n in grid)
    targets = sample_targets(torch.Generator().manual_seed(3), 200, patch, edge)
    for dims in (2, 3):
        labels = overlap_labels(targets, bases, dims)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-12)
        assert labels.min() >= 0 and labels.max() <= 1


def test_3d_labels_of_a_target_inside_a_grid_with_depth_sum_to_one():
    grid, edge = (2, 3, 3), 6
    bases = base_grid(grid, edge)
    targets = sample_targets(torch.Generator().manual_seed(4), 200, tuple(n * edge for n in grid), edge)
    np.testing.assert_allclose(overlap_labels(targets, bases, 3).sum(axis=1), 1.0, atol=1e-12)


# -- base_grid ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, edge", [((3, 3, 1), 4), ((2, 3, 4), 3), ((1, 1, 2), 5)])
def test_base_grid_tiles_the_patch_once_in_documented_index_order(grid, edge):
    boxes = base_grid(grid, edge)
    nx, ny, nz = grid
    assert boxes.shape == (nx * ny * nz, 6) and boxes.dtype == np.int64
    patch = tuple(n * edge for n in grid)
    coverage = sum(paint(box, patch).astype(np.int64) for box in boxes)
    assert (coverage == 1).all()
    for ix, iy, iz in itertools.product(range(nx), range(ny), range(nz)):
        k = (ix * ny + iy) * nz + iz
        start = np.array([ix, iy, iz]) * edge
        np.testing.assert_array_equal(boxes[k], np.concatenate([start, start + edge]))


# -- sample_targets -------------------------------------------------------------------------------

def test_sample_targets_lie_inside_the_patch_and_have_the_crop_edge():
    for seed, (patch, edge) in enumerate([((96, 96, 32), 32), ((10, 7, 5), 5), ((64, 64, 64), 64)]):
        boxes = sample_targets(torch.Generator().manual_seed(seed), 500, patch, edge)
        assert boxes.shape == (500, 6)
        assert (boxes[:, :3] >= 0).all() and (boxes[:, 3:] <= np.array(patch)).all()
        assert (boxes[:, 3:] - boxes[:, :3] == edge).all()


def test_sample_targets_are_reproducible_for_the_same_generator_seed():
    a = sample_targets(torch.Generator().manual_seed(11), 50, (96, 96, 32), 32)
    b = sample_targets(torch.Generator().manual_seed(11), 50, (96, 96, 32), 32)
    c = sample_targets(torch.Generator().manual_seed(12), 50, (96, 96, 32), 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_targets_cover_every_position_about_equally():
    patch, edge, draws = (6, 5, 4), 3, 24_000
    boxes = sample_targets(torch.Generator().manual_seed(0), draws, patch, edge)
    room = np.array(patch) - edge + 1  # (4, 3, 2): 24 possible starts
    counts = np.zeros(room, dtype=np.int64)
    np.add.at(counts, tuple(boxes[:, :3].T), 1)
    expected = draws / counts.size  # 1000 each, binomial sd ~31
    assert (counts > 0).all()
    assert np.abs(counts - expected).max() < 0.15 * expected
    # Where the patch depth equals the edge (v1/v2), the only start in z is 0.
    flat = sample_targets(torch.Generator().manual_seed(1), 100, (96, 96, 32), 32)
    assert (flat[:, 2] == 0).all() and len(np.unique(flat[:, 0])) > 20


def test_sample_targets_reject_a_crop_larger_than_the_patch():
    with pytest.raises(ValueError):
        sample_targets(torch.Generator().manual_seed(0), 1, (64, 64, 31), 32)


# -- boxes_to_ras ---------------------------------------------------------------------------------

BOXES = np.array([[0, 0, 0, 32, 32, 32], [5, 17, 3, 37, 49, 35], [64, 0, 0, 96, 32, 32], [1, 2, 3, 4, 6, 9]])


def check_ras(ras, boxes, affine, atol):
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert ras["corners"].shape == (len(boxes), 8, 3)
    for box, corners in zip(boxes, ras["corners"]):
        np.testing.assert_allclose(corners, nib.affines.apply_affine(affine, explicit_index_corners(box)), atol=atol)
    np.testing.assert_allclose(ras["center"], ras["corners"].mean(axis=1), atol=atol)
    np.testing.assert_allclose(ras["size"], (boxes[:, 3:] - boxes[:, :3]) * spacing, atol=atol)
    axes = ras["axes"]
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-6)
    # A Slicer ROI (centre, size along the axes, orientation) reproduces the corners.
    for centre, size, corners in zip(ras["center"], ras["size"], ras["corners"]):
        signs = np.array([[1 if c & (1 << a) else -1 for a in range(3)] for c in range(8)])
        np.testing.assert_allclose(centre + (signs * size / 2) @ axes.T, corners, atol=atol)


def test_boxes_to_ras_for_an_oblique_anisotropic_affine():
    affine = oblique_affine()
    ras = boxes_to_ras(BOXES, affine)
    check_ras(ras, BOXES, affine, atol=1e-9)
    np.testing.assert_allclose(ras["size"][0], 32 * SPACING)
    np.testing.assert_allclose(ras["axes"], DIRECTION, atol=1e-12)
    assert np.linalg.det(ras["axes"]) == pytest.approx(1.0)


def test_boxes_to_ras_agree_with_a_nifti_written_and_read_back(tmp_path):
    affine = oblique_affine()
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((97, 50, 36), dtype=np.float32), affine), path)
    image = nib.load(path)
    read_affine = image.affine
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)  # sform is stored as float32
    np.testing.assert_allclose(image.header.get_zooms(), SPACING, atol=1e-5)
    ras = boxes_to_ras(BOXES, read_affine)
    check_ras(ras, BOXES, read_affine, atol=1e-6)
    np.testing.assert_allclose(ras["corners"], boxes_to_ras(BOXES, affine)["corners"], atol=1e-3)
    np.testing.assert_allclose(ras["size"], (BOXES[:, 3:] - BOXES[:, :3]) * SPACING, atol=1e-4)
    # The first voxel's centre is the affine's offset; the box corner lies half a voxel out.
    np.testing.assert_allclose(nib.affines.apply_affine(read_affine, [0, 0, 0]), OFFSET, atol=1e-5)


# -- map_boxes ------------------------------------------------------------------------------------

def index_map(permutation, signs, scales, shift) -> np.ndarray:
    """Destination index = P @ source index: row a of P takes source axis permutation[a]."""
    matrix = np.eye(4)
    matrix[:3, :3] = 0
    for a, (src, sign, scale) in enumerate(zip(permutation, signs, scales)):
        matrix[a, src] = sign * scale
    matrix[:3, 3] = shift
    return matrix


def same_point_sets(a, b, atol) -> bool:
    distances = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return bool((distances.min(axis=1) < atol).all() and (distances.min(axis=0) < atol).all())


@pytest.mark.parametrize("permutation, signs, scales, shift", [
    ((0, 1, 2), (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ((0, 1, 2), (-1, 1, 1), (1, 1, 1), (95, 0, 0)),        # x flipped in a 96-voxel grid
    ((2, 0, 1), (1, -1, -1), (1, 1, 1), (3, 60, 40)),       # PIR-like permutation with flips
    ((1, 2, 0), (-1, 1, -1), (0.5, 2.0, 1.5), (80.25, -3.0, 17.5)),  # and scales and shifts
])
def test_map_boxes_describe_the_same_physical_region(permutation, signs, scales, shift):
    src_affine = oblique_affine()
    src_to_dst = index_map(permutation, signs, scales, shift)
    dst_affine = src_affine @ np.linalg.inv(src_to_dst)
    np.testing.assert_allclose(np.linalg.inv(dst_affine) @ src_affine, src_to_dst, atol=1e-12)
    mapped = map_boxes(BOXES, src_to_dst)
    assert mapped.shape == BOXES.shape and (mapped[:, 3:] > mapped[:, :3]).all()
    src_corners = boxes_to_ras(BOXES, src_affine)["corners"]
    dst_corners = boxes_to_ras(mapped, dst_affine)["corners"]
    for a, b in zip(src_corners, dst_corners):
        assert same_point_sets(a, b, atol=1e-9)
    # Sizes are kept in millimetres (along permuted axes).
    src_mm = np.sort(boxes_to_ras(BOXES, src_affine)["size"], axis=1)
    dst_mm = np.sort(boxes_to_ras(mapped, dst_affine)["size"], axis=1)
    np.testing.assert_allclose(src_mm, dst_mm, atol=1e-9)


def test_map_boxes_moves_painted_voxels_for_flips_and_permutations():
    shape = (12, 9, 7)
    src_to_dst = index_map((2, 0, 1), (-1, 1, -1), (1, 1, 1), (shape[2] - 1, 0, shape[1] - 1))
    dst_shape = (shape[2], shape[0], shape[1])
    rng = np.random.default_rng(8)
    boxes = random_boxes(rng, 6, shape, max_edge=5)
    mapped = map_boxes(boxes, src_to_dst)
    np.testing.assert_array_equal(mapped, np.round(mapped))  # integer edges for these maps
    for box, dst_box in zip(boxes, mapped):
        src = paint(box, shape)
        moved = np.zeros(dst_shape, dtype=bool)
        ijk = np.argwhere(src)
        dst_ijk = np.rint(ijk @ src_to_dst[:3, :3].T + src_to_dst[:3, 3]).astype(int)
        moved[tuple(dst_ijk.T)] = True
        np.testing.assert_array_equal(moved, paint(dst_box, dst_shape))


def test_box_corners_follow_the_bit_order():
    box = np.array([1, 2, 3, 5, 8, 13])
    np.testing.assert_array_equal(box_corners(box), explicit_index_corners(box))


# -- grid_index_map -------------------------------------------------------------------------------

def brute_force_index_map(shape, index_to_patch, grid, edge) -> np.ndarray:
    bases = base_grid(grid, edge).astype(np.float64)
    out = np.zeros(shape, dtype=np.int64)
    for ijk in itertools.product(*(range(n) for n in shape)):
        p = index_to_patch[:3, :3] @ np.array(ijk, dtype=np.float64) + index_to_patch[:3, 3]
        inside = [k for k, b in enumerate(bases) if np.all(b[:3] - 0.5 <= p) and np.all(p < b[3:] - 0.5)]
        assert len(inside) <= 1
        out[ijk] = inside[0] + 1 if inside else 0
    return out


@pytest.mark.parametrize("index_to_patch", [
    np.eye(4),
    index_map((0, 1, 2), (1, 1, 1), (1, 1, 1), (-2, 3, -1)),
    index_map((0, 1, 2), (-1, 1, 1), (2.0, 0.5, 1.0), (13.0, -0.5, 1.0)),   # flip, scale, half-voxel shift
    index_map((1, 0, 2), (1, -1, 1), (1.5, 1.0, 0.5), (-1.0, 11.0, 0.25)),  # permutation as well
])
def test_grid_index_map_marks_the_voxels_whose_centres_fall_in_each_base(index_to_patch):
    shape, grid, edge = (10, 9, 6), (3, 2, 2), 3
    got = grid_index_map(shape, index_to_patch, grid, edge)
    assert got.shape == shape and got.dtype == np.int16
    expected = brute_force_index_map(shape, index_to_patch, grid, edge)
    np.testing.assert_array_equal(got, expected)
    assert (expected > 0).any() and (expected == 0).any()  # the patch and the volume overlap only partly
