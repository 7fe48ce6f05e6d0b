"""`reforge tune`: choose alpha (and beta) on held-out queries, then optionally write the best merge."""

from __future__ import annotations

from typing import Any

import click

from reforge.cli import output as ui
from reforge.cli.options import (
    MetricType,
    encoding_options,
    encoding_settings,
    hub_options,
    log_file_option,
    max_shard_size_option,
    output_options,
    sample_options,
    source_options,
)
from reforge.ops.defaults import DEFAULT_ALPHAS, PAPER_BETA

GRID_CONFIRM = 1000  # points; a bigger grid (e.g. a range typed with one digit too many) is confirmed first


class GridType(click.ParamType):
    """A list of numbers ``0,0.25,0.5`` or an inclusive range ``0:1:0.25``, checked at parse time."""

    name = "grid"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        from reforge.errors import InvalidOptionError
        from reforge.tune import parse_grid

        if isinstance(value, tuple):
            return value
        try:
            return parse_grid(str(value), option=param.opts[0] if param else "--alpha")
        except InvalidOptionError as e:
            self.fail(str(e), param, ctx)


@click.command("tune")
@source_options()
@click.option("--adapter", required=True, help="The knowledge adapter (peft folder from `reforge train`).")
@click.option("-d", "--data", required=True, metavar="DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/).")
@click.option("--split", default="dev", show_default=True, help="The held-out qrels split to tune on.")
@click.option(
    "--test-split",
    default="test",
    show_default=True,
    help="The split you will report; tuning on it is refused unless --i-know.",
)
@click.option("--i-know", is_flag=True, help="Allow --split to equal --test-split (the result is then optimistic).")
@click.option(
    "--alpha",
    "alphas",
    type=GridType(),
    default=",".join(f"{alpha:g}" for alpha in DEFAULT_ALPHAS),
    show_default=True,
    help="Alphas to try: a list 0,0.5,1 or a range start:stop:step (0:1:0.1).",
)
@click.option(
    "--beta", "betas", type=GridType(), default=f"{PAPER_BETA:g}", show_default=True, help="Betas to try (same forms)."
)
@click.option(
    "-m",
    "--metric",
    type=MetricType(),
    default="nDCG@10",
    show_default=True,
    metavar="NAME",
    help="The ir-measures metric to maximize: nDCG@10, R@100, RR@10, AP, ...",
)
@sample_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples and the randomization test.")
@encoding_options
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG of the metric against alpha [tune-<dataset>-<split>.png].",
)
@click.option("--no-plot", is_flag=True, help="Write no PNG.")
@click.option(
    "--write",
    "write_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write the merged model of the best point here (exactly what `reforge merge` writes).",
)
@max_shard_size_option("Largest shard file of --write.")
@click.option("--overwrite", is_flag=True, help="Let --write replace a folder that holds a different checkpoint.")
@log_file_option
@click.option("-y", "--yes", is_flag=True, help=f"Run a grid of more than {GRID_CONFIRM:,} points without asking.")
@hub_options
@output_options
def tune_cmd(
    base: str,
    retriever: str | None,
    delta: str | None,
    adapter: str,
    data: str,
    split: str,
    test_split: str,
    i_know: bool,
    alphas: tuple[float, ...],
    betas: tuple[float, ...],
    metric: str,
    max_queries: int | None,
    corpus_sample: int | None,
    seed: int,
    plot_path: str | None,
    no_plot: bool,
    write_dir: str | None,
    max_shard_size: int,
    overwrite: bool,
    yes: bool,
    log_file: str | None,
    token: str | None,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Choose alpha (and beta) on held-out queries.

    Scores base + alpha*Psi + beta*Delta for every point of the grid on a held-out split, each merged in memory
    (nothing written per point; embeddings cached by model content, so a repeated point is free). Prints the
    table, the best point and its paired tests against alpha = 0 (the original retriever), and writes a PNG of
    the metric against alpha. --write then writes the best merge with the code `reforge merge` runs. Tuning on
    the split you report (--test-split) is refused unless --i-know. See docs/tune.md.

    \b
    Examples:
      reforge tune --base base/ --retriever repllama/ --adapter psi/ -d nfcorpus/ --split dev
      reforge tune --base base/ --retriever r/ --adapter psi/ -d scifact/ --split train \\
          --alpha 0:1:0.1 --max-queries 200 --corpus-sample 2000 --write readapted/
      reforge tune --base base/ --delta delta/ --adapter psi/ -d nfcorpus/ --beta 0.9,1 --json
    """

    from reforge.tune import plot_tuning, tune

    if plot_path and no_plot:
        raise click.UsageError("--plot and --no-plot contradict each other; drop one.")
    if not no_plot and not _has_matplotlib():
        raise click.UsageError("The plot needs matplotlib: pip install matplotlib, or pass --no-plot.")
    _confirm_grid(len(alphas) * len(betas), yes)
    if write_dir:  # a bad --write fails now, not after the whole grid
        from reforge.io.target import check_output

        check_output(write_dir, inputs=[base, retriever, delta, adapter], overwrite=overwrite, option="--write")
    ui.quiet_transformers()
    settings = encoding_settings(options, token=token, allow_pickle=allow_pickle)
    with ui.progress_bar("Tuning", quiet=quiet or as_json, log_file=log_file) as bar:
        report = tune(
            base,
            adapter,
            data,
            retriever=retriever,
            delta=delta,
            alphas=alphas,
            betas=betas,
            metric=metric,
            split=split,
            test_split=test_split,
            i_know=i_know,
            max_queries=max_queries,
            corpus_sample=corpus_sample,
            seed=seed,
            settings=settings,
            progress=bar,
            stage=lambda text: bar(0, None, description=text),
        )
    for warning in report.warnings:
        ui.warn(warning)
    summary = report.to_dict()
    if not no_plot:
        summary["plot"] = str(plot_tuning(report, plot_path or f"tune-{report.dataset.name}-{report.split}.png"))
    if write_dir:
        from reforge.ops.job import Access, WriteOptions

        write = WriteOptions(max_shard_size=max_shard_size, overwrite=overwrite, command=ui.command_line())
        try:
            written = _write(report, write_dir, write, Access(token, allow_pickle), quiet or as_json, log_file)
        except Exception:
            _show_or_print(report, summary, as_json)  # the table is the result of the work: never lose it
            raise
        summary["written"] = {
            "output": str(written.output),
            "tensors": written.tensors,
            "total_size": written.total_size,
            "max_abs_rounding": written.max_abs_rounding,
            "already_complete": written.already_complete,
        }
    _show_or_print(report, summary, as_json)


def _show_or_print(report: Any, summary: dict, as_json: bool) -> None:
    if as_json:
        ui.print_json(summary)
    else:
        _show(report, summary)


def _write(report: Any, write_dir: str, write: Any, access: Any, quiet: bool, log_file: str | None) -> Any:
    """`reforge.tune.write_best` with a progress bar: ``write`` and ``access`` are the option groups
    (`reforge.ops.job.WriteOptions`, `Access`) of ``--max-shard-size/--overwrite`` and ``--token/--allow-pickle``."""
    from reforge.tune import write_best

    with ui.progress_bar("merge", unit="bytes", quiet=quiet, log_file=log_file) as progress:
        return write_best(report, write_dir, write=write, access=access, progress=progress)


def _show(report: Any, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"reforge tune: {report.metric} on {report.dataset.name}, split {report.split}")
    for name in ("alpha", "beta", report.metric, "Δ", "p (t-test)", "p (rand.)", "W/T/L", "vectors"):
        table.add_column(name, justify="right", no_wrap=True)
    for p in report.points:
        mark = " *" if p is report.best else ("  (reference)" if not p.in_grid else "")
        t = p.test
        table.add_row(
            f"{p.alpha:g}",
            f"{p.beta:g}",
            f"{p.score:.4f}{mark}",
            f"{t.delta:+.4f}" if t else "",
            ui.p_value(t.p_ttest) if t else "",
            ui.p_value(t.p_randomization) if t else "",
            f"{t.wins}/{t.ties}/{t.losses}" if t else "",
            "encoded" if p.merged else "cached",
        )
    ui.print_table(table)
    sample = report.sample
    ui.out.print(
        f"{sample['queries']} of {sample['split_queries']} {report.split} queries, {sample['documents']} of "
        f"{sample['split_documents']} documents; {report.eval.averaging_text}. Δ and paired "
        f"tests against alpha 0, beta 1 (the original retriever): t-test and randomization test "
        f"({report.eval.settings['permutations']} sign flips); W/T/L = queries better/equal/worse; "
        f"vectors: encoded now or read from the cache.",
        highlight=False,
    )
    best, t = report.best, report.best.test
    verdict = (
        f"{best.score - report.baseline.score:+.4f} over alpha 0 (p = {ui.p_value(t.p_randomization)}, "
        f"randomization; {t.wins}/{t.ties}/{t.losses} queries better/equal/worse)"
        if t
        else "the original retriever itself: no point of the grid beats it"
    )
    ui.out.print(
        f"Best: alpha {best.alpha:g}, beta {best.beta:g}: {report.metric} {best.score:.4f}, {verdict}. "
        f"Chosen on {report.split}: score it on {report.test_split} with `reforge eval`.",
        highlight=False,
    )
    ui.out.print(f"Recommendation: {summary['recommendation']['text']}", highlight=False)
    if "plot" in summary:
        ui.info(f"Plot: {summary['plot']}")
    if "written" in summary:
        ui.info(f"Wrote the merge with alpha {best.alpha:g}, beta {best.beta:g} to {summary['written']['output']}")
    ui.info(f"{report.merges} in-memory merges, {report.seconds:.1f} s")


def _confirm_grid(points: int, yes: bool) -> None:
    """Ask before a grid of more than `GRID_CONFIRM` points; without a terminal to ask on, require --yes."""
    import sys

    if points <= GRID_CONFIRM or yes:
        return
    question = f"The grid has {points:,} points (each one merge and one evaluation). Run them all?"
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} Pass --yes to run it, or a smaller --alpha / --beta grid.")
    if not click.confirm(question, default=False, err=True):
        raise click.Abort()


def _has_matplotlib() -> bool:
    from importlib.util import find_spec

    return find_spec("matplotlib") is not None
