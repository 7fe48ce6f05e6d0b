"""Ranks for a corpus encode split across processes started by ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE`` > 1 every rank encodes a shard
of each corpus into the cache (see `reforge.eval.encode.shard_indices`), and rank 0 merges the shards, encodes the
queries, searches and scores. Ranks meet at a barrier after each corpus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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
