"""`reforge verify`: check a delta or merged checkpoint."""

from __future__ import annotations

import dataclasses

import click

from reforge.cli import output as ui
from reforge.cli.options import (
    adapter_options,
    adapter_pairs,
    hub_options,
    output_options,
    source_options,
    stream_device_option,
)


@click.command("verify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@source_options(recorded=True)
@adapter_options(recorded=True)
@click.option("--beta", type=float, default=None, help="Beta the merge used (default: the recorded one).")
@click.option("--full", is_flag=True, help="Recompute every tensor, not a sample.")
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="How many adapted tensors to recompute without --full.",
)
@click.option("--no-embeddings", is_flag=True, help="Skip embedding sentences with the retriever and the new model.")
@stream_device_option
@hub_options
@output_options
def verify_cmd(folder: str, **options) -> None:
    """Check that a delta or merged checkpoint is sound.

    Checks that FOLDER loads (headers, index, nothing half-written), that every tensor is finite, that names,
    shapes and dtypes match the retriever, and recomputes a sample of tensors (all with --full) from the inputs.
    For a delta: base + Delta against the retriever, within the rounding recorded by `reforge diff`. For a merged
    model it also embeds a few sentences with the retriever and the new model and prints their cosine agreement.
    Inputs default to those recorded in FOLDER/reforge.json. Exits 1 if any check fails.

    \b
    Examples:
      reforge verify readapted/                     # inputs from reforge.json
      reforge verify delta/ --base base/ --retriever retriever/ --full
      reforge verify out/ --base B --retriever R --adapter psi/ --alpha 0.5 --json
    """
    from reforge.eval.agreement import compare_embeddings
    from reforge.ops.job import Access
    from reforge.ops.verify import VerifyInputs, verify_checkpoint

    given = options["adapters"] or options["alphas"]
    inputs = VerifyInputs(
        base=options["base"],
        retriever=options["retriever"],
        delta=options["delta"],
        adapters=adapter_pairs(options["adapters"], options["alphas"]) if given else None,
        beta=options["beta"],
    )
    as_json = options["as_json"]
    with ui.progress_bar("verify", unit="bytes", quiet=options["quiet"] or as_json) as progress:
        report = verify_checkpoint(
            folder,
            inputs,
            access=Access(options["token"], options["allow_pickle"]),
            full=options["full"],
            samples=options["samples"],
            embeddings=None if options["no_embeddings"] else compare_embeddings,
            progress=progress,
            device=options["device"],
        )
    if as_json:
        ui.print_json({**dataclasses.asdict(report), "ok": report.ok, "failures": report.failures})
    else:
        ui.show_checks(report)
    if not report.ok:
        raise SystemExit(1)
