"""What the engine's interpreter can do, as the front ends offer it: devices and missing packages.

The answer comes from ``environment_probe.py`` run by that interpreter in the background
(``ProbeJob``): the GUI never imports torch, and never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .jobs import Job

SMALL_GPU_GB = 8.0
ENVIRONMENT_EVENT = "environment"


@dataclass
class Device:
    id: str  # what --device takes: auto, cuda:N, mps, cpu
    title: str


@dataclass
class EngineEnvironment:
    """The probe's answer. ``missing``: what to install ("torch" first when absent);
    ``problem``: why the engine's Python could not even be asked."""

    devices: list = field(default_factory=lambda: [Device("cpu", "CPU")])
    message: str | None = None
    missing: list = field(default_factory=list)
    problem: str | None = None

    @property
    def ready(self) -> bool:
        return not self.missing and self.problem is None


def environment_from_probe(info: dict) -> EngineEnvironment:
    """Devices, a message for the user and what is missing, from the probe's event."""
    missing = list(info.get("missing") or [])
    if not info.get("torch"):
        return EngineEnvironment(message=f"PyTorch is not installed for the engine ({info.get('problem', '')})",
                                 missing=["torch", *missing])
    devices = [Device("auto", "auto")]
    messages = []
    for gpu in info.get("cuda", []):
        devices.append(Device(f"cuda:{gpu['index']}", f"GPU {gpu['index']}: {gpu['name']} ({gpu['memory_gb']} GB)"))
        if gpu["memory_gb"] < SMALL_GPU_GB:
            messages.append(f"GPU {gpu['index']} has {gpu['memory_gb']} GB: large volumes may fall back to the CPU")
    if info.get("mps"):
        devices.append(Device("mps", "Apple GPU (MPS)"))
    devices.append(Device("cpu", "CPU"))
    if info.get("cuda_build") and not info.get("cuda"):
        messages.append(f"PyTorch {info['torch']} is a CUDA {info['cuda_build']} build but sees no GPU: check the "
                        "NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; running on the CPU")
    elif not info.get("cuda_build") and not info.get("mps") and not info.get("cuda"):
        messages.append(f"PyTorch {info['torch']} is a CPU-only build: the engine runs on the CPU "
                        "(reinstall torch with CUDA through the PyTorch extension to use a GPU)")
    if missing:
        messages.append("missing Python packages: " + ", ".join(missing))
    return EngineEnvironment(devices, "; ".join(messages) or None, missing)


class ProbeJob(Job):
    """The probe as a job; ``environment()`` is its answer once it finished."""

    def __init__(self, client):
        super().__init__("environment", client.probe, status="asking the engine's Python what it has")

    def apply(self, event: dict) -> None:
        if event.get("event") == ENVIRONMENT_EVENT:
            self.result = environment_from_probe(event)
        super().apply(event)

    def environment(self) -> EngineEnvironment:
        """The answer of a finished probe; one that failed offers the CPU and says why."""
        if self.result is not None:
            return self.result
        problem = f"could not ask the engine's Python what it has: {self.error or 'no answer'}"
        return EngineEnvironment(message=problem, problem=problem)
