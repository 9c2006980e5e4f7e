"""Real volumes for tests and demos, taken from files that ship inside pinned PyPI wheels.

Like 3D Slicer's SampleData, each volume is registered with its source and checksum. ``pip
download`` fetches the wheel (no install, no dependencies: these packages are never imported),
its sha256 is checked, and the one member file is extracted into the cache and checked too.
Files appear in the cache only whole (written aside, then renamed), so concurrent fetches are safe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from voco.data.sources import image_suffix
from voco.checkpoints.files import sha256_of
from voco.errors import VocoInputError


@dataclass(frozen=True)
class SampleVolume:
    name: str
    wheel: str  # wheel file name on PyPI, e.g. "nilearn-0.14.1-py3-none-any.whl"
    wheel_sha256: str
    member: str  # path of the volume inside the wheel
    sha256: str
    modality: str  # "ct", "mri" or "label"
    description: str

    @property
    def requirement(self) -> str:
        """The pip requirement that downloads ``wheel``, e.g. ``"nilearn==0.14.1"``."""
        distribution, version = self.wheel.split("-")[:2]
        return f"{distribution}=={version}"


_NILEARN = ("nilearn-0.14.1-py3-none-any.whl", "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a")
_TPTBOX = ("tptbox-1.1.0-py3-none-any.whl", "975a68f4117ab81fcc2d819d6127f301b1cc50210e08e73df1b9a818ee3be984")
_DEEPMRIPREP = ("deepmriprep-0.3.0-py3-none-any.whl", "00cfaab3e4e1744e7d3844cdad1b096af2c06edbae73d683facc9435b835b8bd")
_MNI152 = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

SAMPLES = (
    SampleVolume(
        "mni152-t1", *_NILEARN, _MNI152.format("t1"),
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6", "mri",
        "MNI ICBM152 2009a T1 brain template, 197x233x189 at 1 mm (nilearn)",
    ),
    SampleVolume(
        "mni152-gm", *_NILEARN, _MNI152.format("gm"),
        "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed", "mri",
        "grey-matter probability map (0-255) of the MNI152 template (nilearn)",
    ),
    SampleVolume(
        "mni152-wm", *_NILEARN, _MNI152.format("wm"),
        "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db", "mri",
        "white-matter probability map (0-255) of the MNI152 template (nilearn)",
    ),
    SampleVolume(
        "spine-ct", *_TPTBOX, "TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz",
        "51e09da4b00f8a22c17bfc55f63b8c21d2a9f6f1d3e4044143f29e12744abec9", "ct",
        "lumbar spine CT (L2-L4), 73x47x73 at 1.5 mm, PIR orientation (TPTBox tests)",
    ),
    SampleVolume(
        "spine-ct-vertebrae", *_TPTBOX, "TPTBox/tests/sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz",
        "e5529ffb420d83be69c5fc0fbac4b6990bcaa067a5c0939fc7d705c47527ea1d", "label",
        "vertebra labels of spine-ct: 21-23 = L2-L4 (TPTBox tests)",
    ),
    SampleVolume(
        "spine-mri", *_TPTBOX, "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz",
        "961495b42cdfc02eaf50eb3f471d705793b82802fedb05f5f02aa5367528cf44", "mri",
        "cervical spine T2w MRI (C5-C7), 68x52x67 at 1.5 mm, PIR orientation (TPTBox tests)",
    ),
    SampleVolume(
        "spine-mri-vertebrae", *_TPTBOX, "TPTBox/tests/sample_mri/sub-mri_seg-vert_label-6_msk.nii.gz",
        "14ee727a3f565512ddbf0c9d8ce8d9ce127acc43f0d21bc7771c2fcbd343023a", "label",
        "labels of spine-mri: 5-7 = C5-C7, 105-106 discs, 205-207 endplates (TPTBox tests)",
    ),
    SampleVolume(
        "brain-t1-05mm", *_DEEPMRIPREP, "deepmriprep/data/templates/Template_05mm_bet.nii.gz",
        "7d96889867d29803021a276ba54c0225534266730c5f5348a1ea78ee2d6e62c1", "mri",
        "skull-stripped T1 brain template, 339x411x339 at 0.5 mm, MNI space (deepmriprep/CAT12)",
    ),
    SampleVolume(
        "brain-tissue-15mm", *_DEEPMRIPREP, "deepmriprep/data/templates/Template_4_GS.nii.gz",
        "9932604e631352f5e3dd2146b7059c5e2176610e4ae5efd3c3e4759b4c2cc12f", "label",
        "tissue probabilities of that template (grey, white, other), 113x137x113x3 at 1.5 mm (deepmriprep/CAT12)",
    ),
)


def sample_data_dir() -> Path:
    """Where fetched wheels and volumes are kept: ``$VOCO_CACHE_DIR/sample_data`` or ``~/.cache/voco/sample_data``."""
    return Path(os.environ.get("VOCO_CACHE_DIR") or Path.home() / ".cache" / "voco") / "sample_data"


def fetch(name: str) -> Path:
    """The cached file of sample volume ``name``, downloaded and extracted first if need be."""
    sample = _sample_named(name)
    folder = sample_data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sample.name}{image_suffix(sample.member)}"
    if target.is_file() and sha256_of(target) == sample.sha256:
        return target
    _extract(_cached_wheel(sample, folder), sample, target)
    return target


def fetch_many(names: list[str]) -> list[Path]:
    return [fetch(name) for name in names]


def _sample_named(name: str) -> SampleVolume:
    for sample in SAMPLES:
        if sample.name == name:
            return sample
    raise VocoInputError(f"unknown sample volume '{name}'; known: {', '.join(s.name for s in SAMPLES)}")


def _cached_wheel(sample: SampleVolume, folder: Path) -> Path:
    """The verified wheel of ``sample`` in ``folder``, downloaded unless already there."""
    wheel = folder / sample.wheel
    if wheel.is_file() and sha256_of(wheel) == sample.wheel_sha256:
        return wheel
    with tempfile.TemporaryDirectory(dir=folder) as download_dir:
        _pip_download(sample.requirement, Path(download_dir))
        downloaded = Path(download_dir) / sample.wheel
        if not downloaded.is_file():
            raise VocoInputError(f"pip download of {sample.requirement} gave no {sample.wheel}")
        os.replace(downloaded, wheel)
    _verify(wheel, sample.wheel_sha256)
    return wheel


def _pip_download(requirement: str, download_dir: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    result = subprocess.run([*command, "-d", str(download_dir), requirement], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no error message"]
        raise VocoInputError(f"pip could not download {requirement}: {lines[-1].strip()}")


def _extract(wheel: Path, sample: SampleVolume, target: Path) -> None:
    """Extract ``sample.member`` of ``wheel`` to ``target``, which appears only once verified."""
    with zipfile.ZipFile(wheel) as archive:
        if sample.member not in archive.namelist():
            raise VocoInputError(f"has no member {sample.member}", wheel)
        # A unique name of our own rather than mkstemp's, whose files are private (mode 0600).
        part = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with archive.open(sample.member) as member, open(part, "xb") as out:
                shutil.copyfileobj(member, out)
            _verify(part, sample.sha256, shown_as=f"{wheel.name}:{sample.member}")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)  # a failed extraction leaves nothing behind


def _verify(file: Path, expected: str, shown_as: str | Path | None = None) -> None:
    """Remove ``file`` and raise unless its sha256 is ``expected``."""
    actual = sha256_of(file)
    if actual != expected:
        file.unlink()
        raise VocoInputError(f"sha256 {actual} differs from the expected {expected}; removed it", shown_as or file)
