"""The only module that writes to the terminal.

stdout carries results (a table, or JSON with ``--json``); progress, logs, warnings and hints go to one stderr console.
API functions report progress through a plain callback ``progress(done, total)``; `progress_bar` adapts it to rich.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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

from reforge.errors import mask_secrets
from reforge.io.progress import ProgressFn

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


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


PROGRESS_EVERY_ENV = "REFORGE_PROGRESS_EVERY"  # seconds between plain progress lines (default 30)


@contextmanager
def progress_bar(
    description: str, *, unit: str = "items", quiet: bool = False, log_file: str | None = None
) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr, yielded as a ``progress(done, total)`` callback.

    ``unit="bytes"`` shows sizes and transfer speed; anything else shows counts. The bar is transient and is
    disabled by ``quiet`` or when stderr is not a terminal. Without a terminal (nohup, slurm, CI) and without
    ``quiet``, a plain line goes to stderr instead every ``$REFORGE_PROGRESS_EVERY`` seconds (30) and at each new
    stage; ``log_file`` gets the same lines appended, terminal or not.
    """
    live = not quiet and err.is_terminal
    sinks = [] if quiet or live else [_stderr_line]
    with _append_lines(log_file) as log:
        if log is not None:
            sinks.append(log)
        lines = PlainProgress(description, unit, sinks, _progress_every()) if sinks else None
        with _live_bar(description, unit=unit, disable=not live) as bar:

            def update(done: int, total: int | None = None, description: str | None = None) -> None:
                bar(done, total, description)
                if lines is not None:
                    lines.update(done, total, description)

            yield update
        if lines is not None:
            lines.finish()


class PlainProgress:
    """Progress as plain lines for logs: ``[12:00:05] Training: 120/400 (30%) | loss 2.345 | 1,234 tok/s |
    elapsed 1m05s | ETA 2m31s``, or ``[11:59:30] Training: Reading the corpus | elapsed 30s`` before counting begins.

    A line every ``every`` seconds (the first after ``every`` seconds, so a short command prints none), and a last
    one at the end of a command that printed any. The ETA is the time per unit since counting began times the units
    left."""

    def __init__(
        self,
        label: str,
        unit: str,
        sinks: list[Callable[[str], None]],
        every: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.label, self.unit, self.sinks, self.every = label, unit, sinks, every
        self.clock = clock or time.monotonic
        self.started = self.last_emit = self.clock()
        self.counting_since: float | None = None
        self.done, self.total, self.description = 0, None, ""
        self.stage: str | None = None
        self.printed: str | None = None

    def update(self, done: int, total: int | None = None, description: str | None = None) -> None:
        """Record the state (a description without a total begins a stage); emit a line when one is due."""
        now = self.clock()
        if total is None and description is not None and (description != self.stage or self.total is None):
            if description != self.stage:
                self.stage, self.counting_since, self.total, self.description = description, None, None, ""
        else:
            if description is not None:
                self.description = description
            if total is not None and self.counting_since is None:
                self.counting_since = now
            self.done, self.total = done, total if total is not None else self.total
        finished = self.printed is not None and self.total is not None and self.done >= self.total
        if now - self.last_emit >= self.every or finished:
            self._emit(now)

    def finish(self) -> None:
        """The final state, if this command printed any line and not this one already."""
        if self.printed is not None:
            self._emit(self.clock(), only_if_new=True)

    def _line(self, now: float) -> str:
        elapsed = f"elapsed {_duration(now - self.started)}"
        if self.total is None or self.counting_since is None:
            return f"{self.stage or 'starting'} | {elapsed}"
        size = _size if self.unit == "bytes" else (lambda n: f"{n:,}")
        parts = [f"{size(self.done)}/{size(self.total)}" + (f" ({self.done / self.total:.0%})" if self.total else "")]
        if self.description and self.description != self.label:
            parts.append(self.description)
        parts.append(elapsed)
        spent = now - self.counting_since
        if self.total and 0 < self.done < self.total and spent > 0:
            parts.append(f"ETA {_duration(spent / self.done * (self.total - self.done))}")
        return " | ".join(parts)

    def _emit(self, now: float, only_if_new: bool = False) -> None:
        from datetime import datetime

        text = self._line(now)
        if only_if_new and text.rsplit(" | elapsed", 1)[0] == (self.printed or "").rsplit(" | elapsed", 1)[0]:
            return
        self.last_emit, self.printed = now, text
        line = f"[{datetime.now().strftime('%H:%M:%S')}] {self.label}: {text}"
        for sink in self.sinks:
            sink(line)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _progress_every() -> float:
    import os

    try:
        return max(0.0, float(os.environ.get(PROGRESS_EVERY_ENV, "30")))
    except ValueError:
        return 30.0


def _stderr_line(line: str) -> None:
    err.print(line, highlight=False, markup=False)


@contextmanager
def _append_lines(path: str | None) -> Iterator[Callable[[str], None] | None]:
    """A sink that appends each line to ``path`` and flushes it (a log you can tail), or None."""
    if path is None:
        yield None
        return
    with open(path, "a", encoding="utf-8") as handle:

        def write(line: str) -> None:
            handle.write(line + "\n")
            handle.flush()

        yield write


@contextmanager
def _live_bar(description: str, *, unit: str, disable: bool) -> Iterator[Callable[..., None]]:
    if unit == "bytes":
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        ]
    else:
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
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


def show_write_report(report: Any, *, as_json: bool, what: str) -> None:
    """Print the result of a command that writes a checkpoint (diff, merge): JSON, or a short summary."""
    import dataclasses

    data = dataclasses.asdict(report)
    if as_json:
        print_json(data)
        return
    target = data["output"]
    if data.get("dry_run"):
        out.print(
            f"Plan for {what} {target}: {data['tensors']} tensors, {_size(data['total_size'])} in "
            f"{len(data['shards'])} shard(s) of {', '.join(_size(s) for s in data['shards'])}; "
            f"dtype {data['dtype']}. Nothing written (--dry-run).",
            highlight=False,
        )
        return
    if data.get("already_complete"):
        out.print(f"{target} already holds this exact {what}; nothing to do.", highlight=False)
        return
    resumed = f", {data['resumed_shards']} shard(s) kept from an interrupted run" if data.get("resumed_shards") else ""
    out.print(
        f"Wrote {what} {target}: {data['tensors']} tensors, {_size(data['total_size'])} in "
        f"{len(data['shards'])} shard(s), dtype {data['dtype']}, {data['seconds']:.1f} s{resumed}.",
        highlight=False,
    )
    for key, label in (
        ("max_abs_rounding", "max |stored - exact fp32|"),
        ("low_rank_relative_error", "max relative Frobenius error of the low-rank factors"),
    ):
        if data.get(key) is not None:
            out.print(f"  {label}: {data[key]:.3g}", highlight=False)
    for key, rows in (data.get("extra_vocab_rows") or {}).items():
        out.print(
            f"  {key}: {rows} row(s) beyond the base vocabulary stored as the retriever's values", highlight=False
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def show_plan(plan: dict[str, list[str]]) -> None:
    """The terms of each output tensor (for --dry-run), grouped so that 7B models stay readable."""
    from collections import defaultdict

    from rich.markup import escape
    from rich.table import Table

    groups: dict[str, list[str]] = defaultdict(list)
    for key, terms in plan.items():
        groups[" + ".join(terms)].append(key)
    table = Table("output tensor = ", "tensors", "e.g.")
    for terms, keys in sorted(groups.items(), key=lambda item: -len(item[1])):
        table.add_row(escape(terms), str(len(keys)), escape(keys[0]))
    print_table(table)


def show_checks(report: Any) -> None:
    """A verify report: one line per check, then the verdict."""
    from rich.markup import escape

    for check in report.checks:
        mark = "[green]ok[/green]  "
        if not check.ok:
            mark = "[red]FAIL[/red]"
        elif check.skipped:  # passed as far as it ran; the detail says what it could not check
            mark = "[yellow]part[/yellow]"
        out.print(f"{mark} {check.name:<11} {escape(check.detail)}")
    skipped = len(getattr(report, "skipped", []))
    verdict = (
        "[red]failed[/red]"
        if not report.ok
        else f"[yellow]no failure, but {skipped} check(s) not (fully) run[/yellow]"
        if skipped
        else "[green]sound[/green]"
    )
    out.print(f"{escape(str(report.path))} ({report.kind}): {verdict}")


def show_summary(summary: dict) -> None:
    """`reforge inspect`'s table."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False, box=None)
    rows = [
        ("kind", summary["kind"]),
        ("path", summary["path"]),
        ("architecture", summary.get("architecture") or "-"),
        ("tensors", f"{summary['tensors']:,} ({summary['parameters']:,} parameters, {_size(summary['bytes'])})"),
        ("dtypes", ", ".join(f"{k}: {v}" for k, v in summary["dtypes"].items())),
        ("files", ", ".join(summary["files"])),
    ]
    layout = summary.get("layout")
    if layout:
        form = "bare model (retriever layout)" if layout["bare"] else f"prefix {layout['prefix']!r}"
        head = ", ".join(layout["head"]) or "none"
        rows.append(("layout", f"{form}; head tensors: {head}; tied embeddings: {layout['tied_embeddings']}"))
    adapter = summary.get("adapter")
    if adapter:
        rows.append(
            (
                "adapter",
                f"{adapter['type']} r={adapter['r']} alpha={adapter['lora_alpha']} on "
                f"{adapter['target_modules']}; base {adapter['base']}",
            )
        )
    update = summary.get("update")
    if update:
        relative = update["relative"]
        rows.append(
            (
                "update",
                f"||Psi||/||W|| over {update['modules']} weights: mean {relative['mean']:.3g}, median "
                f"{relative['median']:.3g}, max {relative['max']:.3g} ({relative['max_tensor']}); "
                f"||Psi|| {update['norm']:.4g}; by target: "
                + ", ".join(f"{name} {value:.3g}" for name, value in update["by_target"].items()),
            )
        )
    for key, value in (summary.get("reforge") or {}).items():
        rows.append((f"reforge.{key}", json.dumps(value, default=str)[:200]))
    for name, value in rows:
        table.add_row(name, escape(str(value)))
    print_table(table)


def print_table(table: Any) -> None:
    """Print a rich table on stdout; when stdout is not a terminal, as wide as it needs (no truncated names)."""
    if out.is_terminal:
        out.print(table)
        return
    needed = out.measure(table, options=out.options.update(max_width=10_000)).maximum
    saved = out.width
    out.width = max(saved, needed)
    try:
        out.print(table)
    finally:
        out.width = saved


def p_value(value: float) -> str:
    """A p-value for a table."""
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def quiet_transformers() -> None:
    """transformers' own tqdm bars and warnings would interleave with ours."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def command_line() -> str | None:
    """How this command was invoked (``reforge merge ...``), recorded in the outputs' provenance.

    The record is published (reforge.json, the model card, `reforge push`), so it never holds a secret: an option
    that carries one (``--token``, ``--token=...``) is dropped with its value, and any other argument holding a
    token (``hf_...``, or the value of HF_TOKEN) is masked. Absolute local paths become their folder names.
    """
    import shlex

    import click

    context = click.get_current_context(silent=True)
    argv = context.meta.get(ARGV_KEY) if context is not None else None
    if argv is None:
        argv = sys.argv[1:] if sys.argv else None
    if argv is None:
        return None
    return "reforge " + shlex.join(redact_arguments(argv))


ARGV_KEY = "reforge.argv"  # where the root group keeps the arguments it was given (see reforge.cli.LazyGroup)
_SECRET_OPTION = re.compile(r"^--?[\w-]*(token|password|passwd|secret|api[-_]?key|credential)[\w-]*$", re.I)
_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def redact_arguments(argv: list[str]) -> list[str]:
    """``argv`` without secrets, with absolute local paths cut to their last component (see `command_line`)."""
    import os

    secrets = [os.environ[name] for name in _SECRET_ENV if len(os.environ.get(name) or "") >= 4]
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        option, eq, value = arg.partition("=")
        if _SECRET_OPTION.match(option):
            skip_value = not eq  # "--token VALUE": drop both; "--token=VALUE": drop the one argument
            continue
        for secret in secrets:
            arg = arg.replace(secret, "***")
        arg = mask_secrets(arg)  # token-like strings: one set of patterns, in reforge.errors
        if option.startswith("-") and eq:
            kept.append(f"{option}={_local_name(value)}")
        else:
            kept.append(_local_name(arg))
    return kept


def _local_name(arg: str) -> str:
    """An absolute local path (``/home/me/models/base/``, ``~/x``) as its last component (``base``)."""
    from pathlib import PurePath

    if not arg.startswith(("/", "~")) or arg.strip("/~") == "":
        return arg
    return PurePath(arg.rstrip("/")).name or arg
