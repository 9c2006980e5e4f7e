"""The engine's output (label map + ``OUTPUT.json`` sidecar) as a segmentation node.

One segment per label of the model card, in card order, named and coloured as the card says,
with Slicer's terminology entry where the card has a code, on the input volume's grid, in the
subject hierarchy beside the input (in its study). The
segmentation goes under the input's parent transform *before* its reference geometry is set:
``SetReferenceImageGeometryParameterFromVolumeNode`` maps the volume's grid through the
transform between the two nodes' parents, so the other order applied the transform twice.
Labels the engine found no voxel of stay as empty segments and are reported. Nothing is left in
the scene when anything fails.

Reading the files (``read_output``) needs no scene and runs in the job's worker thread, which also
turns the label map into one image that all segments share (Slicer's shared labelmap: each
segment is a label value of it) and finds which values have voxels; making the node
(``segmentation_from_output``) is MRML and runs on the GUI thread, and touches no voxel: for the
20 VoComni segments, one mask per segment made that step 55 ms of GUI-thread CPU on a 73 x 47 x 73 CT. Surfaces for the 3D
view are made only when the user asks (Show 3D, as in Segment Editor): Slicer's conversion
takes tens of milliseconds even for a small volume and seconds for a large one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from VoCoCommonLib.training_set import LABEL_VALUE_TAG
from VoCoCommonLib.volumes import read_nrrd, same_grid

# Slicer's terminology entry string (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry):
# context~category~type~typeModifier~anatomicContext~region~regionModifier, each code "scheme^value^meaning".
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}


@dataclass
class EngineOutput:
    """The engine's label map and sidecar, read from disk."""

    labels: np.ndarray       # KJI
    ijk_to_ras: np.ndarray
    sidecar: dict
    name: str                # the label map's file name, for messages
    image: object            # vtkOrientedImageData of ``labels``: the segments' shared labelmap
    present: frozenset       # label values with at least one voxel


@dataclass
class SegmentationResult:
    node: object  # vtkMRMLSegmentationNode
    segment_ids: dict = field(default_factory=dict)  # label value -> segment id
    empty_labels: list = field(default_factory=list)  # names of labels with no voxel
    sidecar: dict = field(default_factory=dict)


def terminology_entry(term: dict | None) -> str | None:
    """Slicer's terminology entry string for a label's terminology, or None when it has no code.

    ``term``: the type's ``scheme``, ``code``, ``meaning``, plus optional ``context`` (a Slicer
    terminology context name; default the General Anatomy list), ``category`` (default Anatomical
    Structure), ``modifier`` (e.g. Right), ``region`` (the anatomic region of a lesion)."""
    if not term or not term.get("code"):
        return None

    def coded(entry):
        return "^".join(str((entry or {}).get(key) or "").replace("~", "-").replace("^", "-")
                        for key in ("scheme", "code", "meaning"))

    return "~".join([term.get("context") or TERMINOLOGY_CONTEXT, coded(term.get("category") or ANATOMICAL_STRUCTURE),
                     coded(term), coded(term.get("modifier")), ANATOMIC_CONTEXT, coded(term.get("region")), "^^"])


def hex_to_rgb(color: str) -> tuple[float, float, float]:
    text = str(color).lstrip("#")
    if len(text) != 6:
        raise ValueError(f"colour {color!r} is not #rrggbb")
    return tuple(int(text[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def read_sidecar(label_map_path) -> dict:
    """``seg.nrrd`` -> the content of ``seg.json``."""
    path = Path(label_map_path)
    sidecar = path.with_name(path.name[: -len("".join(path.suffixes[-1:]))] + ".json")
    return json.loads(sidecar.read_text(encoding="utf-8"))


def read_output(label_map_path) -> EngineOutput:
    labels, matrix = read_nrrd(label_map_path)
    counts = np.bincount(labels.ravel()) if labels.dtype.kind == "u" else np.bincount(labels.ravel().astype(np.int64))
    return EngineOutput(labels, matrix, read_sidecar(label_map_path), Path(label_map_path).name,
                        image=labelmap_image(labels, matrix), present=frozenset(np.flatnonzero(counts).tolist()))


def labelmap_image(labels_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """A vtkOrientedImageData of a KJI label array (its own copy of the voxels), on the grid ``ijk_to_ras``."""
    import slicer
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(labels_kji.shape[2], labels_kji.shape[1], labels_kji.shape[0])
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    voxels = np.ascontiguousarray(labels_kji).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels, deep=True,
                                                               array_type=numpy_support.get_vtk_array_type(voxels.dtype)))
    return image


def segmentation_from_output(output: EngineOutput, volume_node, name: str | None = None) -> SegmentationResult:
    """Make the segmentation node of an engine output on ``volume_node``'s grid (see module doc)."""
    import slicer

    labels, matrix, sidecar = output.labels, output.ijk_to_ras, output.sidecar
    if not same_grid(volume_node, labels, matrix):
        raise ValueError(f"the engine's label map {output.name} is not on the grid of "
                         f"'{volume_node.GetName()}' (shape {labels.shape})")
    model = sidecar.get("model") or {}
    if name is None:
        name = f"{volume_node.GetName()} {model.get('name', 'VoCo')}".strip()
        if model.get("version"):
            name += f" v{model['version']}"
    scene = slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    try:
        node.CreateDefaultDisplayNodes()
        place_beside(node, volume_node)
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        result = SegmentationResult(node, sidecar=sidecar)
        segmentation = node.GetSegmentation()
        representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        for label in sidecar.get("labels", []):
            value, segment_id = int(label["value"]), f"label_{label['value']}"
            segment = slicer.vtkSegment()
            segment.SetName(str(label["name"]))
            segment.SetColor(hex_to_rgb(label.get("color") or "#808080"))
            segment.SetNameAutoGenerated(False)  # the model's own names and colours, not the terminology's
            segment.SetColorAutoGenerated(False)
            segment.SetTag(LABEL_VALUE_TAG, str(value))
            entry = terminology_entry(label.get("terminology"))
            if entry:
                segment.SetTerminology(entry)
            segment.SetLabelValue(value)  # its voxels: those of this value in the shared labelmap
            segment.AddRepresentation(representation, output.image)
            if not segmentation.AddSegment(segment, segment_id):
                raise RuntimeError(f"could not add a segment for label {value} ({label['name']})")
            if value not in output.present:
                result.empty_labels.append(str(label["name"]))
            result.segment_ids[value] = segment_id
        return result
    except BaseException:
        remove_node(node)
        raise


def place_beside(node, volume_node) -> None:
    """Put ``node`` in the subject hierarchy where the volume is (its study, for a DICOM series)."""
    hierarchy = node.GetScene().GetSubjectHierarchyNode()
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    if not volume_item:  # a volume outside the hierarchy: the node stays where Slicer put it
        return
    parent = hierarchy.GetItemParent(volume_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # Slicer's subject hierarchy plugins make the item when a node is added; without them, here
        hierarchy.CreateItem(parent, node)


def move_into(result: SegmentationResult, output_node, volume_node) -> SegmentationResult:
    """Put a result's segments into an existing segmentation node (its old segments are replaced)
    and remove the result's own node with its display node."""
    output_node.GetSegmentation().DeepCopy(result.node.GetSegmentation())
    output_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    output_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if output_node.GetDisplayNode() is None:
        output_node.CreateDefaultDisplayNodes()
    remove_node(result.node)
    result.node = output_node
    return result


def remove_node(node) -> None:
    """Remove a displayable node and its display and storage nodes from the scene."""
    import slicer

    scene = slicer.mrmlScene
    if node is None or node.GetScene() is None:
        return
    others = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    others += [node.GetStorageNode()] if hasattr(node, "GetStorageNode") else []
    scene.RemoveNode(node)
    for other in others:
        if other is not None and other.GetScene() is not None:
            scene.RemoveNode(other)
