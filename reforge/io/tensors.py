"""Small whole-file tensor maps (an adapter's weights, a training checkpoint's trainable tensors), read and written
through reforge's own readers: safetensors through `ShardReader`, pickle only weights-only (`reforge.io.pickled`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def load_tensors(file: str | Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of one ``.safetensors`` file (header validated), or of one pickle file (``.bin``/``.pt``, loaded
    with ``weights_only=True``; the caller decides whether pickle is allowed).

    Raises:
        CorruptCheckpointError: a malformed file.
    """
    from reforge.io.index import ShardIndex
    from reforge.io.pickled import load_state
    from reforge.io.reader import ShardReader

    file = Path(file)
    if file.suffix != ".safetensors":
        return load_state(file)
    with ShardReader(ShardIndex.from_files(file.parent, [file])) as reader:
        return {name: reader.get(name) for name in reader.keys()}


def save_tensors(file: str | Path, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file: through a temporary name, renamed when whole, readable by all."""
    from safetensors.torch import save

    file = Path(file)
    temporary = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    temporary.write_bytes(save(contiguous, metadata=metadata or {"format": "pt"}))
    os.replace(temporary, file)
