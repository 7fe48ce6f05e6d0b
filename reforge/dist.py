"""This process's place among the processes ``torchrun`` or ``accelerate launch`` started, for training and eval alike.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain run is rank 0 of 1 and every collective below
is then a no-op. Eval splits a corpus's cache shards ``r, r + world, ...`` over ranks (`Ranks.owned_shards`) and only
each query's top-k crosses ranks (`Ranks.all_gather_topk`); training sums counters (`all_sum`) and rebuilds strided
arrays (`gather_strided`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from reforge.errors import DataError


@dataclass(frozen=True)
class Ranks:
    """``rank`` of ``world`` (``local`` on its machine). ``owned``: this process started the process group, so it
    ends it (`shutdown`)."""

    rank: int = 0
    world: int = 1
    local: int = 0
    owned: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, scores and reports."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (all absent: a single process). Joins nothing."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)))

    def device(self, requested: str | None) -> str:
        """``requested``, or this rank's GPU (``cuda:<local>``) when CUDA is there, else ``cpu``."""
        if requested:
            return requested
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local}" if self.world > 1 else "cuda"
        return "cpu"

    def owned_shards(self, shard_count: int) -> list[int]:
        """The cache shards this rank encodes and searches: every ``world``-th, starting at ``rank``."""
        return list(range(self.rank, shard_count, self.world))

    def agree(self, what: str, value: Any) -> None:
        """Stop unless every rank holds the same ``value`` (e.g. a corpus hash), before any work starts.

        Raises:
            DataError: on every rank, naming the ranks that differ from rank 0.
        """
        if self.world <= 1:
            return
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DataError(
                f"Ranks disagree on {what}: rank 0 has {values[0]!r}, rank {differ[0]} has {values[differ[0]]!r} "
                f"({len(differ)} of {self.world} ranks differ).",
                hint="Give every rank the same files (a shared folder, or identical copies).",
                path=None,
                line=None,
            )

    def all_gather_topk(self, scores: np.ndarray, rows: np.ndarray, device: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every rank's ``(scores, rows)`` top-k table (same shape on all ranks), in rank order."""
        if self.world <= 1:
            return [(scores, rows)]
        import torch
        import torch.distributed as dist

        where = device if str(device).startswith("cuda") else "cpu"  # NCCL gathers GPU tensors, gloo CPU ones
        mine = [torch.from_numpy(np.ascontiguousarray(a)).to(where) for a in (scores, rows)]
        gathered = []
        for tensor in mine:
            parts = [torch.empty_like(tensor) for _ in range(self.world)]
            dist.all_gather(parts, tensor)
            gathered.append([p.cpu().numpy() for p in parts])
        return list(zip(gathered[0], gathered[1]))


def join(device: str) -> Ranks:
    """This process's `Ranks`, joining the launcher's process group (NCCL for a CUDA ``device``, gloo otherwise)
    unless it is a single process or the group already exists."""
    ranks = Ranks.from_env()
    if ranks.world <= 1:
        return ranks
    import torch.distributed as dist

    if dist.is_initialized():
        return ranks
    # torch.distributed.nn binds `group.WORLD` into its functions' default arguments when first imported, and
    # transformers imports it while loading a model. Imported after the group exists, it keeps the group alive past
    # `shutdown`: gloo's worker threads then outlive the interpreter and abort the process as it exits.
    import torch.distributed.nn  # noqa: F401

    cuda = str(device).startswith("cuda")
    if cuda and ":" in str(device):
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=ranks.rank, world_size=ranks.world)
    return Ranks(ranks.rank, ranks.world, ranks.local, owned=True)


def shutdown(ranks: Ranks) -> None:
    """Leave the process group if this process joined it."""
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


def all_true(flag: bool, ranks: Ranks) -> bool:
    """True when ``flag`` holds on every rank (each rank gets the same answer)."""
    if ranks.world == 1:
        return flag
    import torch.distributed as dist

    flags: list[bool] = [False] * ranks.world
    dist.all_gather_object(flags, flag)
    return all(flags)


def gather_strided(local: np.ndarray, total: int, ranks: Ranks) -> np.ndarray:
    """Rebuild an array of ``total`` items when rank r holds items ``r, r + world, ...``."""
    if ranks.world == 1:
        return local
    import torch.distributed as dist

    parts: list[Any] = [None] * ranks.world
    dist.all_gather_object(parts, local)
    full = np.zeros(total, dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r :: ranks.world] = part
    return full
