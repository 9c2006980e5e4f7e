"""``voco segment`` and the parts it is made of: label maps land on the input's exact grid (oblique,
anisotropic, NIfTI or NRRD), the resampling back to that grid and the sliding window are right
independently of any network, running out of memory only makes it slower, ROI and --fast do what
they say, a cancelled run leaves nothing behind, and bad input gets one line and exit code 2.

Networks: ``package`` is a real (randomly initialised, fixed seed) tiny SwinUNETR model package;
where a test needs to know what the right answer is, ``voco.inference.segment.load_network`` is
replaced by a toy model whose output is a known function of the image (a 1x1 convolution).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from torch import nn

from conftest import Events, events, voco_command
from phantoms import SPHERE_CENTRE, dice, oblique_affine, ras_points, sphere_image, sphere_mask
from toy_networks import Threshold
from voco.cli import main
from voco.data.volumes import read_label_map, read_volume
from voco.errors import VocoInputError
from voco.inference import resample, segment as segment_module
from voco.inference.resample import label_map_on_grid
from voco.inference.segment import SegmentOptions, roi_box, segment
from voco.inference.sliding_window import SlidingWindowPredictor, gaussian_importance, window_starts
from voco.models.segmentation import build_segmentation_network, is_backbone_key
from voco.registry.package import Label, ModelCard, Preprocessing, read_package, write_package

LABELS = [Label(1, "liver", "#dd8244", {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}),
          Label(5, "spleen", "#9d6c62", None)]
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# --- volumes and models ---------------------------------------------------------------------------

def write_nifti(path, data, affine, dtype=np.float32):
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 2)
    nib.save(image, str(path))
    return path


def write_nrrd(path, data, affine):
    lps = RAS_TO_LPS @ affine[:3]
    nrrd.write(str(path), np.asarray(data, dtype=np.float32),
               {"space": "left-posterior-superior", "space directions": lps[:, :3].T, "space origin": lps[:, 3],
                "kinds": ["domain"] * 3}, index_order="F")
    return path


def nrrd_affine(path) -> np.ndarray:
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ np.asarray(header["space directions"], dtype=np.float64).T
    affine[:3, 3] = RAS_TO_LPS @ np.asarray(header["space origin"], dtype=np.float64)
    return affine


def card(name="toy", labels=LABELS, spacing=(2.0, 2.0, 2.0), fast_spacing=None, modality="mri") -> ModelCard:
    return ModelCard(name=name, version="1", architecture="swinunetr-tiny", in_channels=1, labels=list(labels),
                     preprocessing=Preprocessing(modality, spacing, (32, 32, 32), fast_spacing))


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    """A real tiny SwinUNETR package (random weights, seed 0): background + liver (1) + spleen (5)."""
    torch.manual_seed(0)
    network = build_segmentation_network("swinunetr-tiny", 1, len(LABELS) + 1)
    return write_package(tmp_path_factory.mktemp("package") / "toy", card(), network.state_dict())


class Constant(nn.Module):
    """The same logits everywhere (the input only sets the shape)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).to(x.device)


@pytest.fixture
def toy_network(monkeypatch):
    """``use(model)``: segment() runs ``model`` instead of the package's network."""

    def use(model):
        monkeypatch.setattr(segment_module, "load_network", lambda package, device: model.to(device).eval())

    return use


@pytest.fixture
def toy_package(tmp_path):
    """A package with one label (value 3); its weights are never loaded (``toy_network`` replaces them)."""
    return write_package(tmp_path / "toy-package", card(labels=[Label(3, "sphere", "#ff0000")]), {"w": torch.zeros(1)})


# --- 1. the label map is on the input's exact grid ---------------------------------------------------

def test_label_map_has_the_exact_geometry_of_an_oblique_anisotropic_input(package, tmp_path, capsys):
    shape = (48, 40, 20)
    affine = oblique_affine(shape=shape)
    data = sphere_image(affine, shape)
    sources = {"nifti": write_nifti(tmp_path / "oblique.nii.gz", data, affine),
               "nrrd": write_nrrd(tmp_path / "oblique.nrrd", data, affine)}
    # The NRRD written with LPS directions is read back on the same RAS grid as the NIfTI.
    np.testing.assert_allclose(read_volume(sources["nrrd"]).affine.numpy(), affine, atol=1e-5)

    for kind, source in sources.items():
        for suffix in (".nii.gz", ".nrrd"):
            output = tmp_path / f"seg-{kind}{suffix}"
            code = main(["segment", str(source), str(output), "--model", str(package.folder), "--device", "cpu",
                         "--progress", "jsonl"])
            assert code == 0, capsys.readouterr().err
            stream = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert stream[-1]["event"] == "done" and stream[-1]["output"] == str(output)
            if suffix == ".nrrd":
                labels, header = nrrd.read(str(output), index_order="F")
                out_affine = nrrd_affine(output)
                assert header["type"] in ("unsigned char", "uint8")
            else:
                written = nib.load(str(output))
                labels, out_affine = np.asarray(written.dataobj), written.affine
                assert written.get_data_dtype() == np.uint8
                if kind == "nifti":  # the input's own header: its qform and sform codes are kept
                    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
                    np.testing.assert_allclose(written.get_qform(), affine, atol=1e-5)
            assert labels.shape == shape, (kind, suffix)
            np.testing.assert_allclose(out_affine, affine, atol=1e-5, err_msg=f"{kind} -> {suffix}")
            # And as voco's reader (MONAI) sees it: the same grid as the image it belongs to.
            image = read_volume(source)
            reread = LoadImage(image_only=True, ensure_channel_first=True)(str(output))
            np.testing.assert_allclose(reread.affine.numpy(), image.affine.numpy(), atol=1e-5)
            read_label_map(output, image)  # what fine-tuning demands of a label map: same grid as its image
            assert set(np.unique(labels)) <= {0, 1, 5}

            sidecar = json.loads(output.with_name(output.name.removesuffix(suffix) + ".json").read_text())
            assert sidecar["format"] == "voco-segmentation" and sidecar["label_map"] == output.name
            assert [(r["value"], r["name"], r["color"]) for r in sidecar["labels"]] == \
                [(1, "liver", "#dd8244"), (5, "spleen", "#9d6c62")]
            assert sidecar["labels"][0]["terminology"]["code"] == "10200004"
            assert sidecar["model"] == {"name": "toy", "version": "1", "weights_sha256": package.card.weights_sha256}
            voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
            for record in sidecar["labels"]:
                assert record["voxels"] == np.count_nonzero(labels == record["value"])
                assert record["volume_ml"] == pytest.approx(record["voxels"] * voxel_ml, abs=1e-3)


@pytest.mark.parametrize("kind", ["nifti", "nrrd"])
def test_labels_land_where_the_structure_is_on_an_oblique_grid(kind, toy_network, toy_package, tmp_path):
    """End to end with a network whose right answer is known (threshold the intensity): the label
    map of a sphere imaged on an oblique 0.7 x 1.1 x 2.5 mm grid, segmented at 2 mm, overlays the
    analytic sphere on the input grid."""
    toy_network(Threshold())
    shape = (48, 40, 20)
    affine = oblique_affine(shape=shape)
    writer = write_nifti if kind == "nifti" else write_nrrd
    name = "sphere.nii.gz" if kind == "nifti" else "sphere.nrrd"
    source = writer(tmp_path / name, sphere_image(affine, shape), affine)
    output = tmp_path / "seg.nii.gz"
    sidecar = segment(source, output, toy_package, SegmentOptions(device="cpu"), Events())
    labels = np.asarray(nib.load(str(output)).dataobj)
    truth = sphere_mask(affine, shape)
    assert set(np.unique(labels)) == {0, 3}
    score = dice(labels == 3, truth)
    print(f"{kind}: Dice of the segmented sphere vs the analytic one: {score:.3f}")
    assert score > 0.9
    assert sidecar["labels"][0]["voxels"] == np.count_nonzero(labels == 3)


def test_a_second_run_replaces_the_outputs_of_the_first(toy_network, toy_package, tmp_path):
    """Its own earlier sidecar is the one existing file an output may replace."""
    toy_network(Threshold())
    source, _ = axis_aligned(tmp_path)
    output = tmp_path / "seg.nii.gz"
    segment(source, output, toy_package, SegmentOptions(device="cpu"), Events())
    first = json.loads((tmp_path / "seg.json").read_text())
    segment(source, output, toy_package, SegmentOptions(device="cpu", tta=True), Events())
    second = json.loads((tmp_path / "seg.json").read_text())
    assert (first["tta"], second["tta"]) == (False, True)


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_no_file(toy_network, toy_package, tmp_path,
                                                                      monkeypatch, capsys):
    import errno

    def full_disk(labels, affine, source, path, compress):
        Path(path).write_bytes(b"part of a label map")
        raise OSError(errno.ENOSPC, "No space left on device")

    toy_network(Threshold())
    source, _ = axis_aligned(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(segment_module, "write_label_map", full_disk)
    capsys.readouterr()
    assert main(["segment", str(source), str(out / "seg.nii.gz"), "--model", str(toy_package.folder),
                 "--progress", "jsonl"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / 'seg.nii.gz'}: disk full: could not write it")
    assert os.listdir(out) == []


# --- 2. resampling scores back to a grid -----------------------------------------------------------

def one_hot(labels: np.ndarray, classes: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([labels == k for k in range(classes)])).to(torch.float16)


def shells(affine, shape) -> np.ndarray:
    """Class 2 inside r < 10 mm, class 1 for 10 <= r < 20 mm, else 0 (classes, not label values)."""
    r = np.linalg.norm(ras_points(affine, shape) - SPHERE_CENTRE, axis=-1)
    return np.where(r < 10, 2, np.where(r < 20, 1, 0)).astype(np.uint8)


def test_resampling_to_a_rotated_anisotropic_grid_reproduces_the_label_at_each_location(monkeypatch):
    scores_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    scores_affine[:3, 3] = SPHERE_CENTRE - 32
    scores = one_hot(shells(scores_affine, (64, 64, 64)), 3)
    shape = (50, 40, 22)
    affine = oblique_affine(spacing=(0.7, 1.1, 2.5), shape=shape, degrees=(20, 20))
    affine[:3, 3] += SPHERE_CENTRE - np.array([3.0, -5.0, 8.0])  # centred on the spheres
    values = [0, 4, 9]  # the label-map value of each class
    expected = np.array(values, dtype=np.uint8)[shells(affine, shape)]
    got = label_map_on_grid(scores, scores_affine, shape, affine, values)
    assert got.shape == shape and got.dtype == np.uint8
    inner = dice(got == 9, expected == 9)
    outer = dice(got == 4, expected == 4)
    print(f"Dice after resampling: inner sphere {inner:.4f}, shell {outer:.4f}")
    assert inner > 0.95 and outer > 0.95
    # Slab by slab gives the very same map as all at once.
    monkeypatch.setattr(resample, "SLAB_VOXELS", 3000)
    assert np.array_equal(label_map_on_grid(scores, scores_affine, shape, affine, values), got)


def test_resampling_onto_the_scores_own_grid_gives_the_labels_back_exactly(monkeypatch):
    shape = (23, 17, 11)
    labels = np.random.default_rng(1).integers(0, 4, shape).astype(np.uint8)
    affine = oblique_affine(shape=shape)
    values = [0, 2, 300, 7]  # > 255: a uint16 map
    got = label_map_on_grid(one_hot(labels, 4), affine, shape, affine, values)
    assert got.dtype == np.uint16
    assert np.array_equal(got, np.array(values)[labels])
    monkeypatch.setattr(resample, "SLAB_VOXELS", 17 * 23 * 2)  # two slices per slab
    assert np.array_equal(label_map_on_grid(one_hot(labels, 4), affine, shape, affine, values),
                          np.array(values)[labels])


def test_resampling_leaves_locations_outside_the_scored_region_as_background():
    scores = torch.zeros((2, 10, 10, 10), dtype=torch.float16)
    scores[1] = 1  # foreground everywhere the scores reach
    scores_affine = np.diag([2.0, 2.0, 2.0, 1.0])  # covers 0..18 mm on each axis
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -10  # -10..29 mm
    got = label_map_on_grid(scores, scores_affine, (40, 40, 40), affine, [0, 6])
    mm = np.arange(40) - 10.0
    inside = (mm >= 0) & (mm <= 18)
    expected = np.where(inside[:, None, None] & inside[None, :, None] & inside[None, None, :], 6, 0)
    # Voxel centres in the scored region (edges included) are labelled; more than one score voxel
    # outside it are background (between the two, interpolation with the zero padding decides).
    far = (mm < -2) | (mm > 20)
    far_any = far[:, None, None] | far[None, :, None] | far[None, None, :]
    assert (got[expected == 6] == 6).all()
    assert (got[far_any] == 0).all()


# --- 3. sliding window ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_window_starts_cover_the_length_with_the_requested_overlap(overlap):
    window = 32
    step = int(window * (1 - overlap))
    for length in range(window + 1, 7 * window):
        starts = window_starts(length, window, overlap)
        assert starts[0] == 0 and starts[-1] == length - window, (length, starts)
        gaps = np.diff(starts)
        assert (gaps > 0).all() and (gaps <= step).all(), (length, starts)  # overlap >= overlap * window
        # As few windows as that allows.
        assert len(starts) == math.ceil((length - window) / step) + 1
    assert window_starts(32, 32, overlap) == [0]
    assert window_starts(5, 32, overlap) == [0]
    assert window_starts(33, 32, overlap) == [0, 1]


def test_gaussian_importance_peaks_at_the_centre_and_never_reaches_zero():
    g = gaussian_importance((32, 16, 8))
    assert g.shape == (32, 16, 8)
    assert g.max() == 1 and g.min() > 0
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1)) and torch.equal(g, g.flip(2))


def test_blending_a_constant_prediction_gives_that_constant_everywhere():
    logits = [0.3, 1.5, -0.7]
    expected = torch.softmax(torch.tensor(logits), 0)
    image = torch.randn(1, 50, 37, 12)  # uneven coverage; z shorter than the window (padded)
    predictor = SlidingWindowPredictor(Constant(logits), (16, 16, 16), torch.device("cpu"), overlap=0.5)
    scores = predictor.predict(image, 3)
    assert scores.shape == (3, 50, 37, 12) and scores.dtype == torch.float16
    assert predictor.windows_evaluated == len(predictor.windows((50, 37, 16))) == 6 * 4 * 1
    np.testing.assert_allclose(scores.float().numpy(), expected.view(3, 1, 1, 1).expand(3, 50, 37, 12).numpy(),
                               atol=2e-3)


def position_image(shape) -> torch.Tensor:
    """A smooth function of position with texture: every voxel's value is known."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    values = np.sin(3 * x) + np.cos(2 * y) * z + 0.3 * np.random.default_rng(2).normal(size=shape)
    return torch.from_numpy(values[None].astype(np.float32))


@pytest.mark.parametrize("mirror", [False, True])
def test_sliding_window_of_a_pointwise_model_equals_one_full_volume_forward(mirror):
    torch.manual_seed(3)
    model = nn.Conv3d(1, 4, 1).eval()  # fully convolutional, and mirror-equivariant
    image = position_image((45, 38, 29))
    predictor = SlidingWindowPredictor(model, (16, 16, 16), torch.device("cpu"), overlap=0.5, mirror=mirror)
    scores = predictor.predict(image, 4).float()
    with torch.no_grad():
        full = torch.softmax(model(image[None]), 1)[0]
    np.testing.assert_allclose(scores.numpy(), full.numpy(), atol=2e-3)
    top2 = full.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 5e-3  # fp16 accumulation may flip only near-ties
    assert clear.float().mean() > 0.95
    assert torch.equal(scores.argmax(0)[clear], full.argmax(0)[clear])
    assert predictor.windows_evaluated == 5 * 4 * 3 * (8 if mirror else 1)


# --- 4. out of memory ------------------------------------------------------------------------------------

class RunsOutOfMemory(nn.Module):
    """``inner``, except that a batch of more than ``max_windows`` windows (or any batch on a
    device other than the CPU) raises torch.OutOfMemoryError, as CUDA does."""

    def __init__(self, inner, max_windows=1, cpu_only=False):
        super().__init__()
        self.inner, self.max_windows, self.cpu_only = inner, max_windows, cpu_only
        self.batches = []

    def to(self, *args, **kwargs):  # stays on the CPU whatever device it is sent to (see below)
        return self

    def forward(self, x):
        self.batches.append((x.shape[0], x.device.type))
        if x.shape[0] > self.max_windows or (self.cpu_only and x.device.type != "cpu"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_halves_the_window_batch_and_gives_the_same_result():
    torch.manual_seed(4)
    inner = nn.Conv3d(1, 3, 3, padding=1).eval()  # not pointwise: windows differ at their borders
    image = position_image((40, 36, 30))
    reference = SlidingWindowPredictor(inner, (16, 16, 16), torch.device("cpu"), batch_size=1).predict(image, 3)

    model, seen = RunsOutOfMemory(inner, max_windows=1), Events()
    predictor = SlidingWindowPredictor(model, (16, 16, 16), torch.device("cpu"), batch_size=4, report=seen.emit)
    scores = predictor.predict(image, 3)
    assert torch.equal(scores, reference)
    assert predictor.batch_size == 1
    assert [size for size, _ in model.batches[:2]] == [4, 2]  # 4 fails, 2 fails, then 1 window at a time
    warnings = [fields["message"] for fields in seen.of("warning")]
    assert len(warnings) == 2
    assert "out of memory" in warnings[0] and "retrying with 2 windows per batch" in warnings[0]
    assert "retrying with 1 window per batch" in warnings[1]
    progress = seen.of("progress")
    assert progress[-1]["done"] == progress[-1]["total"] == len(predictor.windows((40, 36, 30)))


def test_out_of_memory_with_one_window_moves_to_the_cpu():
    """The GPU -> CPU step, without a GPU: the "meta" device stands in for CUDA (tensors without
    storage, so the model wrapper, which stays on the CPU, fails there like an exhausted GPU)."""
    torch.manual_seed(5)
    inner = nn.Conv3d(1, 3, 3, padding=1).eval()
    image = position_image((40, 20, 18))
    reference = SlidingWindowPredictor(inner, (16, 16, 16), torch.device("cpu"), batch_size=1).predict(image, 3)
    model, seen = RunsOutOfMemory(inner, max_windows=64, cpu_only=True), Events()
    predictor = SlidingWindowPredictor(model, (16, 16, 16), torch.device("meta"), batch_size=2, report=seen.emit)
    scores = predictor.predict(image, 3)
    assert predictor.device.type == "cpu" and scores.device.type == "cpu"
    assert torch.equal(scores, reference)
    warnings = [fields["message"] for fields in seen.of("warning")]
    assert len(warnings) == 2 and "retrying with 1 window per batch" in warnings[0]
    assert "continuing on the CPU" in warnings[1]


def test_out_of_memory_on_the_cpu_with_one_window_is_an_error():
    model = RunsOutOfMemory(nn.Conv3d(1, 2, 1), max_windows=0)
    predictor = SlidingWindowPredictor(model, (16, 16, 16), torch.device("cpu"), batch_size=2)
    with pytest.raises(MemoryError, match="even with one window"):
        predictor.predict(torch.zeros(1, 20, 20, 20), 2)


# --- 5. region of interest -------------------------------------------------------------------------------

def axis_aligned(tmp_path, shape=(40, 36, 24), spacing=2.0):
    """An LPS-stored (x and y flipped) image on the model's own 2 mm spacing."""
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [35.0, 20.0, -17.0]
    return write_nifti(tmp_path / "aligned.nii.gz", sphere_image(affine, shape), affine), affine


def test_roi_in_voxels_labels_only_the_box_on_a_full_size_map(toy_network, toy_package, tmp_path):
    toy_network(Constant([0.0, 5.0]))  # foreground wherever it is run
    source, _ = axis_aligned(tmp_path)
    box = (5, 6, 4, 30, 28, 20)
    sidecar = segment(source, tmp_path / "roi.nii.gz", toy_package, SegmentOptions(device="cpu", roi=box), Events())
    labels = np.asarray(nib.load(str(tmp_path / "roi.nii.gz")).dataobj)
    assert labels.shape == (40, 36, 24)
    expected = np.zeros(labels.shape, dtype=np.uint8)
    expected[5:30, 6:28, 4:20] = 3
    assert np.array_equal(labels, expected)
    assert sidecar["roi_voxels"] == list(box)
    assert sidecar["labels"][0]["voxels"] == 25 * 22 * 16
    # Without an ROI the same model labels everything.
    segment(source, tmp_path / "all.nii.gz", toy_package, SegmentOptions(device="cpu"), Events())
    assert (np.asarray(nib.load(str(tmp_path / "all.nii.gz")).dataobj) == 3).all()


def test_a_nifti_without_qform_or_sform_segments_with_a_warning_and_no_volumes_in_ml(toy_network, toy_package,
                                                                                     tmp_path):
    """Codes 0 are ANALYZE's "no orientation": nibabel makes an affine up from pixdim, so ml would be made up."""
    toy_network(Constant([0.0, 5.0]))
    source, _ = axis_aligned(tmp_path)
    loaded = nib.load(str(source))
    image = nib.Nifti1Image(np.asarray(loaded.dataobj), None)  # no affine: saving would write it as an sform
    image.header.set_zooms(loaded.header.get_zooms())
    image.header.set_qform(None, code=0)
    image.header.set_sform(None, code=0)
    nib.save(image, source)
    seen = Events()
    sidecar = segment(source, tmp_path / "seg.nii.gz", toy_package, SegmentOptions(device="cpu"), seen)
    assert sidecar["labels"][0]["voxels"] == 40 * 36 * 24 and sidecar["labels"][0]["volume_ml"] is None
    warnings = [fields["message"] for event, fields in seen.seen if event == "warning"]
    assert warnings == [f"{source}: has no orientation or origin (its NIfTI qform_code and sform_code are 0): "
                        "volumes in ml are not reported"]


def test_roi_in_ras_millimetres_is_the_same_box_as_in_voxels(toy_network, toy_package, tmp_path):
    toy_network(Constant([0.0, 5.0]))
    source, affine = axis_aligned(tmp_path)
    box = (5, 6, 4, 30, 28, 20)
    # Two opposite corners: the centres of the first and the last voxel of the box.
    first = affine @ [*box[:3], 1]
    last = affine @ [box[3] - 1, box[4] - 1, box[5] - 1, 1]
    ras = (*last[:3], *first[:3])  # any two opposite corners, in any order
    options = SegmentOptions(device="cpu", roi_ras=tuple(float(v) for v in ras))
    assert roi_box(options, affine, (40, 36, 24), source) == box
    a = segment(source, tmp_path / "ras.nii.gz", toy_package, options, Events())
    b = segment(source, tmp_path / "vox.nii.gz", toy_package, SegmentOptions(device="cpu", roi=box), Events())
    assert a["roi_voxels"] == b["roi_voxels"] == list(box)
    ras, voxels = (np.asarray(nib.load(str(tmp_path / name)).dataobj) for name in ("ras.nii.gz", "vox.nii.gz"))
    assert np.array_equal(ras, voxels)


def test_roi_ras_at_voxel_centres_is_not_widened_by_float_rounding():
    """Corners placed on voxel centres of an oblique, anisotropic grid land at whole voxel
    coordinates only up to float rounding (9.999999999 or 10.000000001): the box must not
    gain a voxel either way."""
    shape = (60, 50, 40)
    for spacing in [(0.7, 1.1, 2.5), (1.5, 1.5, 1.5), (0.488281, 0.488281, 3.3)]:
        affine = oblique_affine(spacing=spacing, shape=shape, degrees=(0.0, 0.0))
        affine[:3, :3] = affine[:3, :3] @ np.diag([-1, -1, 1])
        for box in [(3, 4, 5, 40, 45, 33), (10, 11, 12, 18, 20, 21), (0, 0, 0, 60, 50, 40)]:
            first = affine @ [*box[:3], 1]
            last = affine @ [box[3] - 1, box[4] - 1, box[5] - 1, 1]
            options = SegmentOptions(roi_ras=tuple(float(v) for v in (*first[:3], *last[:3])))
            assert roi_box(options, affine, shape, "x") == box, (spacing, box)


def test_roi_outside_the_image_or_too_small_is_a_clear_error(toy_package, tmp_path):
    source, affine = axis_aligned(tmp_path)
    thin = (*(affine @ [0, 0, 0, 1])[:3], *(affine @ [3, 30, 20, 1])[:3])  # 4 voxels along x
    cases = [
        (SegmentOptions(roi=(0, 0, 0, 41, 36, 24)), "reaches outside the image (shape 40,36,24)"),
        (SegmentOptions(roi=(-1, 0, 0, 20, 20, 20)), "reaches outside the image"),
        (SegmentOptions(roi=(0, 0, 0, 20, 20, 5)), "too small: every axis needs at least 8 voxels"),
        (SegmentOptions(roi_ras=(500.0, 500.0, 500.0, 600.0, 600.0, 600.0)), "does not overlap the image"),
        (SegmentOptions(roi_ras=tuple(float(v) for v in thin)), "too small"),
    ]
    for options, message in cases:
        with pytest.raises(VocoInputError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
            segment(source, tmp_path / "out" / "seg.nii.gz", toy_package, options, Events())
        assert str(source) in str(error.value)
    assert not (tmp_path / "out").exists()


# --- 6. --fast ----------------------------------------------------------------------------------------------

def test_fast_uses_twice_the_spacing_and_fewer_windows(package, tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shape = (80, 80, 48)
    source = write_nifti(tmp_path / "image.nii.gz", sphere_image(affine, shape), affine)
    normal = segment(source, tmp_path / "normal.nii.gz", package, SegmentOptions(device="cpu"), Events())
    seen = Events()
    fast = segment(source, tmp_path / "fast.nii.gz", package, SegmentOptions(device="cpu", fast=True), seen)
    assert normal["spacing_mm"] == [2.0, 2.0, 2.0] and fast["spacing_mm"] == [4.0, 4.0, 4.0]
    assert fast["fast"] is True and seen.of("start")[0]["fast"] is True
    # 80x80x48 voxels of 1 mm: 40x40x24 at 2 mm (2x2x1 windows of 32), 20x20x12 at 4 mm (one).
    assert normal["windows_evaluated"] == 4 and fast["windows_evaluated"] == 1
    assert nib.load(str(tmp_path / "fast.nii.gz")).shape == shape
    # A card may name its own fast spacing.
    own = write_package(tmp_path / "own", card(fast_spacing=(3.0, 3.0, 3.0)), package.load_state_dict())
    assert segment(source, tmp_path / "own.nii.gz", own, SegmentOptions(device="cpu", fast=True),
                   Events())["spacing_mm"] == [3.0, 3.0, 3.0]


# --- 7. cancelling --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_volume(tmp_path_factory):
    """128^3 at 1 mm (64^3 at the model's 2 mm: 343 windows at overlap 0.8, several seconds)."""
    affine = np.eye(4)
    shape = (128, 128, 128)
    return write_nifti(tmp_path_factory.mktemp("big") / "big.nii", sphere_image(affine, shape), affine)


def cancel_on_first_progress(image, output, package):
    process = subprocess.Popen(voco_command("segment", image, output, "--model", package.folder, "--device", "cpu",
                                            "--overlap", "0.8", "--progress", "jsonl"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if '"event": "progress"' in line:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    process.wait(timeout=60)
    return process.returncode, events("".join(lines)), process.stderr.read()


def test_sigterm_while_segmenting_leaves_no_file(package, big_volume, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, stream, stderr = cancel_on_first_progress(big_volume, out / "seg.nii.gz", package)
    assert code == 128 + signal.SIGTERM, stderr
    kinds = [e["event"] for e in stream]
    assert kinds[0] == "start" and kinds[-1] == "cancelled" and "done" not in kinds
    assert stream[0]["windows"] == 343
    assert "Traceback" not in stderr
    assert os.listdir(out) == []  # no label map, no sidecar, no temporary file


def test_sigterm_leaves_an_existing_output_unchanged(package, big_volume, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.nrrd").write_bytes(b"previous label map")
    (out / "seg.json").write_text('{"format": "voco-segmentation", "previous": true}')
    code, stream, stderr = cancel_on_first_progress(big_volume, out / "seg.nrrd", package)
    assert code == 128 + signal.SIGTERM, stderr
    assert stream[-1]["event"] == "cancelled"
    assert sorted(os.listdir(out)) == ["seg.json", "seg.nrrd"]
    assert (out / "seg.nrrd").read_bytes() == b"previous label map"
    assert (out / "seg.json").read_text() == '{"format": "voco-segmentation", "previous": true}'


# --- 8. bad input ------------------------------------------------------------------------------------------------

def bad_case(name, tmp, package, models):
    """(argv, text the one error line must contain) for one kind of bad input."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    good = write_nifti(tmp / "good.nii.gz", np.random.default_rng(0).normal(100, 20, (40, 40, 24)), affine)
    out = tmp / "out" / "seg.nii.gz"
    model = str(package.folder)

    def copy_package(name):
        folder = tmp / name
        folder.mkdir()
        for file in package.folder.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        return folder

    if name == "two_dimensional":
        write_nifti(tmp / "slice.nii.gz", np.ones((40, 40)) * np.arange(40), affine)
        return ["segment", tmp / "slice.nii.gz", out, "--model", model], "slice.nii.gz: is 2-D"
    if name == "four_dimensional":
        write_nifti(tmp / "series.nii.gz", np.random.default_rng(0).normal(size=(40, 40, 24, 3)), affine)
        return ["segment", tmp / "series.nii.gz", out, "--model", model], "series.nii.gz: has 3 channels/time points"
    if name == "missing_image":
        return ["segment", tmp / "nope.nii.gz", out, "--model", model], "nope.nii.gz: does not exist"
    if name == "unknown_model":
        return ["segment", good, out, "--model", "no-such-model"], "'no-such-model' is not an existing file or folder"
    if name == "truncated_weights":
        folder = copy_package("truncated")
        weights = (folder / "weights.pt").read_bytes()
        (folder / "weights.pt").write_bytes(weights[: len(weights) // 2])
        return ["segment", good, out, "--model", folder], "truncated/weights.pt: sha256 does not match the model card"
    if name == "truncated_weights_unverified":  # a card without a checksum: the load itself must fail cleanly
        folder = copy_package("unverified")
        values = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps({**values, "weights_sha256": None}))
        weights = (folder / "weights.pt").read_bytes()
        (folder / "weights.pt").write_bytes(weights[: len(weights) // 2])
        return ["segment", good, out, "--model", folder], "unverified/weights.pt: not a readable PyTorch checkpoint"
    if name == "card_not_json":
        folder = copy_package("notjson")
        (folder / "model.json").write_text('{"format": "voco-model", "labels": [')
        return ["segment", good, out, "--model", folder], "notjson/model.json: invalid JSON"
    if name == "weights_do_not_fit":
        folder = copy_package("misfit")
        torch.manual_seed(0)
        two_classes = build_segmentation_network("swinunetr-tiny", 1, 2).state_dict()
        write_package(folder, card(), two_classes)  # the card says 3 classes
        return ["segment", good, out, "--model", folder], "misfit/weights.pt: weights do not fit the swinunetr-tiny"
    if name == "png_output":
        return ["segment", good, tmp / "out" / "seg.png", "--model", model], "seg.png: output must end in .nii"
    if name == "bad_roi_text":
        return ["segment", good, out, "--model", model, "--roi", "1,2,3,a,5,6"], \
            "--roi needs six comma-separated numbers x0,y0,z0,x1,y1,z1, got '1,2,3,a,5,6'"
    if name == "roi_outside":
        return ["segment", good, out, "--model", model, "--roi", "0,0,0,50,40,24"], \
            "good.nii.gz: --roi 0,0,0,50,40,24 reaches outside the image (shape 40,40,24)"
    if name == "overlap":
        return ["segment", good, out, "--model", model, "--overlap", "1.5"], "--overlap must be in [0, 1), got 1.5"
    if name == "batch_size":
        return ["segment", good, out, "--model", model, "--batch-size", "0"], "--batch-size must be at least 1"
    if name == "unknown_device":
        return ["segment", good, out, "--model", model, "--device", "tpu"], "--device must be auto, cpu, cuda"
    if name == "cuda_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        return ["segment", good, out, "--model", model, "--device", "cuda"], "--device cuda: torch"
    if name == "installed_backbone":
        torch.manual_seed(0)
        state = {k: v for k, v in build_segmentation_network("swinunetr-tiny", 1, 2).state_dict().items()
                 if is_backbone_key("swinunetr-tiny", k)}
        torch.save(state, tmp / "tiny_backbone.pt")
        assert main(["models", "import", str(tmp / "tiny_backbone.pt"), "--name", "tiny-backbone"]) == 0
        assert (models / "tiny-backbone").is_dir()
        return ["segment", good, out, "--model", "tiny-backbone"], \
            "tiny-backbone is a pretrained backbone without a segmentation head; fine-tune it first"
    if name == "registry_backbone":  # found in the registry: refused before anything is downloaded
        return ["segment", good, out, "--model", "voco-b"], \
            "voco-b is a pretrained backbone without a segmentation head"
    if name == "output_is_the_input":
        return ["segment", good, good, "--model", model], "good.nii.gz: output would replace the input image"
    if name == "output_is_a_hard_link_to_the_input":
        os.link(good, tmp / "out" / "linked.nii.gz")
        return ["segment", good, tmp / "out" / "linked.nii.gz", "--model", model], \
            "linked.nii.gz: output would replace the input image"
    if name == "output_through_a_symlinked_folder":
        (tmp / "again").symlink_to(tmp, target_is_directory=True)
        return ["segment", good, tmp / "again" / "good.nii.gz", "--model", model], "output would replace the input"
    if name == "sidecar_would_replace_dataset_json":
        (tmp / "out" / "dataset.json").write_text('{"name": "my data", "training": []}')
        return ["segment", good, tmp / "out" / "dataset.nii.gz", "--model", model], \
            "dataset.nii.gz: its sidecar " + str(tmp / "out" / "dataset.json") + " exists and was not written by voco"
    if name == "sidecar_would_replace_model_json":
        (tmp / "out" / "model.json").write_text("{}")
        return ["segment", good, tmp / "out" / "model.nrrd", "--model", model], "model.json exists and was not written"
    if name == "all_zero_affine":  # ml from geometry the file does not have
        flat = nib.Nifti1Image(np.random.default_rng(0).normal(100, 20, (40, 40, 24)).astype(np.float32), None)
        flat.header.set_sform(np.zeros((4, 4)), code=1)
        flat.header.set_qform(None, code=0)
        nib.save(flat, tmp / "flat.nii.gz")
        return ["segment", tmp / "flat.nii.gz", out, "--model", model], \
            "flat.nii.gz: has no usable geometry: its voxel-to-world matrix is singular"
    if name == "absurd_spacing":  # 4096 mm voxels resampled to the model's spacing
        write_nifti(tmp / "vast.nii.gz", np.random.default_rng(0).normal(100, 20, (40, 40, 24)),
                    np.diag([4096.0, 4096.0, 4096.0, 1.0]))
        return ["segment", tmp / "vast.nii.gz", out, "--model", model], \
            "vast.nii.gz: resampling its 4096x4096x4096 mm voxels to"
    if name == "header_larger_than_file":
        from test_volumes import header_only_nifti

        header_only_nifti(tmp / "huge.nii.gz")
        return ["segment", tmp / "huge.nii.gz", out, "--model", model], \
            "huge.nii.gz: declares 1500x1500x1500 float32 voxels (13500000000 bytes), but a gzip file of"
    if name == "output_is_folder":
        (tmp / "out" / "seg.nii.gz").mkdir(parents=True)
        return ["segment", good, out, "--model", model], "seg.nii.gz: output is a folder"
    raise AssertionError(name)


BAD = ["two_dimensional", "four_dimensional", "missing_image", "unknown_model", "truncated_weights",
       "truncated_weights_unverified", "card_not_json", "weights_do_not_fit", "png_output", "bad_roi_text",
       "roi_outside", "overlap", "batch_size", "unknown_device", "cuda_without_gpu", "installed_backbone",
       "registry_backbone", "output_is_folder", "output_is_the_input", "output_is_a_hard_link_to_the_input",
       "output_through_a_symlinked_folder", "sidecar_would_replace_dataset_json", "sidecar_would_replace_model_json",
       "all_zero_affine", "absurd_spacing", "header_larger_than_file"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_one_error_line_exit_code_2_and_writes_nothing(case, package, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    monkeypatch.setenv("VOCO_MODELS_DIR", str(models))
    (tmp_path / "out").mkdir()
    argv, expected = bad_case(case, tmp_path, package, models)
    before = sorted(os.listdir(tmp_path / "out"))
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    code = main([str(a) for a in argv] + ["--progress", "jsonl"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["event"] == "error" and expected in last["message"]
    assert sorted(os.listdir(tmp_path / "out")) == before  # nothing written, not even a temporary file
    assert {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.is_file()} == sizes  # the input intact
    assert not models.exists() or sorted(p.name for p in models.iterdir()) in ([], ["tiny-backbone"])


def test_segment_runs_through_the_command_line_and_model_registry_name(package, tmp_path):
    """The whole CLI in its own process: a package imported into the cache, used by its name."""
    env = {"VOCO_MODELS_DIR": str(tmp_path / "models")}
    from conftest import run_voco

    result = run_voco("models", "import", package.folder, "--name", "toy-seg", "--progress", "jsonl", env=env)
    assert result.returncode == 0, result.stderr
    imported = [e for e in events(result.stdout) if e["event"] == "imported"][0]
    assert read_package(imported["path"], verify=True).card.name == "toy"
    shape = (40, 40, 24)
    affine = oblique_affine(spacing=(1.2, 0.9, 2.0), shape=shape)
    source = write_nrrd(tmp_path / "scan.nrrd", sphere_image(affine, shape), affine)
    result = run_voco("segment", source, tmp_path / "seg.nrrd", "--model", "toy-seg", "--device", "cpu",
                      "--progress", "jsonl", env=env)
    assert result.returncode == 0, result.stderr
    stream = events(result.stdout)
    assert [e["event"] for e in stream][0] == "start" and stream[-1]["event"] == "done"
    assert stream[0]["model"] == "toy"
    np.testing.assert_allclose(nrrd_affine(tmp_path / "seg.nrrd"), affine, atol=1e-5)
    assert json.loads((tmp_path / "seg.json").read_text())["model"]["weights_sha256"] == package.card.weights_sha256


# --- 9. the fast way through: the read, the device path, the counts, the raw hand-off --------------------------------

@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32, np.float64, np.uint8])
def test_c_ordered_float32_is_numpys_conversion_whatever_the_memory_order(dtype):
    from voco.data.volumes import c_ordered_float32

    values = np.random.default_rng(0).normal(50, 20, (21, 17, 19)).clip(0, 255).astype(dtype)
    for array in (np.asfortranarray(values), values, np.asfortranarray(values)[:, :, None]):
        converted = c_ordered_float32(array, torch.device("cpu"))
        assert converted.is_contiguous() and converted.dtype == torch.float32
        np.testing.assert_array_equal(converted.numpy(), array.astype(np.float32))


def test_read_volume_gives_monais_loadimage_tensor(tmp_path):
    """What LoadImage gave before (values, affine, metadata), for a NIfTI with and without scaling
    and for an int16 NRRD stored first axis fastest, as the front ends hand volumes over."""
    shape = (24, 20, 16)
    affine = oblique_affine(shape=shape)
    data = np.round(sphere_image(affine, shape) * 10).astype(np.int16)
    scaled = nib.Nifti1Image(data, affine)
    scaled.header.set_slope_inter(0.5, -3.0)
    paths = [write_nifti(tmp_path / "int16.nii.gz", data, affine, np.int16), tmp_path / "scaled.nii",
             tmp_path / "int16.nrrd"]
    nib.save(scaled, str(paths[1]))
    lps = RAS_TO_LPS @ affine[:3]
    nrrd.write(str(paths[2]), data, {"space": "left-posterior-superior", "space directions": lps[:, :3].T,
                                     "space origin": lps[:, 3], "kinds": ["domain"] * 3}, index_order="F")
    for path in paths:
        expected = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
        image = read_volume(path, "cpu")
        assert image.is_contiguous() and image.dtype == torch.float32 and image.shape == (1, *shape)
        assert torch.equal(image.as_tensor(), expected.as_tensor()), path.name
        assert torch.equal(image.affine, expected.affine) and set(image.meta) == set(expected.meta), path.name


def test_the_device_path_on_the_cpu_gives_the_labels_of_todays_stages_run_one_by_one(package, tmp_path):
    """segment() reads onto its device and preprocesses there; on the CPU the label map and the
    sidecar's counts are exactly those of LoadImage -> preprocess -> sliding window -> resampling
    (a random-weights network: any difference in its input would show in its noisy labels)."""
    from voco.data.volumes import Preprocessing as Steps, preprocess
    from voco.inference.segment import load_network

    shape = (40, 36, 22)
    affine = oblique_affine(spacing=(1.3, 1.1, 2.2), shape=shape)
    source = write_nrrd(tmp_path / "scan.nrrd", sphere_image(affine, shape), affine)
    output = tmp_path / "seg.nrrd"
    # float32 on both sides: on a CPU with native bfloat16 "auto" computes the windows in it
    sidecar = segment(source, output, package, SegmentOptions(device="cpu", compress=False, precision="float32"),
                      Events())
    labels, header = nrrd.read(str(output), index_order="F")
    assert header["encoding"] == "raw"

    card = package.card
    image = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(source))
    network_input, input_affine, _ = preprocess(image, Steps(modality=card.preprocessing.modality,
                                                             spacing=card.preprocessing.spacing))
    device = torch.device("cpu")
    scores = SlidingWindowPredictor(load_network(package, device), card.preprocessing.patch_size, device,
                                    overlap=0.5, batch_size=1).predict(network_input, card.num_classes)
    expected = label_map_on_grid(scores, input_affine, shape, image.affine.numpy(), card.class_values())
    np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(expected)) == 3  # all three classes: the comparison is not of two blank maps
    assert [r["voxels"] for r in sidecar["labels"]] == [int(np.count_nonzero(expected == v)) for v in (1, 5)]


def test_voxel_counts_from_the_resampling_are_those_of_the_label_map(monkeypatch):
    """One bincount per slab, where the scores are, including slabs outside the scored region
    (all background) and two classes that share a label value."""
    monkeypatch.setattr(resample, "SLAB_VOXELS", 30 * 26 * 3)  # several slabs
    scores = torch.randn(4, 12, 10, 8, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    scores_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine = np.diag([-1.0, 1.0, 1.5, 1.0])
    affine[:3, 3] = [23.0, -1.0, -4.0]  # x flipped; part of the output lies outside the scores
    labels, counts = resample.label_map_and_counts(scores, scores_affine, (30, 26, 20), affine, [0, 1, 5, 5])
    np.testing.assert_array_equal(labels, label_map_on_grid(scores, scores_affine, (30, 26, 20), affine,
                                                            [0, 1, 5, 5]))
    assert counts == {v: int(np.count_nonzero(labels == v)) for v in (0, 1, 5)}
    assert counts[0] > 0 and counts[1] > 0 and counts[5] > 0
    assert labels.flags.f_contiguous  # the files' order: written without a transposing copy


def test_uncompressed_writes_a_raw_nrrd_that_the_front_end_reads_back(toy_network, toy_package, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "VoCoCommon"))
    from VoCoCommonLib.volumes import read_nrrd

    toy_network(Threshold())
    source, affine = axis_aligned(tmp_path)
    output = tmp_path / "seg.nrrd"
    assert main(["segment", str(source), str(output), "--model", str(toy_package.folder), "--device", "cpu",
                 "--uncompressed"]) == 0
    labels, header = nrrd.read(str(output), index_order="F")
    assert header["encoding"] == "raw" and set(np.unique(labels)) == {0, 3}
    labels_kji, matrix = read_nrrd(output)  # what the Slicer module's read_output reads
    np.testing.assert_array_equal(labels_kji, labels.transpose(2, 1, 0))
    np.testing.assert_allclose(matrix, affine, atol=1e-6)
    # Without the option a .nrrd stays gzip-compressed; a .nii.gz cannot be uncompressed.
    assert main(["segment", str(source), str(tmp_path / "gz.nrrd"), "--model", str(toy_package.folder)]) == 0
    assert nrrd.read_header(str(tmp_path / "gz.nrrd"))["encoding"] == "gzip"
    capsys.readouterr()
    assert main(["segment", str(source), str(tmp_path / "out" / "seg.nii.gz"), "--model", str(toy_package.folder),
                 "--uncompressed"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'out' / 'seg.nii.gz'}: a .nii.gz output is compressed; for an uncompressed one give "
        ".nii or .nrrd"]
    assert not (tmp_path / "out").exists()
