"""`reforge run`: run a recipe (one YAML file: inputs, steps, options) as make would, and end with the table."""

from __future__ import annotations

import click

from reforge.cli import output as ui
from reforge.cli.options import output_options


@click.command("run")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Check the recipe and print the plan: jobs to run and to skip, outputs.")
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="STEP|JOB",
    help="Run just this step (all its jobs) or job (psi/scifact), and what it reads, as make runs a target. "
    "Repeatable. The table then holds only the selected evaluations.",
)
@click.option(
    "-k",
    "--keep-going",
    is_flag=True,
    help="When a job fails, go on with the jobs that do not read it (make -k), then exit 1 naming the failures.",
)
@click.option(
    "--token",
    envvar="HF_TOKEN",
    default=None,
    show_envvar=True,
    help="Hugging Face token for private Hub inputs and push steps. Never printed or saved.",
)
@output_options
def run_cmd(
    recipe: str, dry_run: bool, only: tuple[str, ...], keep_going: bool, token: str | None, quiet: bool, as_json: bool
) -> None:
    """Run a recipe: every step in dependency order, skipping what is made.

    The recipe (YAML) names the base, the retriever, corpora, datasets and steps; each step's options are the
    command's own, with the same names and defaults (the paper's). The whole file is checked before any work: an
    unknown key, a wrong type, a missing input, a cycle or a step that would overwrite an input is an error naming
    its line. A job whose output was made from the same inputs and options (its stamp's fingerprint) is skipped; a
    killed training resumes from its last checkpoint; an edit reruns only what it touches. --only runs one step or
    job and what it reads; --keep-going goes on past a failed job with the jobs that do not read it. Ends with the
    table (out/table.md, table.json, table.png). See docs/recipes.md.

    \b
    Examples:
      reforge run recipes/miniature.yaml --dry-run
      reforge run recipes/miniature.yaml
      reforge run recipes/miniature.yaml --only psi/scifact
      reforge run recipes/table1-repllama.yaml --json > run.json
    """
    from reforge.recipe import run_recipe

    ui.quiet_transformers()
    with ui.progress_bar("Running", quiet=quiet or as_json) as bar:

        def stage(text: str) -> None:  # each job and phase: a line on stderr, and the bar's description
            bar(0, None, description=text)
            if not (quiet or as_json):
                ui.info(text)

        report = run_recipe(
            recipe,
            dry_run=dry_run,
            only=list(only) or None,
            keep_going=keep_going,
            token=token,
            progress=bar,
            stage=stage,
        )
    if as_json:
        ui.print_json(report.to_dict())
    else:
        _show(report)
    if report.failed:
        from reforge.errors import JobsFailedError

        raise JobsFailedError(
            f"{len(report.failed)} job(s) failed: {', '.join(report.failed)}; the jobs that read them did not run.",
            hint="See each job's reason above; fix it and run again (what was made is skipped).",
            failed=report.failed,
        )


def _show(report) -> None:
    from rich.table import Table

    table = Table(title=f"reforge run {report.recipe.path.name}" + (" (dry run)" if report.dry_run else ""))
    for name in ("job", "action", "why", "documents", "tokens", "output"):
        table.add_column(name, justify="right" if name in ("documents", "tokens") else "left")
    for plan in report.jobs:
        training = plan.training or {}
        table.add_row(
            plan.job.id,
            plan.action,
            plan.reason,
            f"{training['documents']:,}" if training else "",
            f"{training['tokens']:,}" if training else "",
            str(plan.job.output),
        )
    ui.print_table(table)
    if report.table:
        from reforge.recipe.table import markdown

        for table_data in report.table["tables"]:
            ui.out.print(markdown(table_data), highlight=False, markup=False)
    if not report.dry_run:
        ran = sum(1 for p in report.jobs if p.action in ("run", "resume"))
        ui.info(f"{ran} of {len(report.jobs)} jobs ran in {report.seconds:.1f} s; outputs in {report.recipe.out}")
