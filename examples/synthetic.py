"""docs/results.md's section on synthetic queries: does `reforge tune` on queries written by `reforge queries`
choose alpha the way real labels would?

    python -m examples.reproduce --synthetic [--out .cache/synthetic] [--only scifact ...]
    python -m examples.reproduce --synthetic --report-only --out .cache/synthetic

Per dataset with judged test queries (SciFact, NFCorpus-partial, the MS MARCO TREC-DL subset), on the CPU budget:

1. ``subset-<ds>``: a small BEIR folder: ``--real-queries`` test queries drawn at random, up to ``--judged-per-query``
   of each one's judged documents (highest grades first), and random other documents up to ``--subset-docs``; its
   qrels are the test qrels of those queries restricted to that corpus. Real labels are read here only to score.
2. ``queries-crop-<ds>`` / ``queries-lm-<ds>``: ``reforge queries`` on that folder (so the synthetic folders link
   to the same corpus.jsonl and every model encodes the corpus once for real and synthetic queries), with the crop
   generator and with SmolLM2-135M-Instruct few-shot (reforge's built-in examples: from no collection scored here;
   ``--synthetic-lm MODEL`` names a larger LM instead).
3. ``psi-<ds>-<k>``: three knowledge adapters per corpus (``reforge train``, first ``--train-max-docs`` documents,
   learning rates 2e-4, 5e-4, 1e-3, seeds 0, 1, 2), shared by both retrievers.
4. ``syn-[last-]tune-<ds>-<k>-<real|crop|lm>``: ``reforge tune`` at alpha 0..1 by 0.25 on the real test split
   (``--i-know``: every point is reported, nothing chosen on it) and on each synthetic split.

`report` compares, per dataset and retriever, the synthetic scores with the real ones: Kendall tau over all
(adapter, alpha) points, the real nDCG@10 at the alpha the synthetic tune chooses against alpha 0.5 and alpha 0, the
mean regret, and the sign agreement of the gain over alpha 0 where the real gain is significant.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from reforge.data.beir import iter_corpus, read_qrels, read_queries

DATASETS = {
    "scifact": "SciFact",
    "nfcorpus-partial": "NFCorpus-partial",
    "msmarco-trecdl19-subset": "MS MARCO TREC-DL subset",
}
GENERATORS = ("crop", "lm", "lm-bm25")  # lm-bm25: the LM's queries (from its cache) kept only if BM25 ranks the
# source document in the top BM25_TOP of the scoring corpus
BM25_TOP = 10
ADAPTERS = ((0, "2e-4"), (1, "5e-4"), (2, "1e-3"))  # (seed, learning rate)
RETRIEVER_PREFIX = {"mean": "", "last": "last-"}


def make_subset(source: Path, dest: Path, *, queries: int, docs: int, per_query: int, seed: int) -> dict:
    """Write the small scoring folder (see the module docstring) and return what it holds."""
    qrels = read_qrels(source / "qrels" / "test.tsv")
    judged_queries = sorted(q for q, d in qrels.items() if any(g > 0 for g in d.values()))
    rng = random.Random(f"synthetic-subset:{seed}")
    chosen = sorted(rng.sample(judged_queries, min(queries, len(judged_queries))))
    keep: set[str] = set()
    for q in chosen:
        ranked = sorted(qrels[q].items(), key=lambda item: (-item[1], item[0]))
        keep |= {doc for doc, grade in ranked if grade > 0}.intersection(d for d, _ in ranked[:per_query])
    all_ids = [d.id for d in iter_corpus(source)]
    others = [d for d in all_ids if d not in keep]
    keep |= set(rng.sample(others, max(0, min(len(others), docs - len(keep)))))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "qrels").mkdir(exist_ok=True)
    with (dest / "corpus.jsonl").open("w") as f:
        for doc in iter_corpus(source):
            if doc.id in keep:
                f.write(json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text}) + "\n")
    texts = read_queries(source / "queries.jsonl")
    with (dest / "queries.jsonl").open("w") as f:
        for q in chosen:
            f.write(json.dumps({"_id": q, "text": texts[q]}) + "\n")
    rows = [(q, d, g) for q in chosen for d, g in sorted(qrels[q].items()) if d in keep]
    (dest / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows)
    )
    return {
        "source": str(source),
        "queries": len(chosen),
        "documents": len(keep),
        "judged_kept": sum(1 for _, _, g in rows if g > 0),
        "per_query": per_query,
        "seed": seed,
    }


def plan(base: Path, data: Path, out: Path, args) -> list:
    """The steps, dataset by dataset (each dataset's table is complete before the next starts)."""
    from examples.reproduce import Step

    steps = []
    for ds in args.datasets:
        subset = out / f"subset-{ds}"
        steps.append(Step(f"subset-{ds}", ("subset", str(data / ds), str(subset))))
        for generator in args.synthetic_generators:
            lm = args.synthetic_lm or str(base)
            model = ("--generator", lm if generator.startswith("lm") else "crop")
            if generator == "lm-bm25":
                model += ("--bm25-top", str(BM25_TOP))
            steps.append(
                Step(
                    f"queries-{generator}-{ds}",
                    (
                        "queries",
                        str(subset),
                        "-o",
                        str(out / f"syn-{generator}-{ds}"),
                        "-n",
                        str(args.synthetic_n),
                        "--seed",
                        "0",
                        "--overwrite",
                        *model,
                    ),
                    (f"subset-{ds}",),
                )
            )
        for retriever in args.synthetic_retrievers:  # one retriever's table, adapter by adapter, then the next
            for seed, lr in ADAPTERS:
                if seed not in args.synthetic_adapters:
                    continue
                steps.append(
                    Step(
                        f"psi-{ds}-{seed}",
                        (
                            "train",
                            str(base),
                            "--corpus",
                            str(data / ds),
                            "-o",
                            str(out / f"psi-{ds}-{seed}"),
                            "--max-docs",
                            str(args.synthetic_train_docs),
                            "--max-length",
                            str(args.synthetic_train_length),
                            "--save-every",
                            "0",
                            "--lr",
                            lr,
                            "--seed",
                            str(seed),
                        ),
                    )
                )
                steps += _tunes(base, out, ds, seed, retriever, args)
    return steps


def _tunes(base: Path, out: Path, ds: str, seed: int, retriever: str, args) -> list:
    """The tune of one adapter in one retriever on the real test queries and on each synthetic split."""
    from examples.reproduce import RETRIEVERS, Step, encoding_of

    path = RETRIEVERS[retriever]
    encoding = list(encoding_of(path))
    encoding[encoding.index("--max-length") + 1] = str(args.synthetic_max_length)
    steps = []
    for split in ("real", *args.synthetic_generators):
        folder = out / (f"subset-{ds}" if split == "real" else f"syn-{split}-{ds}")
        chosen = ("--split", "test", "--i-know") if split == "real" else ("--split", "synthetic")
        steps.append(
            Step(
                f"syn-{RETRIEVER_PREFIX[retriever]}tune-{ds}-{seed}-{split}",
                (
                    "tune",
                    "--base",
                    str(base),
                    "--retriever",
                    str(path),
                    "--adapter",
                    str(out / f"psi-{ds}-{seed}"),
                    "-d",
                    str(folder),
                    *chosen,
                    "--alpha",
                    "0:1:0.25",
                    "--no-plot",
                    *encoding,
                    "--dtype",
                    "float32",
                ),
                (f"psi-{ds}-{seed}", f"subset-{ds}" if split == "real" else f"queries-{split}-{ds}"),
            )
        )
    return steps


def run(base: Path, data: Path, out: Path, args) -> list[str]:
    """Run the plan (the subset steps here, every other step as a reforge command); the failed steps' names."""
    import sys

    from examples.reproduce import run_steps

    failed = []
    for step in plan(base, data, out, args):
        if step.args[0] == "subset":
            result = out / f"{step.name}.json"
            if not result.is_file():
                facts = make_subset(
                    Path(step.args[1]),
                    Path(step.args[2]),
                    queries=args.real_queries,
                    docs=args.subset_docs,
                    per_query=args.judged_per_query,
                    seed=0,
                )
                result.write_text(json.dumps(facts, indent=2))
            continue
        if step.args[0] == "train":
            _wait_for(out, step.name)
        if (out / f"{step.name}.json.partial").is_file():  # another runner is on it (runs share --out)
            print(f"\n== {step.name}: running in another process, skipped here", flush=True)
            continue
        failed += run_steps([step], out, [sys.executable, "-m", "reforge"])
    return failed


def _wait_for(out: Path, name: str, poll: float = 20.0) -> None:
    """Wait while another process runs this step (`examples.reproduce.run_steps` writes its output to
    ``<name>.json.partial`` until it ends), so an adapter is not trained twice; then run_steps finds its JSON."""
    import time

    while (out / f"{name}.json.partial").is_file():
        time.sleep(poll)


def add_arguments(parser) -> None:
    """The options of ``python -m examples.reproduce --synthetic`` (the budget of this section)."""
    parser.add_argument("--synthetic", action="store_true", help="run the synthetic-queries section instead")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--synthetic-n", type=int, default=30, help="documents per synthetic query set")
    parser.add_argument("--real-queries", type=int, default=20, help="real test queries drawn per dataset")
    parser.add_argument("--subset-docs", type=int, default=80, help="documents of each scoring subset")
    parser.add_argument("--judged-per-query", type=int, default=5, help="judged documents kept per real query")
    parser.add_argument("--synthetic-max-length", type=int, default=64, help="encoding length of the tune steps")
    parser.add_argument("--synthetic-train-docs", type=int, default=48, help="documents per knowledge adapter")
    parser.add_argument("--synthetic-train-length", type=int, default=128, help="tokens per training document")
    parser.add_argument("--synthetic-generators", nargs="+", default=["crop", "lm"], choices=list(GENERATORS))
    parser.add_argument(
        "--synthetic-lm",
        default=None,
        metavar="MODEL",
        help="the causal LM of the lm generators (folder or Hub id; default: the base, SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--synthetic-adapters", type=int, nargs="+", default=[s for s, _ in ADAPTERS], help="adapter seeds to run"
    )
    parser.add_argument("--synthetic-retrievers", nargs="+", default=["mean", "last"], choices=list(RETRIEVER_PREFIX))


# ---------------------------------------------------------------------------------------------------------------------
# the report

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SPLITS = ("real", *GENERATORS)


def _points(out: Path, retriever: str, ds: str, seed: int, split: str) -> dict[float, dict] | None:
    path = out / f"syn-{RETRIEVER_PREFIX[retriever]}tune-{ds}-{seed}-{split}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    points = {p["alpha"]: p for p in data["points"] if p["beta"] == 1.0}
    return {**points, "recommendation": data["recommendation"], "queries": data["dataset"]["queries"]}


def _choice(points: dict[float, dict]) -> float:
    """The alpha tune chooses: the highest score, ties to the smaller alpha (`reforge.tune._best`)."""
    return max(ALPHAS, key=lambda a: (points[a]["score"], -a))


def compare(out: Path, retriever: str, ds: str, generator: str) -> dict | None:
    """The comparison of one (retriever, dataset, generator) over the adapters whose three tunes finished."""
    from scipy.stats import kendalltau

    pairs = []
    for seed, _ in ADAPTERS:
        real, synthetic = _points(out, retriever, ds, seed, "real"), _points(out, retriever, ds, seed, generator)
        if real and synthetic:
            pairs.append((seed, real, synthetic))
    if not pairs:
        return None
    grid = [(0, 0.0)] + [(seed, a) for seed, _, _ in pairs for a in ALPHAS[1:]]
    by_seed = {seed: (real, synthetic) for seed, real, synthetic in pairs}
    real_scores = [by_seed[s][0][a]["score"] if a else pairs[0][1][0.0]["score"] for s, a in grid]
    synthetic_scores = [by_seed[s][1][a]["score"] if a else pairs[0][2][0.0]["score"] for s, a in grid]
    tau, p_tau = kendalltau(real_scores, synthetic_scores)
    rows, significant, agree = [], 0, 0
    for seed, real, synthetic in pairs:
        chosen = _choice(synthetic)
        recommended = synthetic["recommendation"]["alpha"]
        best = max(real[a]["score"] for a in ALPHAS)
        rows.append(
            {
                "adapter": seed,
                "choice": chosen,
                "real_at_choice": real[chosen]["score"],
                "real_at_half": real[0.5]["score"],
                "real_at_zero": real[0.0]["score"],
                "best_real": best,
                "best_real_alpha": _choice(real),
                "recommendation": synthetic["recommendation"]["action"],
                "real_at_recommendation": real[recommended]["score"],
            }
        )
        for a in ALPHAS[1:]:
            test = real[a]["test"]
            if test and test["p_randomization"] < 0.05:
                significant += 1
                agree += (synthetic[a]["test"]["delta"] > 0) == (test["delta"] > 0)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "adapters": len(rows),
        "real_queries": pairs[0][1]["queries"],
        "synthetic_queries": pairs[0][2]["queries"],
        "tau": tau,
        "p_tau": p_tau,
        "rows": rows,
        "mean_real_at_choice": mean("real_at_choice"),
        "mean_real_at_half": mean("real_at_half"),
        "mean_real_at_zero": mean("real_at_zero"),
        "regret_choice": mean("best_real") - mean("real_at_choice"),
        "regret_half": mean("best_real") - mean("real_at_half"),
        "regret_zero": mean("best_real") - mean("real_at_zero"),
        "regret_recommendation": mean("best_real") - mean("real_at_recommendation"),
        "significant": significant,
        "agree": agree,
    }


def report(out: Path) -> str:
    """The section's three tables (per dataset and retriever, per generator over them, every point), from the
    finished tune steps; "" when none."""
    summary, points, by_generator = [], [], {g: [] for g in GENERATORS}
    for ds, name in DATASETS.items():
        for retriever in RETRIEVER_PREFIX:
            for generator in GENERATORS:
                c = compare(out, retriever, ds, generator)
                if c is None:
                    continue
                by_generator[generator].append(c)
                agreement = f"{c['agree']}/{c['significant']}" if c["significant"] else "no significant real gain"
                summary.append(
                    f"| {name} | {retriever} | {generator} | {c['adapters']} | {c['real_queries']} / "
                    f"{c['synthetic_queries']} | {_tau(c)} | {c['mean_real_at_choice']:.4f} "
                    f"| {c['mean_real_at_half']:.4f} | {c['mean_real_at_zero']:.4f} | {c['regret_choice']:.4f} | "
                    f"{c['regret_half']:.4f} | {c['regret_zero']:.4f} | {c['regret_recommendation']:.4f} | "
                    f"{agreement} | {', '.join(_said(r) for r in c['rows'])} |"
                )
        points += _point_rows(out, ds, name)
    if not summary:
        return ""
    head = (
        "| dataset | retriever | generator | adapters | queries real / synthetic | Kendall tau | real nDCG@10 at "
        "synthetic choice | at alpha 0.5 | at alpha 0 | mean regret: synthetic choice | alpha 0.5 | alpha 0 | "
        "recommendation | sign agreement (significant real gains) | recommendation per adapter |\n" + "|---" * 15 + "|"
    )
    detail = (
        "| dataset | retriever | adapter | alpha | real nDCG@10 | p (real vs alpha 0) | crop nDCG@10 | "
        "LM nDCG@10 | LM + BM25 filter nDCG@10 |\n" + "|---" * 9 + "|"
    )
    return "\n\n".join(["\n".join([head, *summary]), _overall(by_generator), "\n".join([detail, *points])])


def _overall(by_generator: dict[str, list[dict]]) -> str:
    """Per generator, over its (dataset, retriever) cells: the issue's two targets (tau > 0 in every cell; mean
    regret of the synthetic choice no larger than fixed alpha 0.5's), each cell weighing the same."""
    rows = []
    for generator, cells in by_generator.items():
        if not cells:
            continue

        def mean(key: str, cells: list[dict] = cells) -> float:
            return sum(c[key] for c in cells) / len(cells)

        positive = sum(1 for c in cells if c["tau"] > 0)  # NaN counts as not > 0
        no_worse = sum(1 for c in cells if c["regret_choice"] <= c["regret_half"] + 1e-12)
        rows.append(
            f"| {generator} | {len(cells)} ({sum(c['adapters'] for c in cells)} adapters) | {positive} of {len(cells)} "
            f"| {mean('regret_choice'):.4f} | {mean('regret_recommendation'):.4f} | {mean('regret_half'):.4f} | "
            f"{mean('regret_zero'):.4f} | {no_worse} of {len(cells)} |"
        )
    head = (
        "| generator | (dataset, retriever) cells | Kendall tau > 0 | mean regret: synthetic choice | recommendation | "
        "alpha 0.5 | alpha 0 | cells where the synthetic choice's regret <= alpha 0.5's |\n" + "|---" * 8 + "|"
    )
    return "\n".join([head, *rows])


def _tau(c: dict) -> str:
    if c["tau"] != c["tau"]:  # NaN: one side has a single value (every point scored the same)
        return "undefined (one side constant)"
    return f"{c['tau']:+.3f} (p {c['p_tau']:.3f})"


def _said(row: dict) -> str:
    return f"{row['recommendation']}" + (f" {row['choice']:g}" if row["recommendation"] == "merge" else "")


def _point_rows(out: Path, ds: str, name: str) -> list[str]:
    rows = []
    for retriever in RETRIEVER_PREFIX:
        for seed, lr in ADAPTERS:
            found = {split: _points(out, retriever, ds, seed, split) for split in SPLITS}
            if not found["real"]:
                continue
            for a in ALPHAS:
                real = found["real"][a]
                p = f"{real['test']['p_randomization']:.3f}" if real["test"] else ""
                cells = [f"{found[s][a]['score']:.4f}" if found[s] else "" for s in GENERATORS]
                rows.append(
                    f"| {name} | {retriever} | {seed} (lr {lr}) | {a:g} | {real['score']:.4f} | {p} | "
                    + " | ".join(cells)
                    + " |"
                )
    return rows
