"""The engine's crop layouts and position predictions as MRML nodes.

``voco crops IMAGE --out DIR`` writes ``layout.json`` (base and target boxes with RAS centre,
size, corners and the RAS directions of the box axes) and ``layout.nii.gz`` (base index + 1 on
the input image's grid). ``voco positions IMAGE --checkpoint CKPT --out DIR`` writes
``positions.json`` (per target: true and predicted overlap with each base) and
``positions.nii.gz`` (one target's predicted overlap painted over each base). This module turns
them into markups ROI boxes, a labelmap with a colour table, a table and a scalar volume.

Reading the files (``read_layout``, ``read_positions``) needs no scene and runs in a job's worker
thread; making the nodes (``layout_nodes``, ``position_nodes``) is MRML, for the GUI thread.

Example (Slicer's Python console)::

    from VoCoPretrainLib.overlays import layout_nodes, read_layout
    layout = layout_nodes(read_layout("/tmp/crops"))
    layout.bases[3].GetName()   # 'base 3'
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import slicer
import slicer.util

BASE_COLOR = (1.0, 0.85, 0.1)      # yellow boxes for the base grid
TARGET_COLOR = (0.1, 0.8, 1.0)     # cyan boxes for the sampled targets
ERROR_SCALE = 0.5                  # a mean absolute overlap error this large is drawn fully red
HEATMAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeFullRainbow"
ROLE_ATTRIBUTE = "VoCo.overlay"    # on every node added here: "base", "target", "layout", "heatmap", ...


@dataclass
class OverlayFiles:
    """What ``voco crops`` / ``voco positions`` wrote: the JSON and the volume (KJI, IJK -> RAS)."""

    data: dict
    array: np.ndarray
    ijk_to_ras: np.ndarray


@dataclass
class LayoutNodes:
    """What ``load_layout`` added to the scene."""

    bases: list = field(default_factory=list)      # vtkMRMLMarkupsROINode per base crop, index order
    targets: list = field(default_factory=list)    # vtkMRMLMarkupsROINode per target crop
    labelmap: object = None                        # vtkMRMLLabelMapVolumeNode: base index + 1, 0 outside
    color_table: object = None                     # vtkMRMLColorTableNode: entry k + 1 is "base k"
    layout: dict = field(default_factory=dict)     # layout.json as read

    def nodes(self) -> list:
        return [*self.bases, *self.targets, self.labelmap, self.color_table]


@dataclass
class PositionNodes:
    """What ``load_positions`` added to the scene."""

    table: object = None          # vtkMRMLTableNode: one row per (target, base)
    targets: list = field(default_factory=list)   # vtkMRMLMarkupsROINode per target, coloured by its error
    heatmap: object = None        # vtkMRMLScalarVolumeNode from positions.nii.gz (put it in the foreground)
    heatmap_target: int = 0
    display: dict = field(default_factory=dict)   # colour node ID, window range, suggested foreground opacity
    positions: dict = field(default_factory=dict)  # positions.json as read

    def nodes(self) -> list:
        return [self.table, *self.targets, self.heatmap]


# --- boxes -----------------------------------------------------------------------------------

def box_matrix(center_ras, axes_ras) -> np.ndarray:
    """ROI object-to-node matrix: box axes as columns (a proper rotation) and the centre.

    The engine's axes are the RAS directions of the image's i, j, k; for an image stored with a
    left-handed index frame they form a reflection, so the third axis is flipped. A box is
    symmetric about its centre, so its extent along the flipped axis stays the same.
    """
    axes = np.asarray(axes_ras, dtype=float).reshape(3, 3).copy()
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1
    matrix = np.eye(4)
    matrix[:3, :3] = axes
    matrix[:3, 3] = np.asarray(center_ras, dtype=float)
    return matrix


def add_box(box: dict, axes_ras, name: str, color, fill_opacity: float = 0.05, locked: bool = True):
    """One locked vtkMRMLMarkupsROINode for a box of layout.json (``center_ras``, ``size_mm``)."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(box_matrix(box["center_ras"], axes_ras)))
    node.SetSize(*[float(s) for s in box["size_mm"]])
    node.SetLocked(locked)
    node.SetAttribute(ROLE_ATTRIBUTE, box.get("kind", "box"))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(*color)
    display.SetColor(*color)
    display.SetFillOpacity(fill_opacity)
    return node


def roi_corners(node) -> np.ndarray:
    """The 8 corners (RAS) of an ROI node, from its own centre, size and orientation."""
    matrix = slicer.util.arrayFromVTKMatrix(node.GetObjectToNodeMatrix())
    half = np.asarray(node.GetSize()) / 2
    signs = np.array([[x, y, z] for z in (-1, 1) for y in (-1, 1) for x in (-1, 1)], dtype=float)
    return (signs * half) @ matrix[:3, :3].T + matrix[:3, 3]


def error_color(error: float, scale: float = ERROR_SCALE) -> tuple[float, float, float]:
    """Green (no error) through yellow to red (``scale`` or more), by hue."""
    t = min(max(float(error) / scale, 0.0), 1.0) if error is not None and np.isfinite(error) else 1.0
    return colorsys.hsv_to_rgb((1.0 - t) / 3.0, 1.0, 1.0)


# --- volumes ---------------------------------------------------------------------------------

def read_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    """(array in slicer.util's KJI order, IJK-to-RAS 4x4) of a NIfTI file (its affine is RAS)."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(image.affine, dtype=float)


def _base_color_table(bases: int, name: str):
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(bases + 1)
    table.SetColor(0, "outside", 0.0, 0.0, 0.0, 0.0)
    for k in range(bases):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 1.0)   # well-separated hues
        table.SetColor(k + 1, f"base {k}", r, g, b, 1.0)
    return table


# --- crop layout -----------------------------------------------------------------------------

def read_layout(out_dir) -> OverlayFiles:
    out_dir = Path(out_dir)
    return OverlayFiles(json.loads((out_dir / "layout.json").read_text()), *read_nifti(out_dir / "layout.nii.gz"))


def layout_nodes(files: OverlayFiles, prefix: str = "") -> LayoutNodes:
    """ROIs for every base ("base k", yellow) and target ("target t", cyan) of ``voco crops``
    output, and its base-index labelmap with a colour table (all locked, in RAS)."""
    layout, array, ijk_to_ras = files.data, files.array, files.ijk_to_ras
    axes = layout["box_axes_ras"]
    nodes = LayoutNodes(layout=layout)
    nodes.bases = [add_box(box, axes, f"{prefix}base {box['index']}", BASE_COLOR) for box in layout["bases"]]
    nodes.targets = [add_box(box, axes, f"{prefix}target {box['index']}", TARGET_COLOR, fill_opacity=0.15)
                     for box in layout["targets"]]
    nodes.color_table = _base_color_table(len(layout["bases"]), f"{prefix}base crops colours")
    nodes.labelmap = slicer.util.addVolumeFromArray(array.astype(np.int16), ijk_to_ras, f"{prefix}base crops",
                                                    "vtkMRMLLabelMapVolumeNode")
    nodes.labelmap.GetDisplayNode().SetAndObserveColorNodeID(nodes.color_table.GetID())
    nodes.labelmap.SetAttribute(ROLE_ATTRIBUTE, "layout")
    return nodes


# --- position predictions --------------------------------------------------------------------

POSITION_COLUMNS = ("target", "base", "true", "predicted", "error")


def position_rows(positions: dict) -> np.ndarray:
    """(targets x bases, 5) array: target, base, true overlap, predicted overlap, predicted - true."""
    rows = []
    for target in positions["targets"]:
        for base, (true, predicted) in enumerate(zip(target["true"], target["predicted"])):
            rows.append((target["index"], base, true, predicted, predicted - true))
    return np.asarray(rows, dtype=float).reshape(-1, len(POSITION_COLUMNS))


def read_positions(out_dir) -> OverlayFiles:
    out_dir = Path(out_dir)
    return OverlayFiles(json.loads((out_dir / "positions.json").read_text()), *read_nifti(out_dir / "positions.nii.gz"))


def position_nodes(files: OverlayFiles, prefix: str = "", error_scale: float = ERROR_SCALE) -> PositionNodes:
    """Table of predicted vs true overlap per (target, base), target ROIs coloured green -> red by
    their mean absolute error, and the heatmap of ``positions.nii.gz`` as a scalar volume whose
    display node already uses a rainbow colour map over [0, 1] (put it in the foreground layer:
    ``slicer.util.setSliceViewerLayers(foreground=nodes.heatmap, foregroundOpacity=0.5)``)."""
    positions, array, ijk_to_ras = files.data, files.array, files.ijk_to_ras
    nodes = PositionNodes(positions=positions, heatmap_target=int(positions.get("heatmap_target", 0)))

    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"{prefix}position predictions")
    rows = position_rows(positions)
    slicer.util.updateTableFromArray(table, [rows[:, 0].astype(np.int32), rows[:, 1].astype(np.int32),
                                             rows[:, 2], rows[:, 3], rows[:, 4]], list(POSITION_COLUMNS))
    table.SetAttribute(ROLE_ATTRIBUTE, "positions")
    nodes.table = table

    axes = positions.get("box_axes_ras") or _axes_from_corners(positions["targets"][0])
    for target in positions["targets"]:
        error = target.get("mean_abs_error")
        node = add_box(target, axes, f"{prefix}target {target['index']} (error {error:.2f})",
                       error_color(error, error_scale), fill_opacity=0.2)
        node.SetAttribute("VoCo.mean_abs_error", f"{error:.6g}")
        nodes.targets.append(node)

    heatmap = slicer.util.addVolumeFromArray(array.astype(np.float32), ijk_to_ras,
                                             f"{prefix}predicted overlap (target {nodes.heatmap_target})")
    high = max(1.0, float(array.max())) if array.size else 1.0
    low = min(0.0, float(array.min())) if array.size else 0.0
    display = heatmap.GetDisplayNode()
    display.SetAndObserveColorNodeID(HEATMAP_COLOR_NODE_ID)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(low, high)
    heatmap.SetAttribute(ROLE_ATTRIBUTE, "heatmap")
    nodes.heatmap = heatmap
    nodes.display = {"color_node_id": HEATMAP_COLOR_NODE_ID, "window_min": low, "window_max": high,
                     "foreground_opacity": 0.5}
    return nodes


def _axes_from_corners(box: dict) -> np.ndarray:
    """Unit RAS directions of a box's i, j, k edges from its corners (x fastest, as the engine writes them)."""
    c = np.asarray(box["corners_ras"], dtype=float)
    edges = np.stack([c[1] - c[0], c[2] - c[0], c[4] - c[0]], axis=1)
    return edges / np.linalg.norm(edges, axis=0)
