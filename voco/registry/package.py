"""Model packages: the unit that ``voco finetune`` writes, ``voco models import`` installs and
``voco segment`` runs.

A package is a folder with two files::

    model.json   the model card: name, version, architecture, input channels, preprocessing,
                 labels (value, name, colour, terminology code) and metrics
    weights.pt   {"format": "voco-model", "state_dict": {...}}: tensors only, loadable with
                 torch.load(weights_only=True); its sha256 is recorded in the card

A published segmentation checkpoint (VoComni_B.pt) is installed as it was published: the card
names it as ``weights_file`` and its weights are read through the published-layout loader
(``voco.checkpoints.layouts``), so the file keeps the sha256 its publisher gives.

Everything needed to run the model is in the card; nothing is guessed at inference time. The
card's values are checked when it is read (a patch size of 4096 would allocate hundreds of GB),
and a package is written as a new folder that replaces the old one in a rename, so a kill never
leaves new weights beside an old card.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints.files import atomic_folder, atomic_path, complete_folder, load_checkpoint, save_checkpoint, sha256_of
from ..errors import VocoInputError
from ..models.architectures import BACKBONES

if TYPE_CHECKING:  # cards are read without torch (voco models list); only weights need it
    import torch

CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.pt"
FORMAT = "voco-model"
_PLAIN_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MODALITIES = ("ct", "ct-chest", "mri")
# What a card may ask for: beyond these a card is damaged or hostile, not a model.
MAX_PATCH_EDGE = 512  # voxels; 96 and 128 are usual
SPACING_RANGE = (0.05, 20.0)  # mm
MAX_IN_CHANNELS = 16
MAX_LABEL_VALUE = 65535  # label maps are written as uint8 or uint16
MAX_LABELS = 255

# Colours for labels that come without one (Slicer's GenericAnatomyColors feel: distinct, not garish).
PALETTE = ("#80ae80", "#f1d691", "#b17a65", "#6fb8d2", "#d8654f", "#dd8244", "#90ee90", "#c0685c",
           "#dcf514", "#4e3f9b", "#e3e3f5", "#ff00ff", "#3ca0ff", "#ffa500", "#8b4513", "#00ced1")


@dataclass
class Label:
    value: int
    name: str
    color: str  # "#rrggbb"
    # DICOM-style code triplet, e.g. {"scheme": "SCT", "code": "39607008", "meaning": "Lung"}; None when unknown.
    terminology: dict | None = None


@dataclass
class Preprocessing:
    """How a volume is prepared for the network: the same steps as pretraining."""

    modality: str  # "ct", "ct-chest" or "mri" (decides the intensity scaling)
    spacing: tuple[float, float, float]  # mm
    patch_size: tuple[int, int, int]  # sliding-window edge, voxels
    # Spacing for --fast (coarser, for CPU users); None: twice `spacing`.
    fast_spacing: tuple[float, float, float] | None = None

    def validate(self, source=None) -> None:
        if self.modality not in MODALITIES:
            raise VocoInputError(f"model card modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}",
                                 source)
        patch = self.patch_size
        if len(patch) != 3 or not all(_is_int(n) and 32 <= n <= MAX_PATCH_EDGE and n % 32 == 0 for n in patch):
            raise VocoInputError(f"model card patch_size must be three multiples of 32 up to {MAX_PATCH_EDGE}, "
                                 f"got {list(patch)}", source)
        low, high = SPACING_RANGE
        for key in ("spacing", "fast_spacing"):
            spacing = getattr(self, key)
            if spacing is None and key == "fast_spacing":
                continue
            if len(spacing) != 3 or not all(_is_number(v) and low <= v <= high for v in spacing):
                raise VocoInputError(f"model card {key} must be three sizes of {low:g} to {high:g} mm, "
                                     f"got {list(spacing)}", source)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: str  # one of voco.models.backbones.BACKBONES
    in_channels: int
    labels: list[Label]  # foreground labels in network class order: class i (>= 1) is labels[i - 1]; 0 is background
    preprocessing: Preprocessing
    description: str = ""
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # provenance: data, init weights, steps
    weights_sha256: str | None = None
    weights_file: str = WEIGHTS_NAME  # beside the card; another name: a published checkpoint as it was published

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1

    def class_values(self) -> list[int]:
        """The label-map value written for each network class (class 0, background, is 0)."""
        return [0] + [label.value for label in self.labels]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict, source=None) -> "ModelCard":
        try:
            values = {k: v for k, v in values.items() if k not in ("format", "format_version")}
            values["labels"] = [Label(**label) for label in values["labels"]]
            pre = dict(values["preprocessing"])
            for key in ("spacing", "patch_size", "fast_spacing"):
                if pre.get(key) is not None:
                    pre[key] = tuple(pre[key])
            values["preprocessing"] = Preprocessing(**pre)
            card = cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise VocoInputError(f"not a valid model card: {type(exc).__name__}: {exc}", source) from None
        card.validate(source)
        return card

    def validate(self, source=None) -> None:
        if self.architecture not in BACKBONES:
            raise VocoInputError(f"model card names unknown architecture {self.architecture!r}", source)
        if not _PLAIN_FILE.fullmatch(str(self.weights_file)):
            raise VocoInputError(f"model card weights_file {self.weights_file!r} is not a plain file name", source)
        if not _is_int(self.in_channels) or not 1 <= self.in_channels <= MAX_IN_CHANNELS:
            raise VocoInputError(f"model card in_channels must be 1..{MAX_IN_CHANNELS}, got {self.in_channels!r}", source)
        values = [label.value for label in self.labels]
        if not values or not all(_is_int(v) for v in values) or min(values) < 1 or len(set(values)) != len(values):
            raise VocoInputError("model card labels must be distinct values >= 1 (0 is background)", source)
        if max(values) > MAX_LABEL_VALUE or len(values) > MAX_LABELS:
            raise VocoInputError(f"model card labels must be at most {MAX_LABELS} values up to {MAX_LABEL_VALUE}", source)
        self.preprocessing.validate(source)


def default_labels(values, names: dict[int, str] | None = None) -> list[Label]:
    from .terminology import terminology_for

    names = names or {}
    labels = []
    for value in sorted(int(v) for v in values if int(v) != 0):
        name = names.get(value, f"label {value}")
        labels.append(Label(value, name, PALETTE[(value - 1) % len(PALETTE)], terminology_for(name)))
    return labels


@dataclass(frozen=True)
class ModelPackage:
    folder: Path
    card: ModelCard

    @property
    def weights_path(self) -> Path:
        return self.folder / self.card.weights_file

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        if self.card.weights_file != WEIGHTS_NAME:
            return published_state_dict(self.weights_path, self.card)
        state = load_checkpoint(self.weights_path)
        if state.get("format") != FORMAT or not isinstance(state.get("state_dict"), dict):
            raise VocoInputError(f"not the weights of a {FORMAT} package", self.weights_path)
        return state["state_dict"]


def published_state_dict(path: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    """The whole network's weights from a published checkpoint, with this project's names, after
    checking that the file holds the card's network (architecture, input channels, classes)."""
    from ..checkpoints.layouts import read_weights

    weights = read_weights(path)
    found = (weights.architecture, weights.in_channels, weights.num_classes)
    if found != (card.architecture, card.in_channels, card.num_classes):
        head = f"{weights.num_classes} output classes" if weights.num_classes else "no segmentation head"
        raise VocoInputError(f"holds {weights.architecture} weights with {weights.in_channels} input channel(s) and "
                             f"{head}; model {card.name} needs {card.architecture}, {card.in_channels} channel(s), "
                             f"{card.num_classes} classes (background included)", path)
    return weights.state


def write_package(folder: str | Path, card: ModelCard, state_dict: dict[str, torch.Tensor]) -> ModelPackage:
    """Write weights and the card that names their checksum into a new folder that then replaces
    ``folder`` (see ``atomic_folder``): at every moment ``folder`` is the old or the new package."""
    folder = Path(folder)
    card.validate(folder)
    with atomic_folder(folder) as new:
        weights = save_checkpoint({"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}},
                                  new / WEIGHTS_NAME)
        card.weights_sha256 = sha256_of(weights)
        with atomic_path(new / CARD_NAME) as tmp:  # flushed to disk before the folder is swapped in
            tmp.write_text(json.dumps(card.to_dict(), indent=1))
    return ModelPackage(folder, card)


def read_package(folder: str | Path, verify: bool = False) -> ModelPackage:
    """The package in ``folder`` (or the old one an interrupted replacement left aside), its card
    checked; ``verify``: its weights' sha256 too."""
    folder = complete_folder(folder)
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise VocoInputError(f"not a model package (no {CARD_NAME})", folder)
    try:
        values = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VocoInputError(f"invalid JSON: {exc}", card_path) from None
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        raise VocoInputError(f"not a {FORMAT} model card", card_path)
    package = ModelPackage(folder, ModelCard.from_dict(values, card_path))
    if not package.weights_path.is_file():
        raise VocoInputError(f"model package has no {WEIGHTS_NAME}", folder)
    if verify and package.card.weights_sha256 and sha256_of(package.weights_path) != package.card.weights_sha256:
        raise VocoInputError("sha256 does not match the model card (damaged or altered)", package.weights_path)
    return package
