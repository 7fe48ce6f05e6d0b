"""The miniature RE-AdaptIR reproduction behind docs/results.md, run with reforge's own commands.

    python -m examples.reproduce [--out .cache/reproduce] [--data ../shared/data] [--base DIR]
    python -m examples.reproduce --report-only --out DIR         # rebuild the tables from finished steps

What it runs (every command is printed first; a step whose JSON exists is skipped, so a rerun continues, and a
failed step is logged while the steps that do not need it go on):

1. ``reforge eval``: the untrained base LM vs the retriever (examples/assets/repllama-smol) on SciFact test and
   NFCorpus-partial test, both encoded the retriever's way (``query: ``/``passage: ``, EOS, mean pooling, 128 tokens).
2. ``reforge train``: knowledge adapters with the paper's defaults (DoRA r 32 / alpha 64 on q,k,v,up,down, 4
   documents a step, lr 2e-4 linear, one epoch, 1024 tokens; ``--train-batching rows`` for row packing) on
   SciFact's corpus, NFCorpus-partial's corpus, and for the Table 2 variant SciFact's corpus without
   (``--exclude-judged``) and with only (``--only-judged``) the test-judged passages.
3. ``reforge tune --split test --i-know``: retriever + alpha * Psi on each test split for alpha in 0..1. Every point
   is reported and compared with alpha = 0 (the retriever); nothing is chosen on test.
4. ``reforge tune`` on held-out queries (SciFact train queries, NFCorpus dev): the alpha a user would pick.
5. ``results.md`` in --out: the tables (`report`).

With ``--seeds 0,1,2`` it runs docs/results.md's section 6 instead: the SciFact adapter with the paper's batching
at each seed, then with ``--batching rows`` at the same seeds, then Table 2's variants, each followed by its tune,
and reports the mean and standard deviation of the nDCG@10 change at alpha 0.5 over the seeds.

With ``--retriever last`` the same adapters (trained on the base, so shared) are merged into the last-token retriever
(examples/assets/repllama-smol-last: RepLLaMA's EOS pooling) instead, and its eval/tune steps are named
``tune-last-...``: both retrievers' runs live in one ``--out`` and the report gives a table for each.

On a GPU the full corpora take minutes. On a CPU, budget it with ``--train-max-docs``, ``--train-max-length`` and
``--corpus-sample`` (the same budget for every row); `make demo` is the quick CPU run.
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

from examples.prepare_base import prepare_base

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ALPHAS = "0,0.25,0.5,0.75,1"
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


def encoding_of(retriever: Path) -> tuple[str, ...]:
    """The retriever's encoding (its reforge_encoding.json), spelled out so that the untrained base and every merge
    are encoded the same way: RepLLaMA's prefixes with the retriever's pooling and length."""
    recorded = json.loads((retriever / "reforge_encoding.json").read_text())
    return ("--profile", "repllama", "--pooling", recorded["pooling"], "--max-length", str(recorded["max_length"]))


def retriever_step(name: str, retriever: str) -> str:
    """``tune-scifact-seed0`` as the step of ``retriever``: ``tune-last-scifact-seed0`` for the last-token one."""
    kind, rest = name.split("-", 1)
    return f"{kind}-{STEP_PREFIX[retriever]}{rest}"


@dataclass(frozen=True)
class Step:
    """One reforge command whose ``--json`` output is saved as ``<out>/<name>.json``; ``needs`` are step names."""

    name: str
    args: tuple[str, ...]
    needs: tuple[str, ...] = ()


def plan(base: Path, data: Path, out: Path, args: argparse.Namespace) -> list[Step]:
    """The steps in the order they run: what the results table needs most comes first."""
    scifact, nfcorpus = data / "scifact", data / "nfcorpus-partial"
    retriever = RETRIEVERS[args.retriever]
    evaluation = (*encoding_of(retriever), "--dtype", args.dtype)
    sample = ("--corpus-sample", str(args.corpus_sample)) if args.corpus_sample else ()
    if args.max_queries:
        sample += ("--max-queries", str(args.max_queries))
    training = ("--max-length", str(args.train_max_length), "--save-every", "0")
    if args.train_batching != "documents":  # the runs of 2026-11-26 used row packing, then reforge's default
        training += ("--batching", args.train_batching)
    if args.train_max_docs:
        training += ("--max-docs", str(args.train_max_docs))

    def train(name: str, corpus: Path, *filters: str, seed: int = args.seed) -> Step:
        return Step(
            name,
            (
                "train",
                str(base),
                "--corpus",
                str(corpus),
                *filters,
                "-o",
                str(out / name),
                *training,
                "--seed",
                str(seed),
            ),
        )

    def size(adapter: str) -> Step:
        # how far the adapter moves the base (||Psi|| / ||W||): retriever-independent, like the adapter itself
        return Step(
            f"size-{adapter.removeprefix('psi-')}", ("inspect", str(out / adapter), "--base", str(base)), (adapter,)
        )

    def tune(name: str, adapter: str, dataset: Path, split: str, alphas: str = args.alphas) -> Step:
        honest = ("--i-know",) if split == "test" else ()
        name = retriever_step(name, args.retriever)
        return Step(
            name,
            (
                "tune",
                "--base",
                str(base),
                "--retriever",
                str(retriever),
                "--adapter",
                str(out / adapter),
                "-d",
                str(dataset),
                "--split",
                split,
                *honest,
                "--alpha",
                alphas,
                "--plot",
                str(out / f"{name}.png"),
                *evaluation,
                *sample,
            ),
            needs=(adapter,),
        )

    scifact_test = scifact / "qrels" / "test.tsv"
    if args.seeds:
        return _variance_steps(args.seeds, train, tune, size, scifact, scifact_test, args.only)
    steps = [
        Step(
            retriever_step("eval-retriever", args.retriever),
            (
                "eval",
                str(base),
                str(retriever),
                "--base",
                str(base),
                "-d",
                str(scifact),
                "-d",
                str(nfcorpus),
                *evaluation,
                "-o",
                str(out / retriever_step("eval-retriever", args.retriever)),
            ),
        ),
        train("psi-scifact", scifact),
        tune("tune-scifact-test", "psi-scifact", scifact, "test"),
        train("psi-nfcorpus-partial", nfcorpus),
        tune("tune-nfcorpus-partial-test", "psi-nfcorpus-partial", nfcorpus, "test"),
        tune("tune-scifact-train", "psi-scifact", scifact, DEV_SPLITS["scifact"]),
        tune("tune-nfcorpus-partial-dev", "psi-nfcorpus-partial", nfcorpus, DEV_SPLITS["nfcorpus-partial"]),
        train("psi-scifact-unjudged", scifact, "--exclude-judged", str(scifact_test)),
        tune("tune-scifact-test-unjudged", "psi-scifact-unjudged", scifact, "test"),
        train("psi-scifact-judged", scifact, "--only-judged", str(scifact_test)),
        tune("tune-scifact-test-judged", "psi-scifact-judged", scifact, "test"),
    ]
    return [step for step in steps if not args.only or step.name in args.only]


# Section 3 of docs/results.md: the same comparison over several knowledge-adapter seeds. Each variant is
# (step-name stem, what the adapter trained on, extra `reforge train` options); see `_variance_steps` for the order.
VARIANTS = (
    ("scifact", "the first documents of the corpus", ()),
    ("scifact-rows", "the first documents of the corpus, --batching rows", ("--batching", "rows")),
    ("scifact-unjudged-rows", "the first documents no test query judges, --batching rows", ("--batching", "rows")),
    ("scifact-judged-rows", "the first test-judged documents, --batching rows", ("--batching", "rows")),
)


def _variance_steps(seeds: list[int], train, tune, size, scifact: Path, qrels: Path, only) -> list[Step]:
    """Every variant's adapter, its tune and its size, once per seed. What answers the most comes first: the
    default recipe at every seed, then row packing at the same seeds, then Table 2's variants seed by seed."""
    filters = {
        "scifact-unjudged-rows": ("--exclude-judged", str(qrels)),
        "scifact-judged-rows": ("--only-judged", str(qrels)),
    }

    def pair(stem: str, options: tuple[str, ...], seed: int) -> list[Step]:
        name = f"{stem}-seed{seed}"
        return [
            train(f"psi-{name}", scifact, *filters.get(stem, ()), *options, seed=seed),
            tune(f"tune-{name}", f"psi-{name}", scifact, "test"),
            size(f"psi-{name}"),
        ]

    (_, _, default), (_, _, rows) = VARIANTS[0][:3], VARIANTS[1][:3]
    steps = [s for seed in seeds for s in pair("scifact", default, seed)]
    steps += [s for seed in seeds for s in pair("scifact-rows", rows, seed)]
    steps += [s for seed in seeds for stem, _, options in VARIANTS[2:] for s in pair(stem, options, seed)]
    return [step for step in steps if not only or step.name in only]


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
    for stem, text, _ in VARIANTS:
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
    for stem, text, _ in VARIANTS:
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
    """The command line of `main` (also what `plan` reads its budget from)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "reproduce")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with scifact/ and nfcorpus-partial/")
    parser.add_argument("--base", type=Path, default=None, help="the converted SmolLM2 folder (default: prepare it)")
    parser.add_argument("--train-max-docs", type=int, default=None, help="budget: documents per knowledge adapter")
    parser.add_argument("--train-max-length", type=int, default=1024, help="tokens per training document/row")
    parser.add_argument(
        "--train-batching",
        default="documents",
        choices=("documents", "rows", "grouped"),
        help="reforge train --batching (rows reproduces the runs of 2026-11-26)",
    )
    parser.add_argument("--corpus-sample", type=int, default=None, help="budget: tune over ~N documents per corpus")
    parser.add_argument("--max-queries", type=int, default=None, help="budget: tune on N sampled queries per split")
    parser.add_argument("--alphas", default=ALPHAS, help="the alpha grid of every tune step")
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run just these steps")
    parser.add_argument(
        "--retriever",
        choices=tuple(RETRIEVERS),
        default="mean",
        help="merge the knowledge adapters into this retriever: mean (examples/assets/repllama-smol) or last "
        "(RepLLaMA's last-token pooling, examples/assets/repllama-smol-last); the adapters are shared",
    )
    parser.add_argument("--dtype", default="float32", help="encoding dtype for eval/tune (float32 matches CPU)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="0,1,2",
        help="run section 3 instead: each variant's adapter and tune once per seed",
    )
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md from finished steps")
    from examples.synthetic import add_arguments

    add_arguments(parser)
    return parser.parse_args(argv)


def _seed_list(text: str) -> list[int]:
    return [int(seed) for seed in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if not args.report_only and args.synthetic:
        from examples.synthetic import run

        failed = run(args.base or prepare_base(), args.data, args.out, args)
    elif not args.report_only:
        base = args.base or prepare_base()
        failed = run_steps(plan(base, args.data, args.out, args), args.out, [sys.executable, "-m", "reforge"])
    text = report(args.out)
    (args.out / "results.md").write_text(text)
    print("\n" + text, flush=True)
    if failed:
        print(f"Failed or skipped: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
