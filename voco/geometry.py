"""Crop geometry: base-crop grids, random target crops, overlap labels, boxes in RAS millimetres.

A box is six numbers ``(x0, y0, z0, x1, y1, z1)``: half-open voxel extents, so voxel ``i``
spans ``[i, i + 1)``. Voxel *centres* sit at integer index coordinates (the NIfTI/ITK
convention the affines use), so a box edge ``e`` lies at index coordinate ``e - 0.5``.
Everything here works on whole arrays of boxes at once; nothing loops over crops or pairs.
"""

from __future__ import annotations

import numpy as np
import torch

# Corner order of a box: bit 0 -> x, bit 1 -> y, bit 2 -> z (0 = low edge, 1 = high edge).
_CORNER_BITS = np.array([[(c >> a) & 1 for a in range(3)] for c in range(8)], dtype=bool)


def base_grid(grid: tuple[int, int, int], crop_edge: int) -> np.ndarray:
    """Boxes of a ``grid = (nx, ny, nz)`` of non-overlapping cubes of ``crop_edge`` voxels.

    Base index ``k = (ix * ny + iy) * nz + iz``; returns int64 ``(nx * ny * nz, 6)``.
    """
    ix, iy, iz = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    starts = np.stack([ix.ravel(), iy.ravel(), iz.ravel()], axis=1) * crop_edge
    return np.concatenate([starts, starts + crop_edge], axis=1).astype(np.int64)


def sample_targets(generator: torch.Generator, count: int, patch_shape, crop_edge: int) -> np.ndarray:
    """``count`` random cubes of ``crop_edge`` voxels lying fully inside ``patch_shape``.

    Positions are uniform on every axis where the patch is larger than the crop (only x and y
    for the v1/v2 presets, whose patch depth equals the crop edge).
    """
    room = torch.tensor([p - crop_edge + 1 for p in patch_shape], dtype=torch.float64)
    if (room < 1).any():
        raise ValueError(f"crop edge {crop_edge} does not fit in patch {tuple(patch_shape)}")
    starts = (torch.rand((count, 3), generator=generator, dtype=torch.float64) * room).long().numpy()
    return np.concatenate([starts, starts + crop_edge], axis=1)


def overlap_labels(targets: np.ndarray, bases: np.ndarray, dims: int) -> np.ndarray:
    """Fraction of each target covered by each base: ``(..., T, 6) x (..., K, 6) -> (..., T, K)``.

    ``dims=2`` is the x-y area form of VoCo v1/v2 (depth ignored), ``dims=3`` the volume form
    of nnssl. With targets inside a tiling grid the labels of one target sum to 1.
    """
    if dims not in (2, 3):
        raise ValueError(f"label dims must be 2 or 3, got {dims}")
    t = np.asarray(targets, dtype=np.float64)[..., :, None, :]
    b = np.asarray(bases, dtype=np.float64)[..., None, :, :]
    inter = np.clip(np.minimum(t[..., 3:], b[..., 3:]) - np.maximum(t[..., :3], b[..., :3]), 0, None)
    size = t[..., 3:] - t[..., :3]
    return np.prod(inter[..., :dims], axis=-1) / np.prod(size[..., :dims], axis=-1)


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners of each box in continuous index coordinates: ``(..., 6) -> (..., 8, 3)``."""
    boxes = np.asarray(boxes, dtype=np.float64)
    lo, hi = boxes[..., None, :3] - 0.5, boxes[..., None, 3:] - 0.5
    return np.where(_CORNER_BITS, hi, lo)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 homogeneous ``matrix`` to points ``(..., 3)``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


def map_boxes(boxes: np.ndarray, index_to_index: np.ndarray) -> np.ndarray:
    """Boxes of one voxel grid as the axis-aligned boxes they cover in another grid.

    ``index_to_index`` maps index coordinates of the source grid to those of the destination
    (``inv(dst_affine) @ src_affine``). Results are float edges; exact for grids that differ by
    axis permutation, flip, scale and shift, as preprocessing does.
    """
    corners = apply_affine(index_to_index, box_corners(boxes)) + 0.5
    return np.concatenate([corners.min(axis=-2), corners.max(axis=-2)], axis=-1)


def boxes_to_ras(boxes: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Describe voxel boxes in RAS millimetres through an image's index-to-RAS ``affine``.

    Returns ``corners`` (N, 8, 3), ``center`` (N, 3), ``size`` (N, 3: mm along the image's
    i, j, k axes) and ``axes`` (3, 3: unit RAS direction of i, j, k as columns), which is what a
    Slicer ROI node needs (SetCenter, SetSize, orientation) even for oblique images.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    centre_index = (boxes[:, :3] + boxes[:, 3:]) / 2 - 0.5
    return {
        "corners": apply_affine(affine, box_corners(boxes)),
        "center": apply_affine(affine, centre_index),
        "size": (boxes[:, 3:] - boxes[:, :3]) * spacing,
        "axes": affine[:3, :3] / spacing,
    }


def grid_index_map(shape, index_to_patch: np.ndarray, grid, crop_edge: int) -> np.ndarray:
    """Label volume of ``shape`` holding ``k + 1`` where a voxel falls in base crop ``k``, else 0.

    ``index_to_patch`` maps this volume's index coordinates to the patch's; a voxel belongs to
    the base crop that contains its centre.
    """
    ijk = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), -1)
    m = np.asarray(index_to_patch, dtype=np.float32)
    cell = np.floor((ijk @ m[:3, :3].T + m[:3, 3] + 0.5) / crop_edge).astype(np.int64)
    grid = np.asarray(grid)
    inside = np.all((cell >= 0) & (cell < grid), axis=-1)
    k = (cell[..., 0] * grid[1] + cell[..., 1]) * grid[2] + cell[..., 2]
    return np.where(inside, k + 1, 0).astype(np.int16)
