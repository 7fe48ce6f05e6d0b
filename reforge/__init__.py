"""reforge: readapt LLM-based dense retrievers with unlabeled in-domain text (RE-AdaptIR).

The Python API mirrors the CLI; each name is imported on first use, so ``import reforge`` stays instant:

    >>> import reforge
    >>> reforge.diff("base/", "retriever/", "delta/")                                   # doctest: +SKIP
    >>> reforge.merge("base/", "out/", retriever="retriever/", adapters=[("psi/", 0.5)])  # doctest: +SKIP
    >>> reforge.verify_checkpoint("out/").ok                                             # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "diff": "reforge.ops.diff",
    "merge": "reforge.ops.merge",
    "verify_checkpoint": "reforge.ops.verify",
    "open_checkpoint": "reforge.io.checkpoint",
    "fingerprint": "reforge.io.checkpoint",
    "describe": "reforge.io.describe",
    "evaluate": "reforge.eval",
    "train_adapter": "reforge.train",
    "tune": "reforge.tune",
    "run_recipe": "reforge.recipe",
    "CheckpointWriter": "reforge.io.writer",
    "ShardReader": "reforge.io.reader",
    "ReforgeError": "reforge.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'reforge' has no attribute {name!r}")
