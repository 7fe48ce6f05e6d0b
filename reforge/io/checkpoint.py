"""Opening a checkpoint by reference: a local folder, or a Hub repo id with an optional ``@revision``.

`open_checkpoint` returns a `Checkpoint` (full weights) or an `AdapterCheckpoint` (a peft LoRA/DoRA folder whose
base is another checkpoint). Both read lazily through `ShardReader` and know their key layout and provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from reforge.errors import AdapterError, CheckpointNotFoundError, CorruptCheckpointError, short_path
from reforge.io.buffers import BufferPool
from reforge.io.index import ShardIndex
from reforge.io.keymap import KeyLayout, canonical_map, detect_layout
from reforge.io.reader import ShardReader


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
    adapter_config_file = path / "adapter_config.json"
    if adapter_config_file.is_file():
        adapter_config = _read_json(adapter_config_file)
        index = ShardIndex.from_dir(path, weights_name="adapter_model", allow_pickle=allow_pickle)
        return AdapterCheckpoint(str(ref), path, adapter_config, index, provenance)
    config_file = path / "config.json"
    config = _read_json(config_file) if config_file.is_file() else None
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
    a change confined to bytes between the samples would not (use a full hash for tamper evidence).
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


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a whole file, read in 1 MiB blocks (for data files and records; see `fingerprint` for
    checkpoints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_content_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt")) or name in {
        "config.json",
        "adapter_config.json",
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


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (ValueError, OSError) as e:
        raise CorruptCheckpointError(
            f"{short_path(path)} is not valid JSON ({e}).", path=path, tensor=None, reason=str(e)
        ) from e


def env_home() -> Path:
    """reforge's own folder for caches (``$REFORGE_HOME``, default ``~/.cache/reforge``)."""
    return Path(os.environ.get("REFORGE_HOME", Path.home() / ".cache" / "reforge"))
