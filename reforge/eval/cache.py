"""On-disk cache of embeddings in fixed-size shards, keyed by model content, text content and encoding settings.

Layout under ``$REFORGE_HOME/cache/embeddings`` (``REFORGE_HOME`` defaults to ``~/.cache/reforge``)::

    <key>/meta.json            the layout (rows, shard size, dtype), fixed by the first writer, and what the key
                               stands for (model, dataset, settings)
    <key>/00000.npy            shard 0: rows [0, shard_docs) as a plain (rows, dim) array, memory-mappable
    <key>/00000.ids.json       shard 0's rows (start, count), the SHA-256 of its .npy and its document ids

Shard ``s`` holds rows ``[s * shard_docs, (s + 1) * shard_docs)`` of the text order, whatever the number of ranks
that wrote it, so an entry written by 8 GPUs is read by 1 and an interrupted encode resumes at the first missing
shard. float16 and float32 shards are ordinary ``.npy`` files; numpy has no bfloat16, so bfloat16 shards hold the
upper 16 bits of each float32 (round to nearest even) as ``uint16`` and `Shard.block` widens them back (exact:
bfloat16 is float32 with the low 16 bits dropped).

Nothing is reused unless it is the same: the key holds the model's content key and the corpus hash; the first
writer's ``meta.json`` fixes the shard size for every later writer (`EmbeddingCache.claim`), so two runs with
different ``--shard-docs`` write the same shards; a shard is used only when its bytes match the SHA-256 recorded
beside it (hashed while it was written; read back once per file identity, `reforge.io.checkpoint.file_sha256`
remembers it) and its stored ids are the
corpus's ids for its rows. Anything else (missing, truncated, wrong shape, garbage of the right shape, another
layout's rows) counts as not there, is encoded again, and `Entry.rejected` says why.

Every file is written to a temporary name in the same folder and renamed into place (the vectors first, the ids and
checksum last, so a shard counts only when whole). Entries of the first format (``<key>.npy``, one float32 array) are
converted on first use (`EmbeddingCache.convert_legacy`). Delete the folder at any time to clear the cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from reforge.errors import DiskFullError, InvalidOptionError, ShardNotFoundError
from reforge.io.atomic import write_atomic
from reforge.io.checkpoint import file_identity, file_sha256, remember_sha256

CACHE_FORMAT = 3  # 3: a checksum, the rows and the ids beside every shard
EMBEDDING_DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_SHARD_DOCS = 65_536  # 512 MiB at 4096 dims in float16, 96 MiB at 768
LEGACY_PIECE = 8192  # rows of a first-format entry widened at a time while converting it
READ_BYTES = 4 * 2**20  # stored bytes read and widened at a time: the scratch stays in the CPU cache
FLOAT16_MAX = 65504.0
_STORED = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def default_embedding_dtype(dim: int) -> str:
    """float16 from 1024 dimensions up (halves disk and the bytes every search scans; nDCG@10 moves by < 0.001,
    see docs/eval.md), float32 below, where a corpus is small enough that exact vectors cost little."""
    return "float16" if dim >= 1024 else "float32"


def embedding_key(
    *, model_fingerprint: str, texts_hash: str, settings: dict[str, Any], version: int = CACHE_FORMAT
) -> str:
    """The cache key: SHA-256 of the model fingerprint, the texts' hash and the settings that change vectors."""
    payload = json.dumps(
        {"format": version, "model": model_fingerprint, "texts": texts_hash, "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    """SHA-256 over a list of texts (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def stored_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a shard of ``dtype`` is stored as (bfloat16: uint16)."""
    return np.dtype(_STORED[dtype])


def to_stored(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """float32 vectors in the on-disk representation of ``dtype`` (bfloat16: uint16 upper halves, rounded).

    Raises:
        InvalidOptionError: float16 was asked for vectors beyond its range (±65504).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if dtype == "float32":
        return vectors
    if dtype == "float16":
        if vectors.size and float(np.abs(vectors).max()) > FLOAT16_MAX:
            raise InvalidOptionError(
                f"Embeddings reach {float(np.abs(vectors).max()):.3g}, beyond float16's range (±65504).",
                hint="Pass --embedding-dtype bfloat16 or float32.",
                option="--embedding-dtype",
            )
        return vectors.astype(np.float16)
    bits = vectors.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def widen(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Write stored rows ``raw`` (`to_stored`'s representation of ``dtype``) into float32 ``out``, exactly."""
    if dtype == "bfloat16":
        np.left_shift(raw, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    elif dtype == "float16":  # torch widens with F16C: ~7x numpy's cast
        import torch

        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(raw)))
    else:
        np.copyto(out, raw)


def from_stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows from a stored block (`to_stored`'s inverse, exact for every dtype)."""
    if dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "float16" and array.size >= 2**20:  # torch widens on every core: ~5x numpy's one-thread cast
        import warnings

        import torch

        with warnings.catch_warnings():  # a read-only memory map: torch only reads it here
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(array)).float().numpy()
    return np.asarray(array, dtype=np.float32)


@dataclass(frozen=True)
class Shard:
    """One stored shard: rows ``[start, start + rows)`` of the entry, its vectors ``offset`` bytes into ``path``."""

    path: Path
    start: int
    rows: int
    dtype: str
    offset: int = 0

    def array(self) -> np.ndarray:
        """The stored array, memory-mapped read-only (bfloat16 shards come back as uint16)."""
        return np.load(self.path, mmap_mode="r")

    def read_into(self, at: int, stop: int, out: np.ndarray) -> None:
        """Rows ``[at, stop)`` of this shard, widened to float32, into ``out`` (``(stop - at, dim)`` float32).

        The bytes are read (``readinto``, no memory map to fault in) and widened in pieces of `READ_BYTES` through
        one small scratch buffer that stays in the CPU cache, so nothing the size of the shard is allocated.
        """
        stored = np.dtype(_STORED[self.dtype])
        dim = out.shape[1]
        step = max(1, READ_BYTES // (stored.itemsize * dim))
        scratch = np.empty((min(step, stop - at), dim), dtype=stored)
        with open(self.path, "rb", buffering=0) as file:
            for row in range(at, stop, step):
                count = min(step, stop - row)
                raw = scratch[:count]
                file.seek(self.offset + row * dim * stored.itemsize)
                if file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                    raise ShardNotFoundError(
                        f"Embedding shard {self.path} ended early (row {row + count} of {self.rows}).",
                        hint="Run the evaluation again: damaged shards are re-encoded.",
                        path=self.path,
                        index=self.path.parent / "meta.json",
                    )
                widen(raw, self.dtype, out[row - at : row - at + count])

    def ids(self) -> list[str]:
        """The document ids of this shard's rows."""
        return json.loads(self.path.with_name(self.path.name.replace(".npy", ".ids.json")).read_text())


@dataclass(frozen=True)
class Entry:
    """One cache entry: ``rows`` vectors in shards of ``shard_docs`` rows stored as ``dtype``.

    ``expected_ids(start, stop)``, when given, returns the `reforge.data.lazy.id_hash` of the documents a shard of
    rows ``[start, stop)`` must hold; a shard whose stored ids differ is not used. ``rejected`` says, per shard
    index, why a shard found on disk was not used (and will be encoded again).
    """

    folder: Path
    rows: int
    shard_docs: int
    dtype: str
    expected_ids: Callable[[int, int], np.ndarray] | None = field(default=None, repr=False, compare=False)
    rejected: dict[int, str] = field(default_factory=dict, repr=False, compare=False)
    _verified: dict[int, tuple] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shard_count(self) -> int:
        """Number of shards the entry has when complete."""
        return max(1, -(-self.rows // self.shard_docs))

    def bounds(self, index: int) -> tuple[int, int]:
        """``(first row, row count)`` of shard ``index``."""
        start = index * self.shard_docs
        return start, max(0, min(self.shard_docs, self.rows - start))

    def shard_path(self, index: int) -> Path:
        """Where shard ``index``'s vectors live (its ids and checksum are beside it, ``.ids.json``)."""
        return self.folder / f"{index:05d}.npy"

    def sidecar_path(self, index: int) -> Path:
        """Shard ``index``'s ``{start, rows, sha256, ids}`` (written after its vectors)."""
        return self.folder / f"{index:05d}.ids.json"

    def shard(self, index: int, dim: int | None = None) -> Shard | None:
        """Shard ``index`` if it is on disk and sound, else None (and, if it is there but unsound, why in
        ``rejected``): right shape and dtype, written for these rows, its SHA-256 as recorded (checked once per file
        identity) and, with ``expected_ids``, the ids of these rows of the corpus."""
        path = self.shard_path(index)
        start, rows = self.bounds(index)
        if self.dtype not in _STORED or not path.exists():  # "auto": no shard written yet
            return None
        problem = self._problem(index, start, rows, dim)
        if problem is not None:
            self.rejected[index] = problem
            return None
        self.rejected.pop(index, None)
        return Shard(path, start, rows, self.dtype, offset=self._verified[index][1])

    def _problem(self, index: int, start: int, rows: int, dim: int | None) -> str | None:
        path = self.shard_path(index)
        try:
            identity = (file_identity(path.stat()), file_identity(self.sidecar_path(index).stat()))
        except OSError:
            return "its ids and checksum are missing or unreadable"
        verified = self._verified.get(index)
        if verified is not None and verified[0] == identity and (dim is None or verified[2] == dim):
            return None  # checked in this process, and neither file has changed since
        sidecar = self._sidecar(index)
        if sidecar is None:
            return "its ids and checksum are missing or unreadable"
        if sidecar.get("start") != start or sidecar.get("rows") != rows or len(sidecar.get("ids", ())) != rows:
            return f"it was written for rows {sidecar.get('start')}+{sidecar.get('rows')}, not {start}+{rows}"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return "it cannot be read as an array"
        if not (
            array.ndim == 2
            and array.shape[0] == rows
            and array.dtype == np.dtype(_STORED[self.dtype])
            and array.flags.c_contiguous  # rows are read by byte offset
            and (dim is None or array.shape[1] == dim)
        ):
            return f"its array is {array.dtype} {array.shape}, not {self.dtype} ({rows}, {dim or 'd'})"
        if file_sha256(path, records={}) != sidecar.get("sha256"):
            return "its bytes do not match their recorded SHA-256"
        if self.expected_ids is not None:
            from reforge.data.lazy import id_hash

            stored = np.fromiter((id_hash(str(i)) for i in sidecar["ids"]), dtype=np.uint64, count=rows)
            if not np.array_equal(stored, self.expected_ids(start, start + rows)):
                return "its document ids are not the corpus's ids for these rows"
        self._verified[index] = (identity, int(array.offset), int(array.shape[1]))
        return None

    def _sidecar(self, index: int) -> dict | None:
        try:
            value = json.loads(self.sidecar_path(index).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) and isinstance(value.get("ids"), list) else None

    def shard_ids(self, index: int) -> list[str] | None:
        """The ids stored beside shard ``index`` (None when they are not here or not the right count)."""
        sidecar = self._sidecar(index)
        ids = sidecar["ids"] if sidecar is not None else None
        return ids if ids is not None and len(ids) == self.bounds(index)[1] else None

    def missing(self, indices: Sequence[int] | None = None) -> list[int]:
        """The shards among ``indices`` (default: all) that are not on disk sound, in order (see ``rejected``)."""
        wanted = range(self.shard_count) if indices is None else indices
        dim = self.dim()
        return [i for i in wanted if self.shard(i, dim) is None]

    def dim(self) -> int | None:
        """Vector width, from the first shard on disk with a 2-D array (None when there is none)."""
        for index in range(self.shard_count):
            try:
                array = np.load(self.shard_path(index), mmap_mode="r")
            except (OSError, ValueError):
                continue
            if array.ndim == 2:
                return int(array.shape[1])
        return None

    def shards(self, indices: Sequence[int] | None = None) -> list[Shard]:
        """The shards among ``indices`` (default: all), each checked sound.

        Raises:
            ShardNotFoundError: one is missing or damaged (encode them first; `missing` lists them).
        """
        wanted = range(self.shard_count) if indices is None else indices
        dim = self.dim()
        found = []
        for index in wanted:
            shard = self.shard(index, dim)
            if shard is None:
                why = self.rejected.get(index)
                raise ShardNotFoundError(
                    f"Embedding shard {self.shard_path(index)} is missing or damaged" + (f" ({why})." if why else "."),
                    hint="Run the evaluation again: missing shards are re-encoded.",
                    path=self.shard_path(index),
                    index=self.folder / "meta.json",
                )
            found.append(shard)
        return found

    def write_shard(self, index: int, vectors: np.ndarray, ids: Sequence[str]) -> Path:
        """Store shard ``index`` (float32 ``vectors`` converted to the entry's dtype, or vectors already in its
        stored form, `to_stored`; then its ids and the SHA-256 of its file, hashed while it is written) atomically.

        Raises:
            DiskFullError: the disk filled up (nothing is left under a final name; earlier shards stay).
        """
        start, rows = self.bounds(index)
        if vectors.shape[0] != rows or len(ids) != rows:
            raise ValueError(f"shard {index} needs {rows} rows, got {vectors.shape[0]} vectors and {len(ids)} ids")
        stored = vectors if vectors.dtype == _STORED[self.dtype] else to_stored(vectors, self.dtype)
        path = self.shard_path(index)
        digest = hashlib.sha256()
        sidecar = self.sidecar_path(index)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            sidecar.unlink(missing_ok=True)  # the vectors are replaced: their old checksum no longer holds
            write_atomic(path, lambda f: np.save(_Hashing(f, digest), stored))
            written = path.stat()
            facts = {"start": start, "rows": rows, "sha256": digest.hexdigest(), "ids": list(ids)}
            write_atomic(sidecar, lambda f: f.write(json.dumps(facts).encode()))
            if file_identity(path.stat()) == file_identity(written):  # no other writer replaced it meanwhile
                remember_sha256(path, digest.hexdigest(), written)  # hashed as written: nobody reads it to check
        except OSError as e:
            if not sidecar.is_file():
                path.unlink(missing_ok=True)
            if e.errno not in _FULL:
                raise
            raise DiskFullError(
                f"The disk filled up while writing embedding shard {path} ({stored.nbytes} bytes).",
                hint="Free space, or point --cache-dir at a larger disk; finished shards are kept and reused.",
                path=path,
                needed=stored.nbytes,
                free=None,
            ) from e
        return path


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file-size limit, met as a full disk is


@contextmanager
def _full_disk_said(path: Path) -> Iterator[None]:
    """An OSError of a full disk while writing ``path`` becomes a `DiskFullError` naming it; others pass."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL:
            raise
        raise DiskFullError(
            f"The disk filled up while writing {path}.",
            hint="Free space, or point --cache-dir at a larger disk; finished shards are kept and reused.",
            path=path,
            needed=None,
            free=None,
        ) from e


class _Hashing:
    """A write-only file that hashes what passes through it (numpy writes a non-OS file in 16 MiB pieces)."""

    def __init__(self, file: Any, digest: Any) -> None:
        self.file, self.digest = file, digest

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.file.write(data)


def _meta_facts(entry: Entry, meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "rows": entry.rows, "shard_docs": entry.shard_docs, "dtype": entry.dtype, "format": CACHE_FORMAT}


class EmbeddingCache:
    """Sharded embedding entries in one folder (default: ``$REFORGE_HOME/cache/embeddings``)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        from reforge.io.paths import cache_dir

        self.folder = Path(folder) if folder is not None else cache_dir("embeddings")

    def entry(self, key: str, rows: int, *, shard_docs: int = DEFAULT_SHARD_DOCS, dtype: str = "float32") -> Entry:
        """The entry for ``key`` (its shards may or may not be on disk yet)."""
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding dtype {dtype!r} is not one of {', '.join(EMBEDDING_DTYPES)}")
        return Entry(self.folder / key, rows, max(1, shard_docs), dtype)

    def describe(self, entry: Entry, meta: dict[str, Any]) -> None:
        """Write ``meta.json`` beside the shards (what the key stands for, for people; the layout, for readers)."""
        entry.folder.mkdir(parents=True, exist_ok=True)
        facts = _meta_facts(entry, meta)
        with _full_disk_said(entry.folder / "meta.json"):
            write_atomic(entry.folder / "meta.json", lambda f: f.write(json.dumps(facts, indent=2).encode()))

    def claim(self, entry: Entry, meta: dict[str, Any]) -> Entry:
        """The layout every writer of this entry uses: the first writer's ``meta.json`` is created exclusively (a
        hard link of a whole temporary file, so no reader sees half of it) and the others adopt its shard size and,
        once settled, its dtype. Two evaluations with different ``--shard-docs`` then write the same shards instead
        of overwriting each other's rows.
        """
        entry.folder.mkdir(parents=True, exist_ok=True)
        target = entry.folder / "meta.json"
        if not target.is_file():
            facts = json.dumps(_meta_facts(entry, meta), indent=2).encode()
            temporary = entry.folder / f".meta.{os.getpid()}.{id(entry)}.tmp"
            with _full_disk_said(target):
                write_atomic(temporary, lambda f: f.write(facts))
            try:
                os.link(temporary, target)
            except FileExistsError:
                pass
            finally:
                temporary.unlink(missing_ok=True)
        try:
            found = json.loads(target.read_text())
            shard_docs, dtype = int(found["shard_docs"]), str(found["dtype"])
        except (OSError, ValueError, KeyError, TypeError):  # damaged: this writer's layout, written anew
            self.describe(entry, meta)
            return entry
        if int(found.get("rows", -1)) != entry.rows or shard_docs < 1:
            self.describe(entry, meta)
            return entry
        return replace(entry, shard_docs=shard_docs, dtype=dtype if dtype in EMBEDDING_DTYPES else entry.dtype)

    def settle_dtype(self, entry: Entry, dim: int, meta: dict[str, Any]) -> Entry:
        """``entry`` with an ``auto`` dtype fixed by the vector width ``dim`` (`default_embedding_dtype`: the same for
        every writer of the key) and recorded in ``meta.json``; an entry whose dtype is set comes back as it is."""
        if entry.dtype != "auto":
            return entry
        entry = replace(entry, dtype=default_embedding_dtype(dim))
        self.describe(entry, meta)
        return entry

    def legacy(self, key: str, rows: int) -> np.ndarray | None:
        """A first-format entry (``<key>.npy``, float32), memory-mapped, or None when absent or not ``rows`` long."""
        path = self.folder / f"{key}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        return array if array.ndim == 2 and array.shape[0] == rows and array.dtype == np.float32 else None

    def convert_legacy(
        self,
        entry: Entry,
        key: str,
        indices: Sequence[int],
        meta: dict[str, Any],
        ids_of: Callable[[int, int], list[str]],
        progress: Callable[[int], None] | None = None,
    ) -> Entry | None:
        """Write shards ``indices`` of ``entry`` from the first-format entry ``key`` (`legacy`) instead of encoding
        them; None when there is no such entry of ``entry.rows`` rows. ``ids_of(start, stop)`` gives the document
        ids of rows ``[start, stop)``; ``progress(rows)`` is called after each piece. Each shard is held in its
        stored dtype and read `LEGACY_PIECE` rows at a time. Returns the entry, its dtype settled."""
        old = self.legacy(key, entry.rows)
        if old is None:
            return None
        entry = self.settle_dtype(entry, old.shape[1], meta)
        for index in indices:
            first, count = entry.bounds(index)
            stored = np.empty((count, old.shape[1]), dtype=stored_dtype(entry.dtype))
            for at in range(first, first + count, LEGACY_PIECE):
                stop = min(at + LEGACY_PIECE, first + count)
                stored[at - first : stop - first] = to_stored(old[at:stop], entry.dtype)
                if progress:
                    progress(stop - at)
            entry.write_shard(index, stored, ids_of(first, first + count))
        return entry

    def load(self, entry: Entry) -> np.ndarray | None:
        """Every row of a complete entry as one float32 array (for small entries such as queries), else None."""
        if entry.missing():
            return None
        return np.concatenate([from_stored(s.array(), s.dtype) for s in entry.shards()])

    def save(self, entry: Entry, vectors: np.ndarray, ids: Sequence[str], meta: dict[str, Any]) -> None:
        """Store all rows of ``entry`` (shard by shard) and its ``meta.json``."""
        self.describe(entry, meta)
        for index in range(entry.shard_count):
            start, rows = entry.bounds(index)
            entry.write_shard(index, vectors[start : start + rows], ids[start : start + rows])
