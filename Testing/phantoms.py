"""Numpy-only test volumes with a known geometry and a known answer, for the engine's tests and
for the Slicer-side tests (which run where torch is not installed): an oblique, anisotropic grid
and a bright sphere on it."""

from __future__ import annotations

import math

import numpy as np


def rotation(degrees: float, axis: int) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_affine(spacing=(0.7, 1.1, 2.5), shape=(48, 40, 20), degrees=(20.0, 20.0)) -> np.ndarray:
    """Index -> RAS: rotated about x and about z, anisotropic, centred on (3, -5, 8) mm."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(degrees[0], 0) @ rotation(degrees[1], 2) @ np.diag(spacing)
    affine[:3, 3] = np.array([3.0, -5.0, 8.0]) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def ras_points(affine: np.ndarray, shape) -> np.ndarray:
    """(X, Y, Z, 3) RAS mm of every voxel centre."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


SPHERE_CENTRE, SPHERE_RADIUS = np.array([4.0, -6.0, 9.0]), 12.0


def sphere_mask(affine, shape, centre=SPHERE_CENTRE, radius=SPHERE_RADIUS) -> np.ndarray:
    return np.linalg.norm(ras_points(affine, shape) - centre, axis=-1) < radius


def sphere_image(affine, shape) -> np.ndarray:
    """100 inside the sphere, 10 outside (MRI-like: all positive), with mild deterministic texture."""
    texture = np.random.default_rng(0).normal(0, 1, shape)
    return np.where(sphere_mask(affine, shape), 100.0, 10.0) + texture


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
