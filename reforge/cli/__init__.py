"""The `reforge` command line: a root group, its subcommands, and the one place errors become messages.

Subcommands live in one module each and are attached lazily, so `reforge --help` imports no torch.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import traceback

import click

from reforge import __version__

# command name -> (module, attribute, one-line summary shown in `reforge --help` without importing the module)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": ("reforge.cli.inspect", "inspect_cmd", "Show a checkpoint's layout: tensors, dtypes, shards, kind."),
    "diff": ("reforge.cli.diff", "diff_cmd", "Compute Delta = retriever - base, streamed into a sharded checkpoint."),
    "train": ("reforge.cli.train", "train_cmd", "Train a DoRA knowledge adapter on the base LM over unlabeled text."),
    "merge": ("reforge.cli.merge", "merge_cmd", "Write base + alpha*Psi + beta*Delta in the retriever's layout."),
    "verify": ("reforge.cli.verify", "verify_cmd", "Check that a delta or merged checkpoint is sound."),
    "eval": ("reforge.cli.eval", "eval_cmd", "nDCG@10 (and more) of retrievers on BEIR-style datasets."),
    "tune": ("reforge.cli.tune", "tune_cmd", "Choose alpha (and beta) on held-out queries."),
    "queries": (
        "reforge.cli.queries",
        "queries_cmd",
        "Write synthetic queries for a corpus, to tune and evaluate without labels.",
    ),
    "push": ("reforge.cli.push", "push_cmd", "Upload a verified checkpoint folder to the Hugging Face Hub."),
    "run": ("reforge.cli.run", "run_cmd", "Run a recipe: every step in dependency order, skipping what is made."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when one is run or its help is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _, _) in COMMANDS.items() if _module_exists(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _module_exists(COMMANDS[name][0]):
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Keep the arguments as given, for the provenance command (`reforge.cli.output.command_line`)."""
        ctx.meta["reforge.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        """Run the command; a reforge error (or a known Hub error) becomes one ``Error: ...`` line and exit 1."""
        try:
            with _library_warnings():
                return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted. Rerun the same command: finished work is kept, the rest starts clean.", err=True)
            ctx.exit(130)
        except click.ClickException:
            raise
        except Exception as e:  # noqa: BLE001 - decided by type in format_error; unknown types re-raise
            message = format_error(e)
            if message is None:
                raise
            if os.environ.get("REFORGE_DEBUG"):
                traceback.print_exc()
            raise ReforgeUsageFailure(message) from e

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@contextlib.contextmanager
def _library_warnings():
    """Warnings the library logs (``reforge.*`` loggers, e.g. each Hub retry) printed as warnings, even with
    --quiet (issue 26: a silent Hub used to be waited on with nothing shown)."""
    import logging

    from reforge.cli import output

    class _ToWarn(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            output.warn(record.getMessage())

    logger, handler = logging.getLogger("reforge"), _ToWarn(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # printed once, not again by a root handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _module_exists(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="reforge")
def cli() -> None:
    """Readapt an LLM-based dense retriever to a new domain with unlabeled text (RE-AdaptIR).

    \b
    The pipeline, each step streamed tensor by tensor:
      reforge diff BASE RETRIEVER -o delta/              # Delta = retriever - base
      reforge train BASE --corpus docs.jsonl -o psi/      # DoRA knowledge adapter on the base LM
      reforge merge --base BASE --retriever RETRIEVER --adapter psi/ -o new/   # + 0.5*Psi
      reforge eval RETRIEVER new/ --data scifact/          # nDCG@10, side by side

    Set REFORGE_DEBUG=1 to see tracebacks of reforge errors.
    """


class ReforgeUsageFailure(click.ClickException):
    """An expected failure, already formatted: click prints ``Error: <message>`` to stderr and exits 1."""

    exit_code = 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `reforge` script. Errors are handled in `LazyGroup.invoke`, so tests see the same."""
    from reforge.ops.stream import tune_allocator

    tune_allocator()
    cli.main(args=argv, prog_name="reforge")


def format_error(error: BaseException) -> str | None:
    """The one-line message for an error we expect, or None for a bug. Chosen by walking the type's MRO."""
    for cls in type(error).__mro__:
        formatter = _FORMATTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if formatter is not None:
            return formatter(error)
    return None


def _format_reforge(error: BaseException) -> str:
    return str(error)


def _format_hub_http(error: BaseException) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    where = f" (HTTP {status})" if status else ""
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"Hugging Face Hub request failed{where}: {first_line}"


def _format_repo_not_found(error: BaseException) -> str:
    return (
        "Hub repository not found or not accessible. Check the repo id, or pass --token / run "
        "`hf auth login` if it is private."
    )


def _format_revision_not_found(error: BaseException) -> str:
    return "Hub revision not found. Check the branch, tag or commit after '@'."


def _format_offline(error: BaseException) -> str:
    return (
        "Hub is unreachable or HF_HUB_OFFLINE=1 is set, and the file is not in the local cache. "
        "Pass a local folder, or go online."
    )


_FORMATTERS = {
    "reforge.errors.ReforgeError": _format_reforge,
    "huggingface_hub.errors.HfHubHTTPError": _format_hub_http,
    "huggingface_hub.errors.RepositoryNotFoundError": _format_repo_not_found,
    "huggingface_hub.errors.RevisionNotFoundError": _format_revision_not_found,
    "huggingface_hub.errors.OfflineModeIsEnabled": _format_offline,
    "huggingface_hub.errors.LocalEntryNotFoundError": _format_offline,
}
