"""`reforge inspect`: what a checkpoint is, from its headers."""

from __future__ import annotations

import click

from reforge.cli import output as ui
from reforge.cli.options import hub_options, output_options


@click.command("inspect")
@click.argument("checkpoint")
@hub_options
@output_options
def inspect_cmd(checkpoint: str, token: str | None, allow_pickle: bool, quiet: bool, as_json: bool) -> None:
    """Show a checkpoint's layout: tensors, dtypes, shards, kind.

    Reads only headers and configs, so it is instant even for a 7B model (a Hub repo downloads its weights once
    into the cache). Tells a CausalLM layout ('model.' prefix, lm_head) from the bare model a retriever is, a peft
    adapter from a full model, and shows the provenance of reforge outputs.

    \b
    Examples:
      reforge inspect intfloat/e5-mistral-7b-instruct
      reforge inspect delta/ --json
      reforge inspect psi/
    """
    from reforge.io.describe import describe

    summary = describe(checkpoint, token=token, allow_pickle=allow_pickle)
    if as_json:
        ui.print_json(summary)
    else:
        ui.show_summary(summary)
