"""Ranks for data-parallel training: read from the environment `torchrun` and `accelerate launch` set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a plain run is rank 0 of 1."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` of ``world`` (``local`` on its machine). ``owned``: we started the process
    group, so we end it."""

    rank: int = 0
    world: int = 1
    local: int = 0
    owned: bool = False

    @property
    def main(self) -> bool:
        """The rank that writes files and reports progress."""
        return self.rank == 0


def init_ranks(device_type: str) -> Ranks:
    """Join the process group the launcher set up (nccl on GPUs, gloo on CPUs); rank 0 of 1 without a launcher."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    return Ranks(rank, world, local, owned)


def shutdown(ranks: Ranks) -> None:
    """Leave the process group if we joined it."""
    import torch.distributed as dist

    if ranks.owned and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """Wait for every rank."""
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_sum(values: list[float], ranks: Ranks, device: Any) -> list[float]:
    """Element-wise sum over ranks (float64, so token counts stay exact)."""
    if ranks.world == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_strided(local: np.ndarray, total: int, ranks: Ranks) -> np.ndarray:
    """Rebuild an array of ``total`` items when rank r holds items ``r, r + world, ...``."""
    if ranks.world == 1:
        return local
    import torch.distributed as dist

    parts: list[Any] = [None] * ranks.world
    dist.all_gather_object(parts, local)
    full = np.zeros(total, dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r::ranks.world] = part
    return full
