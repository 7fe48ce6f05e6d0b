"""Small whole-file tensor maps (an adapter's weights, a training checkpoint's trainable tensors), read and written
through reforge's own readers: safetensors through `ShardReader`, pickle only weights-only (`reforge.io.pickled`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.io.atomic import write_atomic

if TYPE_CHECKING:
    import torch


def all_finite(tensor: "torch.Tensor") -> bool:
    """True when ``tensor`` holds no NaN or Inf (non-floating and empty tensors always do).

    The one finite check of reforge (train's checkpoints, eval's loaded models, adapters, merge's inputs, verify):
    one pass computing min and max, which NaN and Inf both propagate to, where ``torch.isfinite(t).all()`` first
    fills a boolean tensor of the same size.
    """
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def first_non_finite(tensors: Iterable[tuple[str, "torch.Tensor"]]) -> str | None:
    """The name of the first ``(name, tensor)`` pair whose tensor holds a NaN or Inf (`all_finite`), or None."""
    for name, tensor in tensors:
        if not all_finite(tensor):
            return name
    return None


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
    """Write ``tensors`` as one safetensors file: through a temporary name, renamed when whole, readable by all.
    The same tensors and metadata always give the same bytes (see `_canonical_header`)."""
    from safetensors.torch import save

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    data = _canonical_header(save(contiguous, metadata=metadata or {"format": "pt"}))
    write_atomic(Path(file), lambda f: f.write(data))


def _canonical_header(data: bytes) -> bytes:
    """``data`` with its ``__metadata__`` keys in sorted order. safetensors keeps metadata in a Rust HashMap, whose
    order changes from process to process: two runs writing the same adapter gave different bytes (and sha256).
    The header keeps its length (same keys and values, space-padded as safetensors pads it), so no offset moves."""
    import json
    import struct

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" not in header:
        return data
    header = {**header, "__metadata__": dict(sorted(header["__metadata__"].items()))}  # its place kept: first
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # never: the same JSON in another order; keep safetensors' own bytes if it ever is
        return data
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_peft_adapter(
    folder: str | Path, peft_config, tensors: dict[str, "torch.Tensor"], provenance: dict[str, str] | None = None
) -> None:
    """Write a normal peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) through reforge's
    own tensor writer, so the weights get the same temporary-name-then-rename and a provenance header.

    ``tensors`` is peft's saved form (``get_peft_model_state_dict``); ``provenance`` lands in the safetensors
    ``__metadata__`` beside peft's ``format: pt``, which peft reads back unchanged.

    Raises:
        NonFiniteError: a tensor holds a NaN or Inf (named); nothing is written.
    """
    import copy

    from reforge.errors import NonFiniteError, short_path

    folder = Path(folder)
    name = first_non_finite(tensors.items())  # checked before anything is written: a NaN adapter is never an output
    if name is not None:
        raise NonFiniteError(
            f"Not writing the adapter {short_path(folder)}: {name} holds a NaN or Inf (training diverged).",
            hint="Lower --lr (or raise --warmup-steps), or check the corpus, and train again.",
            tensor=name,
            path=folder,
        )
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(peft_config)
    config.inference_mode = True  # what PeftModel.save_pretrained records: the saved adapter is for inference
    if isinstance(config.target_modules, set):  # peft keeps a set: written in hash order, new every process
        config.target_modules = sorted(config.target_modules)
    config.save_pretrained(str(folder))
    save_tensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt", **(provenance or {})})
