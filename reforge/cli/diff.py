"""`reforge diff`: Delta = retriever - base."""

from __future__ import annotations

import click

from reforge.cli import output as ui
from reforge.cli.options import (
    DTYPE_CHOICES,
    hub_options,
    keep_lm_head_option,
    output_options,
    stream_device_option,
    write_options,
)


@click.command("diff")
@click.argument("base")
@click.argument("retriever")
@write_options
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="Stored dtype of Delta. auto = the retriever's. The rounding is measured and recorded.",
)
@click.option(
    "--low-rank", is_flag=True, help="For a peft LoRA retriever: keep Delta as its LoRA factors (exact, far smaller)."
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Compress each layer's Delta to this rank by SVD (LoRE-Adapt); error is reported.",
)
@click.option(
    "--energy",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Compress each layer's Delta by SVD to the smallest rank keeping this share of its energy "
    "(sum of squared singular values), e.g. 0.5.",
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Store tensors only the retriever has whole and skip those only the base has, instead of failing.",
)
@keep_lm_head_option
@stream_device_option
@hub_options
@output_options
def diff_cmd(
    base: str,
    retriever: str,
    output: str,
    max_shard_size: int,
    overwrite: bool,
    dry_run: bool,
    durable: bool,
    dtype: str,
    low_rank: bool,
    rank: int | None,
    energy: float | None,
    allow_missing: bool,
    keep_lm_head: bool,
    device: str,
    token: str | None,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Compute Delta = retriever - base, streamed into a sharded checkpoint.

    BASE is the pretrained LM the retriever was trained from (its lm_head is ignored); RETRIEVER is a full
    retriever checkpoint or a peft LoRA adapter over BASE (RepLLaMA form). Either may be a local folder or a Hub
    repo id with an optional @revision. Delta is computed in fp32 tensor by tensor; memory stays near the
    largest tensor whatever the model size. The output records where it came from, so `reforge merge` can
    refuse a delta made from another base.

    \b
    Examples:
      reforge diff mistralai/Mistral-7B-v0.1 intfloat/e5-mistral-7b-instruct -o e5-delta/
      reforge diff meta-llama/Llama-2-7b-hf castorini/repllama-v1-7b-lora-passage -o rl-delta/ --low-rank
      reforge diff base/ retriever/ -o delta/ --dtype bfloat16 --max-shard-size 2GB
      reforge diff base/ retriever/ -o delta/ --energy 0.5        # LoRE-Adapt compression
    """
    from reforge.ops.diff import diff
    from reforge.ops.job import Access, WriteOptions

    write = WriteOptions(dtype, max_shard_size, overwrite, durable, dry_run, ui.command_line())
    with ui.progress_bar("diff", unit="bytes", quiet=quiet or as_json) as progress:
        report = diff(
            base,
            retriever,
            output,
            low_rank=low_rank,
            rank=rank,
            energy=energy,
            allow_missing=allow_missing,
            write=write,
            access=Access(token, allow_pickle),
            keep_lm_head=keep_lm_head,
            progress=progress,
            device=device,
        )
    for warning in report.warnings:
        ui.warn(warning)
    ui.show_write_report(report, as_json=as_json, what="delta")
