"""From a `Recipe` to the jobs it runs, in dependency order, every reference and output checked before any work.

A step expands into one job per value of its dimensions: a ``train`` step into one job per corpus, a ``merge`` into
one per adapter and alpha (or per tune job), a ``tune`` into one per adapter and dataset, an ``eval`` into one per
dataset. A job that reads another step's jobs takes those that agree with it on every dimension they share, so
``merge: {adapter: psi}`` merges each corpus's adapter, and ``eval`` puts on dataset ``scifact`` the retriever and the
models made from corpus ``scifact`` (``matched: true``, the paper's table) beside each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reforge.io.target import overlap
from reforge.recipe.spec import ROLES, TRAIN_PATHS, Recipe, StepSpec, option_key

# What a model reference may name, by step kind: a folder of weights that eval/merge/train can open.
MODEL_KINDS = ("merge", "train")
DIM_ORDER = ("corpus", "dataset", "seed", "alpha")


@dataclass
class Source:
    """One input of a job: another job's output (``job``), a local path (``path``) or a Hub id (``hub``)."""

    text: str
    line: int
    path: Path | None = None
    hub: str | None = None
    job: Job | None = None

    @property
    def ref(self) -> str:
        """What the API is given: a local folder (the job's output, or the path) or the Hub id."""
        if self.job is not None:
            return str(self.job.output)
        return str(self.path) if self.path is not None else str(self.hub)


@dataclass
class Job:
    """One unit of work: a step at one point of its dimensions (``dims``: corpus, dataset, alpha)."""

    id: str
    step: StepSpec
    dims: dict[str, Any]
    output: Path
    inputs: dict[str, list[Source]]
    options: dict[str, Any]
    tune: Job | None = None  # a merge whose alpha is this tune job's best
    labels: list[str] = field(default_factory=list)  # eval: the table name of each model, in order

    @property
    def kind(self) -> str:
        return self.step.kind

    @property
    def needs(self) -> list[Job]:
        """The jobs whose outputs this one reads."""
        found = [s.job for sources in self.inputs.values() for s in sources if s.job is not None]
        return found + ([self.tune] if self.tune is not None else [])


def expand(recipe: Recipe) -> list[Job]:
    """Every job of ``recipe`` in an order that runs each after what it reads.

    Raises:
        RecipeError: a reference names nothing (or a step of the wrong kind), the steps form a cycle, an input is
            missing, an option is out of range, two jobs write one folder, or a job would write over an input.
    """
    jobs: dict[str, list[Job]] = {}
    order = _step_order(recipe)
    for name in order:
        step = recipe.steps[name]
        _check_options(recipe, step)
        jobs[name] = _EXPAND[step.kind](recipe, step, jobs)
        if not jobs[name]:
            raise recipe.error(
                step.line,
                f"step {name!r} has nothing to run: its inputs agree on no corpus, dataset or alpha",
                hint="Check which corpora its inputs were made from.",
            )
    ordered = [job for name in order for job in jobs[name]]
    _check_corpora(recipe)
    _check_outputs(recipe, ordered)
    return ordered


# ---------------------------------------------------------------------------------------------------------------------
# Order of the steps: references between steps form a graph, which must have no cycle


def _step_refs(recipe: Recipe, step: StepSpec) -> list[tuple[str, int]]:
    found = [(text, line) for refs in step.refs.values() for text, line in refs if text in recipe.steps]
    if step.kind == "merge" and isinstance(step.options["alpha"], str):
        found.append((step.options["alpha"], step.lines["alpha"]))
    return found


def _step_order(recipe: Recipe) -> list[str]:
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = path[path.index(name) :] + [name]
            raise recipe.error(
                recipe.steps[cycle[0]].line,
                f"the steps form a cycle: {' -> '.join(cycle)}",
                hint="A step can only read what steps before it write.",
            )
        state[name] = "open"
        for ref, _ in _step_refs(recipe, recipe.steps[name]):
            visit(ref, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in recipe.steps:
        visit(name, [])
    return order


# ---------------------------------------------------------------------------------------------------------------------
# References


def _model(recipe: Recipe, step: StepSpec, role: str, text: str, line: int, jobs: dict) -> list[tuple[dict, Source]]:
    """The candidates a model reference names: ``(dims, source)`` per job of a step, or one fixed source."""
    wanted = ROLES[step.kind][role][0]
    if text in recipe.steps:
        other = recipe.steps[text]
        allowed = MODEL_KINDS if wanted == "model" else (wanted,)
        if other.kind not in allowed:
            raise recipe.error(
                line,
                f"{role} {text!r} is a {other.kind} step; {step.kind}'s {role} must be "
                + " or ".join(f"a {k} step" for k in allowed)
                + (", base, retriever, a folder or a Hub id" if wanted == "model" else ""),
                key=f"steps.{step.name}.{step.kind}.{role}",
            )
        return [(job.dims, Source(text, line, job=job)) for job in jobs[text]]
    if wanted != "model":
        raise recipe.error(
            line,
            f"{role} {text!r} names no {wanted} step",
            key=f"steps.{step.name}.{step.kind}.{role}",
            hint=f"Steps: {', '.join(recipe.steps)}.",
        )
    if text in ("base", "retriever"):
        written = recipe.base if text == "base" else recipe.retriever
        return [({}, _local_or_hub(recipe, written, recipe.lines[text], text))]
    return [({}, _local_or_hub(recipe, text, line, f"steps.{step.name}.{step.kind}.{role}"))]


def _local_or_hub(recipe: Recipe, text: str, line: int, key: str) -> Source:
    """A folder (relative to the recipe) when it exists; else a Hub id ``owner/name[@revision]``; else missing."""
    from reforge.io.hub import looks_like_repo_id

    path = recipe.local(text)
    if path.exists():
        return Source(text, line, path=path)
    spelled_as_path = text.startswith((".", "/", "~")) or text.count("/") != 1
    if not spelled_as_path and looks_like_repo_id(text):
        return Source(text, line, hub=text)
    raise recipe.error(line, f"{text!r} is missing: no such file or folder ({path})", key=key, hint="Check the path.")


def _agree(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def _combos(recipe: Recipe, step: StepSpec, jobs: dict, roles: tuple[str, ...]) -> list[tuple[dict, dict]]:
    """Every agreeing choice of one candidate per role: ``(dims, {role: source})``."""
    combos: list[tuple[dict, dict]] = [({}, {})]
    for role in roles:
        refs = step.refs.get(role)
        if refs is None and role in ("base", "retriever"):
            refs = [(role, recipe.lines[role])]
        if refs is None:
            continue
        (text, line) = refs[0]
        candidates = _model(recipe, step, role, text, line, jobs)
        combos = [
            ({**dims, **cdims}, {**chosen, role: source})
            for dims, chosen in combos
            for cdims, source in candidates
            if _agree(dims, cdims)
        ]
    return combos


def _names(recipe: Recipe, step: StepSpec, role: str, known: dict, what: str) -> list[str] | None:
    refs = step.refs.get(role)
    if refs is None:
        return None
    for text, line in refs:
        if text not in known:
            raise recipe.error(
                line,
                f"{role} {text!r} is not one of the recipe's {what}",
                key=f"steps.{step.name}.{step.kind}.{role}",
                hint=f"Known {what}: {', '.join(known)}." if known else f"Add a {what}: mapping to the recipe.",
            )
    return [text for text, _ in refs]


# ---------------------------------------------------------------------------------------------------------------------
# One function per kind: the jobs of a step


def _job(recipe: Recipe, step: StepSpec, dims: dict, inputs: dict, **extra: Any) -> Job:
    suffix = _suffix(dims)
    if step.output is not None:
        template, line = step.output
        try:
            written = template.format(step=step.name, out=recipe.out, **{k: _dim_text(k, v) for k, v in dims.items()})
        except (KeyError, IndexError, ValueError) as e:
            raise recipe.error(
                line,
                f"output {template!r} names {e}, which this step does not have",
                hint=f"It has: {', '.join(['step', 'out', *dims])}.",
            ) from e
        output = recipe.local(written)
    else:
        output = recipe.out / step.name / suffix if suffix else recipe.out / step.name
    job_id = f"{step.name}/{suffix}" if suffix else step.name
    return Job(job_id, step, dims, output, inputs, dict(step.options), **extra)


def _suffix(dims: dict) -> str:
    parts = [f"{k}{_dim_text(k, dims[k])}" if k in ("seed", "alpha") else dims[k] for k in DIM_ORDER if k in dims]
    if "corpus" in dims and dims.get("dataset") == dims["corpus"]:
        parts.remove(dims["dataset"])
    return "-".join(parts)


def _dim_text(key: str, value: Any) -> str:
    return f"{value:g}" if key == "alpha" else str(value)


def _diff(recipe: Recipe, step: StepSpec, jobs: dict) -> list[Job]:
    return [
        _job(recipe, step, dims, {k: [v] for k, v in chosen.items()})
        for dims, chosen in _combos(recipe, step, jobs, ("base", "retriever"))
    ]


def _train(recipe: Recipe, step: StepSpec, jobs: dict) -> list[Job]:
    corpora = _names(recipe, step, "corpus", recipe.corpora, "corpora") or list(recipe.corpora)
    if not corpora:
        raise recipe.error(step.line, f"train step {step.name!r} has no corpus: the recipe names no corpora")
    found = []
    for dims, chosen in _combos(recipe, step, jobs, ("base",)):
        for corpus in corpora:
            if _agree(dims, {"corpus": corpus}):
                line = recipe.lines[f"corpora.{corpus}"]
                sources = [_local_or_hub(recipe, p, line, f"corpora.{corpus}") for p in recipe.corpora[corpus]]
                paths = [_path_source(recipe, step, f, p) for f in TRAIN_PATHS for p in _as_list(step.options[f])]
                inputs = {"base": [chosen["base"]], "corpus": sources, "filters": paths}
                seeds = step.options["seed"]
                if not isinstance(seeds, list):  # one seed: no seed dimension
                    found.append(_job(recipe, step, {**dims, "corpus": corpus}, inputs))
                    continue
                for seed in seeds:  # a seed list: one adapter per seed
                    job = _job(recipe, step, {**dims, "corpus": corpus, "seed": seed}, inputs)
                    job.options["seed"] = seed
                    found.append(job)
    return found


def _source_roles(step: StepSpec) -> tuple[str, ...]:
    return ("base", "delta", "adapter") if "delta" in step.refs else ("base", "retriever", "adapter")


def _tune(recipe: Recipe, step: StepSpec, jobs: dict) -> list[Job]:
    _one_source(recipe, step)
    chosen_datasets = _names(recipe, step, "dataset", recipe.datasets, "datasets")
    found = []
    for dims, chosen in _combos(recipe, step, jobs, _source_roles(step)):
        datasets = chosen_datasets or [dims.get("corpus")]
        for dataset in datasets:
            if dataset not in recipe.datasets:
                raise recipe.error(
                    step.line,
                    f"tune step {step.name!r} has no dataset for corpus {dataset!r}",
                    hint="Name one with dataset: (its held-out split tunes alpha).",
                )
            data = _dataset_source(recipe, dataset, (step.options["split"], step.options["test_split"]))
            inputs = {**{k: [v] for k, v in chosen.items()}, "dataset": [data]}
            found.append(_job(recipe, step, {**dims, "dataset": dataset}, inputs))
    return found


def _merge(recipe: Recipe, step: StepSpec, jobs: dict) -> list[Job]:
    _one_source(recipe, step)
    alpha = step.options["alpha"]
    found = []
    for dims, chosen in _combos(recipe, step, jobs, _source_roles(step)):
        inputs = {k: [v] for k, v in chosen.items()}
        if isinstance(alpha, str):
            tuned = recipe.steps.get(alpha)
            if tuned is None or tuned.kind != "tune":
                raise recipe.error(
                    step.lines["alpha"],
                    f"alpha {alpha!r} is neither a number nor a tune step",
                    key=f"steps.{step.name}.merge.alpha",
                    hint="Write alpha: 0.5, a list [0.25, 0.5], or the name of a tune step.",
                )
            for tune_job in jobs[alpha]:
                if _agree(dims, tune_job.dims) and tune_job.inputs["adapter"][0].job is chosen["adapter"].job:
                    job = _job(recipe, step, {**dims, **tune_job.dims}, inputs, tune=tune_job)
                    job.options["alpha"] = None  # the tune job's best, known once it has run
                    found.append(job)
        else:
            for value in alpha:
                job = _job(recipe, step, {**dims, "alpha": value}, inputs)
                job.options["alpha"] = value
                found.append(job)
    return found


def _eval(recipe: Recipe, step: StepSpec, jobs: dict) -> list[Job]:
    datasets = _names(recipe, step, "datasets", recipe.datasets, "datasets") or list(recipe.datasets)
    if not datasets:
        raise recipe.error(step.line, f"eval step {step.name!r} has no dataset: the recipe names no datasets")
    candidates = [(text, _model(recipe, step, "models", text, line, jobs), line) for text, line in step.refs["models"]]
    # what a peft-adapter model (a LoRA retriever such as RepLLaMA) is loaded over, as `reforge eval --base`
    base_text, base_line = (step.refs.get("base") or [("base", recipe.lines["base"])])[0]
    base = _model(recipe, step, "base", base_text, base_line, jobs)[0][1]
    found, used = [], set()
    for dataset in datasets:
        wanted = {"dataset": dataset, **({"corpus": dataset} if step.options["matched"] else {})}
        models, labels = [], []
        for text, options, _ in candidates:
            varying = {
                k for k in {k for dims, _ in options for k in dims} if len({str(d.get(k)) for d, _ in options}) > 1
            }
            for dims, source in options:
                if _agree(dims, wanted):
                    models.append(source)
                    labels.append(_label(text, dims, wanted, varying))
                    used.add(text)
        data = _dataset_source(recipe, dataset, (step.options["split"],))
        job = _job(recipe, step, {"dataset": dataset}, {"models": models, "dataset": [data], "base": [base]})
        job.labels = labels
        found.append(job)
    for text, _, line in candidates:
        if text not in used:
            raise recipe.error(
                line,
                f"model {text!r} was made from no corpus named like a dataset of this eval ({', '.join(datasets)})",
                key=f"steps.{step.name}.eval.models",
                hint="Name the corpus like its dataset, or set matched: false to score every model on every dataset.",
            )
    return found


def _label(text: str, dims: dict, wanted: dict, varying: set[str]) -> str:
    """A model's name in the table: the reference, plus the dimensions that tell its jobs apart (``readapted alpha
    0.25``) beyond those the eval matches on."""
    extra = [f"{k} {_dim_text(k, v)}" for k, v in dims.items() if k not in wanted and k in varying]
    return " ".join([text, *extra])


def _push(recipe: Recipe, step: StepSpec, jobs: dict) -> list[Job]:
    if not step.options["repo"]:
        raise recipe.error(step.line, f"push step {step.name!r} needs repo (owner/name on the Hub)")
    found = []
    for dims, chosen in _combos(recipe, step, jobs, ("model",)):
        job = _job(recipe, step, dims, {"model": [chosen["model"]]})
        try:
            job.options["repo"] = step.options["repo"].format(
                step=step.name, **{k: _dim_text(k, v) for k, v in dims.items()}
            )
        except (KeyError, IndexError, ValueError) as e:
            raise recipe.error(
                step.lines["repo"], f"repo names {e}, which this step does not have", key=f"steps.{step.name}.push.repo"
            ) from e
        found.append(job)
    return found


_EXPAND = {"diff": _diff, "train": _train, "tune": _tune, "merge": _merge, "eval": _eval, "push": _push}


def _one_source(recipe: Recipe, step: StepSpec) -> None:
    if "delta" in step.refs and "retriever" in step.refs:
        raise recipe.error(
            step.lines["delta"],
            f"{step.kind} step {step.name!r} gives both retriever and delta",
            hint="Give one: delta (a diff step) or retriever (default: the recipe's).",
        )


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _path_source(recipe: Recipe, step: StepSpec, field_name: str, text: str) -> Source:
    line = step.lines[field_name]
    path = recipe.local(text)
    if not path.exists():
        raise recipe.error(line, f"{text!r} is missing ({path})", key=f"steps.{step.name}.train.{field_name}")
    return Source(text, line, path=path)


def _dataset_source(recipe: Recipe, name: str, splits: tuple[str, ...]) -> Source:
    """The BEIR folder of dataset ``name``: it must hold corpus.jsonl, queries.jsonl and qrels/<split>.tsv."""
    text = recipe.datasets[name]
    line = recipe.lines[f"datasets.{name}"]
    source = _local_or_hub(recipe, text, line, f"datasets.{name}")
    if source.path is None:
        raise recipe.error(line, f"dataset {name!r} ({text}) is not a folder here", key=f"datasets.{name}")
    for part in ("corpus.jsonl", "queries.jsonl", *(f"qrels/{split}.tsv" for split in splits)):
        if not (source.path / part).is_file():
            raise recipe.error(
                line, f"dataset {name!r} has no {part} in {source.path}", key=f"datasets.{name}", hint="Check the path."
            )
    return source


# ---------------------------------------------------------------------------------------------------------------------
# Checks before any work


def _check_options(recipe: Recipe, step: StepSpec) -> None:
    """The API's own checks of the options (ranges, choices), with the line of the option they name."""
    from reforge.errors import InvalidOptionError

    try:
        if step.kind == "train":
            seeds = step.options["seed"]
            options = {**step.options, "seed": seeds[0] if isinstance(seeds, list) else seeds}
            train_config(options, base="base", corpus=["corpus"], output="out").validate()
        elif step.kind in ("eval", "tune"):
            eval_settings(step.options).check()
        elif step.kind in ("diff", "merge"):
            write_options(step.options).check()
            if step.kind == "merge" and not math.isfinite(step.options["beta"]):
                raise InvalidOptionError("beta must be a finite number.", option="beta")
        if step.kind == "tune" and step.options["split"] == step.options["test_split"] and not step.options["i_know"]:
            raise InvalidOptionError(
                f"tunes on split {step.options['split']!r}, the test split: the result would be optimistic.",
                hint="Tune on held-out queries (split: dev), or set i-know: true.",
                option="split",
            )
    except InvalidOptionError as e:
        field_name = str(getattr(e, "option", "") or "").lstrip("-").replace("-", "_")
        line = step.lines.get(field_name, step.line)
        raise recipe.error(
            line, f"step {step.name!r} ({option_key(step.kind, field_name)}): {e.message}", hint=e.hint
        ) from e


def train_config(options: dict, **where: Any) -> Any:
    """The `TrainConfig` of a train job's options (``where``: base, corpus, output)."""
    from reforge.train.config import TrainConfig

    values = {k: v for k, v in options.items()}
    for name in TRAIN_PATHS:
        if name in ("exclude_judged", "only_judged"):
            values[name] = list(values[name] or [])
    return TrainConfig(**where, **values)


def eval_settings(options: dict, **extra: Any) -> Any:
    """The `EvalSettings` of an eval or tune job's options (tune's own options left out)."""
    import dataclasses

    from reforge.eval.pipeline import EvalSettings

    names = {f.name for f in dataclasses.fields(EvalSettings)}
    values = {k: v for k, v in options.items() if k in names}
    if "measures" in values:
        values["measures"] = tuple(values["measures"])
    return EvalSettings(**{**values, **extra})


def write_options(options: dict, **extra: Any) -> Any:
    """The `WriteOptions` of a diff or merge job."""
    from reforge.ops.job import WriteOptions

    return WriteOptions(
        dtype=options["dtype"], max_shard_size=options["max_shard_size"], durable=options["durable"], **extra
    )


def _check_corpora(recipe: Recipe) -> None:
    """Named inputs that no job reads are still checked: a typo in an unused corpus is a typo."""
    for name, paths in recipe.corpora.items():
        for text in paths:
            _local_or_hub(recipe, text, recipe.lines[f"corpora.{name}"], f"corpora.{name}")


def _check_outputs(recipe: Recipe, jobs: list[Job]) -> None:
    """No two jobs write one folder (or one inside another); no job writes over, into or around an input; an
    existing output holds what reforge wrote."""
    from reforge.io.target import absolute

    inputs = []
    for job in jobs:
        for sources in job.inputs.values():
            inputs += [(s.path, s.line) for s in sources if s.path is not None]
    seen: dict[Path, Job] = {}
    for job in jobs:
        output = absolute(job.output)
        for path, line in inputs:
            reason = overlap(output, absolute(path))
            if reason:
                raise recipe.error(
                    job.step.output[1] if job.step.output else job.step.line,
                    f"step {job.id!r} would write {output}, which {reason} {path}, an input (line {line})",
                    hint="Choose another out: (or output:) folder, apart from the inputs.",
                )
        for other_path, other in seen.items():
            reason = overlap(output, other_path)
            if reason:
                raise recipe.error(
                    job.step.output[1] if job.step.output else job.step.line,
                    f"steps {job.id!r} and {other.id!r} would write {output}, which {reason} {other_path}",
                    hint="Give each step its own output folder.",
                )
        seen[output] = job
        _check_existing(recipe, job, output)


def _check_existing(recipe: Recipe, job: Job, output: Path) -> None:
    from reforge.io.target import written_by_reforge
    from reforge.recipe.state import STAMP

    if not output.exists():
        return
    if output.is_dir() and (not any(output.iterdir()) or (output / STAMP).is_file() or written_by_reforge(output)):
        return
    raise recipe.error(
        job.step.line,
        f"step {job.id!r} would write {output}, which holds files reforge did not write",
        hint="Choose another out: folder, or move those files away.",
    )
