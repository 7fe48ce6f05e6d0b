"""`reforge eval`: retrieval quality of one or more models on BEIR-style datasets, side by side."""

from __future__ import annotations

from typing import Any

import click

from reforge.cli import output
from reforge.cli.options import (
    MetricType,
    encoding_options,
    encoding_settings,
    hub_options,
    log_file_option,
    output_options,
    sample_options,
)


@click.command("eval")
@click.argument("models", nargs=-1, required=True, metavar="MODEL [MODEL ...]")
@click.option(
    "-d",
    "--data",
    "datasets",
    multiple=True,
    required=True,
    metavar="DIR",
    help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv). Repeat for several datasets.",
)
@click.option("--split", default="test", show_default=True, help="Which qrels/<split>.tsv to score.")
@click.option(
    "-m",
    "--metric",
    "metrics",
    multiple=True,
    type=MetricType(),
    metavar="NAME",
    help="ir-measures name, repeatable: nDCG@10 (default), R@100, RR@10, AP, P@5, ...",
)
@click.option("--base", default=None, help="Base model for adapter MODELs (default: the adapter config's).")
@click.option(
    "--tokenizer",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="Folder with the tokenizer files, for MODELs that have none (default: the model's, else its base's).",
)
@click.option(
    "-o",
    "--output",
    "output_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write summary.json, runs/*.trec and per_query/*.tsv here.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples and the randomization test.")
@sample_options
@encoding_options
@log_file_option
@hub_options
@output_options
def eval_cmd(
    models: tuple[str, ...],
    datasets: tuple[str, ...],
    metrics: tuple[str, ...],
    output_dir: str | None,
    quiet: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """nDCG@10 (and more) of retrievers on BEIR-style datasets.

    Encodes each corpus once per model (cached on disk, keyed by model, corpus and settings), searches exactly with
    faiss, scores with ir-measures, and compares every MODEL with the first: difference, paired t-test and
    randomization-test p-values, and per-query wins/ties/losses. MODEL is a folder or Hub id; a peft adapter is
    merged into its base in memory. With torchrun / accelerate launch, ranks share the corpus encoding.

    \b
    Examples:
      reforge eval ~/.cache/reforge-models/all-MiniLM-L6-v2 --data ../shared/data/scifact
      reforge eval retriever/ readapted/ -d scifact/ -d nfcorpus/ --metric nDCG@10 --metric R@100
      reforge eval intfloat/e5-mistral-7b-instruct -d scifact/ --output results/ --json
      reforge eval retriever/ -d msmarco/ --split dev --max-queries 500 --corpus-sample 100000
      torchrun --nproc-per-node 4 -m reforge.cli.eval repllama/ -d trec-covid/
    """
    from reforge.data.beir import load_beir
    from reforge.eval import evaluate, write_outputs

    output.quiet_transformers()
    settings = encoding_settings(
        options,
        split=options["split"],
        measures=tuple(metrics) or ("nDCG@10",),
        base=options["base"],
        tokenizer=options["tokenizer"],
        seed=options["seed"],
        max_queries=options["max_queries"],
        corpus_sample=options["corpus_sample"],
        token=options["token"],
        allow_pickle=options["allow_pickle"],
    )
    if output_dir:  # fail now, not after encoding every corpus
        from reforge.io.target import check_writable

        check_writable(output_dir)
    data = [load_beir(path, settings.split) for path in datasets]
    for dataset in data:
        for warning in dataset.warnings:
            output.warn(warning)
    with output.progress_bar("Encoding", quiet=quiet or as_json, log_file=options["log_file"]) as bar:
        report = evaluate(list(models), data, settings, progress=bar, stage=lambda text: bar(0, None, description=text))
    if report is None:  # a rank other than 0 of a distributed run: it only encoded its shards
        return
    if not quiet:
        for dataset in report.datasets:
            if dataset.sample:
                s = dataset.sample
                output.info(
                    f"{dataset.name}: sample of {s['queries']} of {s['split_queries']} queries and "
                    f"{s['documents']} of {s['split_documents']} documents (seed {s['seed']})"
                )
        for result in report.results:
            rate = result.docs_per_second
            corpus = (
                "corpus from cache"
                if result.corpus_cached
                else f"{int(result.timings['documents'])} docs encoded in {result.timings['encode_corpus']:.1f} s"
                + (f" ({rate:.1f} docs/s)" if rate else "")
            )
            output.info(f"{result.model} on {result.dataset}: {corpus}; search {result.timings['search']:.2f} s")
    if as_json:
        output.print_json(report.to_dict())
    else:
        for measure in report.measures:
            table, caption = _table(report, measure)
            output.print_table(table)
            output.out.print(caption, highlight=False)
    if output_dir:  # after the results are shown: a full disk must not cost them
        from reforge.io.target import OutputLock, write_error

        try:
            with OutputLock(output_dir):  # the lock every command writing a folder takes
                written = write_outputs(report, output_dir)
        except OSError as e:
            raise write_error(
                e, output_dir, "The results above are complete; free some space or choose another --output and rerun."
            ) from e
        output.info(f"Wrote {len(written)} files to {output_dir}")


def _table(report: Any, measure: str) -> tuple[Any, str]:
    from rich.table import Table

    compare = len(report.models) > 1
    caption = (
        f"{measure}, {report.averaging_text}; split {report.settings['split']}, "
        f"top-{report.settings['top_k']}, identical ids "
        f"{'kept' if report.settings['keep_identical_ids'] else 'dropped'}"
    )
    if compare:
        caption += (
            f". Δ and tests against {report.models[0].name}: paired t-test, randomization test "
            f"({report.settings['permutations']} sign flips, seed {report.settings['seed']}); "
            f"W/T/L = queries better/equal/worse"
        )
    table = Table(title=f"reforge eval: {measure}")
    for name in ["Dataset", "Model", measure] + (["Δ", "p (t-test)", "p (rand.)", "W/T/L"] if compare else []):
        table.add_column(name, justify="left" if name in ("Dataset", "Model") else "right", no_wrap=True)
    for dataset in report.datasets:
        for i, model in enumerate(report.models):
            row = [dataset.name if i == 0 else "", model.name, f"{report.score(model.name, dataset.name, measure):.4f}"]
            if compare and i > 0:
                c = report.comparison(model.name, dataset.name, measure)
                t = c.test
                row += [
                    f"{t.delta:+.4f}",
                    output.p_value(t.p_ttest),
                    output.p_value(t.p_randomization),
                    f"{t.wins}/{t.ties}/{t.losses}",
                ]
            elif compare:
                row += ["", "", "", ""]
            table.add_row(*row, end_section=i == len(report.models) - 1)
    if len(report.datasets) > 1:
        first = report.average(report.models[0].name, measure)
        for i, model in enumerate(report.models):
            average = report.average(model.name, measure)
            row = ["Average" if i == 0 else "", model.name, f"{average:.4f}"]
            if compare:
                row += [f"{average - first:+.4f}" if i else "", "", "", ""]
            table.add_row(*row)
    return table, caption


if __name__ == "__main__":  # torchrun --nproc-per-node N -m reforge.cli.eval MODEL --data DIR
    from reforge.cli import main

    main(["eval", *__import__("sys").argv[1:]])
