"""A checkpoint folder's small JSON files (``config.json``, ``adapter_config.json``, ``reforge.json``, the training
record) read as one JSON object each: one reader, so a damaged file is the same kind of one-line error whichever
of them it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reforge.errors import CorruptCheckpointError, short_path


def read_json_object(path: str | Path, *, what: str, hint: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        what: how the error names what the file should be, e.g. ``"a readable adapter config"``.
        hint: the error's next step, where the caller knows one.

    Raises:
        CorruptCheckpointError: the file is missing, unreadable, not UTF-8, not JSON, or not a JSON object; the
            message is ``<file> is not <what> (<why>).``
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        raise CorruptCheckpointError(
            f"{short_path(path)} is not {what} ({e}).", hint=hint, path=path, tensor=None, reason=str(e)
        ) from e
    return value
