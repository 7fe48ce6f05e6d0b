"""`run_recipe`: run a recipe's jobs in dependency order through the Python API, skipping what is already made.

For each job, in order (``only``: the named steps or jobs and what they read), `decide`: resolve its options (a
merge's alpha from its tune job), hash them with its inputs' content (`reforge.recipe.state`), skip it when its
output's stamp has that fingerprint (a dry run stops there), else run it with the function the
command runs (`reforge.ops.diff.diff`, `reforge.train.train_adapter`, `reforge.tune.tune`, `reforge.ops.merge.merge`,
`reforge.eval.evaluate`, `reforge.publish.push_folder`) and stamp its output. A train job killed midway resumes from
its last checkpoint when it is run again with the same fingerprint. With ``keep_going`` a failed job is recorded and
the jobs that do not read it go on. Finally the table (`reforge.recipe.table`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reforge.recipe.state as state
from reforge.io.atomic import write_atomic
from reforge.io.progress import ProgressFn, StageFn
from reforge.recipe.plan import Job, eval_settings, expand, train_config, write_options
from reforge.recipe.spec import Recipe, load_recipe

UNMADE = ("failed", "not run")  # what a job that reads such a job cannot run after
# A train job's facts kept in its stamp: `reforge.train.TrainResult`'s numbers
TRAIN_FACTS = (
    "steps",
    "documents",
    "tokens",
    "padding_share",
    "final_loss",
    "tokens_per_s",
    "wall_time_s",
    "resumed_from",
)


@dataclass
class JobPlan:
    """What `run_recipe` does (or did) with one job: ``action`` is ``run``, ``resume`` or ``skip`` (with
    ``keep_going`` also ``failed``, or ``not run`` after a failed job it reads); ``reason`` says why;
    ``training`` holds a train job's documents, tokens and steps (from train's own dry run) when known."""

    job: Job
    action: str
    reason: str
    fingerprint: str | None = None
    training: dict[str, Any] | None = None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # resolved (`resolved_options`)
    keys: dict[str, list[str]] = field(default_factory=dict, repr=False)  # the inputs' content keys

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "job": self.job.id,
            "kind": self.job.kind,
            "action": self.action,
            "reason": self.reason,
            "output": str(self.job.output),
            "needs": [need.id for need in self.job.needs],
            "fingerprint": self.fingerprint,
            "training": self.training,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RunReport:
    """What `run_recipe` did: the plan of every job, the table (None for a dry run or without an eval step)."""

    recipe: Recipe
    jobs: list[JobPlan]
    dry_run: bool
    table: dict[str, Any] | None = None
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        """The jobs that failed (only with ``keep_going``: without it the first failure is raised)."""
        return [p.job.id for p in self.jobs if p.action == "failed"]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "recipe": str(self.recipe.path),
            "recipe_sha256": self.recipe.sha256,
            "out": str(self.recipe.out),
            "dry_run": self.dry_run,
            "jobs": [plan.to_dict() for plan in self.jobs],
            "ran": [p.job.id for p in self.jobs if p.action in ("run", "resume")],
            "skipped": [p.job.id for p in self.jobs if p.action == "skip"],
            "failed": self.failed,
            "not_run": [p.job.id for p in self.jobs if p.action == "not run"],
            "table": self.table,
            "written": [str(p) for p in self.written],
            "seconds": round(self.seconds, 3),
        }


def run_recipe(
    path: str | Path,
    *,
    dry_run: bool = False,
    only: list[str] | None = None,
    keep_going: bool = False,
    token: str | None = None,
    progress: ProgressFn | None = None,
    stage: StageFn | None = None,
) -> RunReport:
    """Run (or with ``dry_run`` only plan) the recipe at ``path``.

    Args:
        path: the recipe file (YAML; see docs/recipes.md).
        dry_run: check the recipe and say what would run and what would be skipped, with each train job's
            documents and tokens (train's own dry run); nothing is written.
        only: run just these steps or jobs (``psi``, ``psi/scifact``) and the jobs they read, as make runs its
            targets; the table then has the selected eval jobs only. None: every job.
        keep_going: when a job fails, record it (``failed``, its error as the reason), mark the jobs that read it
            ``not run`` and go on with the others, as ``make -k``; the table holds the evaluations that were made.
            The caller must look at `RunReport.failed`.
        token: Hugging Face token for private Hub inputs and for push steps (never saved).
        progress: ``progress(done, total)`` within the job that runs (steps, bytes or texts).
        stage: called with a short line as each job starts, and as each phase within it starts.

    Returns:
        A `RunReport`.

    Raises:
        RecipeError: the recipe is wrong (checked whole before any job runs).
        ReforgeError: a job failed (without ``keep_going``); the jobs before it keep their outputs and stamps, so a
            rerun continues.
    """
    started = time.perf_counter()
    say = stage or (lambda text: None)
    recipe = load_recipe(path)
    jobs = select(recipe, expand(recipe), only)
    if not dry_run:
        recipe.out.mkdir(parents=True, exist_ok=True)
        state.write_if_changed(recipe.out / "recipe.yaml", recipe.text.encode("utf-8"))
    plans: list[JobPlan] = []
    for number, job in enumerate(jobs, start=1):
        # a dry run cannot fingerprint a job whose inputs a job before it would make first
        waiting = [need.id for need in job.needs if need.id in {p.job.id for p in plans if p.action != "skip"}]
        broken = [need.id for need in job.needs if need.id in {p.job.id for p in plans if p.action in UNMADE}]
        if broken:  # keep_going: a job that failed, or waited on one, made nothing this job could read
            plans.append(JobPlan(job, "not run", f"after failed {', '.join(broken)}"))
            continue
        plan = decide(job, waiting if dry_run else [])
        plans.append(plan)
        if dry_run:
            if job.kind == "train" and all(s.path is not None for s in job.inputs["base"]):  # no download to count
                say(f"Counting documents and tokens of {job.id}")
                plan.training = _training_plan(job, token, recipe.allow_pickle)
            continue
        if plan.action == "skip":
            continue
        say(f"[{number}/{len(jobs)}] {job.id}: {job.kind} -> {job.output}")
        job_started = time.perf_counter()
        try:
            if job.kind in ("diff", "merge") and state.read_stamp(job.output) is not None:
                # a finished output of another fingerprint, or changed since: the writer would keep what it finds
                # complete for the same plan, so the folder (ours: it holds our stamp) is made again from nothing
                shutil.rmtree(job.output)
            context = _Context(recipe, job, plan.options, plan.keys, plan.fingerprint, token, progress, say)
            _RUNNERS[job.kind](context, resume=plan.action == "resume")
        except Exception as e:  # noqa: BLE001 - with keep_going any failure of one job is recorded, as make -k does
            if not keep_going:
                raise
            plan.action, plan.reason = "failed", _failure(e)
            say(f"{job.id} failed: {plan.reason}")
        plan.seconds = time.perf_counter() - job_started
    report = RunReport(recipe, plans, dry_run)
    if not dry_run:
        from reforge.recipe.table import write_tables

        made = [p.job for p in plans if p.action in ("run", "resume", "skip")]
        report.table, report.written = write_tables(recipe, made)
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints and plans


def resolved_options(job: Job) -> dict[str, Any]:
    """A job's options as they will be used, JSON-ready: a merge's alpha read from its tune job's best point, an
    eval's model names."""
    options = json.loads(json.dumps(job.options, default=list))
    if job.tune is not None:
        options["alpha"] = tuned_alpha(job.tune)
    if job.kind == "eval":
        options["labels"] = list(job.labels)
    return options


def job_fingerprint(job: Job, options: dict[str, Any], keys: dict[str, list[str]] | None = None) -> str:
    """The fingerprint of a job with these resolved options and its inputs' content ``keys`` (default: computed
    here, `input_keys`). A train job counts only the options that change what
    is trained (`reforge.train.config.RESUME_KEYS`, the ones ``--resume`` compares): ``save-every`` or ``device``
    does not retrain an adapter."""
    if job.kind == "train":
        from reforge.train.config import RESUME_KEYS

        options = {k: v for k, v in options.items() if k in RESUME_KEYS}
    return state.fingerprint_of(job.kind, options, input_keys(job) if keys is None else keys)


def tuned_alpha(tune_job: Job) -> float | None:
    """The best alpha a finished tune job chose (None before it has run)."""
    try:
        return float(json.loads((tune_job.output / "tune.json").read_text())["best"]["alpha"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def input_keys(job: Job) -> dict[str, list[str]]:
    """The content key of every input, by role (a Hub id stands for itself: pin it with ``@commit``)."""
    keys: dict[str, list[str]] = {}
    for role, sources in job.inputs.items():
        keys[role] = [
            f"hub:{source.hub}" if source.hub is not None else state.content_key(Path(source.ref)) for source in sources
        ]
    return keys


def _failure(error: Exception) -> str:
    """One line for a failed job: a ReforgeError's message, else the exception's type and text."""
    from reforge.errors import ReforgeError

    text = error.message if isinstance(error, ReforgeError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def select(recipe: Recipe, jobs: list[Job], only: list[str] | None) -> list[Job]:
    """The jobs ``only`` names (a step name stands for all its jobs) and every job they read, in run order.

    Raises:
        RecipeError: a name is neither a step nor a job of the recipe.
    """
    if only is None:
        return jobs
    wanted: set[str] = set()
    for name in only:
        named = [job for job in jobs if name in (job.id, job.step.name)]
        if not named:
            raise recipe.error(
                None,
                f"has no step or job {name!r} (--only)",
                hint=f"Steps: {', '.join(dict.fromkeys(job.step.name for job in jobs))}; jobs look like "
                f"{jobs[-1].id!r} (reforge run --dry-run lists them).",
            )
        pending = named
        while pending:
            job = pending.pop()
            if job.id not in wanted:
                wanted.add(job.id)
                pending += job.needs
    return [job for job in jobs if job.id in wanted]


def decide(job: Job, waiting: list[str]) -> JobPlan:
    """What to do with ``job``: ``skip`` when its output's stamp has its fingerprint, ``resume`` a train job killed
    with the same fingerprint, else ``run``. ``waiting``: the jobs it reads that a dry run would run first (its
    fingerprint is unknown until they have)."""
    if waiting:
        return JobPlan(job, "run", f"after {', '.join(waiting)}")
    options, keys = resolved_options(job), input_keys(job)
    fingerprint = job_fingerprint(job, options, keys)
    if state.is_done(job.output, fingerprint):
        return JobPlan(job, "skip", "made from the same inputs and options", fingerprint, options=options, keys=keys)
    action = "resume" if _can_resume(job, fingerprint) else "run"
    return JobPlan(job, action, _reason(job, fingerprint), fingerprint, options=options, keys=keys)


def _can_resume(job: Job, fingerprint: str) -> bool:
    if job.kind != "train" or state.started_with(job.output) != fingerprint:
        return False
    from reforge.train.state import latest_checkpoint, work_dir

    return latest_checkpoint(work_dir(job.output)) is not None


def _reason(job: Job, fingerprint: str) -> str:
    if job.kind == "train" and state.started_with(job.output) is not None and not job.output.exists():
        return "stopped before it finished"
    stamp = state.read_stamp(job.output)
    if stamp is None:
        return "no output yet" if not job.output.exists() else "output not made by this recipe"
    if stamp.get("fingerprint") == fingerprint:
        return "output changed since it was made"
    return "inputs or options changed"


def _training_plan(job: Job, token: str | None, allow_pickle: bool) -> dict[str, Any]:
    """train's own dry run of a train job: documents, tokens, optimizer steps."""
    from reforge.train import train_adapter

    config = _train_config(job, resume=False, allow_pickle=allow_pickle)
    result = train_adapter(config, None, token=token, dry_run=True)
    return {"documents": result.documents, "tokens": result.tokens, "steps": result.steps}


# ---------------------------------------------------------------------------------------------------------------------
# Running one job


@dataclass
class _Context:
    recipe: Recipe
    job: Job
    options: dict[str, Any]
    keys: dict[str, list[str]]  # the inputs' content keys the fingerprint was made of
    fingerprint: str
    token: str | None
    progress: ProgressFn | None
    stage: StageFn

    @property
    def access(self) -> Any:
        """How diff and merge open their inputs: the token and the recipe's allow-pickle."""
        from reforge.ops.job import Access

        return Access(self.token, self.recipe.allow_pickle)

    def one(self, role: str) -> str | None:
        sources = self.job.inputs.get(role)
        return sources[0].ref if sources else None

    @property
    def command(self) -> str:
        """What the outputs' reforge.json records as the command that made them."""
        return (
            f"reforge run {self.recipe.path.name}  # job {self.job.id}, recipe sha256 {self.recipe.sha256[:16]}, "
            f"fingerprint {self.fingerprint}"
        )

    def stamp(self, folder: Path, facts: dict[str, Any] | None = None) -> None:
        record = {
            "fingerprint": self.fingerprint,
            "job": self.job.id,
            "step": self.job.step.name,
            "kind": self.job.kind,
            "dims": self.job.dims,
            "recipe": {"file": self.recipe.path.name, "sha256": self.recipe.sha256, "copy": state.RECIPE_COPY},
            "options": self.options,
            "inputs": {
                role: [{"ref": s.text, "job": s.job.id if s.job else None} for s in sources]
                for role, sources in self.job.inputs.items()
            },
            "input_keys": self.keys,
            **(facts or {}),
        }
        state.write_stamp(folder, record, self.recipe.text)


def _run_diff(ctx: _Context, resume: bool) -> None:
    from reforge.ops.diff import diff

    o = ctx.options
    diff(
        ctx.one("base"),
        ctx.one("retriever"),
        ctx.job.output,
        low_rank=o["low_rank"],
        rank=o["rank"],
        energy=o["energy"],
        allow_missing=o["allow_missing"],
        keep_lm_head=o["keep_lm_head"],
        write=write_options(o, overwrite=True, command=ctx.command),
        access=ctx.access,
        progress=ctx.progress,
        device=o["device"],
    )
    ctx.stamp(ctx.job.output)


def _train_config(job: Job, resume: bool, allow_pickle: bool = False) -> Any:
    config = train_config(
        job.options,
        base=job.inputs["base"][0].ref,
        corpus=[s.ref for s in job.inputs["corpus"]],
        output=str(job.output),
        allow_pickle=allow_pickle,
    )
    config.resume, config.overwrite = resume, True
    return config


def _run_train(ctx: _Context, resume: bool) -> None:
    from reforge.card import render_adapter_card
    from reforge.train import train_adapter

    state.mark_started(ctx.job.output, ctx.fingerprint)
    progress = ctx.progress

    def step(done: int, total: int, stats: Any) -> None:
        if progress is not None:
            progress(done, total)

    result = train_adapter(
        _train_config(ctx.job, resume, ctx.recipe.allow_pickle),
        step,
        token=ctx.token,
        readme=render_adapter_card,
        stage=ctx.stage,
    )
    ctx.stamp(
        ctx.job.output,
        {
            "training": {  # what `reforge train --json` prints, less the record (training_record.json beside it)
                name: getattr(result, name) for name in TRAIN_FACTS
            }
        },
    )
    state.mark_finished(ctx.job.output)


def _run_tune(ctx: _Context, resume: bool) -> None:
    from reforge.tune import tune

    o = ctx.options
    report = tune(
        ctx.one("base"),
        ctx.one("adapter"),
        ctx.one("dataset"),
        retriever=ctx.one("retriever"),
        delta=ctx.one("delta"),
        alphas=o["alphas"],
        betas=o["betas"],
        metric=o["metric"],
        split=o["split"],
        test_split=o["test_split"],
        i_know=o["i_know"],
        max_queries=o["max_queries"],
        corpus_sample=o["corpus_sample"],
        seed=o["seed"],
        settings=eval_settings(o, token=ctx.token, allow_pickle=ctx.recipe.allow_pickle),
        progress=ctx.progress,
        stage=ctx.stage,
    )
    with _staged(ctx.job.output) as folder:
        text = json.dumps(report.to_dict(), indent=2, default=str) + "\n"
        write_atomic(folder / "tune.json", lambda f: f.write(text.encode("utf-8")))
        from reforge.errors import InvalidOptionError
        from reforge.tune import plot_tuning

        try:
            plot_tuning(report, folder / "tune.png")
        except InvalidOptionError:  # plot_tuning's one complaint: no matplotlib; tune.json is the result
            pass
        ctx.stamp(folder, {"best": {"alpha": report.best.alpha, "beta": report.best.beta, "score": report.best.score}})


def _run_merge(ctx: _Context, resume: bool) -> None:
    from reforge.ops.merge import merge

    o = ctx.options
    if o["alpha"] is None:
        from reforge.errors import InvalidOptionError

        raise InvalidOptionError(f"{ctx.job.tune.id} chose no alpha (no tune.json).", option="alpha")
    merge(
        ctx.one("base"),
        ctx.job.output,
        retriever=ctx.one("retriever"),
        delta=ctx.one("delta"),
        adapters=[(ctx.one("adapter"), o["alpha"])],
        beta=o["beta"],
        keep_lm_head=o["keep_lm_head"],
        write=write_options(o, overwrite=True, command=ctx.command),
        access=ctx.access,
        progress=ctx.progress,
        device=o["device"],
    )
    ctx.stamp(ctx.job.output)


def _run_eval(ctx: _Context, resume: bool) -> None:
    from reforge.eval import evaluate, write_outputs
    from reforge.eval.pipeline import model_source

    access = {"token": ctx.token, "allow_pickle": ctx.recipe.allow_pickle}
    settings = eval_settings(ctx.options, base=ctx.one("base"), **access)
    sources = [
        model_source(source.ref, settings, name=label)
        for source, label in zip(ctx.job.inputs["models"], ctx.job.labels)
    ]
    report = evaluate(sources, [ctx.one("dataset")], settings, progress=ctx.progress, stage=ctx.stage)
    with _staged(ctx.job.output) as folder:
        write_outputs(report, folder)
        ctx.stamp(folder)


def _run_push(ctx: _Context, resume: bool) -> None:
    from reforge.publish import push_folder

    o = ctx.options
    url = push_folder(
        ctx.one("model"),
        o["repo"],
        private=o["private"],
        token=ctx.token,
        revision=o["revision"],
        commit_message=o["commit_message"],
        progress=ctx.progress,
        verify=o["verify"],
    )
    with _staged(ctx.job.output) as folder:
        ctx.stamp(folder, {"pushed": {"repo": o["repo"], "commit_url": url}})


_RUNNERS = {
    "diff": _run_diff,
    "train": _run_train,
    "tune": _run_tune,
    "merge": _run_merge,
    "eval": _run_eval,
    "push": _run_push,
}


@contextmanager
def _staged(output: Path) -> Iterator[Path]:
    """A fresh folder that replaces ``output`` when the block ends cleanly (under the output's lock)."""
    from reforge.io.target import OutputLock, commit_staging, staging_path

    staging = staging_path(output)
    with OutputLock(output):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        yield staging
        commit_staging(staging, output)
