import importlib.util
import gzip
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from voco.data import sample_data
from voco.data.volumes import Preprocessing, Volume, load_volume, load_volumes, preprocess, read_volume
from voco.errors import VocoInputError

# Voxel axes -> RAS: x runs posterior (1.5 mm), y inferior (2 mm), z right (1.25 mm), as in the
# PIR-oriented TPTBox scans, so reorientation permutes and flips every axis.
PIR_AFFINE = np.array(
    [[0.0, 0.0, 1.25, -30.0], [-1.5, 0.0, 0.0, 40.0], [0.0, -2.0, 0.0, 50.0], [0.0, 0.0, 0.0, 1.0]]
)
BODY = (slice(6, 34), slice(5, 27), slice(4, 36))  # a soft-tissue box in air
BLOB = (slice(20, 24), slice(10, 13), slice(25, 28))  # bone-bright, off centre


def write_nifti(path: Path, array, affine=PIR_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def synthetic_ct(path: Path) -> Path:
    volume = np.full((40, 32, 40), -1000.0, dtype=np.float32)
    volume[BODY] = 40.0
    volume[BLOB] = 1000.0
    return write_nifti(path, volume)


def synthetic_mri(path: Path, affine=PIR_AFFINE) -> Path:
    volume = np.zeros((40, 32, 40), dtype=np.float32)
    volume[BODY] = np.random.default_rng(0).uniform(100.0, 300.0, size=volume[BODY].shape)
    return write_nifti(path, volume, affine)


def to_ras(affine, index) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(index, dtype=np.float64) + affine[:3, 3]


def centroid(mask) -> np.ndarray:
    return np.argwhere(np.asarray(mask)).mean(axis=0)


def box_centre(mask) -> np.ndarray:
    indices = np.argwhere(np.asarray(mask))
    return (indices.min(axis=0) + indices.max(axis=0)) / 2.0


def voxel_size(affine) -> float:
    return float(np.linalg.norm(affine[:3, :3], axis=0).max())


def test_read_volume_gives_a_float32_channel_first_metatensor_with_the_file_affine(tmp_path):
    path = synthetic_ct(tmp_path / "ct.nii.gz")
    image = read_volume(path)
    assert isinstance(image, MetaTensor)
    assert image.shape == (1, 40, 32, 40) and image.dtype == torch.float32
    np.testing.assert_allclose(image.affine.numpy(), PIR_AFFINE)
    assert float(image.min()) == -1000.0 and float(image.max()) == 1000.0


@pytest.mark.parametrize("detached", [False, True], ids=["nrrd", "nhdr"])
def test_read_nrrd_converts_its_lps_geometry_to_ras(tmp_path, detached):
    volume = np.arange(10 * 11 * 12, dtype=np.int16).reshape(10, 11, 12)
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.8, 0.9, 2.0]), "space origin": [10.0, 20.0, 30.0]}
    path = tmp_path / ("scan.nhdr" if detached else "scan.nrrd")
    nrrd.write(str(path), volume, header, detached_header=detached)
    image = read_volume(path)
    assert image.shape == (1, 10, 11, 12)
    np.testing.assert_array_equal(image[0].numpy(), volume)
    expected = np.array([[-0.8, 0, 0, -10.0], [0, -0.9, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine.numpy(), expected)


@pytest.mark.parametrize("shape", [(20, 21, 22, 1), (20, 21, 22, 1, 1)])
def test_a_4d_or_5d_file_with_one_time_point_reads_as_one_volume(tmp_path, shape):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    image = read_volume(write_nifti(tmp_path / "one.nii.gz", volume))
    assert image.shape == (1, 20, 21, 22)
    np.testing.assert_array_equal(image[0].numpy(), volume.reshape(20, 21, 22))


def varied(shape):
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def with_value(value):
    volume = varied((10, 10, 10))
    volume[3, 4, 5] = value
    return volume


@pytest.mark.parametrize(
    "array, message",
    [
        (varied((64, 64)), "is 2-D (shape 64x64); expected a 3-D volume"),
        (varied((20, 21, 1)), "is 2-D (shape 20x21x1); expected a 3-D volume"),
        (varied((20, 21, 22, 3)), "has 3 channels/time points; expected one 3-D volume"),
        (varied((20, 21, 22, 1, 2)), "has 2 channels/time points; expected one 3-D volume"),
        (varied((5, 30, 30)), "is too small (shape 5x30x30); every axis needs at least 8 voxels"),
        (np.zeros((0, 10, 10), np.float32), "is empty (0 voxels)"),
        (with_value(np.nan), "contains NaN or infinite values"),
        (with_value(-np.inf), "contains NaN or infinite values"),
        (np.full((10, 10, 10), 7, np.int16), "is constant (value 7): no image content"),
    ],
    ids=["2d", "single-slice", "3-channels", "5d", "too-small", "empty", "nan", "inf", "constant"],
)
def test_unusable_volumes_are_rejected_naming_the_file(tmp_path, array, message):
    path = write_nifti(tmp_path / "bad.nii.gz", array)
    with pytest.raises(VocoInputError) as caught:
        read_volume(path)
    assert str(caught.value) == f"{path}: {message}"


def truncated_nifti(path: Path) -> Path:
    write_nifti(path, varied((20, 20, 20)))
    path.write_bytes(path.read_bytes()[:2000])
    return path


def garbage_nifti(path: Path) -> Path:
    path.write_bytes(b"\x00\x01 definitely not NIfTI" * 40)
    return path


def garbage_gzip(path: Path) -> Path:
    path.write_bytes(gzip.compress(b"definitely not NIfTI" * 40))
    return path


def vector_nrrd(path: Path) -> Path:
    directions = np.array([[np.nan] * 3, [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    header = {"space": "left-posterior-superior", "kinds": ["vector", "domain", "domain", "domain"],
              "space directions": directions, "space origin": [0.0, 0.0, 0.0]}
    nrrd.write(str(path), varied((3, 10, 10, 10)), header)
    return path


def nrrd_without_geometry(path: Path) -> Path:
    nrrd.write(str(path), varied((10, 10, 10)))
    return path


@pytest.mark.parametrize(
    "make, name, message",
    [
        (truncated_nifti, "cut.nii.gz", "cannot be read as an image: Compressed file ended before the end-of-stream marker was reached"),
        (garbage_nifti, "junk.nii", 'cannot be read as an image: Cannot work out file type of "{path}"'),
        (garbage_gzip, "junk.nii.gz", "cannot be read as an image: "),
        (vector_nrrd, "rgb.nrrd", "has 3 channels/time points; expected one 3-D volume"),
        (nrrd_without_geometry, "plain.nrrd", "has no 'space directions': its voxel spacing and orientation are unknown"),
    ],
    ids=["truncated", "garbage", "garbage-gzip", "vector-nrrd", "nrrd-without-geometry"],
)
def test_unreadable_files_are_rejected_in_one_line(tmp_path, make, name, message):
    path = make(tmp_path / name)
    with pytest.raises(VocoInputError) as caught:
        read_volume(path)
    assert str(caught.value).startswith(f"{path}: {message.format(path=path)}")
    assert "\n" not in str(caught.value)


def test_missing_files_and_folders_are_rejected(tmp_path):
    with pytest.raises(VocoInputError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(VocoInputError, match="is not a file"):
        read_volume(tmp_path)


def header_only_nifti(path: Path, shape=(1500, 1500, 1500)) -> Path:
    """A NIfTI header declaring ``shape`` float32 with no voxels after it (54 bytes gzipped)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def header_only_nrrd(path: Path, encoding: str) -> Path:
    nrrd.write(str(path), np.zeros((8, 8, 8), np.float32), {"encoding": encoding, "space": "left-posterior-superior",
                                                            "space directions": np.eye(3), "space origin": np.zeros(3)})
    text = path.read_bytes().split(b"\n\n", 1)[0].replace(b"sizes: 8 8 8", b"sizes: 1500 1500 1500")
    path.write_bytes(text + b"\n\n" + b"\0" * 64)
    return path


@pytest.mark.parametrize("make, name, held", [
    (header_only_nifti, "huge.nii.gz", "a gzip file of 54 bytes holds at most 55728"),
    (header_only_nifti, "huge.nii", "the file holds 352"),
    (lambda path: header_only_nrrd(path, "raw"), "huge.nrrd", "the file holds 64"),
    (lambda path: header_only_nrrd(path, "gzip"), "huge-gz.nrrd", "a gzip file of 64 bytes holds at most 66048"),
], ids=["nifti-gz", "nifti", "nrrd-raw", "nrrd-gzip"])
def test_a_header_declaring_more_voxels_than_its_file_can_hold_is_refused_before_reading(tmp_path, make, name, held):
    path = make(tmp_path / name)
    with pytest.raises(VocoInputError) as caught:
        read_volume(path)
    assert str(caught.value) == (f"{path}: declares 1500x1500x1500 float32 voxels (13500000000 bytes), but {held} "
                                 "bytes; refused before reading")


def test_a_volume_larger_than_the_available_memory_is_refused_before_reading(tmp_path, monkeypatch):
    from voco.data import volumes

    path = synthetic_ct(tmp_path / "ct.nii.gz")
    monkeypatch.setattr(volumes, "_available_memory", lambda: 100_000)
    with pytest.raises(VocoInputError) as caught:
        read_volume(path)
    assert str(caught.value) == (f"{path}: needs 409600 bytes of memory to read 40x32x40 float32 voxels, but "
                                 "only 100000 are available; refused before reading")


@pytest.mark.parametrize("affine, problem", [
    (np.zeros((4, 4)), "its voxel-to-world matrix is singular (zero spacing or collapsed axes)"),
    (np.diag([1.0, 0.0, 1.0, 1.0]), "its voxel-to-world matrix is singular (zero spacing or collapsed axes)"),
    (np.diag([1.0, np.nan, 1.0, 1.0]), "its voxel-to-world matrix is not finite"),
], ids=["all-zero", "zero-spacing", "nan-spacing"])
def test_a_volume_without_usable_geometry_is_refused(tmp_path, affine, problem):
    volume = np.random.default_rng(0).uniform(0, 100, (16, 16, 16)).astype(np.float32)
    image = nib.Nifti1Image(volume, None)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(None, code=0)
    path = tmp_path / "flat.nii.gz"
    nib.save(image, path)
    with pytest.raises(VocoInputError) as caught:
        read_volume(path)
    assert str(caught.value) == f"{path}: has no usable geometry: {problem}"


def test_resampling_that_would_make_an_absurd_grid_is_refused_before_allocating(tmp_path):
    path = synthetic_ct(tmp_path / "ct.nii.gz")
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.diag([4096.0, 4096.0, 4096.0, 1.0])), path)
    with pytest.raises(VocoInputError) as caught:
        load_volume(path, Preprocessing(spacing=(1.5, 1.5, 1.5), foreground_crop=False))
    assert str(caught.value).startswith(f"{path}: resampling its 4096x4096x4096 mm voxels to 1.5x1.5x1.5 mm would "
                                        "make a grid of 109227x87382x109227 voxels")


@pytest.mark.skipif(importlib.util.find_spec("itk") is not None, reason="ITK installed: .mha is readable")
def test_metaimage_without_itk_says_what_to_install(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(b"ObjectType = Image\n")
    with pytest.raises(VocoInputError) as caught:
        read_volume(path)
    assert str(caught.value) == f"{path}: cannot be read as an image: .mha/.mhd files need ITK (pip install itk)"


PIPELINES = {
    "crop": Preprocessing(),
    "spacing": Preprocessing(spacing=(1.0, 1.0, 1.0)),
    "resize": Preprocessing(resize_to=(24, 24, 24)),
    "pad": Preprocessing(pad_to=(40, 40, 40)),
    "all": Preprocessing(spacing=(1.0, 1.0, 1.0), resize_to=(48, 40, 32), pad_to=(64, 64, 64)),
}


@pytest.mark.parametrize("options", PIPELINES.values(), ids=PIPELINES.keys())
def test_preprocessing_keeps_anatomy_where_it_was_in_ras(tmp_path, options):
    path = synthetic_ct(tmp_path / "ct.nii.gz")
    image, affine, modality = preprocess(read_volume(path), options)
    assert modality == "ct"
    # Reoriented to RAS: a positive diagonal, nothing off it.
    assert np.all(np.diag(affine)[:3] > 0)
    np.testing.assert_allclose(affine[:3, :3], np.diag(np.diag(affine)[:3]), atol=1e-9)
    tolerance = voxel_size(affine)
    source = nib.load(path).get_fdata()
    # The bright blob (1000 HU, 1 after windowing) sits where it sat.
    np.testing.assert_allclose(
        to_ras(affine, centroid(image[0].numpy() > 0.7)), to_ras(PIR_AFFINE, centroid(source > 500)), atol=tolerance
    )
    # The result is centred on the foreground box.
    centre = (np.asarray(image.shape[1:]) - 1) / 2.0
    np.testing.assert_allclose(to_ras(affine, centre), to_ras(PIR_AFFINE, box_centre(source > -175)), atol=tolerance)


def test_the_foreground_crop_keeps_exactly_the_foreground_box(tmp_path):
    path = synthetic_ct(tmp_path / "ct.nii.gz")
    image, affine, _ = preprocess(read_volume(path), Preprocessing())
    # BODY spans 28 x 22 x 32 voxels along P, I, R; in RAS order that is R, A, S = 32 x 28 x 22.
    assert tuple(image.shape) == (1, 32, 28, 22)
    np.testing.assert_allclose(np.diag(affine)[:3], [1.25, 1.5, 2.0])


def test_resize_and_pad_give_the_requested_shape_with_zero_borders(tmp_path):
    path = synthetic_ct(tmp_path / "ct.nii.gz")
    resized, _, _ = preprocess(read_volume(path), Preprocessing(resize_to=(16, 16, 16)))
    assert tuple(resized.shape) == (1, 16, 16, 16)
    padded, _, _ = preprocess(read_volume(path), Preprocessing(pad_to=(36, 30, 20)))
    # 32 x 28 x 22 padded up to at least 36 x 30 x 20: two zero slabs each side of x, one of y.
    assert tuple(padded.shape) == (1, 36, 30, 22)
    assert padded[:, :2].abs().max() == 0 and padded[:, -2:].abs().max() == 0
    assert padded[:, :, :1].abs().max() == 0 and padded[:, :, -1:].abs().max() == 0
    assert padded[:, 2:-2, 1:-1].min() > 0


@pytest.mark.parametrize("modality, low, high", [("ct", -175.0, 250.0), ("ct-chest", -1000.0, 500.0)])
def test_ct_windows_map_to_zero_one(tmp_path, modality, low, high):
    volume = np.full((12, 12, 12), -1000.0, dtype=np.float32)
    volume[2:10, 2:10, 2:10] = np.linspace(-600, 1200, 512).reshape(8, 8, 8)
    image = read_volume(write_nifti(tmp_path / "ct.nii.gz", volume, np.eye(4)))
    scaled, _, resolved = preprocess(image, Preprocessing(modality=modality, foreground_crop=False))
    assert resolved == "ct"
    np.testing.assert_allclose(scaled[0].numpy(), np.clip((volume - low) / (high - low), 0, 1), atol=1e-6)


def test_mri_is_normalised_over_its_nonzero_voxels(tmp_path):
    path = synthetic_mri(tmp_path / "t2.nii.gz", affine=np.eye(4))  # RAS already: voxels stay put
    image, _, modality = preprocess(read_volume(path), Preprocessing(foreground_crop=False))
    assert modality == "mri"
    body = torch.from_numpy(nib.load(path).get_fdata() > 0)
    assert abs(image[0][body].mean().item()) < 1e-4
    assert image[0][body].std().item() == pytest.approx(1.0, abs=1e-3)
    assert image[0][~body].abs().max().item() == 0


def test_auto_modality_calls_air_values_ct(tmp_path):
    ct = load_volume(synthetic_ct(tmp_path / "ct.nii.gz"))
    mri = load_volume(synthetic_mri(tmp_path / "mri.nii.gz"))
    assert (ct.modality, mri.modality) == ("ct", "mri")


@pytest.mark.parametrize("modality, threshold", [("mri", "0"), ("ct", "-175")])
def test_a_volume_without_foreground_is_rejected(tmp_path, modality, threshold):
    volume = np.linspace(-1000, -200, 1000, dtype=np.float32).reshape(10, 10, 10)
    path = write_nifti(tmp_path / "dark.nii.gz", volume)
    with pytest.raises(VocoInputError) as caught:
        load_volume(path, Preprocessing(modality=modality))
    assert str(caught.value) == f"{path}: has no foreground above {threshold}"


def test_an_unknown_modality_is_rejected():
    with pytest.raises(VocoInputError, match="unknown modality 'pet'; expected one of auto, ct, ct-chest, mri"):
        Preprocessing(modality="pet")


def test_load_volume_keeps_the_source_geometry(tmp_path):
    path = synthetic_ct(tmp_path / "ct.nii.gz")
    volume = load_volume(path, Preprocessing(spacing=(2.0, 2.0, 2.0)))
    assert isinstance(volume, Volume) and volume.path == path
    assert type(volume.image) is torch.Tensor and volume.image.dtype == torch.float32
    assert volume.source_shape == (40, 32, 40)
    np.testing.assert_allclose(volume.source_affine, PIR_AFFINE)
    np.testing.assert_allclose(np.diag(volume.affine)[:3], [2.0, 2.0, 2.0])
    assert volume.affine.dtype == np.float64 and volume.modality == "ct"


def test_load_volumes_skips_bad_files_with_a_warning(tmp_path):
    good = synthetic_ct(tmp_path / "good.nii.gz")
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 10, 10), np.float32))
    warnings = []
    volumes = load_volumes([flat, good], Preprocessing(), lambda message, path: warnings.append((message, path)))
    assert [v.path for v in volumes] == [good]
    assert warnings == [(f"{flat}: is constant (value 0): no image content", flat)]


@pytest.mark.parametrize("preset", ["demo", "v2"])
def test_an_mri_with_an_intensity_the_z_score_cannot_take_is_skipped_naming_the_file(shipped, tmp_path, preset):
    """One 3e38 voxel in a real MRI made every pretraining loss NaN (the z-score overflows), or the
    image all zeros (without resampling)."""
    from voco.presets import PRESETS

    source = nib.load(str(shipped["spine-mri"]))
    array = np.asarray(source.dataobj).astype(np.float32)
    array[tuple(n // 2 for n in array.shape)] = 3e38
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(array, source.affine), str(bad))
    warnings = []
    volumes = load_volumes([bad, shipped["spine-mri"]], Preprocessing.for_preset(PRESETS[preset], "mri"),
                           lambda message, path: warnings.append((message, path)))
    assert [v.path for v in volumes] == [shipped["spine-mri"]]
    [(message, path)] = warnings  # the peak after resampling: 3e38 spread over neighbours
    assert path == bad and message.startswith(f"{bad}: holds an intensity of ")
    assert message.endswith(", too extreme for the MRI z-score (at most 1.8e+16): a corrupt voxel?")


def test_load_volumes_fails_when_no_file_is_usable(tmp_path):
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 10, 10), np.float32))
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(VocoInputError) as caught:
        load_volumes([missing, flat], Preprocessing(), lambda message, path: None)
    assert str(caught.value) == f"none of the 2 images could be used; first problem: {missing}: does not exist"


def test_load_volumes_with_one_path_raises_its_error(tmp_path):
    warnings = []
    with pytest.raises(VocoInputError, match="does not exist"):
        load_volumes([tmp_path / "missing.nii.gz"], Preprocessing(), lambda *warning: warnings.append(warning))
    assert warnings == []


def test_real_spine_ct_and_brain_mri_keep_their_anatomy_in_place():
    """Downloads (once) the pinned TPTBox and nilearn wheels through sample_data."""
    spine_path, brain_path = sample_data.fetch_many(["spine-ct", "mni152-t1"])

    spine = load_volume(spine_path, Preprocessing(spacing=(2.0, 2.0, 2.0)))
    assert spine.modality == "ct" and spine.source_shape == (73, 47, 73)
    np.testing.assert_allclose(spine.affine[:3, :3], np.diag([2.0, 2.0, 2.0]), atol=1e-9)
    assert 0.0 <= spine.image.min() and spine.image.max() == 1.0
    # Bone (above 250 HU, 1 after windowing) keeps its RAS centre of mass within a voxel; partial
    # volumes of thin bone at the new 2 mm spacing move the thresholded centroid by up to ~1.5 mm.
    source = nib.load(spine_path)
    bone_before = to_ras(source.affine, centroid(source.get_fdata() > 250))
    bone_after = to_ras(spine.affine, centroid(spine.image[0].numpy() > 0.99))
    np.testing.assert_allclose(bone_after, bone_before, atol=voxel_size(spine.affine))

    brain = load_volume(brain_path, Preprocessing(resize_to=(96, 96, 96)))
    assert brain.modality == "mri" and brain.source_shape == (197, 233, 189)
    assert tuple(brain.image.shape) == (1, 96, 96, 96)
    # The template's brain is centred near the MNI origin (the anterior commissure).
    template = nib.load(brain_path)
    head_centre = to_ras(template.affine, box_centre(template.get_fdata() > 0))
    np.testing.assert_allclose(to_ras(brain.affine, [47.5, 47.5, 47.5]), head_centre, atol=voxel_size(brain.affine))
