"""Weights from every published VoCo checkpoint layout, loaded by name into this project's networks.

The layouts (see VOCO_METHOD.md, "Released weights and their layout"):

``voco-ssl-head``  VoCo_{B,L,H}_SSL_head.pt: backbone keys ``swinViT.*``, ``encoder1..4.*``,
                   ``encoder10.*``, as a plain dict or under ``state_dict``.
``voco-training``  VoComni / training checkpoints: weights under ``state_dict``, ``network_weights``,
                   ``net``, ``student`` or ``model``, behind prefixes ``module.`` (DDP), ``backbone.``
                   (v2), ``student.`` / ``teacher.`` (v1), possibly stacked.
``monai-ssl``      MONAI's older SSL weights: ``swin_vit.*`` (or the transformer's bare names, as
                   ``SwinUNETR.load_from`` reads them), plus the rotation / contrastive /
                   reconstruction heads of its pretext tasks.
``nnssl``          OpenMind / nnssl ResEnc-L: ``network_weights`` (``encoder.*``, ``projector.*``) and
                   an ``nnssl_adaptation_plan``.
``voco-pretrain``  this project's pretraining checkpoint: the student's ``backbone.*`` and ``head.*``.
``voco-model``     this project's model package: a whole segmentation network.

Names are normalised to this project's parameter names, then tensors whose name *and* shape match
are copied: a changed input channel count drops the patch embedding, a changed class count the
output head. A by-name loader can silently load nothing, so every load counts what matched and
refuses a file that fills too little of the backbone.

Reading and matching need only names and shapes: ``inspect_checkpoint`` reads them without torch
(``tensor_headers``) and matches them against the network's table (``models.network_shapes``);
torch is imported where tensors are loaded or copied.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VocoInputError
from ..models.architectures import SWIN_SIZES, is_backbone_key
from ..models.network_shapes import network_shapes, state_shapes
from ..registry.package import FORMAT as PACKAGE_FORMAT
from ..registry.package import read_package
from .files import load_checkpoint
from .tensor_headers import NeedsTorch, TensorHeader, read_tensor_headers

if TYPE_CHECKING:
    import torch
    from torch import nn

# A file pretrained with another input channel count misses only the tensors that read the input
# (the patch embedding and encoder1's two input convolutions: 3 of 145..167 SwinUNETR backbone
# tensors, 1 of ResEnc-L's), which still loads well above 90 %; another architecture or size
# matches almost nothing. Anything below this fraction is refused rather than silently left random.
MIN_BACKBONE_FRACTION = 0.9

PRETRAIN_FORMAT = "voco-pretrain"  # voco.training.pretrain writes it
# Where published files keep their weights, in the order the VoCo loader looks.
CONTAINERS = ("state_dict", "network_weights", "net", "student", "model")
STUDENT_NOTE = "used the student weights (teacher ignored)"
SWIN_EMBEDDING = "swinViT.patch_embed.proj.weight"
RESENC_STEM = "encoder.stem."
SWIN_OUTPUT = "out.conv.conv.weight"
RESENC_OUTPUT = "decoder.seg_layers."
# Top-level modules of MONAI's SwinTransformer, which its older SSL file stores without a prefix.
SWIN_TRANSFORMER_PARTS = ("patch_embed.", *(f"layers{i}{v2}." for i in range(1, 5) for v2 in ("", "c")))
# MONAI's SSL model pretrained only the transformer; encoder1..4 and encoder10 start from scratch.
LAYOUT_BACKBONE_PREFIXES = {"monai-ssl": ("swinViT.",)}


@dataclass
class CheckpointWeights:
    path: Path
    layout: str  # "voco-ssl-head", "voco-training", "monai-ssl", "nnssl", "voco-pretrain", "voco-model"
    state: dict[str, torch.Tensor]  # keys normalised to this project's parameter names (or TensorHeaders)
    architecture: str | None
    in_channels: int | None
    num_classes: int | None  # when the file carries a segmentation head
    notes: list[str] = field(default_factory=list)  # what was chosen, stripped or renamed
    plan: dict | None = None  # nnssl adaptation plan


@dataclass
class LoadReport:
    matched: list[str]
    missing: list[str]
    shape_mismatched: list[str]
    unexpected: list[str]
    backbone_total: int
    backbone_matched: int

    @property
    def fraction(self) -> float:
        return self.backbone_matched / self.backbone_total if self.backbone_total else 0.0

    def to_dict(self, examples: int = 5) -> dict:
        lists = {"matched": self.matched, "missing": self.missing, "shape_mismatched": self.shape_mismatched,
                 "unexpected": self.unexpected}
        return {**{name: len(names) for name, names in lists.items()},
                "backbone_total": self.backbone_total, "backbone_matched": self.backbone_matched,
                "fraction": round(self.fraction, 4),
                "examples": {name: names[:examples] for name, names in lists.items()}}


# -- reading -------------------------------------------------------------------------------------

def read_weights(path, loader=load_checkpoint) -> CheckpointWeights:
    """The weights of a checkpoint file or model-package folder, with this project's names;
    ``loader=read_tensor_headers`` reads only their names, dtypes and shapes (no torch)."""
    path = Path(path)
    notes = []
    if path.is_dir():
        package = read_package(path)
        notes.append(f"model package {package.card.name} {package.card.version}")
        path = package.weights_path
    raw = loader(path)
    layout, state, plan = _unpack(raw, path, notes)
    state, changed = _unwrap(state, notes)
    state, renamed = _rename_monai(state, notes)
    if layout is None:
        layout = "monai-ssl" if renamed else "voco-training" if changed else "voco-ssl-head"
    architecture, in_channels, num_classes = _detect(state, path)
    return CheckpointWeights(path, layout, state, architecture, in_channels, num_classes, notes, plan)


def _unpack(raw: dict, path: Path, notes: list[str]) -> tuple[str | None, dict[str, torch.Tensor], dict | None]:
    """Find the weights inside the file: (layout when the file says it, tensors, nnssl plan)."""
    layout = {PACKAGE_FORMAT: "voco-model", PRETRAIN_FORMAT: "voco-pretrain"}.get(raw.get("format"))
    plan = raw.get("nnssl_adaptation_plan")
    if plan is not None:
        layout = "nnssl"
    state = raw
    for key in CONTAINERS:
        if isinstance(raw.get(key), dict):
            state = raw[key]
            if layout is None and key != "state_dict":
                layout = "voco-training"
            if key == "student" and raw.get("teacher") is not None:
                notes.append(STUDENT_NOTE)
            break
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and _is_tensor(v)}
    if not tensors:
        raise VocoInputError(f"holds no tensors (first keys: {_first_keys(state)})", path)
    return layout, tensors, plan if isinstance(plan, dict) else None


def _is_tensor(value) -> bool:
    """A tensor of either reader: a header, or torch's (which exists only once torch is imported)."""
    torch = sys.modules.get("torch")
    return isinstance(value, TensorHeader) or (torch is not None and isinstance(value, torch.Tensor))


def _unwrap(state: dict, notes: list[str]) -> tuple[dict, bool]:
    """Strip training wrappers, outermost first (``module.student.backbone.swinViT...``).

    ``module.`` (DDP) and a lone ``teacher.`` are stripped only when every key carries them: a
    prefix of part of the set is somebody's own name (ResEnc-L's ``encoder.`` is never touched).
    ``student.`` and ``backbone.`` select the keys that carry them: the teacher copy is dropped,
    and the wrapper's other parts (projection heads) keep their names and count as unexpected.
    """
    changed = False
    while True:
        if any(k.startswith("student.") for k in state):
            if any(k.startswith("teacher.") for k in state):
                notes.append(STUDENT_NOTE)
            state = {k: v for k, v in state.items() if not k.startswith("teacher.")}
            prefix = "student."
        elif any(k.startswith("backbone.") for k in state):
            prefix = "backbone."
        else:
            prefix = next((p for p in ("module.", "teacher.") if all(k.startswith(p) for k in state)), None)
            if prefix is None:
                return state, changed
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        notes.append(f"stripped prefix {prefix}")
        changed = True


def _rename_monai(state: dict, notes: list[str]) -> tuple[dict, bool]:
    """MONAI's older SSL weights: ``swin_vit.*`` or the transformer's bare names -> ``swinViT.*``."""
    if any(k.startswith("swin_vit.") for k in state):
        notes.append("renamed swin_vit to swinViT")
        return {("swinViT." + k.removeprefix("swin_vit.") if k.startswith("swin_vit.") else k): v
                for k, v in state.items()}, True
    if SWIN_EMBEDDING not in state and "patch_embed.proj.weight" in state:
        notes.append("named the bare Swin transformer keys swinViT.*")
        return {("swinViT." + k if k.startswith(SWIN_TRANSFORMER_PARTS) else k): v for k, v in state.items()}, True
    return state, False


def _detect(state: dict, path: Path) -> tuple[str, int, int | None]:
    """(architecture, input channels, classes of the segmentation head or None) from keys and shapes."""
    if SWIN_EMBEDDING in state:
        embedding = state[SWIN_EMBEDDING]
        sizes = {spec["feature_size"]: name for name, spec in SWIN_SIZES.items()}
        if embedding.shape[0] not in sizes:
            known = ", ".join(f"{size} ({name})" for size, name in sizes.items())
            raise VocoInputError(f"SwinUNETR feature size {embedding.shape[0]} is none of the known sizes: {known}", path)
        head = state.get(SWIN_OUTPUT)
        return sizes[embedding.shape[0]], embedding.shape[1], None if head is None else head.shape[0]
    stem = [v for k, v in state.items() if k.startswith(RESENC_STEM) and len(v.shape) == 5]
    if stem:
        heads = {int(k[len(RESENC_OUTPUT):].split(".")[0]): v for k, v in state.items()
                 if k.startswith(RESENC_OUTPUT) and k.endswith(".weight")}
        return "resencl", stem[0].shape[1], heads[max(heads)].shape[0] if heads else None
    raise VocoInputError(f"no VoCo/SwinUNETR/ResEnc-L weights found (first keys: {_first_keys(state)})", path)


def _first_keys(state: dict, count: int = 5) -> str:
    keys = [str(k) for k in list(state)[:count]]
    return ", ".join(keys) + (", ..." if len(state) > count else "") if keys else "none"


# -- loading -------------------------------------------------------------------------------------

def load_weights(model: nn.Module, weights: CheckpointWeights, architecture: str,
                 min_backbone_fraction: float = MIN_BACKBONE_FRACTION) -> LoadReport:
    """Copy every tensor whose name and shape match into ``model`` (in place).

    Refuses, leaving ``model`` untouched, when less than ``min_backbone_fraction`` of the backbone
    tensors the file should provide would be filled. Names are counted once per tensor: modules
    registered twice (ResEnc-L's ``all_modules``, its decoder's reference to the encoder) appear
    under several names in a state dict but are one tensor.
    """
    import torch

    report, copies = match_weights(state_shapes(model), weights, architecture)
    if report.fraction < min_backbone_fraction:
        raise VocoInputError(
            f"only {report.backbone_matched} of {report.backbone_total} backbone tensors match the {architecture} "
            f"network (the file holds {weights.architecture} weights with {weights.in_channels} input channels; "
            "architecture mismatch?)", weights.path)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, key in copies:
            targets[name].copy_(weights.state[key])
    return report


def match_weights(targets: list[tuple[str, tuple | str]], weights: CheckpointWeights,
                  architecture: str) -> tuple[LoadReport, list[tuple[str, str]]]:
    """What ``load_weights`` would copy into a network of ``targets`` (``network_shapes``' entries):
    the report, and (network name, file key) of each tensor to copy."""
    shapes = {name: shape for name, shape in targets if not isinstance(shape, str)}
    canonical = {name: shape if isinstance(shape, str) else name for name, shape in targets}
    matched, mismatched, unexpected, copies, seen = [], [], [], [], set()
    for key, value in weights.state.items():
        if key not in canonical:
            unexpected.append(key)
        elif canonical[key] not in seen:  # a second name of a tensor already seen adds nothing
            name = canonical[key]
            seen.add(name)
            if shapes[name] == tuple(value.shape):
                matched.append(name)
                copies.append((name, key))
            else:
                mismatched.append(name)
    unique = list(shapes)
    missing = [name for name in unique if name not in seen]
    backbone = _expected_backbone(unique, architecture, weights.layout)
    return LoadReport(matched, missing, mismatched, unexpected, len(backbone),
                      len(set(backbone) & set(matched))), copies


def _expected_backbone(names: list[str], architecture: str, layout: str) -> list[str]:
    """The model's backbone tensors that a file of this layout can fill (all, unless the layout
    pretrained only part of the backbone and the model has that part)."""
    backbone = [name for name in names if is_backbone_key(architecture, name)]
    return [name for name in backbone if name.startswith(LAYOUT_BACKBONE_PREFIXES.get(layout, ""))] or backbone


# -- inspecting ----------------------------------------------------------------------------------

def inspect_checkpoint(path) -> dict:
    """What a file holds and how it loads into a fresh network of the architecture it holds.

    Without torch where it can: names and shapes from the file (``read_tensor_headers``) against the
    network's table. A file with torch objects that reader does not model, or a network the table does
    not describe, is loaded and built with torch (on the meta device), giving the same report."""
    try:
        weights = read_weights(path, loader=read_tensor_headers)
    except NeedsTorch:
        weights = read_weights(path)
    targets = network_shapes(weights.architecture, weights.in_channels, weights.num_classes or 2)
    if targets is None:
        from ..models.segmentation import build_segmentation_network

        with _meta_device():  # shapes and names only: an H-sized network costs no memory here
            network = build_segmentation_network(weights.architecture, weights.in_channels, weights.num_classes or 2)
        targets = state_shapes(network)
    report, _ = match_weights(targets, weights, weights.architecture)
    plan = weights.plan or {}
    return {
        "path": str(weights.path), "layout": weights.layout, "architecture": weights.architecture,
        "in_channels": weights.in_channels, "num_classes": weights.num_classes,
        "tensors": len(weights.state), "parameters": _parameter_count(weights.state),
        "notes": weights.notes, "plan": weights.plan,
        "recommended_patch_size": plan.get("recommended_downstream_patchsize") or plan.get("input_patch_size"),
        "load": report.to_dict(), "loads": report.fraction >= MIN_BACKBONE_FRACTION,
    }


def describe_inspection(report: dict) -> str:
    """``inspect_checkpoint``'s report in a few lines for a terminal."""
    load = report["load"]
    head = f"{report['num_classes']} classes" if report["num_classes"] else "no segmentation head"
    lines = [f"{report['path']}: {report['layout']} layout, {report['architecture']}, "
             f"{report['in_channels']} input channel(s), {head}",
             f"{report['tensors']} tensors, {report['parameters']:,} parameters",
             f"into a fresh {report['architecture']} segmentation network: {load['matched']} matched, "
             f"{load['missing']} missing, {load['shape_mismatched']} shape-mismatched, {load['unexpected']} unexpected; "
             f"backbone {load['backbone_matched']} of {load['backbone_total']} ({load['fraction']:.0%})"
             + ("" if report["loads"] else f", below the {MIN_BACKBONE_FRACTION:.0%} needed to load")]
    if report["recommended_patch_size"]:
        lines.append("recommended patch size: " + "x".join(map(str, report["recommended_patch_size"])))
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _parameter_count(state: dict) -> int:
    """Values of the distinct floating-point tensors (aliases saved under two names count once)."""
    seen = {_where(v): v for v in state.values() if v.is_floating_point()}
    return sum(v.numel() for v in seen.values())


def _where(tensor) -> tuple:
    """Storage, offset and shape: the same for two names of one saved tensor."""
    if isinstance(tensor, TensorHeader):
        return tensor.storage, tensor.offset, tuple(tensor.shape)
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


@contextmanager
def _meta_device():
    """Build modules on the meta device (no memory, no initialisation). MONAI's SwinTransformer
    turns a ``torch.linspace`` of drop-path rates into floats with ``.item()``, which meta tensors
    refuse: that one call stays on the CPU."""
    import torch

    linspace = torch.linspace
    torch.linspace = lambda *args, **kwargs: linspace(*args, **{**kwargs, "device": "cpu"})
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.linspace = linspace
