"""`reforge verify`: check a delta or merged checkpoint."""

from __future__ import annotations

import dataclasses

import click

from reforge.cli import output as ui
from reforge.cli.options import hub_options, output_options, stream_device_option


@click.command("verify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--base", default=None, help="The base model (default: the one recorded in reforge.json).")
@click.option("--retriever", default=None, help="The retriever (default: the one recorded).")
@click.option("--delta", default=None, help="The delta the merge used (default: the one recorded).")
@click.option("--adapter", "adapters", multiple=True, help="Adapter(s) the merge used (default: those recorded).")
@click.option("--alpha", "alphas", multiple=True, type=float, help="Alpha of each --adapter, in order.")
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
def verify_cmd(
    folder: str,
    base: str | None,
    retriever: str | None,
    delta: str | None,
    adapters: tuple[str, ...],
    alphas: tuple[float, ...],
    beta: float | None,
    full: bool,
    samples: int,
    no_embeddings: bool,
    device: str,
    token: str | None,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
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
    from reforge.ops.verify import verify_checkpoint

    if alphas and len(alphas) != len(adapters):
        raise click.UsageError("give one --alpha per --adapter.")
    pairs = list(zip(adapters, alphas or [0.5] * len(adapters))) if adapters else None
    with ui.progress_bar("verify", unit="bytes", quiet=quiet or as_json) as progress:
        report = verify_checkpoint(
            folder,
            base=base,
            retriever=retriever,
            delta=delta,
            adapters=pairs,
            beta=beta,
            full=full,
            samples=samples,
            embeddings=None if no_embeddings else compare_embeddings,
            token=token,
            allow_pickle=allow_pickle,
            progress=progress,
            device=device,
        )
    if as_json:
        ui.print_json({**dataclasses.asdict(report), "ok": report.ok, "failures": report.failures})
    else:
        ui.show_checks(report)
    if not report.ok:
        raise SystemExit(1)
