"""Standard codes for label names, so that Slicer shows a segment as the anatomy it is.

SNOMED CT codes of DICOM CID 7140 "Brain Structure for Volumetric Measurement", looked up by a
label's lower-case name. Only codes taken from that table are listed: a wrong code is worse than
none.
"""

from __future__ import annotations

_SCT = {
    "amygdala": ("4958002", "Amygdala"),
    "brain stem": ("119238007", "Brain Stem"),
    "caudate nucleus": ("11000004", "Caudate Nucleus"),
    "cerebellar cortex": ("25991003", "Cerebellar Cortex"),
    "cerebellar white matter": ("33060004", "Cerebellar White Matter"),
    "cerebellum": ("113305005", "Cerebellum"),
    "cerebral grey matter": ("40146001", "Cerebral Gray Matter"),
    "cerebral white matter": ("68523003", "Cerebral White Matter"),
    "fourth ventricle": ("35918002", "Fourth Ventricle"),
    "globus pallidus": ("14738005", "Globus Pallidus"),
    "hippocampus": ("5366008", "Hippocampus"),
    "lateral ventricle": ("66720007", "Lateral Ventricle"),
    "putamen": ("89278009", "Putamen"),
    "thalamus": ("119406000", "Thalamus"),
    "third ventricle": ("49841001", "Third ventricle"),
}
_ALIASES = {"grey matter": "cerebral grey matter", "gray matter": "cerebral grey matter",
            "cerebral gray matter": "cerebral grey matter", "white matter": "cerebral white matter",
            "brainstem": "brain stem"}


def terminology_for(name: str) -> dict | None:
    """``{"scheme": "SCT", "code": ..., "meaning": ...}`` for a known label name, else None."""
    key = " ".join(name.lower().replace("_", " ").split())
    entry = _SCT.get(_ALIASES.get(key, key))
    return {"scheme": "SCT", "code": entry[0], "meaning": entry[1]} if entry else None
