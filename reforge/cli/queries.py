"""`reforge queries`: synthetic queries for a corpus without labels, as a BEIR folder eval and tune score."""

from __future__ import annotations

from typing import Any

import click

from reforge.cli import output as ui
from reforge.cli.options import log_file_option, output_options


@click.command("queries")
@click.argument("data", metavar="DATA")
@click.option("-o", "--output", required=True, metavar="DIR", help="The BEIR folder to write.")
@click.option(
    "--generator",
    required=True,
    help="A causal LM (folder or Hub id, e.g. the base LM) prompted few-shot, or crop (a span of the document, no "
    "model). No default: neither crop nor a 135M LM ordered alphas as real labels did on every dataset "
    "(docs/results.md, section 8).",
)
@click.option(
    "-n", "--num-docs", "n", type=int, default=100, show_default=True, help="Documents to draw (one query each)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draw, the crop and LM sampling.")
@click.option(
    "--min-words", type=int, default=20, show_default=True, help="Skip documents shorter than this (title + text)."
)
@click.option("--max-words", type=int, default=32, show_default=True, help="Drop queries longer than this.")
@click.option(
    "--max-copy",
    type=int,
    default=8,
    show_default=True,
    help="Drop an LM query repeating this many consecutive words of its document (0 = off).",
)
@click.option(
    "--bm25-top",
    type=int,
    default=None,
    help="Keep a query only if BM25 ranks its document in the top K of the corpus (needs bm25s).",
)
@click.option(
    "--examples",
    "examples_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help='Few-shot examples replacing the built-in ones: JSONL of {"document": ..., "query": ...}.',
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Documents per generate call.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Longest query generated, in tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; above 0: sampled (seeded).")
@click.option(
    "--max-doc-words", type=int, default=160, show_default=True, help="Words of each document shown to the LM."
)
@click.option("--device", default=None, help="torch device of the LM [default: cuda if there is one, else cpu].")
@click.option(
    "--copy-corpus",
    is_flag=True,
    help="Copy DATA's corpus into the folder instead of linking to it (a link costs nothing for a 10 GB corpus).",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of reforge queries.")
@log_file_option
@output_options
def queries_cmd(
    data: str,
    output: str,
    generator: str,
    n: int,
    seed: int,
    min_words: int,
    max_words: int,
    max_copy: int,
    bm25_top: int | None,
    examples_file: str | None,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    max_doc_words: int,
    device: str | None,
    copy_corpus: bool,
    overwrite: bool,
    log_file: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write synthetic queries for a corpus, to tune and evaluate without labels.

    Draws -n documents spread over the corpus of DATA (a BEIR folder or a corpus .jsonl), writes one query for
    each (a cropped span, or a causal LM prompted with a few document -> query examples that come from no judged
    collection), drops empty, over-long, duplicate and copied queries, and writes a BEIR folder: corpus.jsonl (a
    link to DATA's, or a copy), queries.jsonl, qrels/synthetic.tsv and reforge-queries.json (how it was made).
    Score it with `reforge eval -d OUT --split synthetic` and `reforge tune -d OUT --split synthetic`. LM queries
    are cached per document, so a killed run resumes. DATA's qrels are never read. See docs/queries.md.

    \b
    Examples:
      reforge queries data/scifact -o syn-lm/ --generator HuggingFaceTB/SmolLM2-135M-Instruct -n 200
      reforge queries data/scifact -o syn-crop/ --generator crop -n 200 --bm25-top 100
      reforge tune --base base/ --retriever r/ --adapter psi/ -d syn-scifact/ --split synthetic
    """
    from reforge.queries.build import make_queries
    from reforge.queries.filters import FilterSettings
    from reforge.queries.generate import GenerationSettings
    from reforge.queries.prompt import Prompt, read_examples

    for option, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise click.BadParameter(f"must be at least 1, got {value}.", param_hint=option)
    if temperature < 0:
        raise click.BadParameter(f"must be 0 or more, got {temperature}.", param_hint="--temperature")
    if generator == "crop" and examples_file:
        raise click.UsageError("--examples is for an LM --generator; crop uses no prompt.")
    prompt = Prompt(max_doc_words=max_doc_words)
    if examples_file:
        prompt = Prompt(examples=read_examples(examples_file), max_doc_words=max_doc_words, source=examples_file)
    ui.quiet_transformers()
    with ui.progress_bar("queries", unit="documents", quiet=quiet or as_json, log_file=log_file) as bar:
        report = make_queries(
            data,
            output,
            generator=generator,
            n=n,
            seed=seed,
            min_words=min_words,
            filters=FilterSettings(max_words=max_words, max_copy=max_copy),
            prompt=prompt,
            generation=GenerationSettings(batch_size, max_new_tokens, temperature, device),
            bm25_top=bm25_top,
            copy_corpus=copy_corpus,
            overwrite=overwrite,
            command=ui.command_line(),
            progress=bar,
            stage=lambda text: bar(0, None, description=text),
        )
    if as_json:
        ui.print_json(report.to_dict())
        return
    _show(report)


def _show(report: Any) -> None:
    record = report.record
    counts, sample = record["counts"], record["sample"]
    reasons = ", ".join(f"{k} {v}" for k, v in counts["dropped_by_reason"].items() if v) or "none"
    ui.out.print(
        f"{counts['kept']} queries kept of {sample['drawn']} documents drawn ({record['generator']['name']}, seed "
        f"{record['seed']}; {sample['too_short_skipped']} too-short documents skipped); dropped: {reasons}. "
        f"{counts['from_cache']} from the cache.",
        highlight=False,
    )
    mode = "a link to" if record["corpus"]["mode"] == "link" else "a copy of"
    ui.out.print(
        f"Wrote {report.output} (corpus.jsonl is {mode} {record['corpus']['source']}). Score it with: "
        f"reforge eval -d {report.output} --split synthetic ...",
        highlight=False,
    )
