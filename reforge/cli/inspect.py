"""`reforge inspect`: what a checkpoint is, from its headers."""

from __future__ import annotations

import click

from reforge.cli import output as ui
from reforge.cli.options import hub_options, output_options


@click.command("inspect")
@click.argument("checkpoint")
@click.option(
    "--base",
    default=None,
    help="For a peft adapter: also measure how far it moves this base, ||Psi|| / ||W|| for each weight it changes "
    "(reads those weights and the adapter, one at a time).",
)
@hub_options
@output_options
def inspect_cmd(
    checkpoint: str, base: str | None, token: str | None, allow_pickle: bool, quiet: bool, as_json: bool
) -> None:
    """Show a checkpoint's layout: tensors, dtypes, shards, kind.

    Reads only headers and configs, so it is instant even for a 7B model (a Hub repo downloads its weights once
    into the cache). Tells a CausalLM layout ('model.' prefix, lm_head) from the bare model a retriever is, a peft
    adapter from a full model, and shows the provenance of reforge outputs.

    With --base, a knowledge adapter's size too: the Frobenius norm of its dense update Psi relative to the base
    weight, per weight (mean, median, largest) and per target module. Two adapters trained on the same text with
    different step counts differ here before any retrieval is scored.

    \b
    Examples:
      reforge inspect intfloat/e5-mistral-7b-instruct
      reforge inspect delta/ --json
      reforge inspect psi/ --base meta-llama/Llama-2-7b-hf
    """
    from reforge.io.describe import describe

    summary = describe(checkpoint, token=token, allow_pickle=allow_pickle)
    if base is not None:
        summary["update"] = _update_size(summary, checkpoint, base, token, allow_pickle, quiet or as_json)
    if as_json:
        ui.print_json(summary)
    else:
        ui.show_summary(summary)


def _update_size(summary: dict, checkpoint: str, base: str, token, allow_pickle: bool, quiet: bool) -> dict:
    from reforge.ops.fold import update_size

    if "adapter" not in summary:
        raise click.BadParameter(
            f"--base measures a peft adapter, but {checkpoint} is a {summary['kind']}: pass the adapter folder "
            "`reforge train` wrote, or leave out --base.",
            param_hint="--base",
        )
    with ui.progress_bar("Measuring Psi", quiet=quiet) as bar:
        return update_size(checkpoint, base, token=token, allow_pickle=allow_pickle, progress=bar)
