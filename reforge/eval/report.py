"""What `reforge.eval.evaluate` returns (`EvalReport`) and how it is written to disk (`write_outputs`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reforge.eval.metrics import AVERAGING, PairedTest, paired_test
from reforge.io.atomic import write_atomic


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as evaluated: name, split, counts, and hashes to reproduce it."""

    name: str
    path: str | None
    split: str
    documents: int
    queries: int
    judgments: int
    content_hash: str
    files_sha256: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    sample: dict[str, Any] | None = None  # how a --max-queries / --corpus-sample sample was drawn (None: whole)


@dataclass(frozen=True)
class ModelInfo:
    """A model as evaluated: its name in tables, where it came from, its fingerprint and encoding profile."""

    name: str
    ref: str | None
    path: str | None
    fingerprint: str | None
    profile: dict[str, Any]
    base_ref: str | None = None


@dataclass(frozen=True)
class Result:
    """One model on one dataset.

    ``scores[measure]`` is the average under the report's averaging over ``scored_queries`` queries;
    ``per_query[measure][query_id]`` covers every judged query. ``run`` is ``{query_id: {doc_id: score}}``.
    ``timings`` (seconds) holds ``load``, ``encode_corpus``, ``encode_queries``, ``search``, ``score``;
    ``corpus_cached`` says whether the corpus vectors came from the cache.
    """

    model: str
    dataset: str
    scores: dict[str, float]
    per_query: dict[str, dict[str, float]]
    scored_queries: int
    run: dict[str, dict[str, float]]
    timings: dict[str, float]
    corpus_cached: bool
    query_prefix: str

    @property
    def docs_per_second(self) -> float | None:
        """Corpus encoding throughput, None when the vectors came from the cache."""
        seconds = self.timings.get("encode_corpus", 0.0)
        documents = self.timings.get("documents", 0.0)
        return None if self.corpus_cached or seconds <= 0 else documents / seconds


@dataclass(frozen=True)
class Comparison:
    """A model against the first model on one dataset and measure (`PairedTest` fields, plus both scores)."""

    dataset: str
    model: str
    baseline: str
    baseline_score: float
    score: float
    test: PairedTest


def compare(
    baseline: Result,
    other: Result,
    qrels: Mapping[str, Any],
    *,
    averaging: str,
    measure: str,
    permutations: int,
    seed: int,
) -> Comparison:
    """``other`` against ``baseline`` on ``measure``: a paired test on every judged query (``all`` averaging), or
    with ``beir`` averaging on the queries both runs answered."""
    if averaging == "all":
        query_ids = list(qrels)
    else:
        query_ids = [q for q in qrels if baseline.run.get(q) and other.run.get(q)]
    test = paired_test(
        baseline.per_query[measure],
        other.per_query[measure],
        query_ids,
        measure=measure,
        permutations=permutations,
        seed=seed,
    )
    return Comparison(other.dataset, other.model, baseline.model, baseline.scores[measure], other.scores[measure], test)


@dataclass(frozen=True)
class EvalReport:
    """Everything one `evaluate` call measured, in model and dataset order.

    ``averaging`` is ``beir`` or ``all`` (see `reforge.eval.metrics`); ``settings`` holds the resolved options.
    """

    models: tuple[ModelInfo, ...]
    datasets: tuple[DatasetInfo, ...]
    measures: tuple[str, ...]
    averaging: str
    settings: dict[str, Any]
    results: tuple[Result, ...]
    comparisons: tuple[Comparison, ...]
    version: str

    def result(self, model: str, dataset: str) -> Result:
        """The result of ``model`` on ``dataset`` (names as in the tables)."""
        for r in self.results:
            if r.model == model and r.dataset == dataset:
                return r
        raise KeyError(f"no result for model {model!r} on dataset {dataset!r}")

    def score(self, model: str, dataset: str, measure: str | None = None) -> float:
        """One average score (default measure: the first)."""
        return self.result(model, dataset).scores[measure or self.measures[0]]

    def average(self, model: str, measure: str | None = None) -> float:
        """The mean over datasets of ``model``'s score (how BEIR tables average across datasets)."""
        values = [self.score(model, d.name, measure) for d in self.datasets]
        return sum(values) / len(values)

    def comparison(
        self, model: str, dataset: str, measure: str | None = None, *, baseline: str | None = None
    ) -> Comparison:
        """``model`` against ``baseline`` (default: the first model) on ``dataset``."""
        measure = measure or self.measures[0]
        baseline = baseline or self.models[0].name
        for c in self.comparisons:
            if c.model == model and c.baseline == baseline and c.dataset == dataset and c.test.measure == measure:
                return c
        raise KeyError(f"no comparison for {model!r} against {baseline!r} on {dataset!r} ({measure})")

    @property
    def averaging_text(self) -> str:
        """The averaging in words, for captions."""
        return AVERAGING[self.averaging]

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary: provenance, settings, scores, comparisons and timings (no runs, no per-query scores)."""
        return {
            "reforge_version": self.version,
            "measures": list(self.measures),
            "averaging": {"name": self.averaging, "meaning": self.averaging_text},
            "settings": self.settings,
            "models": [asdict(m) for m in self.models],
            "datasets": [asdict(d) for d in self.datasets],
            "results": [
                {
                    "model": r.model,
                    "dataset": r.dataset,
                    "scores": r.scores,
                    "scored_queries": r.scored_queries,
                    "query_prefix": r.query_prefix,
                    "corpus_cached": r.corpus_cached,
                    "docs_per_second": r.docs_per_second,
                    "timings": r.timings,
                }
                for r in self.results
            ],
            "averages": {m.name: {name: self.average(m.name, name) for name in self.measures} for m in self.models}
            if len(self.datasets) > 1
            else {},
            "comparisons": [
                {
                    "dataset": c.dataset,
                    "model": c.model,
                    "baseline": c.baseline,
                    "baseline_score": c.baseline_score,
                    "score": c.score,
                    **asdict(c.test),
                }
                for c in self.comparisons
            ],
        }


def write_outputs(report: EvalReport, folder: str | Path) -> list[Path]:
    """Write ``summary.json``, ``runs/<model>__<dataset>.trec`` and ``per_query/<model>__<dataset>.tsv``.

    Run files use the TREC format ``query_id Q0 doc_id rank score run_name``; per-query files have the columns
    ``query_id``, then one per measure (every judged query; ``counted`` says whether the averaging counts it).
    Each file is written under a temporary name and renamed. Returns the paths written.
    """
    folder = Path(folder)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    (folder / "per_query").mkdir(parents=True, exist_ok=True)
    written = []
    for r in report.results:
        stem = f"{_slug(r.model)}__{_slug(r.dataset)}"
        lines = []
        for query_id, hits in r.run.items():
            ranked = sorted(hits.items(), key=lambda item: (-item[1], item[0]))
            lines += [
                f"{query_id} Q0 {doc_id} {rank} {score:.6f} {_slug(r.model)}"
                for rank, (doc_id, score) in enumerate(ranked, start=1)
            ]
        written.append(_write_text(folder / "runs" / f"{stem}.trec", "\n".join(lines) + "\n"))
        measures = list(r.per_query)
        counted = set(_counted(r, report.averaging))
        rows = ["\t".join(["query_id", *measures, "counted"])]
        for query_id in r.per_query[measures[0]]:
            values = [f"{r.per_query[m][query_id]:.6f}" for m in measures]
            rows.append("\t".join([query_id, *values, "1" if query_id in counted else "0"]))
        written.append(_write_text(folder / "per_query" / f"{stem}.tsv", "\n".join(rows) + "\n"))
    written.append(_write_text(folder / "summary.json", json.dumps(report.to_dict(), indent=2, default=str) + "\n"))
    return written


def _counted(result: Result, averaging: str) -> list[str]:
    if averaging == "all":
        return list(result.per_query[next(iter(result.per_query))])
    return [q for q, hits in result.run.items() if hits]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))
