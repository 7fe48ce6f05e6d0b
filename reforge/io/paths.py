"""Where reforge keeps things, and files of a checkpoint folder resolved safely.

`reforge_home`, `cache_root` and `cache_dir` are the one home of reforge's own folders: ``$REFORGE_HOME`` (default
``~/.cache/reforge``) and its ``cache/<kind>`` subfolders (``corpus-index``, ``token-lengths``, ``embeddings``,
``content-keys``, ``queries``): every module asks them rather than joining the path itself.

Files of a checkpoint folder, resolved: a symlink or a symlinked folder may not carry an outside file in.

A checkpoint may use symlinks inside itself; a Hub cache snapshot is made of them (``snapshots/<commit>/x`` ->
``../../blobs/<hash>``, within the same repo's cache folder). Anything that resolves elsewhere (``shard ->
/etc/passwd``, ``extras/ -> ~/.ssh``) is refused, and so is anything that is not a regular file (a FIFO would hang
the reader, a device would stream forever).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from reforge.errors import CorruptCheckpointError, UnsafePathError, short_path

DEFAULT_HOME = "~/.cache/reforge"


def reforge_home() -> Path:
    """reforge's own folder for caches: ``$REFORGE_HOME`` as set now (read on every call), default
    ``~/.cache/reforge``, with ``~`` expanded.
    """
    return Path(os.environ.get("REFORGE_HOME", DEFAULT_HOME)).expanduser()


def cache_root() -> Path:
    """``$REFORGE_HOME/cache``: the folder holding every `cache_dir` (scratch space that must sit on the same disk
    goes here too)."""
    return reforge_home() / "cache"


def cache_dir(kind: str) -> Path:
    """The cache folder for one kind of reused result: ``$REFORGE_HOME/cache/<kind>`` (not created here).

    Args:
        kind: one folder name, e.g. ``"corpus-index"`` or ``"token-lengths"`` (no ``/``, not ``.`` or ``..``).

    Raises:
        ValueError: ``kind`` is not a single folder name (a bug in the caller, not bad input).

    Example:
        >>> cache_dir("corpus-index").relative_to(reforge_home()).as_posix()
        'cache/corpus-index'
    """
    if not kind or kind in (".", "..") or "/" in kind or "\\" in kind:
        raise ValueError(f"not a cache folder name: {kind!r}")
    return cache_root() / kind


def checkpoint_roots(folder: Path) -> list[Path]:
    """The real folders a checkpoint's files may resolve into: the folder itself, and for a Hub cache snapshot its
    repo's ``blobs`` folder."""
    real = Path(folder).resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent / "blobs")
    return roots


def inside_checkpoint(folder: Path, path: Path, *, what: str = "file") -> Path:
    """``path`` resolved, if it stays inside ``folder`` (see `checkpoint_roots`) and is a regular file.

    Raises:
        UnsafePathError: it resolves outside the checkpoint folder (a symlink, or a path through a symlinked folder).
        CorruptCheckpointError: it is a FIFO, a device, a socket or a folder, not a file.
    """
    real = Path(path).resolve()
    if not any(real == root or root in real.parents for root in checkpoint_roots(folder)):
        link = _first_link(Path(folder), Path(path))
        through = f" through the link {short_path(link)} -> {os.readlink(link)}" if link is not None else ""
        raise UnsafePathError(
            f"{short_path(path)} ({what} of {short_path(folder)}) resolves to {real}{through}, outside the "
            "checkpoint folder.",
            hint="Refusing to read it: copy the file into the folder if it really belongs to the checkpoint.",
            index=path,
            entry=str(path),
        )
    mode = real.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise CorruptCheckpointError(
            f"{short_path(path)} ({what} of {short_path(folder)}) is {kind}, not a file.",
            hint="Replace it with the real file.",
            path=path,
            tensor=None,
            reason=kind,
        )
    return real


def _first_link(folder: Path, path: Path) -> Path | None:
    """The first symlink on the way from ``folder`` down to ``path`` (``path`` itself included), or None."""
    try:
        parts = path.relative_to(folder).parts
    except ValueError:
        return None
    at = folder
    for part in parts:
        at = at / part
        if at.is_symlink():
            return at
    return None


# ---- local paths in records ----------------------------------------------------------------------------------------
# A record (reforge.json) is published with the folder it describes, so it names a local input relative to that
# folder, never by its absolute path (which carries a user name, a home folder, at times a token-like folder name).
# An input entry is local when it has a "path" (`reforge.io.checkpoint` records one only for a local folder); its
# "path" and "ref" are then written relative to the record's folder, and read back against it.
RECORDED_RELATIVE_TO = "the folder holding this file"
_INPUT_KEYS = ("base", "retriever", "delta", "retriever_adapter", "adapter")


def recorded_path(path: str | Path, root: str | Path) -> str:
    """``path`` as a record in folder ``root`` names it: relative to ``root`` (``../base``), POSIX separators.

    Example:
        >>> recorded_path("/runs/base", "/runs/merged")
        '../base'
    """
    return Path(os.path.relpath(Path(path).absolute(), Path(root).absolute())).as_posix()


def recorded_inputs(record: dict, root: str | Path) -> dict:
    """``record`` (a manifest about to be written in ``root``) with every local input's ``path`` and ``ref``
    relative to ``root`` (see `recorded_path`), and an adapter's absolute corpus paths too; says so in
    ``paths_relative_to``. Entries are replaced by changed copies (they may be shared with another record), the
    record itself is changed in place and returned."""

    def relative(entry: dict) -> dict:
        entry = dict(entry)
        if isinstance(entry.get("path"), str):  # a local input; its ref is a path as typed (maybe relative)
            entry["path"] = recorded_path(entry["path"], root)
            if isinstance(entry.get("ref"), str):
                entry["ref"] = recorded_path(entry["ref"], root)
        if isinstance(entry.get("corpus"), str):  # an adapter's corpus paths, as its training record joined them
            parts = entry["corpus"].split(", ")
            entry["corpus"] = ", ".join(recorded_path(p, root) if Path(p).is_absolute() else p for p in parts)
        return entry

    _map_inputs(record, relative)
    record["paths_relative_to"] = RECORDED_RELATIVE_TO
    return record


def located_inputs(record: dict, root: str | Path) -> dict:
    """The inverse of `recorded_inputs`: a copy of ``record`` (read from folder ``root``) with every recorded local
    path absolute again: the local inputs' ``path`` and ``ref``, and a training record's corpus files
    (``corpus.paths``, which `reforge.train` records relative to the adapter folder). A record written before paths
    were recorded relative is returned as it is (a copy).

    Example:
        >>> record = {"paths_relative_to": RECORDED_RELATIVE_TO, "corpus": {"paths": ["../data/c.jsonl"]}}
        >>> located_inputs(record, "/runs/psi")["corpus"]["paths"]
        ['/runs/data/c.jsonl']
    """
    import copy

    record = copy.deepcopy(record)
    if record.get("paths_relative_to") != RECORDED_RELATIVE_TO:
        return record

    def absolute(entry: dict) -> dict:
        if isinstance(entry.get("path"), str):
            for key in ("path", "ref"):
                if isinstance(entry.get(key), str):
                    entry[key] = _located(entry[key], root)
        return entry

    _map_inputs(record, absolute)
    corpus = record.get("corpus")
    if isinstance(corpus, dict) and isinstance(corpus.get("paths"), list):
        corpus["paths"] = [_located(p, root) if isinstance(p, str) else p for p in corpus["paths"]]
    return record


def _located(path: str, root: str | Path) -> str:
    """A recorded ``path`` read against the record's folder ``root`` (an absolute one stays as it is)."""
    return path if Path(path).is_absolute() else os.path.normpath(Path(root).absolute() / path)


def _map_inputs(record: dict, change) -> None:
    for key in _INPUT_KEYS:
        if isinstance(record.get(key), dict):
            record[key] = change(record[key])
    if isinstance(record.get("adapters"), list):
        record["adapters"] = [change(a) if isinstance(a, dict) else a for a in record["adapters"]]
