"""Where a command may write a folder: the output rule, checked before any work, and the one lock every writer takes.

The rule (issue 13): an output may replace only something reforge wrote (its ``reforge.json`` or
``training_record.json`` says so), and never a folder that is, contains or lies inside one of the command's inputs.
A symlink, a mount point, a file, or a place that cannot be written is refused too. All of it is checked before the
first tensor is computed, so a long merge, tune or training never fails at its very end on a path mistake.

The lock is ``.NAME.reforge-lock`` beside the output, held with ``flock`` for the whole run (diff, merge,
``tune --write`` and train alike): a second run writing the same output is refused at once.

An output is committed one way (`commit_staging`): written whole in a sibling folder (the writer's
``.NAME.reforge-partial``, train's ``.NAME.reforge-train/final``), then renamed into place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from reforge.errors import DiskFullError, OutputExistsError, OutputLockedError, OutputRefusedError, short_path
from reforge.io.manifest import MANIFEST, TRAINING_RECORD, peek_record

MANIFESTS = (MANIFEST, TRAINING_RECORD)  # what diff/merge/tune --write and train leave in their output


def lock_path(output: str | Path) -> Path:
    """The lock file of a run writing ``output``."""
    output = absolute(output)
    return output.parent / f".{output.name}.reforge-lock"


def staging_path(output: str | Path) -> Path:
    """The folder a run writes ``output`` into before renaming it into place (``.NAME.reforge-partial``)."""
    output = absolute(output)
    return output.parent / f".{output.name}.reforge-partial"


def absolute(output: str | Path) -> Path:
    """``output`` as an absolute path with a real name (``-o .`` is the current folder by its name); the last
    component is not resolved, so a symlink given as output stays visible as one."""
    path = Path(os.path.abspath(os.path.expanduser(str(output))))
    return path.parent.resolve() / path.name if path.name else path


def written_by_reforge(folder: Path) -> bool:
    """Whether ``folder`` holds an output reforge wrote: a manifest that is a JSON object naming reforge's version."""
    for name in MANIFESTS:
        manifest = peek_record(folder, name)
        if "reforge_version" in manifest or "plan_id" in manifest:
            return True
    return False


def check_output(
    output: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False, option: str = "--output"
) -> Path:
    """Refuse, before any work, an output this command must not write; return it as an absolute path.

    Args:
        output: the folder the command will write.
        inputs: the command's inputs (local paths; Hub ids and None are skipped).
        overwrite: the user allows replacing an earlier reforge output.
        option: the option that named the output, for messages.

    Raises:
        OutputRefusedError: the output is, contains or lies inside an input; is a symlink, a mount point or a file;
            or its folder cannot be written.
        OutputExistsError: the output holds files reforge did not write (with or without ``overwrite``).
    """
    path = absolute(output)
    shown = short_path(output)
    if str(output).rstrip("/").rsplit("/", 1)[-1] in ("", ".", ".."):
        raise _refused(
            path,
            f"{option} {output!r} names the current folder or one above it ({path}); reforge "
            "replaces its output folder as a whole.",
            f"Name a new folder, e.g. {option} out/.",
        )
    if path.is_symlink():
        raise _refused(
            path,
            f"{option} {shown} is a symbolic link (to {os.path.realpath(path)}).",
            "Pass the folder it points to, or another folder.",
        )
    for source in _local_inputs(inputs):
        reason = overlap(path, source)
        if reason:
            raise _refused(
                path,
                f"{option} {shown} {reason} {short_path(source)}, an input of this command; "
                "writing there could delete it.",
                f"Choose an {option} folder apart from the inputs.",
            )
    if path.exists() and not path.is_dir():
        raise _refused(path, f"{option} {shown} is a file, not a folder.", f"Choose another {option}.")
    if path.is_dir() and os.path.ismount(path):
        raise _refused(
            path,
            f"{option} {shown} is a mount point; reforge writes beside the output and renames "
            "it into place, which a mount point cannot take.",
            f"Use {option} {shown}/NAME instead.",
        )
    if path.is_dir() and any(path.iterdir()) and not written_by_reforge(path):
        raise OutputExistsError(
            f"{option} {shown} holds files reforge did not write; they are never replaced"
            + (", --overwrite or not." if overwrite else "."),
            hint=f"Choose an empty or new {option} folder.",
            path=path,
        )
    check_writable(path, option)
    return path


def _local_inputs(inputs: Iterable[str | Path | None]) -> list[Path]:
    found = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        candidate = Path(os.path.expanduser(str(item)))
        if candidate.exists():
            found.append(candidate.resolve())
    return found


def overlap(output: str | Path, source: str | Path) -> str | None:
    """How folder ``output`` overlaps ``source`` once links are resolved: "is", "lies inside", "contains", or None.

    The one rule for "an output may not be, contain or lie inside an input" (the commands' output check here, and
    `reforge run`'s check of a whole recipe before any job)."""
    real, source = Path(output).resolve(), Path(source).resolve()
    if real == source:
        return "is"
    if source in real.parents:
        return "lies inside"
    if real in source.parents:
        return "contains"
    return None


def check_writable(path: str | Path, option: str = "--output") -> None:
    """The nearest existing folder at or above ``path`` must be a folder we can create files in (probed for real,
    so a read-only mount refuses root too).

    Raises:
        OutputRefusedError: a file stands in the way, or nothing can be created there.
    """
    path = absolute(path)
    ancestor = path.parent if path.is_dir() else path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _refused(
            path,
            f"{option} {short_path(path)} cannot be created: {short_path(ancestor)} is a file.",
            f"Choose another {option}.",
        )
    try:
        probe = tempfile.mkdtemp(prefix=".reforge-probe-", dir=ancestor)
    except OSError as e:
        raise _refused(
            path,
            f"{option} {short_path(path)} cannot be written: creating a folder in "
            f"{short_path(ancestor)} fails ({e.strerror}).",
            f"Choose an {option} on a writable disk.",
        ) from e
    os.rmdir(probe)


def write_error(error: OSError, path: str | Path, hint: str) -> Exception:
    """A failed write as a reforge error: `DiskFullError` when the disk or a quota is full, `OutputRefusedError`
    otherwise (permissions, a read-only disk); ``hint`` says where the finished work is."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFullError(
            f"the disk filled up while writing {short_path(path)}.", hint=hint, path=Path(path), needed=None, free=None
        )
    return OutputRefusedError(
        f"writing {short_path(path)} failed: {error.strerror or error}.", hint=hint, path=Path(path)
    )


def old_path(output: str | Path) -> Path:
    """Where `commit_staging` moves the output it replaces, until the new one is in place (``.NAME.reforge-old``)."""
    output = absolute(output)
    return output.parent / f".{output.name}.reforge-old"


def commit_staging(staging: str | Path, output: str | Path, *, durable: bool = False, hint: str | None = None) -> None:
    """Put the whole folder ``staging`` at ``output``, replacing what is there: how every command commits its output.

    ``staging`` must be on ``output``'s filesystem (a sibling: the renames are atomic). What ``output`` held is
    renamed to `old_path` first and removed once ``staging`` is in place, so the output path holds the old folder
    or the new one, whole, at every moment but the instant between the two renames; a run killed there leaves the
    old output in ``.NAME.reforge-old`` and the new one whole in ``staging``, and a rerun commits again. With
    ``durable`` the folder and its parent are fsynced (the rename survives a power loss).

    Raises:
        DiskFullError, OutputRefusedError: a rename failed; the message says where the whole output waits
            (``hint``, default: move ``staging`` to ``output`` yourself).
    """
    staging, output = Path(staging), absolute(output)
    old = old_path(output)
    try:
        if durable:
            _fsync_dir(staging)
        if os.path.lexists(old):
            _remove(old)
        if os.path.lexists(output):
            os.replace(output, old)
        os.replace(staging, output)
        if durable:
            _fsync_dir(output.parent)
    except OSError as e:
        shown = f"The whole output is in {short_path(staging)}: move that folder to {short_path(output)} yourself."
        raise write_error(e, output, hint or shown) from e
    if os.path.lexists(old):
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refused(path: Path, message: str, hint: str) -> OutputRefusedError:
    return OutputRefusedError(message, hint=hint, path=path)


class OutputLock:
    """``with OutputLock(output):`` -- the one lock of every command that writes ``output``.

    Raises `OutputLockedError` at once when another run holds it. The lock file is removed on release.
    """

    def __init__(self, output: str | Path) -> None:
        self.output = absolute(output)
        self.path = lock_path(self.output)
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise `OutputLockedError`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                os.close(fd)
                raise OutputLockedError(
                    f"another reforge run is writing {short_path(self.output)} right now.",
                    hint=f"Wait for it to finish; if none is running, delete {short_path(self.path)}.",
                    path=self.output,
                    lock=self.path,
                ) from e
            # the file we locked may have been unlinked by a run finishing just now; lock the current one
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and let go of the lock (a no-op when not held)."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
