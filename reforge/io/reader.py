"""Lazy, tensor-by-tensor reading of a checkpoint folder.

`ShardReader.get` reads one tensor with ``pread`` into memory the tensor owns: no memory map stays open, so the
resident set holds only the tensors the caller keeps. One shard file is open at a time (twice: for ordinary reads,
and with O_DIRECT where the filesystem allows it; see `reforge.io.format.read_tensor`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.io.buffers import BufferPool
from reforge.io.format import TensorInfo, open_direct, read_tensor
from reforge.io.index import ShardIndex
from reforge.io.pickled import load_state

if TYPE_CHECKING:
    import torch


class ShardReader:
    """Read tensors of one checkpoint by name, one at a time.

    Example:
        >>> with ShardReader(ShardIndex.from_dir("model/")) as reader:      # doctest: +SKIP
        ...     weight = reader.get("layers.0.mlp.up_proj.weight")
    """

    def __init__(self, index: ShardIndex, pool: BufferPool | None = None) -> None:
        self.index = index
        self.pool = pool
        self._fd: int | None = None
        self._direct_fd: int | None = None
        self._fd_file: Path | None = None
        self._pickle_file: Path | None = None
        self._pickle_state: dict | None = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def directory(self) -> Path:
        return self.index.directory

    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard, by offset), which is the fastest order to read them."""
        infos = self.index.tensors
        return sorted(infos, key=lambda n: (str(infos[n].file), infos[n].start))

    def __contains__(self, name: str) -> bool:
        return name in self.index.tensors

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of a tensor, without reading it."""
        return self.index.tensors[name]

    def get(self, name: str, rows: slice | None = None) -> "torch.Tensor":
        """The tensor ``name``, read now, in its stored dtype; with ``rows`` (a slice of its first dimension) only
        those rows, read alone: streaming a large tensor piece by piece keeps its memory to a piece."""
        info = self.info(name)
        if self.index.pickle_files:
            tensor = self._pickle_tensor(info)
            return tensor if rows is None else tensor[rows].clone()
        if rows is not None and info.shape:
            info = info.rows(rows)
        fd = self._open(info.file)
        return read_tensor(fd, info, direct_fd=self._direct_fd, pool=self.pool)

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = self._fd_file = None
        self._pickle_state = self._pickle_file = None

    def _open(self, file: Path) -> int:
        if self._fd_file != file:
            self.close()
            self._fd = os.open(file, os.O_RDONLY)
            self._fd_file = file
            self._direct_fd = open_direct(file, os.O_RDONLY)
        assert self._fd is not None
        return self._fd

    def _pickle_tensor(self, info: TensorInfo) -> "torch.Tensor":
        if self._pickle_file != info.file or self._pickle_state is None:
            self._pickle_state = load_state(info.file)
            self._pickle_file = info.file
        return self._pickle_state[info.name].clone()
