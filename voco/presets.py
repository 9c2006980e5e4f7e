"""The published VoCo variants as data: crop geometry, loss form, teacher, augmentation and optimiser.

Each value is the one the official code uses (Luffy03/VoCo for v1, Luffy03/Large-Scale-Medical
``Self-supervised/`` for v2, MIC-DKFZ/nnssl's VoCoTrainer for nnssl); README lists the deliberate
differences. One is switchable: ``norm_scope="volume"`` (default) normalises the projection head
over the crops of each volume, so that a batch split over DDP ranks trains the same objective;
``"batch"`` is the official normalisation over all crops in the process. ``demo`` is a scaled-down
v2 that trains on two CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from .errors import VocoInputError


@dataclass(frozen=True)
class Preset:
    name: str
    grid: tuple[int, int, int]          # base crops along x, y, z
    crop_edge: int                      # base/target crop edge, in voxels of the sampled patch
    input_edge: int                     # edge the network sees (v1 resizes 96 -> 64)
    num_targets: int                    # random target crops per volume
    label_dims: Literal[2, 3]           # overlap as x-y area (v1/v2) or volume (nnssl)
    patch_mode: Literal["resize_foreground", "random_crop"]
    spacing: tuple[float, float, float] | None   # resample to this spacing (mm); None keeps it
    neg_loss: Literal["square", "log"]  # zero-overlap term: p^2 (v1, nnssl) or -log(1 - p) (v2)
    teacher: Literal["full", "head", "none"]     # EMA teacher of backbone+head, head only, none
    inter_volume: bool                  # v2's cross-volume term
    feature_dropout: float              # v2's Dropout1d on student embeddings
    head_dim: int                       # projection head hidden and output width
    head_norm: Literal["batch", "instance"]
    augment: Literal["voco", "nnssl"]
    optimizer: Literal["adamw", "sgd"]
    lr: float
    warmup_steps: int
    ema_momentum: float = 0.9
    # nnssl: the prediction loss sends no gradient to the base embeddings (only the regulariser does)
    detach_bases: bool = False
    # "voco": mean over pairs i < j of ReLU(cos(b_i, stopgrad b_j))^2; "nnssl": of ReLU(cos(b_i, b_j))
    regulariser: Literal["voco", "nnssl"] = "voco"
    weight_decay: float = 0.01          # v1/v2 pass none to AdamW, so torch's default 0.01 applies
    shift_prob: float = 0.5             # intensity shift of up to 0.1 per crop ("voco" augmentation)
    norm_scope: Literal["volume", "batch"] = "volume"   # head normalisation over a volume or the batch

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """The patch the crops are cut from: exactly the base grid, so targets stay inside it."""
        return tuple(n * self.crop_edge for n in self.grid)

    @property
    def num_bases(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


# Bounds that keep a mistyped option from asking for more memory than any machine has (a 3200-voxel
# crop edge, 10**9 targets): far above the published settings (patches up to 384, 2 to 4 targets).
MAX_PATCH_EDGE = 512
MAX_TARGETS = 64

PRESETS: dict[str, Preset] = {
    "v1": Preset("v1", (4, 4, 1), 96, 64, 2, 2, "resize_foreground", None, "square", "full", False,
                 0.0, 2048, "batch", "voco", "adamw", 1e-4, 5000, shift_prob=0.1),
    "v2": Preset("v2", (3, 3, 1), 64, 64, 2, 2, "random_crop", (1.5, 1.5, 1.5), "log", "head", True,
                 0.2, 1024, "batch", "voco", "adamw", 1e-4, 5000, shift_prob=0.5),
    "nnssl": Preset("nnssl", (4, 4, 1), 64, 64, 4, 3, "random_crop", (1.0, 1.0, 1.0), "square", "none", False,
                    0.0, 2048, "instance", "nnssl", "sgd", 1e-2, 0,
                    detach_bases=True, regulariser="nnssl", weight_decay=3e-5, shift_prob=0.0),
    "demo": Preset("demo", (3, 3, 1), 32, 32, 2, 2, "random_crop", (1.0, 1.0, 1.0), "log", "head", True,
                   0.2, 256, "batch", "voco", "adamw", 1e-4, 20, shift_prob=0.5),
}


def parse_triple(text: str, kind=int, what: str = "value") -> tuple:
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise VocoInputError(f"{what} must be three positive numbers like 3,3,1, got {text!r}")
    return values


NORM_SCOPES = ("volume", "batch")


def resolve_preset(name: str, grid: str | None = None, crop_edge: int | None = None,
                   num_targets: int | None = None, spacing: str | None = None,
                   norm_scope: str | None = None) -> Preset:
    """A named preset with the custom-grid and normalisation overrides of the command line applied."""
    if name not in PRESETS:
        raise VocoInputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    changes = {}
    if grid is not None:
        changes["grid"] = parse_triple(grid, int, "--grid")
    if crop_edge is not None:
        if crop_edge < 32 or crop_edge % 32:
            raise VocoInputError(f"--crop-edge must be a multiple of 32 (the backbone downsamples 32x), got {crop_edge}")
        changes["crop_edge"] = changes["input_edge"] = crop_edge
    if num_targets is not None:
        if num_targets < 1:
            raise VocoInputError(f"--targets must be at least 1, got {num_targets}")
        changes["num_targets"] = num_targets
    if spacing is not None:
        changes["spacing"] = None if spacing == "native" else parse_triple(spacing, float, "--spacing")
    if norm_scope is not None:
        if norm_scope not in NORM_SCOPES:
            raise VocoInputError(f"--norm-scope must be one of {', '.join(NORM_SCOPES)}, got {norm_scope!r}")
        changes["norm_scope"] = norm_scope
    if changes.get("grid", (0, 0, 1))[2] > 1:
        # The x-y area labels of v1/v2 assume one layer of bases; with several, a base under
        # the target would count as overlapping it. Use the volume form instead.
        changes["label_dims"] = 3
    if changes:
        preset = dataclasses.replace(preset, name=f"{name}-custom" if "grid" in changes or "crop_edge" in changes else name, **changes)
    if preset.num_bases < 2:
        raise VocoInputError(f"the base grid {preset.grid} must have at least 2 crops")
    if max(preset.patch_shape) > MAX_PATCH_EDGE:
        raise VocoInputError(f"--grid {','.join(map(str, preset.grid))} of {preset.crop_edge}-voxel crops makes a "
                             f"{'x'.join(map(str, preset.patch_shape))} patch; at most {MAX_PATCH_EDGE} voxels an axis")
    if preset.num_targets > MAX_TARGETS:
        raise VocoInputError(f"--targets must be at most {MAX_TARGETS}, got {preset.num_targets}")
    return preset


def preset_from_dict(values: dict) -> Preset:
    fields = {f.name for f in dataclasses.fields(Preset)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
    return Preset(**values)
