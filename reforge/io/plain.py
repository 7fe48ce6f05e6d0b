"""A second, deliberately plain way to read checkpoint tensors: the safetensors library itself.

`reforge verify`'s independent check reads its inputs here, not through `reforge.io.reader` (pread, O_DIRECT,
pooled buffers, our own header parser), so that a bug in that fast path cannot confirm its own output. The index is
read with ``json`` and nothing else; pickle weights are not read here (the check reports them as not recomputed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_INDEXES = ("model.safetensors.index.json",)
_SINGLES = ("model.safetensors", "adapter_model.safetensors")


class PlainReader:
    """``name -> tensor`` for the safetensors weights of one folder, read with ``safetensors.safe_open``.

    ``names`` is empty when the folder has no safetensors weights (a pickle checkpoint).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        for index in _INDEXES:
            if (self.folder / index).is_file():
                weight_map = json.loads((self.folder / index).read_text())["weight_map"]
                self.files = {name: self.folder / file for name, file in weight_map.items()}
                return
        for single in _SINGLES:
            if (self.folder / single).is_file():
                from safetensors import safe_open

                with safe_open(self.folder / single, framework="pt") as handle:
                    self.files = dict.fromkeys(handle.keys(), self.folder / single)
                return

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> "torch.Tensor":
        """The tensor ``name`` as safetensors loads it."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)
