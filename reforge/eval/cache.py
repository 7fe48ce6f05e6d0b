"""On-disk cache of embeddings, keyed by model content, text content and encoding settings.

Layout under ``$REFORGE_HOME/cache/embeddings`` (``REFORGE_HOME`` defaults to ``~/.cache/reforge``)::

    <key>.npy                      float32 (n, dim), rows in text order
    <key>.json                     what the key stands for (model, dataset, settings), for people and `reforge` itself
    <key>.shard-<r>-of-<w>.npz     one rank's part of a distributed encode (``indices`` + ``vectors``), merged by rank 0

Every file is written to a temporary name in the same folder and renamed into place, so a reader never sees half a
file and an interrupted run leaves no corrupt entry. Delete the folder at any time to clear the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CACHE_FORMAT = 1


def reforge_home() -> Path:
    """``$REFORGE_HOME``, or ``~/.cache/reforge`` (`reforge.io.checkpoint.env_home`)."""
    from reforge.io.checkpoint import env_home

    return Path(env_home()).expanduser()


def embedding_key(*, model_fingerprint: str, texts_hash: str, settings: dict[str, Any]) -> str:
    """The cache key: SHA-256 of the model fingerprint, the texts' hash and the settings that change vectors."""
    payload = json.dumps(
        {"format": CACHE_FORMAT, "model": model_fingerprint, "texts": texts_hash, "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def texts_hash(texts: list[str]) -> str:
    """SHA-256 over a list of texts (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


class EmbeddingCache:
    """Embedding arrays in one folder (default: ``reforge_home() / "cache" / "embeddings"``)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else reforge_home() / "cache" / "embeddings"

    def path(self, key: str) -> Path:
        """Where the array for ``key`` lives."""
        return self.folder / f"{key}.npy"

    def load(self, key: str, rows: int) -> np.ndarray | None:
        """The cached array, memory-mapped read-only, or None when absent, damaged or not ``rows`` long (then the
        caller re-encodes and replaces it). Only the header is read here."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        ok = array.ndim == 2 and array.shape[0] == rows and array.dtype == np.float32
        return array if ok else None

    def save(self, key: str, array: np.ndarray, meta: dict[str, Any]) -> Path:
        """Store ``array`` (and ``meta`` as JSON) atomically; returns the array's path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.folder / f"{key}.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
        _atomic_write(self.path(key), lambda f: np.save(f, np.ascontiguousarray(array, dtype=np.float32)))
        return self.path(key)

    def shard_path(self, key: str, rank: int, world_size: int) -> Path:
        """Where rank ``rank`` of ``world_size`` leaves its part of a distributed encode."""
        return self.folder / f"{key}.shard-{rank}-of-{world_size}.npz"

    def save_shard(self, key: str, rank: int, world_size: int, indices: list[int], vectors: np.ndarray) -> Path:
        """Store one rank's rows (with their indices) atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.shard_path(key, rank, world_size)
        _atomic_write(
            path,
            lambda f: np.savez(
                f, indices=np.asarray(indices, dtype=np.int64), vectors=np.asarray(vectors, dtype=np.float32)
            ),
        )
        return path

    def merge_shards(self, key: str, world_size: int, rows: int, meta: dict[str, Any]) -> np.ndarray:
        """Assemble the shards of all ranks into the full array, save it, and delete the shards.

        Raises:
            FileNotFoundError: a rank's shard is missing.
            ValueError: the shards do not cover every row exactly once.
        """
        parts = [np.load(self.shard_path(key, r, world_size)) for r in range(world_size)]
        dim = next((p["vectors"].shape[1] for p in parts if p["vectors"].size), 0)
        array = np.empty((rows, dim), dtype=np.float32)
        seen = np.zeros(rows, dtype=bool)
        for part in parts:
            indices = part["indices"]
            if seen[indices].any():
                raise ValueError(f"shards of {key} overlap")
            seen[indices] = True
            array[indices] = part["vectors"]
        if not seen.all():
            raise ValueError(f"shards of {key} miss {int((~seen).sum())} rows")
        self.save(key, array, meta)
        for r in range(world_size):
            self.shard_path(key, r, world_size).unlink(missing_ok=True)
        return array


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
