"""Small whole-file tensor maps (an adapter's weights, a training checkpoint's trainable tensors), read and written
through reforge's own readers: safetensors through `ShardReader`, pickle only weights-only (`reforge.io.pickled`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from reforge.io.atomic import write_atomic

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

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    data = save(contiguous, metadata=metadata or {"format": "pt"})
    write_atomic(Path(file), lambda f: f.write(data))


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_peft_adapter(
    folder: str | Path, peft_config, tensors: dict[str, "torch.Tensor"], provenance: dict[str, str] | None = None
) -> None:
    """Write a normal peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) through reforge's
    own tensor writer, so the weights get the same temporary-name-then-rename and a provenance header.

    ``tensors`` is peft's saved form (``get_peft_model_state_dict``); ``provenance`` lands in the safetensors
    ``__metadata__`` beside peft's ``format: pt``, which peft reads back unchanged.
    """
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(peft_config)
    config.inference_mode = True  # what PeftModel.save_pretrained records: the saved adapter is for inference
    config.save_pretrained(str(folder))
    save_tensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt", **(provenance or {})})
