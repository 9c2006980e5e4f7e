"""From class scores on the network's grid back to a label map on the input's own grid.

Scores are interpolated trilinearly at the position of every output voxel (found through the two
index -> RAS affines, so any orientation, obliquity and anisotropy is handled), then reduced to
the winning class. This runs in slabs of output slices: only one slab of float32 scores exists at
a time, however large the input.
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
    index_to_score = torch.as_tensor(np.linalg.inv(scores_affine) @ affine, dtype=torch.float64)
    device = scores.device
    dtype = np.uint8 if max(class_values) < 256 else np.uint16
    values = torch.as_tensor(class_values, device=device)
    out = np.zeros(shape, dtype=dtype)
    nx, ny, nz = shape
    per_slab = max(1, SLAB_VOXELS // (nx * ny))
    grid_xy = torch.stack(torch.meshgrid(torch.arange(nx, dtype=torch.float64), torch.arange(ny, dtype=torch.float64),
                                         indexing="ij"), dim=-1)  # (X, Y, 2)
    score_shape = torch.tensor(scores.shape[1:], dtype=torch.float64)
    for z0 in range(0, nz, per_slab):
        z = torch.arange(z0, min(nz, z0 + per_slab), dtype=torch.float64)
        points = torch.cat([grid_xy[:, :, None, :].expand(nx, ny, len(z), 2),
                            z[None, None, :, None].expand(nx, ny, len(z), 1)], dim=-1)
        source = points @ index_to_score[:3, :3].T + index_to_score[:3, 3]  # (X, Y, z, 3) score indices
        low = torch.clamp(source.reshape(-1, 3).amin(0).floor(), min=0)
        high = torch.minimum(source.reshape(-1, 3).amax(0).ceil() + 1, score_shape)
        if (high <= low).any():
            continue  # the slab lies outside the scored region: background
        region = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        block = scores[(slice(None), *region)].float()
        sizes = torch.tensor(block.shape[1:], dtype=torch.float64)
        # grid_sample wants (x, y, z) = (W, H, D) = our axes (2, 1, 0), scaled to [-1, 1].
        normalised = (source - low) / torch.clamp(sizes - 1, min=1) * 2 - 1
        grid = normalised.flip(-1).to(torch.float32).to(device)
        sampled = F.grid_sample(block[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        # Outside the scored region every class samples 0 and argmax picks class 0, background.
        out[:, :, z0:z0 + len(z)] = values[sampled.argmax(0)].cpu().numpy().astype(dtype)
    return out
