"""Volumes between MRML and the files the engine reads and writes.

Files are NRRD in LPS space, written and read with ``pynrrd`` (Slicer bundles it). Slicer's
arrays are in KJI order (``slicer.util.arrayFromVolume``); NRRD's first axis is the fastest one
(I), so arrays are written and read with ``index_order="C"``.

A volume under a parent transform is written on its own (untransformed) grid; whatever is made
from the engine's output is put under the same transform, so nothing is resampled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _nrrd():
    try:
        import nrrd
    except ImportError as exc:  # pragma: no cover - Slicer ships pynrrd
        raise RuntimeError("VoCo needs the Python package pynrrd (pip install pynrrd)") from exc
    return nrrd


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 IJK -> RAS matrix (its own grid, without parent transforms)."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def check_scalar_volume(volume_node) -> np.ndarray:
    """The node's voxels (KJI); a clear error for anything the engine cannot segment."""
    import slicer

    if volume_node is None:
        raise ValueError("no input volume selected")
    if volume_node.GetImageData() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no image data")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{volume_node.GetName()}' is a label map, not an image to segment")
    voxels = slicer.util.arrayFromVolume(volume_node)
    if voxels.ndim != 3:
        raise ValueError(f"volume '{volume_node.GetName()}' has {voxels.shape[-1]} components per voxel; "
                         "VoCo segments single-component (scalar) volumes")
    return voxels


def write_nrrd(array_kji: np.ndarray, ijk_to_ras_matrix: np.ndarray, path, compress: bool = False) -> Path:
    """Write a KJI array with its IJK -> RAS matrix as an LPS NRRD (``path`` is written in place)."""
    nrrd = _nrrd()
    matrix = np.asarray(ijk_to_ras_matrix, dtype=np.float64)
    lps = LPS_FROM_RAS @ matrix[:3]
    header = {"space": "left-posterior-superior", "space directions": lps[:, :3].T, "space origin": lps[:, 3],
              "kinds": ["domain"] * 3, "encoding": "gzip" if compress else "raw"}
    nrrd.write(str(path), np.ascontiguousarray(array_kji), header, index_order="C",
               compression_level=1 if compress else 9)
    return Path(path)


def read_nrrd(path) -> tuple[np.ndarray, np.ndarray]:
    """(KJI array, 4x4 IJK -> RAS) of a 3-D NRRD in LPS or RAS space."""
    nrrd = _nrrd()
    array, header = nrrd.read(str(path), index_order="C")
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {array.shape}")
    directions = np.asarray(header["space directions"], dtype=np.float64).T  # columns: I, J, K
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    space = header.get("space", "left-posterior-superior")
    if space in ("left-posterior-superior", "LPS"):
        flip = LPS_FROM_RAS
    elif space in ("right-anterior-superior", "RAS"):
        flip = np.eye(3)
    else:
        raise ValueError(f"{path}: unsupported NRRD space {space!r}")
    matrix = np.eye(4)
    matrix[:3, :3] = flip @ directions
    matrix[:3, 3] = flip @ origin
    return array, matrix


def write_volume(volume_node, path, compress: bool = False) -> Path:
    """Volume node -> NRRD that the engine reads with the node's exact geometry."""
    return write_nrrd(check_scalar_volume(volume_node), ijk_to_ras(volume_node), path, compress)


def same_grid(volume_node, array_kji: np.ndarray, matrix: np.ndarray, tolerance_mm: float = 1e-3) -> bool:
    import slicer

    shape = tuple(slicer.util.arrayFromVolume(volume_node).shape[:3])
    return shape == tuple(array_kji.shape) and np.allclose(ijk_to_ras(volume_node), matrix, atol=tolerance_mm)


def label_map_node_from_file(path, name: str | None = None):
    """A ``vtkMRMLLabelMapVolumeNode`` with the file's voxels and geometry (added to the scene)."""
    import slicer

    array, matrix = read_nrrd(path)
    return slicer.util.addVolumeFromArray(array, matrix, name or Path(path).name.split(".")[0],
                                          nodeClassName="vtkMRMLLabelMapVolumeNode")


def label_array_from_segmentation(segmentation_node, reference_volume_node, values_by_segment_id: dict) -> np.ndarray:
    """One KJI label array on the reference volume's grid: segment id -> value (later ones win overlaps)."""
    import slicer

    shape = slicer.util.arrayFromVolume(reference_volume_node).shape[:3]
    top = max(values_by_segment_id.values(), default=0)
    labels = np.zeros(shape, dtype=np.uint8 if top < 256 else np.uint16)
    for segment_id, value in values_by_segment_id.items():
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_volume_node)
        labels[mask > 0] = value
    return labels


def fsync_file(path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
