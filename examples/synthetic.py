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
   generator and with SmolLM2-135M-Instruct few-shot (reforge's built-in examples: from no collection scored here).
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
GENERATORS = ("crop", "lm")
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
    from examples.reproduce import RETRIEVERS, Step, encoding_of

    steps = []
    for ds in args.datasets:
        subset = out / f"subset-{ds}"
        steps.append(Step(f"subset-{ds}", ("subset", str(data / ds), str(subset))))
        for generator in GENERATORS:
            model = ("--generator", str(base)) if generator == "lm" else ()
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
        for seed, lr in ADAPTERS:
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
        for retriever in args.synthetic_retrievers:
            path = RETRIEVERS[retriever]
            encoding = list(encoding_of(path))
            encoding[encoding.index("--max-length") + 1] = str(args.synthetic_max_length)
            for seed, _ in ADAPTERS:
                for split in ("real", *GENERATORS):
                    folder = subset if split == "real" else out / f"syn-{split}-{ds}"
                    chosen = ("--split", "test", "--i-know") if split == "real" else ("--split", "synthetic")
                    name = f"syn-{RETRIEVER_PREFIX[retriever]}tune-{ds}-{seed}-{split}"
                    steps.append(
                        Step(
                            name,
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
            _wait_for(out / f"{step.name}.json.tmp")
        failed += run_steps([step], out, [sys.executable, "-m", "reforge"])
    return failed


def _wait_for(partial: Path) -> None:
    """Wait while another process trains this adapter (its ``.json.tmp`` exists), instead of training it twice."""
    import time

    while partial.is_file():
        time.sleep(20)


def add_arguments(parser) -> None:
    """The options of ``python -m examples.reproduce --synthetic`` (the budget of this section)."""
    parser.add_argument("--synthetic", action="store_true", help="run the synthetic-queries section instead")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--synthetic-n", type=int, default=30, help="documents per synthetic query set")
    parser.add_argument("--real-queries", type=int, default=20, help="real test queries drawn per dataset")
    parser.add_argument("--subset-docs", type=int, default=80, help="documents of each scoring subset")
    parser.add_argument("--judged-per-query", type=int, default=5, help="judged documents kept per real query")
    parser.add_argument("--synthetic-max-length", type=int, default=128, help="encoding length of the tune steps")
    parser.add_argument("--synthetic-train-docs", type=int, default=48, help="documents per knowledge adapter")
    parser.add_argument("--synthetic-train-length", type=int, default=128, help="tokens per training document")
    parser.add_argument("--synthetic-retrievers", nargs="+", default=["mean", "last"], choices=list(RETRIEVER_PREFIX))
