"""`reforge merge`: the readapted retriever."""

from __future__ import annotations

import click

from reforge.cli import output as ui
from reforge.cli.options import (
    DTYPE_CHOICES,
    adapter_options,
    adapter_pairs,
    hub_options,
    keep_lm_head_option,
    output_options,
    source_options,
    stream_device_option,
    write_options,
)
from reforge.ops.defaults import PAPER_BETA


@click.command("merge")
@source_options()
@adapter_options()
@click.option("--beta", type=float, default=PAPER_BETA, show_default=True, help="Weight of Delta.")
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="Output dtype. auto = each tensor's dtype in the retriever.",
)
@click.option(
    "--corpus",
    default=None,
    help="Name of the corpus the adapter was trained on, for the model card "
    "(default: read from the adapter's training record).",
)
@write_options
@keep_lm_head_option
@stream_device_option
@hub_options
@output_options
def merge_cmd(
    base: str,
    retriever: str | None,
    delta: str | None,
    adapters: tuple[str, ...],
    alphas: tuple[float, ...],
    beta: float,
    dtype: str,
    corpus: str | None,
    output: str,
    max_shard_size: int,
    overwrite: bool,
    dry_run: bool,
    durable: bool,
    keep_lm_head: bool,
    device: str,
    token: str | None,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write base + alpha*Psi + beta*Delta in the retriever's layout.

    The output loads exactly where the original retriever loads (same architecture, config, dtypes, tokenizer and
    sentence-transformers files; no lm_head) and carries a model card recording its provenance. Every tensor is
    computed in fp32 from the stored inputs and rounded once. Streamed tensor by tensor; safe to interrupt and
    rerun.

    \b
    Examples:
      reforge merge --base mistralai/Mistral-7B-v0.1 --retriever intfloat/e5-mistral-7b-instruct \\
          --adapter psi/ -o e5-readapted/
      reforge merge --base base/ --delta delta/ --adapter psi/ --alpha 0.5 --beta 1.0 -o out/
      reforge merge --base base/ --retriever r/ --adapter a/ --alpha 0.5 --adapter b/ --alpha 0.3 -o out/
      reforge merge --base base/ --retriever r/ --adapter psi/ -o out/ --dry-run
    """
    from reforge.ops.job import Access, WriteOptions
    from reforge.ops.merge import merge

    pairs = adapter_pairs(adapters, alphas)
    if not pairs:
        ui.warn("no --adapter given: the output is base + beta*Delta (the retriever itself when beta is 1).")
    write = WriteOptions(dtype, max_shard_size, overwrite, durable, dry_run, ui.command_line())
    with ui.progress_bar("merge", unit="bytes", quiet=quiet or as_json) as progress:
        report = merge(
            base,
            output,
            retriever=retriever,
            delta=delta,
            adapters=pairs,
            beta=beta,
            corpus=corpus,
            write=write,
            access=Access(token, allow_pickle),
            keep_lm_head=keep_lm_head,
            progress=progress,
            device=device,
        )
    if dry_run and not as_json:
        ui.show_plan(report.plan)
    ui.show_write_report(report, as_json=as_json, what="merged retriever")
