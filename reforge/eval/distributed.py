"""Ranks for a corpus encode split across processes started by ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` > 1, rank ``r`` owns the cache
shards ``r, r + WORLD_SIZE, ...`` of each corpus (`owned_shards`): it encodes the missing ones, searches them for every
query, and only each query's top-k (row numbers and scores, `all_gather_topk`) crosses ranks. Rank 0 scores and
reports. Before encoding, the ranks compare what they read (`agree`) and stop if they differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from reforge.errors import DataError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that searches, scores and reports."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (all absent: a single process)."""
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    def device(self, requested: str | None) -> str:
        """``requested``, or this rank's GPU (``cuda:<local_rank>``) when CUDA is there, else ``cpu``."""
        if requested:
            return requested
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.world_size > 1 else "cuda"
        return "cpu"

    def start(self, device: str) -> None:
        """Join the process group (NCCL on CUDA, gloo otherwise) unless single-process or already joined."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                import torch

                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        dist.barrier()

    def owned_shards(self, shard_count: int) -> list[int]:
        """The cache shards this rank encodes and searches: every ``world_size``-th, starting at ``rank``."""
        return list(range(self.rank, shard_count, self.world_size))

    def agree(self, what: str, value: Any) -> None:
        """Stop unless every rank holds the same ``value`` (e.g. a corpus hash), before any work starts.

        Raises:
            DataError: on every rank, naming the ranks that differ from rank 0.
        """
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DataError(
                f"Ranks disagree on {what}: rank 0 has {values[0]!r}, rank {differ[0]} has {values[differ[0]]!r} "
                f"({len(differ)} of {self.world_size} ranks differ).",
                hint="Give every rank the same files (a shared folder, or identical copies).",
                path=None,
                line=None,
            )

    def all_gather_topk(self, scores: np.ndarray, rows: np.ndarray, device: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every rank's ``(scores, rows)`` top-k table (same shape on all ranks), in rank order."""
        if self.world_size <= 1:
            return [(scores, rows)]
        import torch
        import torch.distributed as dist

        where = device if device.startswith("cuda") else "cpu"  # NCCL gathers GPU tensors, gloo CPU ones
        mine = [torch.from_numpy(np.ascontiguousarray(a)).to(where) for a in (scores, rows)]
        gathered = []
        for tensor in mine:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor)
            gathered.append([p.cpu().numpy() for p in parts])
        return list(zip(gathered[0], gathered[1]))
