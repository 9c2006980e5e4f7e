"""The clinician's training set: corrected cases collected in Slicer for ``voco finetune``.

A folder in the MSD layout::

    dataset.json          {"name", "description", "labels": {"0": "background", "1": "liver", ...},
                           "numTraining", "training": [{"image": "./imagesTr/case_0001.nrrd",
                                                        "label": "./labelsTr/case_0001.nrrd",
                                                        "unseen_dice": {...}}, ...]}
    imagesTr/case_0001.nrrd   the image on its own grid (LPS NRRD)
    labelsTr/case_0001.nrrd   the corrected label map on the same grid

``unseen_dice`` (only for a case whose segmentation a model made): how the model version that
made it did against the correction, before any training on it: ``{"model", "version", "dice":
{label name: Dice}, "mean_dice"}`` (VoCoCommonLib.versions). ``voco finetune`` reads only
``image`` and ``label``.

Adding a case has two halves: ``snapshot`` reads the scene (the GUI thread: the label values, in
one export of all segments, and a view of the image's voxels) and ``write`` compresses and stores
the files (a worker thread; seconds for a large volume). ``add`` does both, for the console and tests.

Crash safety: every file is written under a temporary name, flushed to disk and renamed into
place; dataset.json is replaced last. A crash at any moment leaves the previous dataset.json
whole, plus at most files that it does not name; the next ``write`` removes those.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .versions import SCORE_KEY
from .volumes import check_scalar_volume, fsync_file, ijk_to_ras, label_array_from_segmentation, write_nrrd

DATASET_JSON = "dataset.json"
IMAGES, LABELS = "imagesTr", "labelsTr"
TMP_PREFIX = ".tmp-"
LABEL_VALUE_TAG = "VoCo.LabelValue"  # on a segment: the label value of the model output it came from
_CASE = re.compile(r"case_(\d+)\.nrrd")


@dataclass
class CaseSnapshot:
    """A case read from the scene, ready to be written by any thread."""

    image: np.ndarray
    labels: np.ndarray
    ijk_to_ras: np.ndarray
    names: dict  # label value -> segment name


class TrainingSet:
    """Example (Slicer's Python console)::

        ts = TrainingSet("/data/voco-cases")
        ts.add(getNode("CT"), getNode("CT liver v1"), {"liver": 1, "spleen": 5})
        ts.count
    """

    _write_lock = threading.Lock()  # one writer at a time: case numbers and dataset.json

    def __init__(self, folder, name: str = "VoCo clinician cases"):
        self.folder = Path(folder)
        self.name = name

    @property
    def dataset_json(self) -> Path:
        return self.folder / DATASET_JSON

    def read(self) -> dict:
        """The current dataset.json (an empty set when there is none yet)."""
        if not self.dataset_json.is_file():
            return {"name": self.name, "description": "cases corrected in 3D Slicer (VoCoSegmentation)",
                    "tensorImageSize": "3D", "modality": {"0": "image"}, "labels": {"0": "background"},
                    "numTraining": 0, "training": [], "test": []}
        return json.loads(self.dataset_json.read_text(encoding="utf-8"))

    def cases(self) -> list[dict]:
        """The ``training`` entries, each with ``case_id`` added."""
        return [{**entry, "case_id": Path(entry["image"]).name.split(".")[0]} for entry in self.read()["training"]]

    def finetuning_data(self) -> Path:
        """dataset.json, for ``voco finetune --data``; a ValueError for the user while there is no case."""
        if self.count < 1:
            raise ValueError("the training set has no cases yet: add a corrected case in VoCo Segmentation")
        return self.dataset_json

    @property
    def count(self) -> int:
        return len(self.read()["training"])

    @property
    def label_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.read()["labels"].items()}

    def add(self, volume_node, segmentation_node, labels=None, segment_ids=None) -> str:
        """Store the image and the segmentation as a new case; returns its id (``case_0001``...)."""
        return self.write(self.snapshot(volume_node, segmentation_node, labels, segment_ids))

    def snapshot(self, volume_node, segmentation_node, labels=None, segment_ids=None) -> CaseSnapshot:
        """The case as it is in the scene.

        ``labels`` says which value each segment gets: ``{segment name: value}``, or a model card's
        labels (a list of ``{"value", "name"}``). A segment not named there keeps the value tagged
        by the model that made it, else takes the next free value; names already in dataset.json
        keep their values. ``segment_ids`` restricts which segments are stored (default: all)."""
        if segmentation_node is None:
            raise ValueError("no segmentation selected")
        values = self._segment_values(segmentation_node, labels, self.read(), segment_ids)
        if not values:
            raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments to store")
        image = check_scalar_volume(volume_node)
        label_array = label_array_from_segmentation(segmentation_node, volume_node,
                                                    {sid: value for sid, (_, value) in values.items()})
        if not label_array.any():
            raise ValueError("the segmentation is empty on this volume: nothing to learn from")
        # The image is handed over as a view of the volume's voxels, as a segmentation's input is:
        # copying a 512 x 512 x 300 CT here held the GUI thread 49-211 ms; the writer reads it.
        return CaseSnapshot(image=image, labels=label_array, ijk_to_ras=ijk_to_ras(volume_node),
                            names={value: name for name, value in values.values()})

    def write(self, case: CaseSnapshot, score: dict | None = None) -> str:
        """Write a snapshot as the next case, with the ``unseen_dice`` score of the model version
        that segmented it, if any; returns its id."""
        with self._write_lock:
            dataset = self.read()
            self.remove_orphans(dataset)
            case_id = self._next_case_id(dataset)
            image_path, label_path = self.folder / IMAGES / f"{case_id}.nrrd", self.folder / LABELS / f"{case_id}.nrrd"
            self._atomic(image_path, lambda tmp: write_nrrd(case.image, case.ijk_to_ras, tmp, compress=True))
            self._atomic(label_path, lambda tmp: write_nrrd(case.labels, case.ijk_to_ras, tmp, compress=True))
            for value, name in case.names.items():
                dataset["labels"][str(value)] = name
            dataset["labels"] = {k: dataset["labels"][k] for k in sorted(dataset["labels"], key=int)}
            entry = {"image": f"./{IMAGES}/{case_id}.nrrd", "label": f"./{LABELS}/{case_id}.nrrd"}
            dataset["training"].append({**entry, SCORE_KEY: score} if score else entry)
            dataset["numTraining"] = len(dataset["training"])
            self._atomic(self.dataset_json,
                         lambda tmp: tmp.write_text(json.dumps(dataset, indent=1), encoding="utf-8"))
            return case_id

    # --- helpers ------------------------------------------------------------------------------

    def _segment_values(self, segmentation_node, labels, dataset, segment_ids) -> dict:
        import vtk

        if isinstance(labels, (list, tuple)):
            labels = {str(label["name"]): int(label["value"]) for label in labels}
        by_name = {name: int(value) for value, name in dataset["labels"].items() if int(value) != 0}
        by_name.update(labels or {})
        used = set(by_name.values())
        segmentation = segmentation_node.GetSegmentation()
        ids = list(segment_ids) if segment_ids else [segmentation.GetNthSegmentID(i)
                                                     for i in range(segmentation.GetNumberOfSegments())]
        values = {}
        for segment_id in ids:
            segment = segmentation.GetSegment(segment_id)
            if segment is None:
                raise ValueError(f"no segment {segment_id!r} in '{segmentation_node.GetName()}'")
            name = segment.GetName()
            if name not in by_name:
                tagged = vtk.mutable("")  # vtkSegment::GetTag(tag, std::string& value)
                segment.GetTag(LABEL_VALUE_TAG, tagged)
                tagged = str(tagged)
                value = int(tagged) if tagged.isdigit() and int(tagged) not in used else max(used | {0}) + 1
                by_name[name] = value
                used.add(value)
            if by_name[name] < 1:
                raise ValueError(f"segment '{name}': label values must be at least 1 (0 is background)")
            values[segment_id] = (name, by_name[name])
        return values

    def _next_case_id(self, dataset) -> str:
        numbers = [int(m.group(1)) for entry in dataset["training"] if (m := _CASE.fullmatch(Path(entry["image"]).name))]
        return f"case_{max(numbers, default=0) + 1:04d}"

    def remove_orphans(self, dataset: dict | None = None) -> list[Path]:
        """Delete temporary files and case files that dataset.json does not name (left by a crash)."""
        dataset = self.read() if dataset is None else dataset
        named = {(self.folder / entry[key]).resolve() for entry in dataset["training"] for key in ("image", "label")}
        removed = []
        for sub in (IMAGES, LABELS, "."):
            folder = self.folder / sub
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                orphan = path.name.startswith(TMP_PREFIX) or (sub != "." and path.resolve() not in named)
                if orphan and path.is_file():
                    path.unlink()
                    removed.append(path)
        return removed

    def _atomic(self, path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
        try:
            write(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # the rename itself reaches the disk
            descriptor = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError:
            pass  # not possible on every platform (Windows)
