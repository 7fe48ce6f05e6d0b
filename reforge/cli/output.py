"""The only module that writes to the terminal.

stdout carries results (a table, or JSON with ``--json``); progress, logs, warnings and hints go to one stderr console.
API functions report progress through a plain callback ``progress(done, total)``; `progress_bar` adapts it to rich.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ProgressFn = Callable[[int, "int | None"], None]


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout (one document, for machines)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """A progress or log line on stderr."""
    err.print(message, highlight=False)


def warn(message: str) -> None:
    """A warning on stderr; printed even with --quiet."""
    err.print(f"[yellow]Warning:[/yellow] {message}", highlight=False)


@contextmanager
def progress_bar(description: str, *, unit: str = "items", quiet: bool = False) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr, yielded as a ``progress(done, total)`` callback.

    ``unit="bytes"`` shows sizes and transfer speed; anything else shows counts. The bar is transient and is
    disabled by ``quiet`` or when stderr is not a terminal.
    """
    if unit == "bytes":
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn()]
    else:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
    disable = quiet or not err.is_terminal
    with Progress(*columns, console=err, transient=True, disable=disable) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int | None = None, description: str | None = None) -> None:
            kwargs: dict[str, Any] = {"completed": done}
            if total is not None:
                kwargs["total"] = total
            if description is not None:
                kwargs["description"] = description
            progress.update(task, **kwargs)

        yield update
