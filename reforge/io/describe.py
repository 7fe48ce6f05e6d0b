"""A summary of a checkpoint without reading its tensors: what `reforge inspect` shows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from reforge.io.checkpoint import AdapterCheckpoint, open_checkpoint
from reforge.io.manifest import read_manifest


def describe(ref: str | Path, *, token: str | None = None, allow_pickle: bool = False) -> dict:
    """Kind, architecture, key layout, dtypes, shards and size of a checkpoint (headers only).

    Returns:
        A JSON-able dict: ``kind`` (model, adapter, delta or merge), ``path``, ``architecture``, ``layout``
        (``prefix``, ``head`` tensors, ``tied_embeddings``), ``tensors``, ``parameters``, ``bytes``, ``dtypes``,
        ``files``, and for adapters ``adapter`` (type, r, alpha, targets), for reforge outputs ``reforge``.
    """
    checkpoint = open_checkpoint(ref, token=token, allow_pickle=allow_pickle)
    infos = checkpoint.index.tensors
    summary = {
        "ref": str(ref),
        "path": str(checkpoint.path),
        "kind": checkpoint.kind,
        "tensors": len(infos),
        "parameters": sum(info.numel for info in infos.values()),
        "bytes": sum(info.nbytes for info in infos.values()),
        "dtypes": dict(Counter(info.dtype for info in infos.values()).most_common()),
        "files": [Path(f).name for f in checkpoint.index.files],
    }
    if isinstance(checkpoint, AdapterCheckpoint):
        config = checkpoint.adapter_config
        summary["adapter"] = {
            "type": "DoRA" if config.get("use_dora") else config.get("peft_type", "LORA"),
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "target_modules": config.get("target_modules"),
            "base": checkpoint.base_ref,
            "use_rslora": bool(config.get("use_rslora")),
        }
    else:
        config = checkpoint.config or {}
        summary["architecture"] = checkpoint.architecture
        summary["layout"] = {
            "prefix": checkpoint.layout.prefix,
            "head": sorted(checkpoint.layout.head),
            "bare": checkpoint.layout.is_bare,
            "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        }
    manifest = read_manifest(checkpoint.path)
    if manifest is not None:
        summary["kind"] = manifest.get("kind", summary["kind"])
        summary["reforge"] = {
            k: manifest.get(k)
            for k in (
                "state",
                "reforge_version",
                "base",
                "retriever",
                "adapters",
                "beta",
                "dtype",
                "max_abs_rounding",
                "command",
            )
            if manifest.get(k) is not None
        }
    return summary
