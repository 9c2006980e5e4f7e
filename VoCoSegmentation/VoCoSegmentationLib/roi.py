"""A markups ROI as the engine's ``--roi-ras`` box."""

from __future__ import annotations

import numpy as np


def roi_corners_ras(roi_node) -> np.ndarray:
    """The 8 world (RAS) corners of the ROI box, its rotation and parent transforms included."""
    import slicer

    size = np.array(roi_node.GetSize(), dtype=np.float64)
    if (size <= 0).any():
        raise ValueError(f"ROI '{roi_node.GetName()}' has an empty size {tuple(size)}")
    # box axes and centre in the ROI node's coordinates
    object_to_node = slicer.util.arrayFromVTKMatrix(roi_node.GetObjectToNodeMatrix())
    half = size / 2
    corners = np.array([[x, y, z, 1.0] for x in (-half[0], half[0]) for y in (-half[1], half[1])
                        for z in (-half[2], half[2])])
    local = (object_to_node @ corners.T)[:3].T
    return transform_points(local, roi_node.GetParentTransformNode(), to_world=True)


def transform_points(points: np.ndarray, transform_node, to_world: bool) -> np.ndarray:
    """Points through a (possibly non-linear) parent transform, node -> world or world -> node."""
    if transform_node is None:
        return np.asarray(points, dtype=np.float64)
    import vtk

    transform = vtk.vtkGeneralTransform()
    if to_world:
        transform_node.GetTransformToWorld(transform)
    else:
        transform_node.GetTransformFromWorld(transform)
    return np.array([transform.TransformPoint(*map(float, p)) for p in points])


def roi_ras_box(roi_node, volume_node=None) -> tuple[float, ...]:
    """``(x0, y0, z0, x1, y1, z1)``: opposite corners of the ROI's bounding box in the RAS space of
    ``volume_node``'s own grid (world RAS when the volume has no parent transform). A rotated ROI is
    taken by the axis-aligned bounds of its corners."""
    corners = roi_corners_ras(roi_node)
    if volume_node is not None:
        corners = transform_points(corners, volume_node.GetParentTransformNode(), to_world=False)
    low, high = corners.min(0), corners.max(0)
    return tuple(float(v) for v in (*low, *high))


def roi_argument(roi_node, volume_node=None) -> list[str]:
    """``["--roi-ras=x0,y0,z0,x1,y1,z1"]`` for the engine (one word: a value that starts with '-'
    would be taken for an option)."""
    return ["--roi-ras=" + ",".join(f"{v:.4f}" for v in roi_ras_box(roi_node, volume_node))]
