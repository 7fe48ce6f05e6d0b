"""Opening a checkpoint by reference (a local folder, or a Hub repo id with an optional ``@revision``), and keying
one by its content.

`open_checkpoint` returns a `Checkpoint` (full weights) or an `AdapterCheckpoint` (a peft LoRA/DoRA folder whose
base is another checkpoint). Both read lazily through `ShardReader` and know their key layout and provenance.

Content keys (`content_key`): what a checkpoint, or one file, holds, as a SHA-256 of all its bytes, computed at
most once. Anything reforge reuses instead of recomputing (embeddings, a resumed training run) is keyed by it, never
by a path, a name or a sample of the bytes (`fingerprint` samples; it stays only as the provenance already recorded
in outputs). A file's SHA-256 comes from the cheapest source that is exact:

1. reforge's own outputs: `reforge.io.writer.CheckpointWriter` hashes each shard while writing it (no extra read)
   and records ``{sha256, size, identity}`` under ``file_sha256`` in ``reforge.json``. The record is trusted only
   for that very file (same identity, below): moving the folder on its disk keeps it; a copy, even ``cp -a``, or an
   edit is read once like any other file;
2. Hub files: the HF cache stores an LFS file as ``blobs/<sha256>`` (its etag), so a snapshot file that links to a
   64-hex blob carries its SHA-256 in its name (what huggingface_hub's cache exposes; no network);
3. anything else is read once and its hash remembered under ``$REFORGE_HOME/cache/content-keys/`` by the file's
   identity: device, inode, size, mtime_ns and ctime_ns (ctime cannot be set back by ``touch``; a change of any of
   them only costs one more read).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from reforge.errors import AdapterError, CheckpointNotFoundError, short_path
from reforge.io.adapter_config import ADAPTER_CONFIG, is_adapter, read_adapter_config
from reforge.io.atomic import write_atomic
from reforge.io.buffers import BufferPool
from reforge.io.index import ShardIndex
from reforge.io.jsonfile import read_json_object
from reforge.io.keymap import KeyLayout, canonical_map, detect_layout
from reforge.io.manifest import peek_record
from reforge.io.reader import ShardReader

#: ``reforge.json`` field the writer fills: ``{filename: {"sha256", "size", "identity"}}``.
RECORD_FIELD = "file_sha256"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIG_NAMES = frozenset({"config.json", ADAPTER_CONFIG})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 4 << 20

Progress = Callable[[int, int | None], None]


@dataclass
class Checkpoint:
    """A checkpoint folder with full weights.

    Attributes:
        ref: what the user passed (path or ``repo@revision``).
        path: the local folder (the snapshot folder for a Hub repo).
        config: ``config.json`` as a dict, or None.
        index: where each tensor lives.
        layout: how its keys map to canonical (bare-model) names.
        provenance: ``ref``, ``repo_id``, ``revision``, ``commit`` (Hub only) and ``fingerprint``.
    """

    ref: str
    path: Path
    config: dict | None
    index: ShardIndex
    layout: KeyLayout
    provenance: dict = field(default_factory=dict)
    kind: str = "model"

    def reader(self, pool: BufferPool | None = None) -> ShardReader:
        """A fresh lazy reader (use it as a context manager); large tensors take their memory from ``pool``."""
        return ShardReader(self.index, pool)

    def canonical_keys(self) -> dict[str, str]:
        """``{canonical key: stored key}`` for every tensor but the head."""
        return canonical_map(self.index.tensors, self.layout)

    @property
    def architecture(self) -> str | None:
        archs = (self.config or {}).get("architectures") or []
        return archs[0] if archs else None


@dataclass
class AdapterCheckpoint:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Attributes:
        adapter_config: the parsed ``adapter_config.json``.
        base_ref: ``base_model_name_or_path`` from the config (may be None or a name that is not local).
    """

    ref: str
    path: Path
    adapter_config: dict
    index: ShardIndex
    provenance: dict = field(default_factory=dict)
    kind: str = "adapter"

    def reader(self, pool: BufferPool | None = None) -> ShardReader:
        return ShardReader(self.index, pool)

    @property
    def base_ref(self) -> str | None:
        return self.adapter_config.get("base_model_name_or_path")

    @property
    def is_dora(self) -> bool:
        return bool(self.adapter_config.get("use_dora"))


def resolve_local(ref: str | Path, *, token: str | None = None, allow_pickle: bool = False, progress=None) -> Path:
    """The local folder for a checkpoint reference, downloading only the needed files of a Hub repo.

    Args:
        ref: a folder, or ``owner/name`` / ``owner/name@revision`` on the Hub.
        token: Hub token for private repos (never printed).
        allow_pickle: let a Hub download fetch pickle weights when the repo has no safetensors.

    Raises:
        CheckpointNotFoundError: neither a folder nor something that looks like a repo id.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{short_path(path)} is a file; give the folder that holds it.", ref=str(ref))
    from reforge.io import hub

    if not hub.looks_like_repo_id(str(ref)):
        raise CheckpointNotFoundError(
            f"{ref} is not a folder here, nor a Hub repo id (owner/name[@revision]).", ref=str(ref)
        )
    repo_id, revision = hub.parse_ref(str(ref))
    try:
        return hub.download_checkpoint(
            repo_id, revision=revision, token=token, allow_pickle=allow_pickle, progress=progress
        )
    except CheckpointNotFoundError as e:
        if path.parent.is_dir() and str(path.parent) not in ("", "."):
            raise _local_typo(ref, path, e) from e
        raise


def _local_typo(ref: str | Path, path: Path, error: Exception) -> CheckpointNotFoundError:
    """``out/typo`` when a folder ``out/`` exists here is a mistyped local path far more often than a Hub repo."""
    near = sorted(p.name + "/" for p in path.parent.iterdir() if p.is_dir() and not p.name.startswith("."))[:8]
    return CheckpointNotFoundError(
        f"{ref} is not a folder here: {short_path(path.parent)}/ has no {path.name!r}"
        + (f" (it holds {', '.join(near)})" if near else "")
        + f"; nor could it be read as a Hub repo ({error}).",
        hint="Check the path for a typo.",
        ref=str(ref),
    )


def open_checkpoint(
    ref: str | Path, *, token: str | None = None, allow_pickle: bool = False, progress=None
) -> Checkpoint | AdapterCheckpoint:
    """Open a model or adapter checkpoint for lazy reading; see `resolve_local` for ``ref``."""
    path = resolve_local(ref, token=token, allow_pickle=allow_pickle, progress=progress)
    provenance = _provenance(str(ref), path)
    if is_adapter(path):
        adapter_config = read_adapter_config(path)
        index = ShardIndex.from_dir(path, weights_name="adapter_model", allow_pickle=allow_pickle)
        return AdapterCheckpoint(str(ref), path, adapter_config, index, provenance)
    config_file = path / "config.json"
    config = read_json_object(config_file, what="valid JSON") if config_file.is_file() else None
    index = ShardIndex.from_dir(path, allow_pickle=allow_pickle)
    return Checkpoint(str(ref), path, config, index, detect_layout(index.tensors, config), provenance)


def open_model(ref: str | Path, **kwargs) -> Checkpoint:
    """Like `open_checkpoint`, but a peft adapter folder is an error (a full model is needed here)."""
    checkpoint = open_checkpoint(ref, **kwargs)
    if isinstance(checkpoint, AdapterCheckpoint):
        raise AdapterError(
            f"{ref} is a peft adapter, but a full model is needed here.",
            hint=f"Pass its base ({checkpoint.base_ref or 'see adapter_config.json'}) instead.",
            path=checkpoint.path,
            tensor=None,
        )
    return checkpoint


def fingerprint(path: str | Path, *, samples: int = 16, sample_bytes: int = 4096) -> str:
    """A content fingerprint of a checkpoint folder, cheap even for 14 GB.

    Hashes every weight file's name, size and header, ``samples`` evenly spaced ``sample_bytes`` reads of its data,
    and the JSON configs. Any change to the architecture, dtype, shapes or a retrained/merged model changes it;
    a change confined to bytes between the samples would not: never key a reuse by it, use `content_key`.
    """
    path = Path(path)
    digest = hashlib.sha256()
    names = sorted(p.name for p in path.iterdir() if p.is_file() and _is_content_file(p.name))
    for name in names:
        file = path / name
        size = file.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with file.open("rb") as handle:
            if name.endswith(".json"):
                digest.update(handle.read())
                continue
            positions = range(0, size, max(size // samples, 1))
            if hasattr(os, "posix_fadvise"):  # ask for all samples at once: one disk latency, not one per sample
                for position in positions:
                    os.posix_fadvise(handle.fileno(), position, sample_bytes, os.POSIX_FADV_WILLNEED)
            for position in positions:
                handle.seek(position)
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()[:32]


def _is_content_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt")) or name in {
        "config.json",
        ADAPTER_CONFIG,
        "model.safetensors.index.json",
        "reforge.json",
    }


def _provenance(ref: str, path: Path) -> dict:
    record: dict = {"ref": ref}
    if not Path(ref).expanduser().is_dir():
        from reforge.io import hub

        repo_id, revision = hub.parse_ref(ref)
        record.update(repo_id=repo_id, revision=revision or "main")
        if path.parent.name == "snapshots":
            record["commit"] = path.name
    else:
        record["path"] = str(path.resolve())
    record["fingerprint"] = fingerprint(path)
    return record


# ---- content keys ----------------------------------------------------------------------------------------------------
def content_key(path: str | Path, *, progress: Progress | None = None) -> str:
    """The SHA-256 (64 hex) identifying what a checkpoint folder, or a single file, holds.

    For a folder: every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``), its index files and
    ``config.json`` / ``adapter_config.json`` at its top level, by name and content (subfolders are not included;
    ``reforge.json`` and other metadata are not). For a file: its SHA-256. See the module docstring for where each
    file's hash comes from; the first key of an unrecorded 14 GB folder reads it once (its weight files side by side,
    one thread each up to the CPU count), later keys cost a stat per file.

    Args:
        path: a folder or a file (symlinks are followed).
        progress: ``progress(bytes_hashed, bytes_to_hash)`` while files are read.

    Raises:
        OSError: the path cannot be read.
    """
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path, progress=progress)
    records = _recorded(path)
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.is_file() and _counts(p.name))
    big = [name for name in names if not _is_small(name)]
    sizes = {name: (path / name).stat().st_size for name in big}
    todo, done, lock = sum(sizes.values()), dict.fromkeys(big, 0), threading.Lock()

    def one(name: str) -> str:
        def report(n: int, _total: int | None) -> None:
            with lock:
                done[name] = n
                if progress is not None:
                    progress(sum(done.values()), todo)

        return file_sha256(path / name, progress=report, records=records)

    # weight files are hashed side by side (hashlib lets go of the GIL): a sharded model keys as fast as the cores go
    with ThreadPoolExecutor(max_workers=max(1, min(len(big), os.cpu_count() or 1, 8))) as pool:
        hashes = dict(zip(big, pool.map(one, big)))
    digest = hashlib.sha256(b"reforge-content-key-v1\0")
    for name in names:
        # configs and indexes: hashed directly, they are a few KB
        value = hashes[name] if name in hashes else hashlib.sha256((path / name).read_bytes()).hexdigest()
        digest.update(f"{name}\0{value}\0".encode())
    return digest.hexdigest()


def file_sha256(path: str | Path, *, progress: Progress | None = None, records: dict | None = None) -> str:
    """The SHA-256 of one file's bytes: from the writer's record, the Hub blob's name, the memo, or read once.

    ``records`` is the folder's ``file_sha256`` record when the caller already read it (None: read it here).
    """
    path = Path(path)
    stat = path.stat()
    hub = _hub_sha256(path)
    if hub is not None:
        return hub
    record = (records if records is not None else _recorded(path.parent)).get(path.name)
    if isinstance(record, dict) and record.get("identity") == file_identity(stat):
        if _HEX64.fullmatch(str(record.get("sha256"))):
            return str(record["sha256"])
    memo = _memo_path(stat)
    try:
        remembered = memo.read_text().strip()
        if _HEX64.fullmatch(remembered):
            return remembered
    except OSError:
        pass
    value = sha256_file(path, progress=progress)
    if file_identity(path.stat()) == file_identity(stat):  # unchanged while read (else the next key reads it again)
        remember_sha256(path, value, stat)
    return value


def remember_sha256(path: str | Path, sha256: str, stat: os.stat_result | None = None) -> None:
    """Remember the SHA-256 of a file whose bytes were hashed as they were written (so no later key reads it);
    ``stat``: the file's stat when it was hashed (default: now)."""
    memo = _memo_path(stat if stat is not None else Path(path).stat())
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, lambda f: f.write(sha256.encode()))
    except OSError:
        pass  # a read-only home only costs the next read


def sha256_file(path: str | Path, *, progress: Progress | None = None) -> str:
    """The SHA-256 of a whole file, read in 4 MiB blocks (no memo; see `file_sha256`)."""
    digest = hashlib.sha256()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    done = 0
    with Path(path).open("rb", buffering=0) as handle:
        total = os.fstat(handle.fileno()).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            done += n
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def file_record(path: str | Path, sha256: str) -> dict:
    """What the writer records for a file it has just written and hashed: the hash, the size and the file's identity
    as it is now (the record is trusted only for this very file: a copy, a move to another disk or an edit is read
    once instead)."""
    stat = Path(path).stat()
    return {"sha256": sha256, "size": stat.st_size, "identity": file_identity(stat)}


def memo_dir() -> Path:
    """Where hashes of files that carry none are remembered: ``$REFORGE_HOME/cache/content-keys``."""
    from reforge.io.paths import cache_dir

    return cache_dir("content-keys")


def _memo_path(stat: os.stat_result) -> Path:
    return memo_dir() / file_identity(stat)


def file_identity(stat: os.stat_result) -> str:
    """A file's identity: device, inode, size, mtime_ns, ctime_ns (any write, copy or ``touch`` changes one)."""
    return f"{stat.st_dev}-{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}-{stat.st_ctime_ns}"


def _counts(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name in _CONFIG_NAMES or name.endswith(".index.json")


def _is_small(name: str) -> bool:
    return name.endswith(".json")


def _hub_sha256(path: Path) -> str | None:
    """The SHA-256 a Hub cache file carries: a snapshot link to ``blobs/<64 hex>`` (an LFS file's etag)."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
        return target.name
    return None


def _recorded(folder: Path) -> dict:
    """The writer's ``file_sha256`` record in ``folder/reforge.json`` (complete outputs only), else ``{}``."""
    manifest = peek_record(folder)  # reforge.json is read by io.manifest (issue 23)
    if manifest.get("state") != "complete":
        return {}
    record = manifest.get(RECORD_FIELD)
    return record if isinstance(record, dict) else {}
