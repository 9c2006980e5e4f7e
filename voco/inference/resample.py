"""From class scores on the network's grid back to a label map on the input's own grid.

Scores are interpolated trilinearly at the position of every output voxel (found through the two
index -> RAS affines, so any orientation, obliquity and anisotropy is handled), then reduced to
the winning class. This runs in slabs of output slices: only one slab of float32 scores exists at
a time, however large the input.

When the two grids share their axes up to order and sign (every input that is not oblique to
the RAS axes), trilinear interpolation is three 1-D interpolations, done as gathers along each
axis with the classes last, several times faster than ``grid_sample``; oblique grids use
``grid_sample``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SLAB_VOXELS = 1 << 22  # output voxels per slab: ~16 MB of float32 per class


def label_map_on_grid(scores: torch.Tensor, scores_affine: np.ndarray, shape: tuple[int, int, int],
                      affine: np.ndarray, class_values: list[int]) -> np.ndarray:
    """The label map of ``shape`` on the grid ``affine`` (4x4 index -> RAS); ``scores`` is
    ``(K, X, Y, Z)`` on the grid ``scores_affine``. Voxels outside the scored region are 0."""
    return label_map_and_counts(scores, scores_affine, shape, affine, class_values)[0]


def label_map_and_counts(scores: torch.Tensor, scores_affine: np.ndarray, shape: tuple[int, int, int],
                         affine: np.ndarray, class_values: list[int]) -> tuple[np.ndarray, dict[int, int]]:
    """``label_map_on_grid``'s map and how many voxels of it hold each class value, counted
    slab by slab where the scores are (one bincount of a slab, not one pass per label).

    The map is in Fortran order, the order of NIfTI and NRRD files: each slab is reordered where
    the scores are, and writing the map needs no transposing copy of the whole volume (for a raw
    512x512x300 NRRD that copy was most of the write)."""
    to_scores = np.linalg.inv(scores_affine) @ affine  # output index -> score index
    device = scores.device
    dtype = np.uint8 if max(class_values) < 256 else np.uint16
    values = torch.as_tensor(np.asarray(class_values, dtype=dtype).astype(np.int64), device=device)
    out = np.zeros(shape, dtype=dtype, order="F")
    counts = torch.zeros(len(class_values), dtype=torch.int64, device=device)
    nx, ny, nz = shape
    per_slab = max(1, SLAB_VOXELS // (nx * ny))
    score_shape = np.array(scores.shape[1:])
    axes = _shared_axes(to_scores)
    for z0 in range(0, nz, per_slab):
        z1 = min(nz, z0 + per_slab)
        corners = np.array([[x, y, z, 1] for x in (0, nx - 1) for y in (0, ny - 1) for z in (z0, z1 - 1)], float)
        reach = (to_scores @ corners.T)[:3]  # a linear map: the slab's extremes are at its corners
        low = np.clip(np.floor(reach.min(1)), 0, score_shape).astype(int)
        high = np.clip(np.ceil(reach.max(1)) + 1, 0, score_shape).astype(int)
        if (high <= low).any():
            counts[0] += nx * ny * (z1 - z0)
            continue  # the slab lies outside the scored region: background
        block = scores[(slice(None), *(slice(a, b) for a, b in zip(low, high)))]
        if axes is not None:
            winners = _separable_argmax(block, to_scores, axes, low, (nx, ny), (z0, z1))
        else:
            grid = _sampling_grid(to_scores, low, high, (nx, ny), (z0, z1), device)
            sampled = F.grid_sample(block.float()[None], grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=True)[0]
            winners = sampled.argmax(0)
        # Outside the scored region every class samples 0 and argmax picks class 0, background.
        counts += torch.bincount(winners.reshape(-1), minlength=len(class_values))
        slab = values[winners].to(torch.uint8 if dtype == np.uint8 else torch.int32).permute(2, 1, 0).contiguous()
        out[:, :, z0:z1] = slab.cpu().numpy().transpose(2, 1, 0)
    by_value: dict[int, int] = {}
    for value, count in zip(class_values, counts.tolist()):
        by_value[int(value)] = by_value.get(int(value), 0) + count
    return out, by_value


def _shared_axes(to_scores: np.ndarray) -> list[int] | None:
    """For each output axis the score axis it runs along, when each moves along exactly one."""
    nonzero = np.abs(to_scores[:3, :3]) > 1e-9 * np.abs(to_scores[:3, :3]).max()
    if (nonzero.sum(0) != 1).any() or (nonzero.sum(1) != 1).any():
        return None
    return [int(np.argmax(nonzero[:, i])) for i in range(3)]


def _separable_argmax(block: torch.Tensor, to_scores: np.ndarray, axes: list[int], low, xy, z_range) -> torch.Tensor:
    """Winning class per output voxel of the slab, by linear interpolation along one axis at a time."""
    # Classes last and score axes in output-axis order: (X_s, Y_s, Z_s, K) with X_s along output x, ...
    values = block.permute(*(1 + a for a in axes), 0).float()
    ranges = [(0, xy[0]), (0, xy[1]), z_range]
    for out_axis in (2, 1, 0):  # the slab's thin axis first keeps the intermediates small
        score_axis = axes[out_axis]
        index = torch.arange(*ranges[out_axis], dtype=torch.float64)
        position = to_scores[score_axis, out_axis] * index + to_scores[score_axis, 3] - low[score_axis]
        values = _interpolate_along(values, out_axis, position.to(device=values.device, dtype=torch.float32))
    return values.argmax(-1)


def _interpolate_along(values: torch.Tensor, axis: int, position: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``values`` at fractional indices ``position`` along ``axis``;
    outside ``[0, n-1]`` the missing neighbour counts as 0 (as grid_sample's zero padding)."""
    n = values.shape[axis]
    below = position.floor()
    weight = (position - below).to(values.dtype)
    below = below.to(torch.int64)
    above = below + 1
    shape = [1] * values.dim()
    shape[axis] = -1

    def taken(index):
        inside = ((index >= 0) & (index < n)).to(values.dtype).view(shape)
        return values.index_select(axis, index.clamp(0, n - 1)) * inside

    return taken(below) * (1 - weight).view(shape) + taken(above) * weight.view(shape)


def _sampling_grid(to_scores: np.ndarray, low, high, xy: tuple[int, int], z_range: tuple[int, int], device):
    """grid_sample's ``(1, X, Y, z, 3)`` grid for output voxels ``[0, X) x [0, Y) x [z0, z1)``.

    The map from output index to grid_sample's [-1, 1] coordinates of the block ``[low, high)``
    is affine, so the grid is a sum of three broadcast axis terms, built in float32 in one pass;
    its last axis is (W, H, D) = score axes (2, 1, 0)."""
    scale = 2.0 / np.maximum(np.asarray(high) - np.asarray(low) - 1, 1)
    linear = (to_scores[:3, :3] * scale[:, None])[::-1]  # rows in grid order (W, H, D)
    offset = ((to_scores[:3, 3] - low) * scale - 1)[::-1]
    axes = [torch.arange(0, xy[0]), torch.arange(0, xy[1]), torch.arange(*z_range)]
    terms = [torch.as_tensor(linear[:, i].copy(), dtype=torch.float32) * a.to(torch.float32)[:, None]
             for i, a in enumerate(axes)]
    grid = (terms[0][:, None, None, :] + terms[1][None, :, None, :] + terms[2][None, None, :, :]
            + torch.as_tensor(offset.copy(), dtype=torch.float32))
    return grid[None].to(device)
