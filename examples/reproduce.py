"""The miniature RE-AdaptIR reproduction behind docs/results.md: its recipes, run by `reforge run`, and its tables.

    python -m examples.reproduce [--out .cache/reproduce] [--data ../shared/data] [--base DIR] [budget options]
    python -m examples.reproduce --seeds 0,1,2 [--retriever last]   # section 6: recipes/results-seeds.yaml
    python -m examples.reproduce --report-only --out DIR           # rebuild the tables from finished jobs

The steps are recipes, run by `reforge.recipe.run_recipe` (what `reforge run` runs), which skips every job whose
output was made from the same inputs and options and resumes a killed one:

- ``recipes/results.yaml`` (sections 1-5): ``eval-retriever`` (the untrained base LM vs the retriever on SciFact and
  NFCorpus-partial test, encoded the retriever's way), the knowledge adapters ``psi-scifact``,
  ``psi-nfcorpus-partial``, and for Table 2 ``psi-scifact-unjudged`` / ``psi-scifact-judged`` (without, and with only,
  the test-judged passages), each followed by ``reforge tune`` on test (``--i-know``: every alpha reported against
  alpha 0, nothing chosen there) and on held-out queries (SciFact train, NFCorpus dev): the alpha a user would pick.
- ``recipes/results-seeds.yaml`` (section 6, ``--seeds``): four adapter variants (the paper's batching, row packing,
  Table 2's two corpora with row packing) at each seed, each tuned in both example retrievers (``--retriever last``:
  RepLLaMA's last-token pooling, examples/assets/repllama-smol-last; the adapters are trained on the base, so shared).

The options below are a budget on top of the recipe: they are written into an edited copy of it, ``<out>/recipe.yaml``
(paths made absolute; what ran is what that file says, and ``reforge run <out>/recipe.yaml`` runs it again). Then
this module keeps what docs/results.md's tables need: each job's summary as ``<out>/<name>.json`` (what the command's
``--json`` prints: `reforge train`'s, `reforge tune`'s, one `reforge eval` report per eval step over its datasets),
and for section 6 each adapter's size, ``size-<variant>-seed<k>.json`` (`reforge inspect --base`'s, measured here:
how far the adapter moves the base is a number of this report, not a product of the pipeline). ``results.md`` in
``--out`` holds the tables (`report`).

``--synthetic`` runs docs/results.md's synthetic-query section instead (examples/synthetic.py, which still runs its
steps as reforge commands through `run_steps`: ``reforge queries`` and its own subset step are no recipe kinds).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples.prepare_base import prepare_base

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RECIPES = {"main": REPO / "recipes" / "results.yaml", "seeds": REPO / "recipes" / "results-seeds.yaml"}
DATASETS = {"scifact": "SciFact", "nfcorpus-partial": "NFCorpus-partial"}
# held-out queries for tuning: NFCorpus has a dev split; SciFact only train (the retriever's own training queries)
DEV_SPLITS = {"scifact": "train", "nfcorpus-partial": "dev"}
# The retrievers a knowledge adapter is merged into. Knowledge adapters are trained on the base, not on a retriever,
# so both share them; only the eval/tune steps are the retriever's own (named with its prefix: `tune-last-...`).
RETRIEVERS = {
    "mean": REPO / "examples" / "assets" / "repllama-smol",  # the committed mean-pooling retriever (section 1)
    "last": REPO / "examples" / "assets" / "repllama-smol-last",  # RepLLaMA's last-token pooling, warm-started
}
STEP_PREFIX = {"mean": "", "last": "last-"}
# Section 6's adapter variants: (step-name stem, what the adapter trained on); recipes/results-seeds.yaml trains them
VARIANTS = (
    ("scifact", "the first documents of the corpus"),
    ("scifact-rows", "the first documents of the corpus, --batching rows"),
    ("scifact-unjudged-rows", "the first documents no test query judges, --batching rows"),
    ("scifact-judged-rows", "the first test-judged documents, --batching rows"),
)
# a recipe step's keys that hold a path (relative to the recipe), made absolute in the edited copy
_PATH_OPTIONS = ("exclude-judged", "only-judged", "exclude-ids", "only-ids")
_MODEL_ROLES = ("base", "retriever", "delta", "adapter", "model", "models")


def encoding_of(retriever: Path) -> tuple[str, ...]:
    """The retriever's encoding (its reforge_encoding.json) as command-line options, so that the untrained base and
    every merge are encoded the same way: RepLLaMA's prefixes with the retriever's pooling and length."""
    recorded = json.loads((retriever / "reforge_encoding.json").read_text())
    return ("--profile", "repllama", "--pooling", recorded["pooling"], "--max-length", str(recorded["max_length"]))


def retriever_step(name: str, retriever: str) -> str:
    """``tune-scifact-seed0`` as the step of ``retriever``: ``tune-last-scifact-seed0`` for the last-token one."""
    kind, rest = name.split("-", 1)
    return f"{kind}-{STEP_PREFIX[retriever]}{rest}"


# ---------------------------------------------------------------------------------------------------------------------
# the recipe, with the command line's budget


def edited_recipe(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """The recipe this run needs (``recipes/results-seeds.yaml`` with ``--seeds``, else ``recipes/results.yaml``) as
    a plain mapping, with the budget options written into its steps, ``out`` set to ``--out``, ``base`` to
    ``base``, the data under ``--data`` and every path absolute. A budget option left out keeps the recipe's value.
    """
    import yaml

    source = RECIPES["seeds" if args.seeds else "main"]
    recipe = yaml.safe_load(source.read_text())  # anchors and `<<:` merges resolved
    recipe = {k: v for k, v in recipe.items() if not k.startswith("x-")}

    def local(text: str) -> str:
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else source.parent / path).resolve()
        if args.data is not None and path.is_relative_to(DATA.resolve()):
            path = args.data.resolve() / path.relative_to(DATA.resolve())
        return str(path)

    recipe["out"], recipe["base"], recipe["retriever"] = str(args.out.resolve()), str(base), local(recipe["retriever"])
    for group in ("corpora", "datasets"):
        recipe[group] = {name: local(path) for name, path in recipe.get(group, {}).items()}
    if args.retriever == "last" and not args.seeds:  # section 1-5's steps, in the last-token retriever
        recipe["retriever"] = str(RETRIEVERS["last"])
        recipe["steps"] = {
            (retriever_step(name, "last") if _kind(step) in ("eval", "tune") else name): step
            for name, step in recipe["steps"].items()
        }
    names = set(recipe["steps"]) | {"base", "retriever"}
    for step in recipe["steps"].values():
        kind = _kind(step)
        options = step[kind] = dict(step[kind] or {})
        for key in _MODEL_ROLES:  # a reference that is a folder, not a step or base/retriever
            if isinstance(options.get(key), str) and options[key] not in names:
                options[key] = local(options[key])
        for key in _PATH_OPTIONS:
            if key in options:
                value = options[key]
                options[key] = [local(v) for v in value] if isinstance(value, list) else local(value)
        if kind == "train":
            _set(options, "max-docs", args.train_max_docs)
            _set(options, "max-length", args.train_max_length)
            if "batching" not in options:  # a variant's own batching (rows) stays
                _set(options, "batching", args.train_batching)
            if isinstance(options.get("seed"), list):
                _set(options, "seed", args.seeds)
            else:
                _set(options, "seed", args.seed)
        if kind in ("eval", "tune"):
            _set(options, "dtype", args.dtype)
            if args.retriever == "last" and not args.seeds:
                options["pooling"] = "last"
        if kind == "tune":
            _set(options, "alpha", args.alphas)
            _set(options, "corpus-sample", args.corpus_sample)
            _set(options, "max-queries", args.max_queries)
    return recipe


def _kind(step: dict) -> str:
    return next(k for k in step if k != "output")


def _set(options: dict, key: str, value: Any) -> None:
    if value is not None:
        options[key] = value


def write_recipe(recipe: dict[str, Any], out: Path) -> Path:
    """``<out>/recipe.yaml``: the recipe this run runs (`reforge.recipe.run_recipe` keeps its copy there too)."""
    import yaml

    from reforge.recipe.state import write_if_changed

    out.mkdir(parents=True, exist_ok=True)
    header = "# written by python -m examples.reproduce: its recipe with this run's budget and paths\n"

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # each value written out, no &id001 anchors
            return True

    text = header + yaml.dump(recipe, Dumper=Dumper, sort_keys=False, width=120)
    return write_if_changed(out / "recipe.yaml", text.encode("utf-8"))


def summary_name(job: Any) -> str:
    """The ``<out>/<name>.json`` a job's summary is kept as: its output folder's name (the recipes write
    ``{out}/<step>`` or ``{out}/<step>-seed<k>``); an eval step's datasets are one report, named after the step."""
    return job.step.name if job.kind == "eval" else job.output.name


def select(jobs: list, only: list[str] | None, retriever: str, seeds: bool) -> list[str] | None:
    """The job ids to run (`run_recipe`'s ``only``) for ``--only`` names (``psi-scifact``, ``tune-scifact-test``,
    ``size-scifact-seed0``: the summaries' names) and, for section 6, ``--retriever`` (its tune steps only). None:
    every job."""
    if seeds:  # section 6: the tunes in the other retriever are left out
        last = retriever == "last"
        jobs = [job for job in jobs if job.kind != "tune" or job.step.name.startswith("tune-last-") == last]
    if not only and not seeds:
        return None
    by_name: dict[str, list[str]] = {}
    for job in jobs:
        by_name.setdefault(summary_name(job), []).append(job.id)
        if job.kind == "train":
            by_name.setdefault("size-" + job.output.name.removeprefix("psi-"), []).append(job.id)
    if not only:
        return [job.id for job in jobs]
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: no such step here; steps: {' '.join(by_name)}")
    return list(dict.fromkeys(job_id for name in only for job_id in by_name[name]))


def collect(jobs: list, out: Path, base: Path, sizes: bool) -> list[str]:
    """Keep each finished job's summary as ``<out>/<name>.json`` (see `summary_name`), and with ``sizes`` each
    adapter's size; returns the names written. A job without a stamp (not run yet, or failed) is left out."""
    from reforge.recipe.state import read_stamp, write_if_changed

    written, evals = [], {}
    for job in jobs:
        stamp = read_stamp(job.output)
        if stamp is None:
            continue
        if job.kind == "eval":
            evals.setdefault(summary_name(job), []).append(json.loads((job.output / "summary.json").read_text()))
            continue
        if job.kind == "train":
            record = json.loads((job.output / "training_record.json").read_text())
            data = {"output": str(job.output), "dry_run": False, **stamp["training"], "record": record}
            if sizes:
                written += _measure_size(job, stamp, base, out)
        elif job.kind == "tune":
            data = json.loads((job.output / "tune.json").read_text())
        else:
            continue
        write_if_changed(out / f"{summary_name(job)}.json", _json(data))
        written.append(summary_name(job))
    for name, summaries in evals.items():
        write_if_changed(out / f"{name}.json", _json(_one_report(summaries)))
        written.append(name)
    return written


def _one_report(summaries: list[dict]) -> dict:
    """One eval step's per-dataset summaries as the one report `reforge eval -d A -d B --json` prints."""
    merged = {**summaries[0]}
    for key in ("datasets", "results", "comparisons"):
        merged[key] = [item for s in summaries for item in s[key]]
    models = [m["name"] for m in merged["models"]]
    measures = merged["measures"]
    merged["averages"] = (
        {
            m: {x: sum(r["scores"][x] for r in merged["results"] if r["model"] == m) / len(summaries) for x in measures}
            for m in models
        }
        if len(summaries) > 1
        else {}
    )
    return merged


def _measure_size(job: Any, stamp: dict, base: Path, out: Path) -> list[str]:
    """``size-<variant>-seed<k>.json``: `reforge inspect ADAPTER --base BASE --json` of a train job's adapter, once
    per adapter (measured again when the adapter was made again)."""
    from reforge.io.describe import describe
    from reforge.ops.fold import update_size
    from reforge.recipe.state import write_if_changed

    name = "size-" + job.output.name.removeprefix("psi-")
    path = out / f"{name}.json"
    if path.is_file() and json.loads(path.read_text()).get("adapter_fingerprint") == stamp["fingerprint"]:
        return []
    print(f"Measuring {job.output.name} against the base ({name}.json)", flush=True)
    summary = describe(str(job.output))
    summary["update"] = update_size(str(job.output), str(base))
    summary["adapter_fingerprint"] = stamp["fingerprint"]
    write_if_changed(path, _json(summary))
    return [name]


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8")


def run_recipe_here(args: argparse.Namespace) -> list[str]:
    """Write this run's recipe, run it (`reforge.recipe.run_recipe`), keep the summaries; the jobs that failed or
    did not run after a failure."""
    base = (args.base or prepare_base()).resolve()
    return run_and_collect(edited_recipe(args, base), args, base)


def run_and_collect(recipe: dict[str, Any], args: argparse.Namespace, base: Path) -> list[str]:
    """`run_recipe_here` for a recipe already edited (`edited_recipe`)."""
    from reforge.recipe import run_recipe
    from reforge.recipe.plan import expand
    from reforge.recipe.spec import load_recipe

    path = write_recipe(recipe, args.out)
    jobs = expand(load_recipe(path))
    only = select(jobs, args.only, args.retriever, bool(args.seeds))
    print(f"reforge run {path}" + (f" --only {' '.join(only)}" if only else ""), flush=True)
    # keep_going: a failed job is reported and the jobs that do not read it go on (a rerun continues there)
    report = run_recipe(path, only=only, keep_going=True, stage=lambda text: print(text, flush=True))
    for plan in report.jobs:
        print(f"   {plan.job.id}: {plan.action} ({plan.reason}, {plan.seconds:.0f} s)", flush=True)
    chosen = [job for job in jobs if only is None or job.id in only]
    collect(chosen, args.out, base, sizes=bool(args.seeds))
    return report.failed + [plan.job.id for plan in report.jobs if plan.action == "not run"]


# ---------------------------------------------------------------------------------------------------------------------
# reforge commands as subprocesses: what examples/synthetic.py still runs its steps with (`reforge queries` and its
# subset step are no recipe kinds)


@dataclass(frozen=True)
class Step:
    """One reforge command whose ``--json`` output is saved as ``<out>/<name>.json``; ``needs`` are step names."""

    name: str
    args: tuple[str, ...]
    needs: tuple[str, ...] = ()


def run_steps(steps: list[Step], out: Path, command: list[str], log: Callable[[str], None] = print) -> list[str]:
    """Run every step whose JSON is missing and whose needs succeeded; returns the names of the failed steps."""
    failed: list[str] = []
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for step in steps:
        result = out / f"{step.name}.json"
        log(f"\n== {step.name}\n$ reforge {shlex.join(step.args)} --json")
        if result.is_file():
            log("   (already done)")
            continue
        missing = [need for need in step.needs if not (out / f"{need}.json").is_file()]
        if missing:
            log(f"   (skipped: {', '.join(missing)} did not finish)")
            failed.append(step.name)
            continue
        started = time.perf_counter()
        partial = result.with_name(result.name + ".partial")
        with partial.open("w") as stdout, (out / "logs" / f"{step.name}.log").open("w") as stderr:
            code = subprocess.run([*command, *step.args, "-q", "--json"], stdout=stdout, stderr=stderr).returncode
        if code != 0:
            partial.unlink()
            log(f"   FAILED (exit {code}); see {out / 'logs' / (step.name + '.log')}")
            failed.append(step.name)
            continue
        partial.rename(result)
        log(f"   ({time.perf_counter() - started:.0f} s)")
    return failed


# ---------------------------------------------------------------------------------------------------------------------
# the report


def report(out: Path) -> str:
    """docs/results.md's tables, in Markdown, from the JSON of the finished steps (missing steps are left out)."""
    sections = [
        _retriever_table(out),
        _training_table(out),
        _alpha_table(out),
        _tuned_table(out),
        _table2(out),
        _variance_table(out),
        _batching_table(out),
        _variance_table(out, "last"),
        _batching_table(out, "last"),
        _retrievers_table(out),
        _synthetic_tables(out),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _synthetic_tables(out: Path) -> str:
    from examples.synthetic import report as synthetic_report

    return synthetic_report(out)


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _retriever_table(out: Path) -> str:
    data = _load(out, "eval-retriever")
    if not data:
        return ""
    rows = []
    for c in data["comparisons"]:
        rows.append(
            _row(
                _dataset_name(c["dataset"]),
                f"{c['baseline_score']:.4f}",
                f"{c['score']:.4f}",
                f"{c['delta']:+.4f}",
                _p(c["p_ttest"]),
                _p(c["p_randomization"]),
                _wtl(c),
            )
        )
    return _table(
        "dataset | base LM (untrained) | retriever | difference | p (t-test) | p (randomization) | "
        "wins / ties / losses",
        rows,
    )


def _training_table(out: Path) -> str:
    rows = []
    for name in ("psi-scifact", "psi-nfcorpus-partial", "psi-scifact-unjudged", "psi-scifact-judged"):
        data = _load(out, name)
        if not data:
            continue
        loss = data["record"]["loss"]
        rows.append(
            _row(
                name,
                _corpus_text(name),
                f"{data['documents']:,}",
                f"{data['tokens']:,}",
                f"{data['steps']:,}",
                f"{loss['first']:.3f} -> {data['final_loss']:.3f}",
                f"{data['tokens_per_s']:,.0f}",
                f"{data['wall_time_s']:.0f} s",
            )
        )
    return _table("adapter | corpus | documents | tokens trained | steps | loss first -> last | tokens/s | time", rows)


def _alpha_table(out: Path) -> str:
    rows = []
    for dataset in DATASETS:
        data = _load(out, f"tune-{dataset}-test")
        for point in data["points"] if data else ():
            rows.append(_point_row(DATASETS[dataset], point))
    return _table(
        "dataset (test) | alpha | nDCG@10 | vs retriever (alpha 0) | p (t-test) | p (randomization) | "
        "wins / ties / losses",
        rows,
    )


def _tuned_table(out: Path) -> str:
    rows = []
    for dataset, split in DEV_SPLITS.items():
        tuned, test = _load(out, f"tune-{dataset}-{split}"), _load(out, f"tune-{dataset}-test")
        if not tuned or not test:
            continue
        alpha = tuned["best"]["alpha"]
        rows.append(
            _row(
                DATASETS[dataset],
                f"{split} ({tuned['dataset']['queries']} queries)",
                f"{alpha:g}",
                f"{tuned['best']['score']:.4f}",
                _score_at(test, alpha),
                _score_at(test, 0.5),
                _score_at(test, 0.0),
            )
        )
    return _table(
        "dataset | tuned on | alpha chosen | its score there | test nDCG@10 at that alpha | "
        "test nDCG@10 at alpha 0.5 | test, retriever",
        rows,
    )


def _table2(out: Path) -> str:
    rows = []
    for name, text in (
        ("tune-scifact-test", "the whole corpus"),
        ("tune-scifact-test-unjudged", "the corpus without the test-judged passages"),
        ("tune-scifact-test-judged", "only the test-judged passages"),
    ):
        data = _load(out, name)
        for point in data["points"] if data else ():
            if point["alpha"] == 0.5:
                test = point["test"]
                rows.append(
                    _row(text, "0.5", f"{point['score']:.4f}", f"{test['delta']:+.4f}", _p(test["p_randomization"]))
                )
    return _table(
        "knowledge adapter trained on | alpha | SciFact test nDCG@10 | vs retriever | p (randomization)", rows
    )


def seed_runs(out: Path, stem: str, retriever: str = "mean") -> list[dict]:
    """The finished seeds of one variant of section 6 merged into ``retriever``, in seed order: ``seed``, the
    adapter's ``steps``, ``tokens``, ``final_loss`` and ``last10_loss`` (the mean of its last 10 steps' losses: one
    step's is noise), the alpha 0.5 point's ``delta`` (vs the retriever), ``p_randomization``, ``score``, the
    training ``budget`` in words, and ``size``: the adapter's mean ||Psi|| / ||W|| over the weights it changes
    (`reforge inspect --base`; None when its size step has not run)."""
    runs = []
    tunes = out.glob(retriever_step(f"tune-{stem}-seed*.json", retriever))
    for path in sorted(tunes, key=lambda p: int(p.stem.rsplit("seed", 1)[1])):
        seed = int(path.stem.rsplit("seed", 1)[1])
        trained = _load(out, f"psi-{stem}-seed{seed}")
        point = next((p for p in json.loads(path.read_text())["points"] if p["alpha"] == 0.5), None)
        if trained is None or point is None:
            continue
        measured = _load(out, f"size-{stem}-seed{seed}")
        history = [loss for _, loss in trained["record"]["loss"]["history"]]
        config = trained["record"]["config"]
        runs.append(
            {
                "seed": seed,
                "budget": f"{config['max_docs'] or 'all'} documents, {config['max_length']} tokens",
                "steps": trained["steps"],
                "tokens": trained["tokens"],
                "final_loss": trained["final_loss"],
                "last10_loss": sum(history[-10:]) / len(history[-10:]),
                "delta": point["test"]["delta"],
                "score": point["score"],
                "p_randomization": point["test"]["p_randomization"],
                "size": measured["update"]["relative"]["mean"] if measured else None,
            }
        )
    return runs


def spread(values: list[float]) -> dict:
    """``n``, ``mean``, sample ``std`` (ddof 1) and the one-sample t-test p (mean = 0) of per-seed values; std and
    p are None for fewer than 2 values."""
    import numpy as np
    from scipy import stats

    n = len(values)
    if n < 2:
        return {"n": n, "mean": values[0] if values else None, "std": None, "p": None}
    return {
        "n": n,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)),
        "p": float(stats.ttest_1samp(values, 0.0).pvalue),
    }


def _variance_table(out: Path, retriever: str = "mean") -> str:
    rows, budgets = [], set()
    for stem, text in VARIANTS:
        runs = seed_runs(out, stem, retriever)
        if not runs:
            continue
        budgets |= {r["budget"] for r in runs}
        s = spread([r["delta"] for r in runs])
        steps = sorted({r["steps"] for r in runs})
        tokens = sorted({r["tokens"] for r in runs})
        rows.append(
            _row(
                text,
                str(s["n"]),
                ", ".join(str(r["seed"]) for r in runs),
                "/".join(map(str, steps)),
                f"{tokens[0]:,}" if len(tokens) == 1 else f"{tokens[0]:,}-{tokens[-1]:,}",
                ", ".join(_size(r) for r in runs),
                ", ".join(f"{r['delta']:+.4f}" for r in runs),
                f"{s['mean']:+.4f}",
                "" if s["std"] is None else f"{s['std']:.4f}",
                "" if s["p"] is None else _p(s["p"]),
            )
        )
    return _table(
        f"knowledge adapter ({' / '.join(sorted(budgets))}){_MERGED_INTO[retriever]} | n | seeds | steps | tokens "
        "trained | size: norm(Psi) / norm(W) x 1000, per seed | nDCG@10 change at alpha 0.5, per seed | mean | "
        "std (sample) | p (t-test over seeds, mean = 0)",
        rows,
    )


def _size(run: dict) -> str:
    """The adapter's mean ||Psi|| / ||W||, in thousandths ("-" before its size step has run)."""
    return "-" if run["size"] is None else f"{run['size'] * 1000:.2f}"


# the mean-pooling tables' headers predate the last-token retriever; they stay as they are
_MERGED_INTO = {"mean": "", "last": ", merged into the last-token retriever"}


def _batching_table(out: Path, retriever: str = "mean") -> str:
    paper, rows = ({r["seed"]: r for r in seed_runs(out, stem, retriever)} for stem in ("scifact", "scifact-rows"))
    seeds = sorted(set(paper) & set(rows))
    if not seeds:
        return ""
    lines = [
        _row(
            str(k),
            f"{paper[k]['steps']} / {rows[k]['steps']}",
            f"{paper[k]['last10_loss']:.3f} / {rows[k]['last10_loss']:.3f}",
            f"{_size(paper[k])} / {_size(rows[k])}",
            f"{paper[k]['delta']:+.4f} / {rows[k]['delta']:+.4f}",
            f"{rows[k]['delta'] - paper[k]['delta']:+.4f}",
        )
        for k in seeds
    ]
    s = spread([rows[k]["delta"] - paper[k]["delta"] for k in seeds])
    std = "" if s["std"] is None else f", std {s['std']:.4f}, p {_p(s['p'])}"
    lines.append(_row(f"mean (n = {s['n']})", "", "", "", "", f"{s['mean']:+.4f}{std}"))
    return _table(
        f"seed{_MERGED_INTO[retriever]} | steps: documents (default) / rows | loss, mean of the last 10 steps | "
        "size: norm(Psi) / norm(W) x 1000 | nDCG@10 change at alpha 0.5 | rows minus documents",
        lines,
    )


def _retrievers_table(out: Path) -> str:
    """Each variant's seeds that were merged into both retrievers: the same knowledge adapter's nDCG@10 change in
    the last-token retriever minus its change in the mean-pooling one, seed by seed (a paired comparison)."""
    rows = []
    for stem, text in VARIANTS:
        mean, last = ({r["seed"]: r["delta"] for r in seed_runs(out, stem, kind)} for kind in ("mean", "last"))
        seeds = sorted(set(mean) & set(last))
        if not seeds:
            continue
        s = spread([last[k] - mean[k] for k in seeds])
        rows.append(
            _row(
                text,
                str(s["n"]),
                f"{sum(mean[k] for k in seeds) / len(seeds):+.4f}",
                f"{sum(last[k] for k in seeds) / len(seeds):+.4f}",
                ", ".join(f"{last[k] - mean[k]:+.4f}" for k in seeds),
                f"{s['mean']:+.4f}",
                "" if s["std"] is None else f"{s['std']:.4f}",
                "" if s["p"] is None else _p(s["p"]),
            )
        )
    return _table(
        "knowledge adapter (the same one in both) | n | mean change, mean pooling | mean change, last token | "
        "last token minus mean pooling, per seed | mean | std (sample) | p (paired t-test over seeds)",
        rows,
    )


def _table(header: str, rows: list[str]) -> str:
    """A Markdown table (columns separated by `` | `` in ``header``), or "" when there are no rows."""
    if not rows:
        return ""
    return "\n".join([f"| {header} |", "|" + "---|" * (header.count("|") + 1), *rows])


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _wtl(test: dict) -> str:
    return f"{test['wins']} / {test['ties']} / {test['losses']}"


def _point_row(dataset: str, point: dict) -> str:
    test = point["test"]
    if test is None:
        return _row(dataset, f"{point['alpha']:g} (retriever)", f"{point['score']:.4f}", "", "", "", "")
    return _row(
        dataset,
        f"{point['alpha']:g}",
        f"{point['score']:.4f}",
        f"{test['delta']:+.4f}",
        _p(test["p_ttest"]),
        _p(test["p_randomization"]),
        _wtl(test),
    )


def _score_at(tune_report: dict, alpha: float) -> str:
    for point in tune_report["points"]:
        if point["alpha"] == alpha and point["beta"] == 1.0:
            return f"{point['score']:.4f}"
    return "(not in the grid)"


def _dataset_name(name: str) -> str:
    return DATASETS.get(name, name)


def _corpus_text(name: str) -> str:
    return {
        "psi-scifact": "SciFact",
        "psi-nfcorpus-partial": "NFCorpus-partial",
        "psi-scifact-unjudged": "SciFact minus test-judged",
        "psi-scifact-judged": "SciFact test-judged only",
    }[name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `main`. A budget option left out keeps the recipe's value."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "reproduce")
    parser.add_argument(
        "--data", type=Path, default=None, help="folder with scifact/ and nfcorpus-partial/ [../shared/data]"
    )
    parser.add_argument("--base", type=Path, default=None, help="the converted SmolLM2 folder (default: prepare it)")
    parser.add_argument("--train-max-docs", type=int, default=None, help="budget: documents per knowledge adapter")
    parser.add_argument("--train-max-length", type=int, default=None, help="tokens per training document/row")
    parser.add_argument(
        "--train-batching",
        default=None,
        choices=("documents", "rows", "grouped"),
        help="reforge train --batching of the adapters that do not set their own (rows reproduces the runs of "
        "2026-11-26)",
    )
    parser.add_argument("--corpus-sample", type=int, default=None, help="budget: tune over ~N documents per corpus")
    parser.add_argument("--max-queries", type=int, default=None, help="budget: tune on N sampled queries per split")
    parser.add_argument("--alphas", default=None, help="the alpha grid of every tune step (0,0.5,1 or 0:1:0.25)")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help="run just these (psi-scifact, tune-scifact-test, ...)"
    )
    parser.add_argument(
        "--retriever",
        choices=tuple(RETRIEVERS),
        default="mean",
        help="tune in this retriever: mean (examples/assets/repllama-smol) or last (RepLLaMA's last-token pooling, "
        "examples/assets/repllama-smol-last; its steps are named tune-last-...); the adapters are shared",
    )
    parser.add_argument("--dtype", default=None, help="encoding dtype for eval/tune (the recipes: float32, as CPU)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (sections 1-5)")
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="0,1,2",
        help="run section 6 instead (recipes/results-seeds.yaml): each variant's adapter and tunes at these seeds",
    )
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md from finished steps")
    from examples.synthetic import add_arguments

    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.alphas is not None:
        args.alphas = _grid(args.alphas)
    return args


def _seed_list(text: str) -> list[int]:
    return [int(seed) for seed in text.split(",")]


def _grid(text: str) -> list[float] | str:
    """``0,0.5`` as a list; ``0:1:0.25`` as written (the recipe reads both)."""
    return text if ":" in text else [float(value) for value in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if not args.report_only and args.synthetic:
        from examples.synthetic import run

        failed = run(args.base or prepare_base(), args.data or DATA, args.out, args)
    elif not args.report_only:
        failed = run_recipe_here(args)
    text = report(args.out)
    (args.out / "results.md").write_text(text)
    print("\n" + text, flush=True)
    if failed:
        print(f"Failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
