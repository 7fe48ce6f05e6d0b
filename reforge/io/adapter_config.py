"""A peft adapter folder's ``adapter_config.json``: its name and its one reader.

`reforge.io.checkpoint` (opening an adapter), `reforge.ops.recheck` (verify's independent check) and
`reforge.eval.model` read it here: one reader, one error for a damaged file (issue 23: one home per fact).
"""

from __future__ import annotations

from pathlib import Path

from reforge.io.jsonfile import read_json_object

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(folder: str | Path) -> bool:
    """Whether ``folder`` is a peft adapter folder (it has an ``adapter_config.json``)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> dict:
    """The parsed ``adapter_config.json`` of the adapter ``folder``.

    Raises:
        CorruptCheckpointError: the file is missing, unreadable, not JSON, or not a JSON object; the message names it.
    """
    return read_json_object(Path(folder) / ADAPTER_CONFIG, what="a readable adapter config")
