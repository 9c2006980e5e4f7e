"""One code path for 1 process, N processes and N nodes: ``torchrun`` sets RANK / WORLD_SIZE /
LOCAL_RANK and the rendezvous; a plain ``voco pretrain`` is simply a world of one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import VocoInputError


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (for reporting: every rank computes its own batch's losses)."""
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one: ranks must agree when to stop."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
            raise VocoInputError(f"--device {name}: torch {torch.__version__} ({build}) sees no CUDA GPU; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise VocoInputError("--device mps: Apple MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise VocoInputError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def init_distributed(device_name: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
