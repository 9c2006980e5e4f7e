"""Files in the layouts the VoCo authors publish, for tests that cannot download the real ones.

``VoComni_B.pt`` (Hugging Face Luffy503/VoCo) is what the authors' VoComni trainer saves: a dict
with ``epoch``, ``best_acc`` and ``state_dict``, the last holding a MONAI SwinUNETR
(``use_v2=True``, 21 output channels) under its own parameter names. Written here from a freshly
initialised network of that shape, it is the published file in all but its values (and so in
all but its sha256): 298,652,107 bytes against the published 298,654,672.

The shipped registry pins the published sha256, which a written file cannot have; ``registry_for``
is the shipped registry with the sha256 of the written files instead, everything else as shipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SHIPPED_REGISTRY = Path(__file__).resolve().parents[1] / "Resources" / "models.json"
VOCOMNI_CLASSES = 21  # background + the 20 VoComni classes


def write_vocomni_checkpoint(path, architecture: str = "swinunetr-b", classes: int = VOCOMNI_CLASSES,
                             seed: int = 0) -> Path:
    from voco.models.segmentation import build_segmentation_network

    torch.manual_seed(seed)
    network = build_segmentation_network(architecture, 1, classes)
    path = Path(path)
    torch.save({"epoch": 1, "best_acc": 0.0, "state_dict": network.state_dict()}, path)
    return path


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def registry_for(folder, files: dict[str, Path]) -> Path:
    """The shipped registry, with the entry publishing each file name of ``files`` pinned to the
    sha256 (and size) of the written file; returns the new registry's path."""
    values = json.loads(SHIPPED_REGISTRY.read_text(encoding="utf-8"))
    for entry in values["models"]:
        written = files.get(entry["file"])
        if written is not None:
            entry["sha256"], entry["size_bytes"] = sha256_of(written), Path(written).stat().st_size
    path = Path(folder) / "models.json"
    path.write_text(json.dumps(values, indent=1), encoding="utf-8")
    return path


# -- every published key layout, in files of a few kilobytes ----------------------------------------

NNSSL_PLAN = {"architecture_plans": {"arch_class_name": "ResEncL"}, "pretrain_num_input_channels": 1,
              "recommended_downstream_patchsize": [160, 160, 160], "key_to_encoder": "encoder.stages",
              "key_to_stem": "encoder.stem", "keys_to_in_proj": ["encoder.stem.convs.0.conv"], "key_to_lpe": None}
MONAI_HEADS = {"rotation_head.weight": (4, 48), "rotation_head.bias": (4,), "contrastive_head.weight": (512, 48),
               "contrastive_head.bias": (512,), "convTrans3d.weight": (48, 1, 1, 1, 1), "convTrans3d.bias": (1,)}
VOCO_HEAD = {"head.layer1.weight": (1024, 1152), "head.layer1.bias": (1024,)}


def stride0_state(architecture: str, in_channels: int = 1, num_classes: int = 2) -> dict:
    """A segmentation network's state-dict names with stride-0 tensors of its shapes and dtypes: value i
    for the i-th distinct tensor, names of one shared tensor sharing it (as torch.save writes them)."""
    from voco.checkpoints.layouts import _meta_device
    from voco.models.segmentation import build_segmentation_network

    with _meta_device():
        network = build_segmentation_network(architecture, in_channels, num_classes)
    values = {}
    return {k: values.setdefault(id(v), torch.full((1,), len(values), dtype=v.dtype).expand(v.shape))
            for k, v in network.state_dict(keep_vars=True).items()}


def _stride0(shapes: dict) -> dict:
    return {k: torch.full((1,), i + 0.5).expand(shape) for i, (k, shape) in enumerate(shapes.items())}


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def write_published_layouts(folder) -> dict[str, Path]:
    """One small file (or package folder) per published checkpoint layout that
    ``voco.checkpoints.layouts`` reads, as ``{what: path}``: the published key layouts with stride-0
    tensors (one stored value each), so each file is a few kilobytes whatever its shapes."""
    from voco.models.segmentation import is_backbone_key
    from voco.registry.package import ModelCard, Preprocessing, default_labels, write_package

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    network = stride0_state("swinunetr-b", num_classes=VOCOMNI_CLASSES)
    backbone = {k: v for k, v in network.items() if is_backbone_key("swinunetr-b", k)}
    transformer = {k.removeprefix("swinViT."): v for k, v in backbone.items() if k.startswith("swinViT.")}
    resenc = stride0_state("resencl")
    contents = {
        "VoCo_B_SSL_head.pt": backbone,
        "VoCo_B_SSL_head_state_dict.pt": {"state_dict": backbone},
        "VoComni_B.pt": {"epoch": 1, "best_acc": 0.0, "state_dict": network},
        "VoCo_v1_training.pt": {"state_dict": {**_prefixed(backbone, "module.student.backbone."),
                                               **_prefixed(backbone, "module.teacher.backbone.")}},
        "VoCo_v2_training.pt": {"net": _prefixed({**_prefixed(backbone, "backbone."), **_stride0(VOCO_HEAD)}, "module.")},
        "model_swinvit.pt": {"state_dict": _prefixed({**_prefixed(transformer, "swin_vit."), **_stride0(MONAI_HEADS)},
                                                     "module.")},
        "monai_bare_swin.pt": {**transformer, **_stride0(MONAI_HEADS)},
        "VoCo_L_4channels.pt": {k: v for k, v in stride0_state("swinunetr-l", in_channels=4).items()
                                if is_backbone_key("swinunetr-l", k)},
        "nnssl_checkpoint_final.pth": {"network_weights": {k: v for k, v in resenc.items() if k.startswith("encoder.")},
                                       "nnssl_adaptation_plan": NNSSL_PLAN, "citations": []},
        "voco_pretrain_checkpoint.pt": {"format": "voco-pretrain", "format_version": 1, "step": 3,
                                        "student": {**_prefixed(backbone, "backbone."), **_stride0(VOCO_HEAD)},
                                        "teacher": _stride0(VOCO_HEAD), "optimizer": {"state": {}, "param_groups": []}},
    }
    paths = {}
    for name, content in contents.items():
        torch.save(content, folder / name)
        paths[name] = folder / name
    card = ModelCard(name="published-layout-test", version="1.0", architecture="swinunetr-tiny", in_channels=1,
                     labels=default_labels([1, 2]), preprocessing=Preprocessing("ct", (1.5,) * 3, (32,) * 3))
    paths["model package"] = write_package(folder / "package", card, stride0_state("swinunetr-tiny", num_classes=3)).folder
    return paths
