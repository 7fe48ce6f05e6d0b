"""`reforge train`: a DoRA knowledge adapter on the base LM, over unlabeled documents."""

from __future__ import annotations

from pathlib import Path

import click

from reforge.cli import output as ui
from reforge.cli.options import DeviceType, SizeType, hub_options, log_file_option, output_options
from reforge.errors import InvalidOptionError
from reforge.train.config import ATTENTIONS, BATCHINGS, PAPER_TARGETS, PRECISIONS, SCHEDULES, TrainConfig
from reforge.train.tracking import REPORT_TO

_D = TrainConfig(base="", corpus=[""], output="")  # the defaults, shown in --help


def _targets(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


@click.command("train")
@click.argument("base")
@click.option(
    "--corpus",
    "corpus",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="BEIR folder, .jsonl file, .txt file or folder, or a datasets.save_to_disk folder. Repeatable.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Adapter folder to write (built under a temporary name, renamed when whole).",
)
@click.option(
    "--text-field", default=None, help="JSONL field / dataset column with the text [default: BEIR title + text]."
)
@click.option("--per-line", is_flag=True, help="For .txt inputs: one document per non-empty line, not per file.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip JSONL lines that are not JSON or lack the text field.")
@click.option("--max-docs", type=click.IntRange(min=1), default=None, help="Train on the first N documents kept.")
@click.option("--only-ids", type=click.Path(exists=True, dir_okay=False), help="Keep only these ids (one per line).")
@click.option("--exclude-ids", type=click.Path(exists=True, dir_okay=False), help="Drop these ids (one per line).")
@click.option(
    "--only-judged",
    multiple=True,
    type=click.Path(exists=True),
    help="Keep only documents judged in this qrels file (repeatable).",
)
@click.option(
    "--exclude-judged",
    multiple=True,
    type=click.Path(exists=True),
    help="Drop documents judged in this qrels file (repeatable), e.g. the test split's.",
)
@click.option("--lora", is_flag=True, help="Plain LoRA instead of DoRA.")
@click.option(
    "--target-modules",
    default=",".join(PAPER_TARGETS),
    show_default=True,
    help="Comma-separated Linear module names to adapt.",
)
@click.option("-r", "--lora-r", "r", type=click.IntRange(min=1), default=_D.r, show_default=True, help="Adapter rank.")
@click.option("--lora-alpha", type=float, default=_D.lora_alpha, show_default=True, help="Scale numerator (alpha/r).")
@click.option(
    "--lora-dropout",
    type=click.FloatRange(0, 1, max_open=True),
    default=_D.lora_dropout,
    show_default=True,
    help="Dropout on the adapter's input.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_D.batch_size,
    show_default=True,
    help="Documents per process and micro-step (packed rows with --batching rows).",
)
@click.option(
    "--grad-accum",
    type=click.IntRange(min=1),
    default=_D.grad_accum,
    show_default=True,
    help="Micro-steps per optimizer step.",
)
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option(
    "--schedule", type=click.Choice(SCHEDULES), default=_D.schedule, show_default=True, help="Learning-rate schedule."
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    default=_D.warmup_steps,
    show_default=True,
    help="Linear warm-up steps.",
)
@click.option(
    "--max-grad-norm",
    type=float,
    default=_D.max_grad_norm,
    show_default=True,
    help="Clip the gradient norm (0 = no clipping).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=_D.epochs, show_default=True, help="Passes over the corpus."
)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after N optimizer steps.")
@click.option(
    "--max-length",
    type=click.IntRange(min=2),
    default=_D.max_length,
    show_default=True,
    help="Tokens per document (longer ones are cut, as in the paper) and per packed row.",
)
@click.option(
    "--batching",
    type=click.Choice(BATCHINGS),
    default=_D.batching,
    show_default=True,
    help="documents: the paper's --batch-size documents per step, packed with no padding; rows: --batch-size full "
    "rows per step (more documents, fewer steps: a deviation); grouped: documents of similar length, padded.",
)
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Adapter init, data order and dropout.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=_D.precision,
    show_default=True,
    help="auto: bf16 autocast on GPUs that have it, fp32 on CPU.",
)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option(
    "--attention",
    type=click.Choice(ATTENTIONS),
    default=_D.attention,
    show_default=True,
    help="How each document attends to itself only. auto: split (fallback for families it does not cover). "
    "split: documents packed into rows, each attended alone by sdpa. padded: one document per row, padded, the "
    "model's own attention (as HF Trainer; any family). flex: compiled flex_attention, CUDA only, opt-in: its "
    "gradients are checked only by `make gpu-check`. All give the same loss (docs/train.md).",
)
@click.option(
    "--device",
    type=DeviceType(),
    default=None,
    help="torch device [default: cuda:LOCAL_RANK if there is a GPU, else cpu].",
)
@click.option(
    "--save-every",
    type=click.IntRange(min=0),
    default=_D.save_every,
    show_default=True,
    help="Checkpoint every N optimizer steps, for --resume (0 = never).",
)
@click.option(
    "--report-to",
    type=click.Choice(REPORT_TO),
    default="none",
    show_default=True,
    help="Log loss, learning rate and tok/s per step with accelerate's tracker (tensorboard needs `tensorboard`).",
)
@click.option(
    "--logging-dir",
    type=click.Path(file_okay=False),
    default="runs",
    show_default=True,
    help="Where --report-to writes: one sub-folder per run, named after -o and the start time.",
)
@log_file_option
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of an interrupted run.")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds something else.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read the corpus and print the plan: documents, tokens, steps, and peak GPU memory (with and without "
    "--gradient-checkpointing) against --gpu-memory, and hours at --throughput.",
)
@click.option(
    "--gpu-memory",
    type=SizeType(),
    default="80GB",
    show_default=True,
    help="With --dry-run: the GPU's memory the plan must fit (10% kept spare for the allocator).",
)
@click.option(
    "--throughput",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --dry-run: training tokens per second per GPU, for the hours [default: none, not measured yet: "
    "`make gpu-check` measures it].",
)
@hub_options
@output_options
def train_cmd(
    base: str,
    corpus: tuple[str, ...],
    output: str,
    lora: bool,
    target_modules: str,
    token: str | None,
    dry_run: bool,
    gpu_memory: int,
    throughput: float | None,
    report_to: str,
    logging_dir: str,
    log_file: str | None,
    quiet: bool,
    as_json: bool,
    **options,
) -> None:
    """Train a DoRA knowledge adapter on the base LM over unlabeled text.

    BASE is the causal LM the retriever was made from (a folder or a Hub id), not the retriever. The adapter
    learns the target domain by next-token prediction; `reforge merge` then adds 0.5 of it to the retriever.
    Defaults are the paper's (DoRA r 32, alpha 64 on q,k,v,up,down; batch 4; lr 2e-4 linear; one epoch; 1024
    tokens): each optimizer step sees 4 documents, packed so that no compute goes to padding. The run is
    checkpointed with --save-every and continued with --resume. Launch it with `torchrun` or `accelerate launch`
    to use several GPUs.

    \b
    Examples:
      reforge train meta-llama/Llama-2-7b-hf --corpus data/scifact -o psi-scifact/
      reforge train ./base --corpus data/scifact --exclude-judged data/scifact/qrels/test.tsv -o psi/
      reforge train ./base --corpus notes/ --per-line --max-docs 10000 --save-every 200 -o psi/ --resume
      torchrun --nproc-per-node 8 "$(which reforge)" train ./base --corpus big.jsonl --text-field body -o psi/
    """
    from datetime import datetime

    from reforge.card import render_adapter_card
    from reforge.train import train_adapter
    from reforge.train.tracking import step_logger

    lists = {k: list(v) for k, v in options.items() if isinstance(v, tuple)}  # multiple=True options, as saved
    config = TrainConfig(
        base=base,
        corpus=list(corpus),
        output=output,
        use_dora=not lora,
        target_modules=_targets(target_modules),
        **{**options, **lists},
    )
    try:  # out-of-range or non-finite numbers (--lr nan, --lora-alpha inf) are usage errors, caught before any work
        config.validate()
    except InvalidOptionError as e:
        raise click.UsageError(str(e)) from e
    run_name = f"{Path(output).name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        with (
            ui.progress_bar("Training", quiet=quiet or as_json, log_file=log_file) as bar,
            step_logger("none" if dry_run else report_to, logging_dir, run_name, config.to_dict()) as log,
        ):

            def progress(step: int, total: int, stats) -> None:
                bar(step, total, description=f"loss {stats.loss:.3f} | {stats.tokens_per_s:,.0f} tok/s")
                if log is not None:
                    log(step, stats)

            result = train_adapter(
                config,
                progress,
                token=token,
                dry_run=dry_run,
                readme=render_adapter_card,
                stage=lambda text: bar(0, None, description=text),
            )
    except KeyboardInterrupt:
        _interrupted(config)
    if not result.is_main:
        return
    if result.dry_run:
        from reforge.dist import Ranks

        _fit(result.record, gpu_memory, throughput, Ranks.from_env().world)
    _report(result, config, as_json)


def _fit(record: dict, gpu_memory: int, throughput: float | None, gpus: int) -> None:
    """Add to the dry run's memory plan whether it fits ``gpu_memory`` and the hours at ``throughput``."""
    from reforge.train.plan import fits_in, plan_hours

    memory = record["memory"]
    memory["gpu_memory"] = gpu_memory
    memory["fits"] = fits_in(memory["peak"], gpu_memory)
    memory["fits_checkpointed"] = fits_in(memory["peak_checkpointed"], gpu_memory)
    tokens = record["tokens"]["input"]
    hours = plan_hours(tokens, throughput and throughput * gpus)
    record["time"] = {"tokens": tokens, "tokens_per_s_per_gpu": throughput, "gpus": gpus, "hours": hours}


def _interrupted(config: TrainConfig) -> None:
    """Ctrl-C: say how to continue, the way the rerun will accept it (exit 130, as a shell does)."""
    from reforge.train.state import latest_checkpoint, work_dir

    checkpoint = latest_checkpoint(work_dir(config.output))
    if checkpoint is None:
        ui.err.print("Interrupted before the first checkpoint. Rerun the same command to start over.", highlight=False)
    else:
        step = int(checkpoint.name.split("-")[-1])
        ui.err.print(
            f"Interrupted; the last checkpoint is at step {step} ({checkpoint}). Rerun the same command with "
            "--resume to continue from it, or with --overwrite to start over.",
            highlight=False,
        )
    raise click.exceptions.Exit(130)


def _report(result, config: TrainConfig, as_json: bool) -> None:
    record, corpus = result.record, result.record["corpus"]
    if (record.get("attention") or {}).get("note"):
        ui.warn(record["attention"]["note"])
    if corpus["only_ids_missing"]:
        ui.warn(f"{corpus['only_ids_missing']} ids of the --only filters are not in the corpus.")
    if corpus["documents_at_max_length"]:
        ui.warn(
            f"{corpus['documents_at_max_length']} of {corpus['documents']} documents reach --max-length "
            f"{config.max_length} and are cut there."
        )
    if as_json:
        ui.print_json(
            {
                "output": str(result.output) if result.output else None,
                "dry_run": result.dry_run,
                "steps": result.steps,
                "documents": result.documents,
                "tokens": result.tokens,
                "padding_share": result.padding_share,
                "final_loss": result.final_loss,
                "tokens_per_s": result.tokens_per_s,
                "wall_time_s": result.wall_time_s,
                "resumed_from": result.resumed_from,
                "record": record,
            }
        )
        return
    kind = "LoRA" if not config.use_dora else "DoRA"
    lines = [
        f"{'Plan' if result.dry_run else 'Trained'}: {kind} r {config.r}, alpha {config.lora_alpha:g} on "
        f"{','.join(config.target_modules)}" + ("" if result.dry_run else f" -> {result.output}"),
        f"  documents {result.documents:,} of {corpus['documents_read']:,} read | tokens {result.tokens:,} "
        f"trained | padding {result.padding_share:.1%} | steps {result.steps:,} "
        f"({record['global_batch']} {'rows' if config.batching == 'rows' else 'documents'} each)",
    ]
    if result.dry_run:
        lines += _plan_lines(record, config)
    if not result.dry_run:
        resumed = f" | resumed at step {result.resumed_from}" if result.resumed_from else ""
        lines.append(
            f"  loss {record['loss']['first']:.4f} -> {result.final_loss:.4f} | "
            f"{result.tokens_per_s:,.0f} tok/s | {result.wall_time_s:.1f} s{resumed}"
        )
        lines.append(f"  record {Path(result.output) / 'training_record.json'}")
    ui.out.print("\n".join(lines), highlight=False)


def _plan_lines(record: dict, config: TrainConfig) -> list[str]:
    memory, time = record["memory"], record["time"]
    gib = 2**30

    def verdict(fits: bool) -> str:
        return "fits" if fits else "does NOT fit"

    at = (
        f"{config.batch_size} x {config.max_length} tokens a forward pass, {memory['precision']}, {memory['attention']}"
    )
    lines = [
        f"  GPU memory ({at}): weights {memory['weights'] / gib:.2f} GiB | adapter + gradients + AdamW "
        f"{(memory['adapter'] + memory['gradients'] + memory['optimizer']) / gib:.2f} GiB | activations "
        f"{memory['activations'] / gib:.2f} GiB ({memory['activations_checkpointed'] / gib:.2f} with "
        f"--gradient-checkpointing) | logits {memory['logits'] / gib:.2f} GiB",
        f"  peak {memory['peak'] / gib:.1f} GiB: {verdict(memory['fits'])} {memory['gpu_memory'] / 1e9:g} GB; "
        f"with --gradient-checkpointing {memory['peak_checkpointed'] / gib:.1f} GiB: "
        f"{verdict(memory['fits_checkpointed'])} (10% kept spare)",
    ]
    if time["hours"] is None:
        lines.append(
            f"  time: {time['tokens']:,} tokens; throughput not measured yet (pass --throughput TOKENS_PER_S; "
            "`make gpu-check` measures it on a GPU)"
        )
    else:
        lines.append(
            f"  time: {time['tokens']:,} tokens at {time['tokens_per_s_per_gpu']:,.0f} tokens/s x {time['gpus']} GPU"
            f"{'s' if time['gpus'] > 1 else ''} (as stated, not measured here): {time['hours']:.2f} hours"
        )
    return lines
