"""torchrun support: process group from the environment, one device per rank, averaged scalars."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lcsurgery.errors import LCSurgeryError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (identity in a single process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t)

    def parameters_identical(self, model: torch.nn.Module) -> bool:
        """Whether every rank holds bit-identical parameters (a checksum per rank, gathered)."""
        if self.world == 1:
            return True
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973).add_(1)
        mine = torch.stack([flat.sum(), (flat * weights).sum()]).to(self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return all(torch.equal(every[0], e) for e in every[1:])

    def broadcast_gates(self, model: torch.nn.Module) -> None:
        """Rank 0's gate biases on every rank (after rank 0 alone has changed them)."""
        if self.world == 1:
            return
        for name, p in model.named_parameters():
            if name.startswith("lc_gates.") and name.endswith(".bias"):
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N``), or with none the GPU when one is visible and the CPU
    otherwise; a GPU asked for where torch sees none is refused, naming the option."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LCSurgeryError(f"--device {name}: no CUDA device is visible to torch here (torch {torch.__version__})")
    return device


def setup() -> Dist:
    """Join the torchrun job if launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=resolve_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
