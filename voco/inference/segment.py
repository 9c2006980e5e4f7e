"""``voco segment``: one volume in, one label map (plus a JSON sidecar) out, on the input's grid.

Stages: read -> ROI -> preprocess as the model card says -> sliding-window scores (half
precision) -> resample the scores back to the input grid in slabs, counting each label's voxels
-> write label map and sidecar together. With a GPU, everything from the read on runs there: the
file's voxels go to it as they are, and only the final label map comes back. Nothing is written
until the end, and a cancelled run leaves no file behind.

The outputs never replace what they should not: the input itself (``voco segment IN IN``), or,
through the sidecar's name (``dataset.nii.gz`` -> ``dataset.json``), a file the engine did not
write. A sidecar the engine wrote is recognised by its ``"format": "voco-segmentation"``.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import SpatialCrop

from ..checkpoints.files import atomic_path
from ..data.label_maps import check_label_output, sidecar_path, write_label_map
from ..data.volumes import Preprocessing, missing_geometry, preprocess, read_volume
from ..errors import VocoInputError
from ..jobs.signals import Cancelled, cancel_on_signals, signals_held_at_exit
from ..models.segmentation import build_segmentation_network
from ..registry.package import ModelPackage
from ..training.distributed import choose_device
from .resample import label_map_and_counts
from .sliding_window import SlidingWindowPredictor

DEFAULT_OVERLAP = 0.5
FAST_SPACING_FACTOR = 2.0
SIDECAR_FORMAT = "voco-segmentation"


@dataclass
class SegmentOptions:
    device: str = "auto"
    fast: bool = False
    tta: bool = False
    roi: tuple[int, int, int, int, int, int] | None = None  # voxels of the input, end exclusive
    roi_ras: tuple[float, float, float, float, float, float] | None = None  # two opposite corners, mm
    batch_size: int | None = None
    overlap: float = DEFAULT_OVERLAP
    precision: str = "auto"  # see SlidingWindowPredictor
    compress: bool = True  # False: a raw .nrrd (or .nii) that a front end on this machine reads back at once

    def validate(self) -> None:
        if not 0 <= self.overlap < 1:
            raise VocoInputError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size is not None and self.batch_size < 1:
            raise VocoInputError(f"--batch-size must be at least 1, got {self.batch_size}")


def load_network(package: ModelPackage, device: torch.device) -> torch.nn.Module:
    card = package.card
    network = build_segmentation_network(card.architecture, card.in_channels, card.num_classes)
    state = package.load_state_dict()
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise VocoInputError(f"weights do not fit the {card.architecture} network of its model card: {first[:160]}",
                             package.weights_path) from None
    return network.to(device).eval()


def model_spacing(package: ModelPackage, fast: bool) -> tuple[float, float, float]:
    pre = package.card.preprocessing
    if not fast:
        return pre.spacing
    return pre.fast_spacing or tuple(FAST_SPACING_FACTOR * s for s in pre.spacing)


def segment(image_path: str | Path, output: str | Path, package: ModelPackage, options: SegmentOptions,
            reporter, networks=None) -> dict:
    """Segment ``image_path`` into ``output``; returns the sidecar's content. ``networks(package,
    device)`` gives the network (default ``load_network``: read from disk; voco serve passes its cache)."""
    options.validate()
    output = check_outputs(image_path, output, options.compress)
    started = time.perf_counter()
    device = choose_device(options.device)
    source = read_volume(image_path, device)  # preprocessing runs where the tensor is: on the GPU when one is used
    source_affine = source.affine.numpy().astype(np.float64)
    no_geometry = missing_geometry(image_path)
    if no_geometry:
        reporter.emit("warning", message=f"{image_path}: {no_geometry}: volumes in ml are not reported",
                      file=str(image_path))
    source_shape = tuple(int(n) for n in source.shape[1:])
    box = roi_box(options, source_affine, source_shape, image_path)
    region = SpatialCrop(roi_start=box[:3], roi_end=box[3:])(source) if box else source
    region_affine = region.affine.numpy().astype(np.float64)
    region_shape = tuple(int(n) for n in region.shape[1:])
    del source

    card = package.card
    spacing = model_spacing(package, options.fast)
    image, image_affine, modality = preprocess(region, Preprocessing(modality=card.preprocessing.modality,
                                                                     spacing=spacing))
    del region
    network = (load_network if networks is None else networks)(package, device)
    batch = options.batch_size or (4 if device.type == "cuda" else 1)
    predictor = SlidingWindowPredictor(network, card.preprocessing.patch_size, device, overlap=options.overlap,
                                       batch_size=batch, mirror=options.tta, precision=options.precision,
                                       report=_throttled(reporter))
    windows = len(predictor.windows(tuple(max(a, b) for a, b in zip(image.shape[1:], card.preprocessing.patch_size))))
    reporter.emit("start", image=str(image_path), output=str(output), model=card.name, version=card.version,
                  device=str(device), spacing=list(spacing), windows=windows, fast=options.fast, tta=options.tta)
    scores = predictor.predict(image, card.num_classes)
    del image
    reporter.emit("progress", stage="resample", done=0, total=1)
    labels, voxels = label_map_and_counts(scores, image_affine, region_shape, region_affine, card.class_values())
    del scores
    reporter.emit("progress", stage="resample", done=1, total=1)
    if box:
        full = np.zeros(source_shape, dtype=labels.dtype, order="F")  # the label map's order (see resample)
        full[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = labels
        labels = full

    sidecar = {
        "format": SIDECAR_FORMAT, "image": str(image_path), "label_map": output.name,
        "model": {"name": card.name, "version": card.version, "weights_sha256": card.weights_sha256},
        "labels": [_label_record(label, voxels.get(label.value, 0), None if no_geometry else source_affine)
                   for label in card.labels],
        "device": str(predictor.device), "spacing_mm": list(spacing), "modality": modality, "fast": options.fast,
        "tta": options.tta, "overlap": options.overlap, "roi_voxels": list(box) if box else None,
        "windows_evaluated": predictor.windows_evaluated, "precision": options.precision,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_outputs(labels, source_affine, image_path, output, sidecar, options.compress)
    reporter.emit("done", output=str(output), sidecar=str(sidecar_path(output)), seconds=sidecar["seconds"],
                  windows=predictor.windows_evaluated)
    return sidecar


def check_outputs(image_path, output, compress: bool = True) -> Path:
    """The label map's path, after refusing outputs that would replace the input or a file that
    is not an earlier sidecar of this engine."""
    output = check_label_output(output, compress)
    sidecar = sidecar_path(output)
    for written in (output, sidecar):
        if _same_file(written, image_path):
            raise VocoInputError(f"{'output' if written == output else 'its sidecar ' + sidecar.name} "
                                 "would replace the input image; give another output name", output)
    if sidecar.exists() and not _engine_sidecar(sidecar):
        raise VocoInputError(f"its sidecar {sidecar} exists and was not written by voco segment; "
                             "give another output name", output)
    return output


def _same_file(a: Path, b) -> bool:
    """Same path after resolving links, or the same file under another name (a hard link)."""
    b = Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _engine_sidecar(path: Path) -> bool:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and values.get("format") == SIDECAR_FORMAT


def write_outputs(labels: np.ndarray, affine: np.ndarray, source, output: Path, sidecar: dict,
                  compress: bool = True) -> None:
    """Both files or neither: each is written to a temporary name (a signal meanwhile removes
    them), then both are renamed with SIGTERM/SIGINT held back."""
    with signals_held_at_exit() as hold:
        with ExitStack() as stack:
            json_tmp = stack.enter_context(atomic_path(sidecar_path(output)))
            # innermost, so that an error (a full disk) is reported for the large file, the label map
            label_tmp = stack.enter_context(atomic_path(output))
            write_label_map(labels, affine, source, label_tmp, compress)
            json_tmp.write_text(json.dumps(sidecar, indent=1))
            hold()  # the renames run as the ExitStack closes


def roi_box(options: SegmentOptions, affine: np.ndarray, shape: tuple[int, int, int], path) -> tuple[int, ...] | None:
    """The ROI as ``(x0, y0, z0, x1, y1, z1)`` voxels of the input (end exclusive), or None."""
    if options.roi is not None:
        start, end = np.array(options.roi[:3]), np.array(options.roi[3:])
        if (start < 0).any() or (end > np.array(shape)).any():
            raise VocoInputError(f"--roi {_text(options.roi)} reaches outside the image (shape {_text(shape)})", path)
    elif options.roi_ras is not None:
        corners = np.array([[x, y, z] for x in options.roi_ras[0::3] for y in options.roi_ras[1::3]
                            for z in options.roi_ras[2::3]])
        voxels = (np.linalg.inv(affine) @ np.c_[corners, np.ones(len(corners))].T)[:3].T
        voxels = voxels.round(4)  # a corner on a voxel centre is a whole index, not 9.9999999 or 10.0000001
        start = np.clip(np.floor(voxels.min(0)).astype(int), 0, shape)
        end = np.clip(np.ceil(voxels.max(0)).astype(int) + 1, 0, shape)
        if (end <= start).any():
            raise VocoInputError(f"--roi-ras {_text(options.roi_ras)} does not overlap the image", path)
    else:
        return None
    if (end - start < 8).any():
        raise VocoInputError(f"the ROI {_text([*start, *end])} is too small: every axis needs at least 8 voxels", path)
    return tuple(int(v) for v in (*start, *end))


def _label_record(label, voxels: int, affine: np.ndarray | None) -> dict:
    """The sidecar's record of ``label`` with its ``voxels``; ``volume_ml`` is None without an
    ``affine`` the file gives."""
    volume_ml = None if affine is None else round(voxels * abs(np.linalg.det(affine[:3, :3])) / 1000.0, 3)
    return {"value": label.value, "name": label.name, "color": label.color, "terminology": label.terminology,
            "voxels": voxels, "volume_ml": volume_ml}


def _throttled(reporter, interval: float = 0.2):
    """Progress events at most every ``interval`` seconds (and always the last one); other events as they come."""
    last = [0.0]

    def report(event, **fields):
        now = time.monotonic()
        if event != "progress" or fields.get("done") == fields.get("total") or now - last[0] >= interval:
            last[0] = now
            reporter.emit(event, **fields)

    return report


def _text(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def parse_box(text: str | None, kind, option: str):
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 6:
        raise VocoInputError(f"{option} needs six comma-separated numbers x0,y0,z0,x1,y1,z1, got {text!r}")
    return values


def segment_from_args(args, reporter, networks=None) -> int:
    from ..registry.registry import resolve_package

    options = SegmentOptions(device=args.device, fast=args.fast, tta=args.tta,
                             roi=parse_box(args.roi, int, "--roi"), roi_ras=parse_box(args.roi_ras, float, "--roi-ras"),
                             batch_size=args.batch_size,
                             overlap=DEFAULT_OVERLAP if args.overlap is None else args.overlap,
                             precision=args.precision, compress=not args.uncompressed)
    check_outputs(args.image, args.output, options.compress)
    with cancel_on_signals():
        try:
            package = resolve_package(args.model, reporter)
            segment(args.image, args.output, package, options, reporter, networks)
        except Cancelled as cancel:
            reporter.emit("cancelled", message="stopped before writing; no output was written")
            return 128 + cancel.signum
    return 0
