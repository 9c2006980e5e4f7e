import hashlib
import shutil
import subprocess
import zipfile

import nibabel as nib
import pytest

from voco.data import sample_data
from voco.data.sample_data import SAMPLES, SampleVolume, fetch, fetch_many, sample_data_dir
from voco.errors import VocoInputError

MEMBER = "fakepkg/data/volume.nii.gz"
MEMBER_BYTES = b"not really a volume, but bytes to checksum"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path):
    """A small wheel holding one member, and a pip that 'downloads' it, counting its calls."""
    wheel = tmp_path / "pypi" / "fakepkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MEMBER, MEMBER_BYTES)
        archive.writestr("fakepkg/__init__.py", "")
    return wheel


@pytest.fixture
def downloads(fake_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("VOCO_CACHE_DIR", str(tmp_path / "cache"))
    requested = []

    def pip_download(requirement, download_dir):
        requested.append(requirement)
        shutil.copy(fake_wheel, download_dir)

    monkeypatch.setattr(sample_data, "_pip_download", pip_download)
    return requested


def register(monkeypatch, fake_wheel, wheel_sha256=None, member=MEMBER, member_sha256=sha256(MEMBER_BYTES)):
    sample = SampleVolume(
        "fake", fake_wheel.name, wheel_sha256 or sha256(fake_wheel.read_bytes()), member, member_sha256, "mri", "test"
    )
    monkeypatch.setattr(sample_data, "SAMPLES", (sample,))
    return sample


def test_the_cache_folder_follows_voco_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VOCO_CACHE_DIR", str(tmp_path))
    assert sample_data_dir() == tmp_path / "sample_data"
    monkeypatch.delenv("VOCO_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sample_data_dir() == tmp_path / "home/.cache/voco/sample_data"


def test_the_requirement_is_read_from_the_wheel_name():
    requirements = {sample.name: sample.requirement for sample in SAMPLES}
    assert requirements["mni152-t1"] == "nilearn==0.14.1"
    assert requirements["spine-ct"] == "tptbox==1.1.0"
    assert requirements["brain-t1-05mm"] == "deepmriprep==0.3.0"


def test_registered_names_are_unique_with_known_modalities():
    assert len({sample.name for sample in SAMPLES}) == len(SAMPLES) == 9
    assert {sample.modality for sample in SAMPLES} == {"ct", "mri", "label"}


def test_fetch_extracts_the_verified_member_and_caches_the_wheel(monkeypatch, fake_wheel, downloads, tmp_path):
    register(monkeypatch, fake_wheel)
    path = fetch("fake")
    assert path == tmp_path / "cache/sample_data/fake.nii.gz"
    assert path.read_bytes() == MEMBER_BYTES
    assert downloads == ["fakepkg==1.0"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.nii.gz", fake_wheel.name]

    assert fetch("fake") == path  # cached: no second download
    path.unlink()
    assert fetch("fake").read_bytes() == MEMBER_BYTES  # re-extracted from the cached wheel
    assert downloads == ["fakepkg==1.0"]


def test_a_tampered_cached_volume_is_extracted_again(monkeypatch, fake_wheel, downloads):
    register(monkeypatch, fake_wheel)
    path = fetch("fake")
    path.write_bytes(b"tampered")
    assert fetch("fake").read_bytes() == MEMBER_BYTES


def test_a_wheel_with_the_wrong_checksum_is_removed_and_reported(monkeypatch, fake_wheel, downloads, tmp_path):
    register(monkeypatch, fake_wheel, wheel_sha256="0" * 64)
    with pytest.raises(VocoInputError) as caught:
        fetch("fake")
    cached_wheel = tmp_path / "cache/sample_data" / fake_wheel.name
    assert str(caught.value) == (
        f"{cached_wheel}: sha256 {sha256(fake_wheel.read_bytes())} differs from the expected {'0' * 64}; removed it"
    )
    assert list(cached_wheel.parent.iterdir()) == []


def test_a_member_with_the_wrong_checksum_is_removed_and_reported(monkeypatch, fake_wheel, downloads, tmp_path):
    register(monkeypatch, fake_wheel, member_sha256="f" * 64)
    with pytest.raises(VocoInputError) as caught:
        fetch("fake")
    assert str(caught.value) == (
        f"{fake_wheel.name}:{MEMBER}: sha256 {sha256(MEMBER_BYTES)} differs from the expected {'f' * 64}; removed it"
    )
    # The wheel itself was fine and stays; no partial volume is left behind.
    assert [p.name for p in (tmp_path / "cache/sample_data").iterdir()] == [fake_wheel.name]


def test_a_member_missing_from_the_wheel_is_named(monkeypatch, fake_wheel, downloads, tmp_path):
    register(monkeypatch, fake_wheel, member="fakepkg/data/other.nii.gz")
    with pytest.raises(VocoInputError, match="has no member fakepkg/data/other.nii.gz"):
        fetch("fake")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(VocoInputError) as caught:
        fetch("mni305")
    assert str(caught.value) == (
        "unknown sample volume 'mni305'; known: mni152-t1, mni152-gm, mni152-wm, "
        "spine-ct, spine-ct-vertebrae, spine-mri, spine-mri-vertebrae, brain-t1-05mm, brain-tissue-15mm"
    )


def test_a_failed_pip_download_reports_pips_last_error(monkeypatch, fake_wheel, tmp_path):
    monkeypatch.setenv("VOCO_CACHE_DIR", str(tmp_path / "cache"))
    register(monkeypatch, fake_wheel)
    failed = subprocess.CompletedProcess([], 1, "", "Looking in indexes\nERROR: No matching distribution found for fakepkg==1.0\n")
    monkeypatch.setattr(sample_data.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(VocoInputError) as caught:
        fetch("fake")
    assert str(caught.value) == "pip could not download fakepkg==1.0: ERROR: No matching distribution found for fakepkg==1.0"


def test_real_sample_volumes_download_and_verify():
    """Needs PyPI (or pip's cache): downloads the pinned nilearn and TPTBox wheels once."""
    spine_ct, mni_t1 = fetch_many(["spine-ct", "mni152-t1"])
    assert spine_ct.name == "spine-ct.nii.gz"
    assert nib.load(spine_ct).shape == (73, 47, 73)
    assert nib.aff2axcodes(nib.load(spine_ct).affine) == ("P", "I", "R")
    assert nib.load(mni_t1).shape == (197, 233, 189)


def test_cli_lists_and_fetches_sample_volumes_for_the_front_ends(shipped):
    from conftest import events, run_voco

    listed = run_voco("samples", "list", "--progress", "jsonl")
    assert listed.returncode == 0, listed.stderr
    [samples] = events(listed.stdout)
    assert {"name": "spine-ct", "modality": "ct"}.items() <= samples["samples"][3].items()
    fetched = run_voco("samples", "fetch", "spine-ct", "--progress", "jsonl")
    assert fetched.returncode == 0 and events(fetched.stdout) == [{"event": "done", "time": events(fetched.stdout)[0]["time"],
                                                                  "path": str(shipped["spine-ct"])}]
    unknown = run_voco("samples", "fetch", "nope")
    assert unknown.returncode == 2 and unknown.stdout == "" and len(unknown.stderr.splitlines()) == 1
    assert unknown.stderr.startswith("error: unknown sample volume 'nope'; known: mni152-t1, ")
