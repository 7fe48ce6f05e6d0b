"""A file written whole or not at all: a temporary name in the same folder, fsynced, then renamed into place.

Used by every cache (embedding shards, corpus indexes, token lengths) and result file reforge writes outside a
checkpoint, so a reader never sees half a file and an interrupted run leaves only whole files behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a binary file that becomes ``path`` only once it is complete (mode 0644).

    Raises:
        OSError: from the disk (full, read-only); the temporary file is removed and ``path`` is untouched.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
