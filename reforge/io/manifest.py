"""The two provenance records reforge writes next to weights, read and written in one place.

- ``reforge.json`` (`Manifest`): written by `CheckpointWriter` for diff and merge (and tune --write). ``kind``
  (``delta``/``merge``), ``state`` (``partial`` while writing, ``complete`` when renamed into place), ``plan_id``,
  the inputs' provenance, per-tensor ``records`` of measured error, and the ``command``.
- ``training_record.json`` (`TrainingRecord`): written by `reforge train` next to a peft adapter: the base it was
  trained on (with its content fingerprint), the corpus, the options and the measured run.

A record that is missing is None; one that cannot be parsed is an error naming the file, never an empty record
(an unparseable ``reforge.json`` used to make `verify` skip its checks and say "sound").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reforge.errors import CorruptCheckpointError
from reforge.io.atomic import write_atomic
from reforge.io.jsonfile import read_json_object

MANIFEST = "reforge.json"
TRAINING_RECORD = "training_record.json"


@dataclass(frozen=True)
class Manifest:
    """A parsed ``reforge.json``. ``data`` is the whole record; the fields are the ones readers rely on."""

    path: Path
    data: dict[str, Any] = field(repr=False)

    @property
    def kind(self) -> str | None:
        return self.data.get("kind")

    @property
    def state(self) -> str | None:
        return self.data.get("state")

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def plan_id(self) -> str | None:
        return self.data.get("plan_id")

    @property
    def records(self) -> dict[str, dict]:
        """Per-tensor measurements (``max_abs_rounding`` ...), by tensor name."""
        records = self.data.get("records") or {}
        return records if isinstance(records, dict) else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


@dataclass(frozen=True)
class TrainingRecord:
    """A parsed ``training_record.json``."""

    path: Path
    data: dict[str, Any] = field(repr=False)

    @property
    def base_fingerprint(self) -> str | None:
        """The content fingerprint of the base the adapter was trained on (`reforge.io.checkpoint.fingerprint`)."""
        base = self.data.get("base")
        return base.get("fingerprint") if isinstance(base, dict) else None

    @property
    def corpus(self) -> str | None:
        """What the adapter was trained on, as one string for a card: a path, a source name, or several paths."""
        corpus = self.data.get("corpus")
        if not isinstance(corpus, dict):
            return corpus if isinstance(corpus, str) else None
        paths = corpus.get("paths")
        if isinstance(paths, list) and paths:
            return ", ".join(str(p) for p in paths)
        return corpus.get("path") or corpus.get("source")


def read_manifest(folder: str | Path) -> Manifest | None:
    """``folder/reforge.json``, or None when there is none.

    Raises:
        CorruptCheckpointError: the file exists but is not a JSON object.
    """
    data = _read(Path(folder) / MANIFEST)
    return None if data is None else Manifest(Path(folder) / MANIFEST, data)


def read_training_record(folder: str | Path) -> TrainingRecord | None:
    """``folder/training_record.json``, or None when there is none.

    Raises:
        CorruptCheckpointError: the file exists but is not a JSON object.
    """
    data = _read(Path(folder) / TRAINING_RECORD)
    return None if data is None else TrainingRecord(Path(folder) / TRAINING_RECORD, data)


def peek_record(folder: str | Path, name: str = MANIFEST) -> dict[str, Any]:
    """``folder/name`` (``reforge.json`` by default) as a dict, ``{}`` when it is missing, unreadable or not a JSON
    object: for the checks that treat a damaged record as no record (is this an output reforge wrote, does a partial
    folder belong to this plan), which then start clean or refuse, never trust it."""
    try:
        return _read(Path(folder) / name) or {}
    except CorruptCheckpointError:
        return {}


def write_record(path: str | Path, data: dict[str, Any]) -> None:
    """Write a record as indented JSON through a temporary name, renamed when whole."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return read_json_object(
        path,
        what="a readable JSON object",
        hint="It was damaged after it was written; rerun the command that wrote the folder.",
    )
