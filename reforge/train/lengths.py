"""Token lengths of a training corpus, computed once per corpus and tokenizer and cached on disk.

The batch plan needs every document's token count. Counting means tokenizing the whole corpus (about 130k tokens/s
on 2 CPU cores: over an hour for MS MARCO), and `--dry-run` and `--resume` need the same plan as the run they
describe or continue. So the counts are stored as one ``uint32`` array per key under
``$REFORGE_HOME/cache/token-lengths/<key>.npy`` (4 bytes a document), keyed by the kept documents (the corpus
hash, which covers ids, texts and order), the tokenizer (its full definition, not its name) and the cut
(``max_length``, EOS). Ranks count their strided share in parallel and rank 0 writes the file (temporary name,
rename); a later run reads it when every rank sees it, otherwise all count again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from reforge.dist import Ranks, all_true, gather_strided
from reforge.io.atomic import write_atomic

CACHE_VERSION = 1


def tokenizer_identity(tokenizer) -> str:
    """SHA-256 of what decides token ids: a fast tokenizer's full JSON definition (normalizer, pre-tokenizer, model,
    post-processor), else its vocabulary; plus the class and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # truncation and padding are call settings the tokenizer remembers, not its definition
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        digest.update(json.dumps(definition, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()


def lengths_key(corpus_sha256: str, tokenizer, max_length: int) -> str:
    """The cache key of one corpus, tokenizer and cut."""
    payload = {
        "version": CACHE_VERSION,
        "corpus": corpus_sha256,
        "tokenizer": tokenizer_identity(tokenizer),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_folder() -> Path:
    """``$REFORGE_HOME/cache/token-lengths``."""
    from reforge.io.paths import cache_dir

    return cache_dir("token-lengths")


def cached_token_lengths(
    texts: Sequence[str],
    count: Callable[[Sequence[str]], np.ndarray],
    key: str,
    ranks: Ranks = Ranks(),
    folder: Path | None = None,
) -> tuple[np.ndarray, bool]:
    """Every text's token count, from the cache when every rank finds it, else counted (each rank every
    ``world``-th text) and stored by rank 0. Returns ``(lengths as int64, came from the cache)``."""
    path = (folder or default_folder()) / f"{key}.npy"
    found = _read(path, len(texts))
    if all_true(found is not None, ranks):
        assert found is not None
        return found.astype(np.int64), True
    lengths = gather_strided(count(texts[ranks.rank :: ranks.world]), len(texts), ranks)
    if ranks.rank == 0:
        _write(path, lengths.astype(np.uint32))
    return lengths, False


def _read(path: Path, rows: int) -> np.ndarray | None:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return np.asarray(array) if array.shape == (rows,) and array.dtype == np.uint32 else None


def _write(path: Path, array: np.ndarray) -> None:
    """Atomically; a cache that cannot be written (read-only home, full disk) only costs the next run a recount."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: np.save(f, array))
    except OSError:
        return
