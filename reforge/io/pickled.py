"""Pickle checkpoints (``pytorch_model.bin``), loaded only with ``torch.load(weights_only=True)``.

A pickle file has no header to parse, so its tensor map comes from loading it (memory-mapped: only the pickle's
small object graph is read). The result is an ordinary tensor map, so a pickle checkpoint goes through the same
layout, shape and missing-key checks as safetensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.errors import CorruptCheckpointError, short_path
from reforge.io.format import TensorInfo, safetensors_dtype

if TYPE_CHECKING:
    import torch


def load_state(file: Path) -> dict[str, "torch.Tensor"]:
    """The tensors of one pickle file, loaded weights-only (refuses arbitrary objects) and memory-mapped.

    Raises:
        CorruptCheckpointError: not a weights-only pickle, or not a dict of tensors.
    """
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise CorruptCheckpointError(
            f"{short_path(file)} could not be loaded as a weights-only pickle ({_one_line(e)}).",
            path=file,
            tensor=None,
            reason=str(e),
        ) from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            f"{short_path(file)} does not hold a dict of tensors.", path=file, tensor=None, reason="not a state dict"
        )
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def tensor_infos(file: Path) -> dict[str, TensorInfo]:
    """``{name: TensorInfo}`` for a pickle file; offsets are meaningless (0 and the byte size), the rest is real."""
    infos = {}
    for name, tensor in load_state(file).items():
        try:
            dtype = safetensors_dtype(tensor.dtype)
        except ValueError as e:
            raise CorruptCheckpointError(
                f"{short_path(file)}: tensor {name!r} has dtype {tensor.dtype}, which reforge cannot process.",
                path=file,
                tensor=name,
                reason=str(e),
            ) from e
        infos[name] = TensorInfo(name, file, dtype, tuple(tensor.shape), 0, tensor.numel() * tensor.element_size())
    return infos


def _one_line(error: BaseException) -> str:
    """torch's weights-only errors run over several lines: the line that names the cause (errors are one line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith(("WeightsUnpickler error:", "Unsupported operand"))]
    return (named or lines or [type(error).__name__])[0]
