"""What a recipe remembers between runs: each job's fingerprint, kept in a stamp inside its output folder.

A job's fingerprint hashes its kind, its resolved options and the content of every input (`content_key`). A job
is skipped when its output holds a stamp (``reforge-recipe.json``) with the same fingerprint, as make skips a target
newer than its sources, except that content decides, not times. The stamp also records the recipe (its SHA-256, and
a copy of it as ``reforge-recipe.yaml``), so anyone holding the output can rerun what made it.

A train job about to start leaves ``.NAME.reforge-recipe`` beside its output with the fingerprint: after a kill,
a rerun with the same fingerprint resumes train's own checkpoints; any other fingerprint starts over.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from reforge import __version__
from reforge.io.atomic import write_atomic

STAMP = "reforge-recipe.json"
RECIPE_COPY = "reforge-recipe.yaml"
STAMP_FORMAT = 1
_OWN_FILES = (STAMP, RECIPE_COPY)
_CHECKPOINT_FILES = ("config.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json")


def content_key(path: str | Path) -> str:
    """What an input holds, as a key: a checkpoint folder's whole-content key, else the SHA-256 of its files.

    Both come from `reforge.io.checkpoint` (`content_key`, `file_sha256`): each file's hash is recorded by the writer
    or remembered by file identity (device, inode, size, times), so a second run reads no weights or corpus again.
    A checkpoint's key leaves out reforge.json and the other records, so remaking an output with the same weights
    keeps the key of everything made from it.
    """
    from reforge.io.checkpoint import content_key as checkpoint_key

    path = Path(path)
    if path.is_dir() and any((path / name).is_file() for name in _CHECKPOINT_FILES):
        return "checkpoint:" + checkpoint_key(path)
    return "sha256:" + _data_key(path)


def _data_key(path: Path) -> str:
    from reforge.io.checkpoint import file_sha256

    if path.is_file():
        return file_sha256(path)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name not in _OWN_FILES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()


def fingerprint_of(kind: str, options: dict[str, Any], inputs: dict[str, list[str]]) -> str:
    """The fingerprint of a job: its kind, resolved options and input content keys (by role, in order)."""
    payload = json.dumps(
        {"format": STAMP_FORMAT, "kind": kind, "options": options, "inputs": inputs}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def read_stamp(output: Path) -> dict[str, Any] | None:
    """The stamp in ``output``, or None when there is none or it is unreadable."""
    try:
        stamp = json.loads((output / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def is_done(output: Path, fingerprint: str) -> bool:
    """Whether ``output`` was made by a job with this fingerprint and still holds what that job wrote (its content
    key, recorded in the stamp, is checked again: an output changed or damaged since is made again)."""
    stamp = read_stamp(output)
    if stamp is None or stamp.get("fingerprint") != fingerprint:
        return False
    return stamp.get("output_key") == content_key(output)


def write_stamp(output: Path, record: dict[str, Any], recipe_text: str) -> None:
    """Write the copy of the recipe into ``output``, a Reproduce section into its model card (if it has one), then
    the stamp (``record`` plus the output's own content key, the version and the time)."""
    from reforge.card import write_card_recipe

    write_atomic(output / RECIPE_COPY, lambda f: f.write(recipe_text.encode("utf-8")))
    write_card_recipe(output, RECIPE_COPY)
    stamp = {"format": STAMP_FORMAT, **record, "output_key": content_key(output)}
    stamp.update(reforge_version=__version__, finished_at=_now())
    write_atomic(output / STAMP, lambda f: f.write((json.dumps(stamp, indent=2, default=str) + "\n").encode()))


def write_if_changed(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, unless the file already holds exactly that (a rerun that changes
    nothing leaves every file as it was)."""
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    return write_atomic(path, lambda f: f.write(data))


def pending_path(output: Path) -> Path:
    """Where a started job keeps its fingerprint until it finishes (beside the output)."""
    return output.parent / f".{output.name}.reforge-recipe"


def mark_started(output: Path, fingerprint: str) -> None:
    """Record that a job with ``fingerprint`` is writing ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(pending_path(output), lambda f: f.write(fingerprint.encode("ascii")))


def started_with(output: Path) -> str | None:
    """The fingerprint of the job that started writing ``output`` and did not finish, or None."""
    try:
        return pending_path(output).read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def mark_finished(output: Path) -> None:
    """Forget the started mark (the stamp now says what the output is)."""
    pending_path(output).unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
