"""Files of a checkpoint folder, resolved: a symlink or a symlinked folder may not carry an outside file in.

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
