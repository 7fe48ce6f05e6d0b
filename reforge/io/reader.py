"""Lazy, tensor-by-tensor reading of a checkpoint folder.

`ShardReader.get` reads one tensor with ``pread`` into memory the tensor owns: no memory map stays open, so the
resident set holds only the tensors the caller keeps. One shard file is open at a time (twice: for ordinary reads,
and with O_DIRECT where the filesystem allows it; see `reforge.io.format.read_tensor`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.errors import CorruptCheckpointError, short_path
from reforge.io.buffers import BufferPool
from reforge.io.format import TensorInfo, open_direct, read_tensor, safetensors_dtype
from reforge.io.index import ShardIndex

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
        self._pickle_infos: dict[str, TensorInfo] | None = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def directory(self) -> Path:
        return self.index.directory

    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard, by offset), which is the fastest order to read them."""
        infos = self._infos()
        return sorted(infos, key=lambda n: (str(infos[n].file), infos[n].start))

    def __contains__(self, name: str) -> bool:
        return name in self._infos()

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of a tensor, without reading it."""
        return self._infos()[name]

    def get(self, name: str) -> "torch.Tensor":
        """The tensor ``name``, read now, in its stored dtype."""
        info = self.info(name)
        if self.index.pickle_files:
            return self._pickle_tensor(info)
        fd = self._open(info.file)
        return read_tensor(fd, info, direct_fd=self._direct_fd, pool=self.pool)

    def iter_tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield ``(name, tensor)`` for every tensor, in file order."""
        for name in self.keys():
            yield name, self.get(name)

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

    def _infos(self) -> dict[str, TensorInfo]:
        if not self.index.pickle_files:
            return self.index.tensors
        if self._pickle_infos is None:
            self._pickle_infos = {}
            for file in self.index.pickle_files:
                for name, tensor in self._load_pickle(file).items():
                    self._pickle_infos[name] = TensorInfo(
                        name,
                        file,
                        safetensors_dtype(tensor.dtype),
                        tuple(tensor.shape),
                        0,
                        tensor.numel() * tensor.element_size(),
                    )
                self._pickle_state = None  # keep only one pickle file loaded
        return self._pickle_infos

    def _pickle_tensor(self, info: TensorInfo) -> "torch.Tensor":
        if self._pickle_file != info.file or self._pickle_state is None:
            self._pickle_state = self._load_pickle(info.file)
            self._pickle_file = info.file
        return self._pickle_state[info.name].clone()

    @staticmethod
    def _load_pickle(file: Path) -> dict:
        import pickle

        import torch

        try:  # weights_only refuses arbitrary objects; mmap keeps a large file out of memory until used
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise CorruptCheckpointError(
                f"{short_path(file)} could not be loaded as a weights-only pickle ({e}).",
                path=file,
                tensor=None,
                reason=str(e),
            ) from e
        if not isinstance(state, dict):
            raise CorruptCheckpointError(
                f"{short_path(file)} does not hold a dict of tensors.",
                path=file,
                tensor=None,
                reason="not a state dict",
            )
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

