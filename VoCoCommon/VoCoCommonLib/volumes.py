"""Volumes between MRML and the files the engine reads and writes (the hand-off).

Files are NRRD in LPS space with an attached header, raw or gzip, read and written here with
numpy and the standard library alone: Slicer ships neither pynrrd nor nibabel, and these files
are written before the engine's packages are even installed (the training set). Slicer's arrays
are KJI (``slicer.util.arrayFromVolume``); NRRD's first axis is the fastest one (I), which is a
C-order KJI array's last, so the bytes go out and come in as they are.

A hand-off has two halves so that the GUI thread only does the quick one: ``snapshot`` (GUI
thread: the node's voxels as a view and its IJK -> RAS) and ``write_nrrd`` (a worker thread).
A volume under a parent transform is written on its own (untransformed) grid; whatever is made
from the engine's output is put under the same transform, so nothing is resampled.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_TYPES = {  # NRRD type names (all spellings of the format's spec) -> numpy
    "int8": np.int8, "signed char": np.int8, "uint8": np.uint8, "uchar": np.uint8, "unsigned char": np.uint8,
    "int16": np.int16, "short": np.int16, "short int": np.int16, "signed short": np.int16,
    "uint16": np.uint16, "ushort": np.uint16, "unsigned short": np.uint16,
    "int32": np.int32, "int": np.int32, "signed int": np.int32, "uint32": np.uint32, "uint": np.uint32,
    "unsigned int": np.uint32, "int64": np.int64, "longlong": np.int64, "long long": np.int64,
    "uint64": np.uint64, "ulonglong": np.uint64, "unsigned long long": np.uint64,
    "float": np.float32, "double": np.float64,
}
_NAMES = {np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.int16): "int16",
          np.dtype(np.uint16): "uint16", np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32",
          np.dtype(np.int64): "int64", np.dtype(np.uint64): "uint64", np.dtype(np.float32): "float",
          np.dtype(np.float64): "double"}
_VECTOR = re.compile(r"\(([^)]*)\)")


@dataclass
class VolumeSnapshot:
    """What a worker thread needs to write a volume node: its voxels (a view; keep the node as
    it is until written) and its IJK -> RAS matrix."""

    name: str
    array_kji: np.ndarray
    ijk_to_ras: np.ndarray

    def write(self, path, compress: bool = False) -> Path:
        return write_nrrd(self.array_kji, self.ijk_to_ras, path, compress)


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 IJK -> RAS matrix (its own grid, without parent transforms)."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def check_scalar_volume(volume_node) -> np.ndarray:
    """The node's voxels (KJI); a clear error for anything the engine cannot take."""
    import slicer

    if volume_node is None:
        raise ValueError("no input volume selected")
    if volume_node.GetImageData() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no image data")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{volume_node.GetName()}' is a label map, not an image")
    voxels = slicer.util.arrayFromVolume(volume_node)
    if voxels.ndim != 3:
        raise ValueError(f"volume '{volume_node.GetName()}' has {voxels.shape[-1]} components per voxel; "
                         "VoCo takes single-component (scalar) volumes")
    return voxels


def snapshot(volume_node) -> VolumeSnapshot:
    return VolumeSnapshot(volume_node.GetName(), check_scalar_volume(volume_node), ijk_to_ras(volume_node))


def write_nrrd(array_kji: np.ndarray, ijk_to_ras_matrix: np.ndarray, path, compress: bool = False) -> Path:
    """A KJI array with its IJK -> RAS matrix as an LPS NRRD with an attached header."""
    array = np.ascontiguousarray(array_kji)
    if array.ndim != 3 or array.dtype not in _NAMES:
        raise ValueError(f"cannot write a {array.dtype} array of shape {array.shape} as a 3-D NRRD")
    lps = LPS_FROM_RAS @ np.asarray(ijk_to_ras_matrix, dtype=np.float64)[:3]
    vector = lambda v: "(" + ",".join(repr(float(x)) for x in v) + ")"  # noqa: E731
    header = ["NRRD0004", f"type: {_NAMES[array.dtype]}", "dimension: 3", "space: left-posterior-superior",
              "sizes: " + " ".join(str(n) for n in array.shape[::-1]),
              "space directions: " + " ".join(vector(lps[:, axis]) for axis in range(3)),
              "kinds: domain domain domain", "endian: little", f"encoding: {'gzip' if compress else 'raw'}",
              f"space origin: {vector(lps[:, 3])}"]
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n\n").encode("ascii"))
        f.write(gzip.compress(data, compresslevel=1) if compress else data)
    return Path(path)


def read_nrrd(path) -> tuple[np.ndarray, np.ndarray]:
    """(KJI array, 4x4 IJK -> RAS) of a 3-D NRRD with an attached header, in LPS or RAS space."""
    path = Path(path)
    with open(path, "rb") as f:
        if not f.readline().startswith(b"NRRD000"):
            raise ValueError(f"{path}: not a NRRD file")
        fields = {}
        for raw in iter(f.readline, b""):
            line = raw.decode("ascii", errors="replace").rstrip("\r\n")
            if not line:
                break
            if line.startswith("#") or ":=" in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        payload = f.read()
    if "data file" in fields or "datafile" in fields:
        raise ValueError(f"{path}: detached NRRD data files are not read here")
    if int(fields.get("dimension", 0)) != 3:
        raise ValueError(f"{path}: expected a 3-D image, got dimension {fields.get('dimension')}")
    dtype = np.dtype(_TYPES[fields["type"]]).newbyteorder(">" if fields.get("endian") == "big" else "<")
    sizes = [int(n) for n in fields["sizes"].split()]
    encoding = fields.get("encoding", "raw")
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif encoding != "raw":
        raise ValueError(f"{path}: NRRD encoding {encoding!r} is not read here")
    count = int(np.prod(sizes))
    array = np.frombuffer(payload, dtype=dtype, count=count).reshape(sizes[::-1]).astype(dtype.newbyteorder("="))
    directions = np.array([[float(x) for x in v.split(",")] for v in _VECTOR.findall(fields["space directions"])]).T
    origin = np.array([float(x) for x in _VECTOR.findall(fields.get("space origin", "(0,0,0)"))[0].split(",")])
    space = fields.get("space", "left-posterior-superior")
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


def same_grid(volume_node, array_kji: np.ndarray, matrix: np.ndarray, tolerance_mm: float = 1e-3) -> bool:
    import slicer

    shape = tuple(slicer.util.arrayFromVolume(volume_node).shape[:3])
    return shape == tuple(array_kji.shape) and np.allclose(ijk_to_ras(volume_node), matrix, atol=tolerance_mm)


def label_array_from_segmentation(segmentation_node, reference_volume_node, values_by_segment_id: dict) -> np.ndarray:
    """One KJI label array on the reference volume's grid: segment id -> value (later ones win overlaps).

    One export of every segment at once (Slicer's merged labelmap numbers the n-th segment of the
    list n + 1), then a lookup to the values: a model's 20 segments cost one export, not 20."""
    import slicer
    import vtk

    ids = vtk.vtkStringArray()
    for segment_id in values_by_segment_id:
        ids.InsertNextValue(segment_id)
    top = max(values_by_segment_id.values(), default=0)
    lookup = np.array([0, *values_by_segment_id.values()], dtype=np.uint8 if top < 256 else np.uint16)
    scene = slicer.mrmlScene
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("VoCo export"))
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                  reference_volume_node):
            raise RuntimeError(f"could not export the segments of '{segmentation_node.GetName()}'")
        return lookup[slicer.util.arrayFromVolume(labelmap)]
    finally:  # the temporary node and what the export made for it (its colour table; not shared ones)
        display = labelmap.GetDisplayNode()
        colors = display.GetColorNode() if display is not None else None
        for node in (labelmap, display, labelmap.GetStorageNode(),
                     colors if colors is not None and not colors.GetSingletonTag() else None):
            if node is not None and node.GetScene() is not None:
                scene.RemoveNode(node)


def fsync_file(path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
