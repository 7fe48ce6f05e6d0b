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
@click.option(
    "--card",
    "card_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    metavar="FOLDER",
    help="Put this run's results into FOLDER's model card: FOLDER is one of the MODELs (the readapted one), the "
    "first MODEL is its retriever. Updates README.md's model-index and Evaluation table (retriever and readapted "
    "side by side with the paired tests) and reforge_eval.json; reforge push uploads both. Whole splits only.",
)
@click.option(
    "--mteb-results",
    "mteb_dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Also write MTEB v2 result files: DIR/{org__name}/{revision}/{TaskName}.json and model_meta.json "
    "(BEIR folders under MTEB task names, others as reforge-<folder>; MTEB's per-task identical-id rule). "
    "Whole splits only. Uses the mteb package's classes where installed (reforge[mteb]).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples and the randomization test.")
@click.option(
    "--bm25",
    is_flag=True,
    help="Add a BM25 row (bm25s as in MTEB's baseline: lucene, k1 1.5, b 0.75, English stop words and stemmer) "
    "with the same paired tests; with 2+ models, also a table of each model against BM25. Needs reforge[bm25].",
)
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
    mteb_dir: str | None,
    card_dir: str | None,
    bm25: bool,
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
      reforge eval retriever/ readapted/ -d scifact/ --bm25 --card readapted/
      reforge eval retriever/ readapted/ -d scifact/ -d arguana/ --mteb-results mteb-results/
      torchrun --nproc-per-node 4 -m reforge.cli.eval repllama/ -d trec-covid/
    """
    from reforge.data.beir import load_beir
    from reforge.eval import evaluate, write_outputs
    from reforge.eval.bm25 import KIND as BM25_KIND
    from reforge.eval.bm25 import NAME as BM25_NAME

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
    if card_dir and settings.sampled:
        raise click.UsageError("--card shows whole-split scores; drop --max-queries / --corpus-sample.")
    if mteb_dir:  # fail now: a sample, a short top-k, or an identical-id rule the run cannot be converted to
        from reforge.eval.mteb import check_mteb_export
        from reforge.io.target import check_writable

        check_writable(mteb_dir, option="--mteb-results")
        check_mteb_export(
            data,
            keep_identical_ids=settings.keep_identical_ids,
            top_k=settings.top_k,
            sampled=settings.sampled,
        )
    for dataset in data:
        for warning in dataset.warnings:
            output.warn(warning)
    with output.progress_bar("Encoding", quiet=quiet or as_json, log_file=options["log_file"]) as bar:
        report = evaluate(list(models), data, settings, progress=bar, stage=lambda text: bar(0, None, description=text))
    if report is None:  # a rank other than 0 of a distributed run: it only encoded its shards
        return
    if bm25:
        from reforge.eval.bm25 import BM25Settings, add_bm25

        bm25_settings = BM25Settings()
        if not (quiet or as_json):
            output.info(f"BM25: {bm25_settings.describe()}")
        report = add_bm25(report, data, bm25_settings)
    if not quiet:
        for dataset in report.datasets:
            if dataset.sample:
                s = dataset.sample
                output.info(
                    f"{dataset.name}: sample of {s['queries']} of {s['split_queries']} queries and "
                    f"{s['documents']} of {s['split_documents']} documents (seed {s['seed']})"
                )
        indexed = {m.name for m in report.models if m.profile.get("kind") == BM25_KIND}  # add_bm25's row
        for result in report.results:
            rate = result.docs_per_second
            if result.model in indexed:
                corpus = f"{int(result.timings['documents'])} docs indexed in {result.timings['encode_corpus']:.1f} s"
            else:
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
            if bm25 and len(report.models) > 2:  # the BM25 row shows the one model against BM25 already
                table, caption = _table(report, measure, baseline=BM25_NAME)
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
    if mteb_dir:
        _write_mteb(report, mteb_dir, data)
    if card_dir:
        _write_card(report, card_dir)


def _write_card(report: Any, folder: str) -> None:
    """FOLDER's results and the first model's, with FOLDER's paired test against it, into FOLDER's card."""
    from pathlib import Path

    from reforge.card import evaluation_record, write_card_evaluation
    from reforge.errors import InvalidOptionError

    target = Path(folder).resolve()
    matches = [m for m in report.models if m.path and Path(m.path).resolve() == target]
    if not matches:
        raise InvalidOptionError(f"--card {folder} is not one of the evaluated models.", option="--card")
    if matches[0].name == report.models[0].name:
        raise InvalidOptionError(
            f"--card {folder} is the first model; list the original retriever first, then {folder}.", option="--card"
        )
    record = evaluation_record(report.to_dict(), matches[0].name, report.models[0].name)
    card, evidence = write_card_evaluation(target, record)
    output.info(f"Updated {card} (model-index, Evaluation table) and {evidence}")


def _write_mteb(report: Any, folder: str, data: list[Any]) -> None:
    from reforge.eval.mteb import write_mteb_results
    from reforge.io.target import OutputLock, write_error

    try:
        with OutputLock(folder):
            files = write_mteb_results(report, folder, data)
    except OSError as e:
        raise write_error(e, folder, "The results above are complete; choose another --mteb-results and rerun.") from e
    for f in files:
        output.info(f"MTEB {f.task} ({f.model}): main_score {f.main_score:.4f} -> {f.path}; {'; '.join(f.notes)}")


def _table(report: Any, measure: str, baseline: str | None = None) -> tuple[Any, str]:
    """One measure's table: every model, tested against ``baseline`` (default: the first model), listed first."""
    from rich.table import Table

    models = list(report.models)
    if baseline:
        models.sort(key=lambda m: m.name != baseline)
    reference = models[0].name
    compare = len(models) > 1
    caption = (
        f"{measure}, {report.averaging_text}; split {report.settings['split']}, "
        f"top-{report.settings['top_k']}, identical ids "
        f"{'kept' if report.settings['keep_identical_ids'] else 'dropped'}"
    )
    if compare:
        caption += (
            f". Δ and tests against {reference}: paired t-test, randomization test "
            f"({report.settings['permutations']} sign flips, seed {report.settings['seed']}); "
            f"W/T/L = queries better/equal/worse"
        )
    if "bm25" in report.settings:
        caption += f". BM25: {report.settings['bm25']['description']}"
    title = f"reforge eval: {measure}" + (f" against {reference}" if baseline else "")
    table = Table(title=title)
    for name in ["Dataset", "Model", measure] + (["Δ", "p (t-test)", "p (rand.)", "W/T/L"] if compare else []):
        table.add_column(name, justify="left" if name in ("Dataset", "Model") else "right", no_wrap=True)
    for dataset in report.datasets:
        for i, model in enumerate(models):
            row = [dataset.name if i == 0 else "", model.name, f"{report.score(model.name, dataset.name, measure):.4f}"]
            if compare and i > 0:
                t = report.comparison(model.name, dataset.name, measure, baseline=reference).test
                row += [
                    f"{t.delta:+.4f}",
                    output.p_value(t.p_ttest),
                    output.p_value(t.p_randomization),
                    f"{t.wins}/{t.ties}/{t.losses}",
                ]
            elif compare:
                row += ["", "", "", ""]
            table.add_row(*row, end_section=i == len(models) - 1)
    if len(report.datasets) > 1:
        first = report.average(reference, measure)
        for i, model in enumerate(models):
            average = report.average(model.name, measure)
            row = ["Average" if i == 0 else "", model.name, f"{average:.4f}"]
            if compare:
                row += [f"{average - first:+.4f}" if i else "", "", "", ""]
            table.add_row(*row)
    return table, caption


if __name__ == "__main__":  # torchrun --nproc-per-node N -m reforge.cli.eval MODEL --data DIR
    from reforge.cli import main

    main(["eval", *__import__("sys").argv[1:]])
