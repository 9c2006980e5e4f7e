"""The CUDA paths: AMP pretraining and fine-tuning, segmentation on the GPU agreeing with the CPU,
and the out-of-memory fallback (smaller window batches, then the CPU). Skipped without a GPU;
run on a GPU machine with ``python -m pytest Testing/python/test_gpu.py``."""

from __future__ import annotations

import json

import numpy as np
import nibabel as nib
import pytest
import torch

from conftest import events, run_voco
from voco.models.segmentation import build_segmentation_network
from voco.registry.package import Label, ModelCard, Preprocessing, write_package

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _package(folder, architecture: str, patch: int, seed: int = 0):
    torch.manual_seed(seed)
    network = build_segmentation_network(architecture, 1, 3)
    card = ModelCard(name=f"gpu-{architecture}", version="1", architecture=architecture, in_channels=1,
                     labels=[Label(1, "a", "#ff0000"), Label(2, "b", "#00ff00")],
                     preprocessing=Preprocessing(modality="ct", spacing=(1.0, 1.0, 1.0), patch_size=(patch,) * 3))
    return write_package(folder, card, network.state_dict())


def test_pretraining_runs_with_amp_on_cuda(tmp_path, shipped):
    result = run_voco("pretrain", "--data", shipped["mni152-t1"], shipped["spine-ct"], "--out", tmp_path / "run",
                      "--backbone", "swinunetr-b", "--steps", "3", "--checkpoint-every", "3", "--device", "cuda",
                      "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    steps = [e for e in events(result.stdout) if e["event"] == "step"]
    assert len(steps) == 3 and all(np.isfinite(e["loss"]) for e in steps)
    assert [e for e in events(result.stdout) if e["event"] == "start"][0]["device"].startswith("cuda")


def test_segmentation_on_cuda_agrees_with_cpu(tmp_path, shipped):
    package = _package(tmp_path / "model", "swinunetr-tiny", 64)
    outputs = {}
    for device in ("cuda", "cpu"):
        outputs[device] = tmp_path / f"{device}.nii.gz"
        result = run_voco("segment", shipped["spine-ct"], outputs[device], "--model", package.folder,
                          "--device", device, "--progress", "jsonl")
        assert result.returncode == 0, result.stderr
    a, b = (np.asarray(nib.load(str(outputs[d])).dataobj) for d in ("cuda", "cpu"))
    # AMP (fp16) on the GPU against float32 on the CPU: the argmax may flip where classes tie.
    assert (a == b).mean() > 0.99


def test_out_of_memory_falls_back_to_smaller_batches_then_cpu(tmp_path, shipped):
    package = _package(tmp_path / "model", "swinunetr-b", 96)
    script = (
        "import sys, torch; from voco.cli import main; "
        "torch.cuda.set_per_process_memory_fraction(0.012); "  # ~1 GB of 80: the B weights fit, a 96^3 window does not
        f"sys.exit(main(['segment', '{shipped['spine-ct']}', '{tmp_path / 'seg.nii.gz'}', '--model', "
        f"'{package.folder}', '--device', 'cuda', '--batch-size', '4', '--progress', 'jsonl']))"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [e["message"] for e in events(result.stdout) if e["event"] == "warning"]
    assert any("retrying with 2 windows" in w for w in warnings), warnings
    assert any("continuing on the CPU" in w for w in warnings), warnings
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["device"] == "cpu"
    assert nib.load(str(tmp_path / "seg.nii.gz")).shape == nib.load(str(shipped["spine-ct"])).shape


def test_reading_and_preprocessing_on_the_gpu_give_the_cpu_tensors(shipped):
    """segment()'s device path: the voxels cross as they are and become float32 on the GPU, and the
    MONAI transforms run there (float64 resampling: equal up to the last bits)."""
    from voco.data.volumes import Preprocessing, preprocess, read_volume

    cpu, gpu = read_volume(shipped["spine-ct"]), read_volume(shipped["spine-ct"], "cuda")
    assert gpu.device.type == "cuda" and gpu.is_contiguous()
    assert torch.equal(gpu.cpu().as_tensor(), cpu.as_tensor()) and torch.equal(gpu.affine, cpu.affine)
    steps = Preprocessing(modality="ct", spacing=(1.5, 1.5, 1.5))
    (a, a_affine, _), (b, b_affine, _) = preprocess(cpu, steps), preprocess(gpu, steps)
    assert b.device.type == "cuda"
    np.testing.assert_allclose(b_affine, a_affine)
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-5)
