"""Scores with ir-measures (pytrec_eval backend), two ways of averaging, and paired significance tests.

Averaging:
- ``beir``: the mean over judged queries that returned at least one hit (BEIR's ``EvaluateRetrieval.evaluate``,
  which averages what pytrec_eval returns for the run).
- ``all``: the mean over every judged query, a query without hits scoring 0 (``trec_eval -c``; also what
  ``ir_measures.calc_aggregate`` does).
They differ only when some query gets no hit (e.g. all its hits were dropped as identical ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reforge.errors import InvalidOptionError

AVERAGING = {
    "beir": "mean over queries with results (BEIR)",
    "all": "mean over all judged queries, no result = 0 (trec_eval -c)",
}


@dataclass(frozen=True)
class RunScores:
    """One run's scores. ``aggregate[measure]`` is the mean of ``per_query[measure]`` over ``query_ids``
    (the queries the averaging counts)."""

    aggregate: dict[str, float]
    per_query: dict[str, dict[str, float]]
    query_ids: tuple[str, ...]
    averaging: str


@dataclass(frozen=True)
class PairedTest:
    """A model against a baseline on the same queries: mean difference, p-values, and per-query win/tie/loss."""

    measure: str
    n: int
    delta: float
    p_ttest: float
    p_randomization: float
    wins: int
    ties: int
    losses: int


def parse_measures(names: Sequence[str]) -> list[Any]:
    """ir-measures objects for names such as ``nDCG@10``, ``R@100``, ``RR@10``, ``AP``.

    Raises:
        InvalidOptionError: a name ir-measures does not know (the message gives examples that work).
    """
    import ir_measures

    measures = []
    for name in names:
        try:
            measures.append(ir_measures.parse_measure(name))
        except (NameError, ValueError, TypeError, AttributeError) as e:
            raise InvalidOptionError(
                f"Unknown metric {name!r} ({e}).",
                hint="Use ir-measures names, e.g. nDCG@10, R@100, RR@10, AP, P@5.",
                option="--metric",
            ) from e
    return measures


def score_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Sequence[Any],
    averaging: str = "beir",
) -> RunScores:
    """Per-query and averaged scores of ``run`` against ``qrels``.

    Args:
        qrels: ``{query_id: {doc_id: grade}}``; grade-0 rows count as judged non-relevant.
        run: ``{query_id: {doc_id: score}}``.
        measures: from `parse_measures`.
        averaging: ``beir`` or ``all`` (see the module docstring).

    Example:
        >>> m = parse_measures(["nDCG@10"])
        >>> score_run({"q": {"d1": 1}, "r": {"d2": 1}}, {"q": {"d1": 2.0}}, m, "beir").aggregate
        {'nDCG@10': 1.0}
        >>> score_run({"q": {"d1": 1}, "r": {"d2": 1}}, {"q": {"d1": 2.0}}, m, "all").aggregate
        {'nDCG@10': 0.5}
    """
    import ir_measures

    if averaging not in AVERAGING:
        raise InvalidOptionError(f"Averaging {averaging!r} is not one of {', '.join(AVERAGING)}.", option="--averaging")
    names = [str(m) for m in measures]
    per_query: dict[str, dict[str, float]] = {name: {q: 0.0 for q in qrels} for name in names}
    clean_run = {q: dict(hits) for q, hits in run.items() if hits and q in qrels}
    if clean_run:
        for metric in ir_measures.iter_calc(list(measures), dict(qrels), clean_run):
            per_query[str(metric.measure)][metric.query_id] = float(metric.value)
    counted = tuple(q for q in qrels if averaging == "all" or q in clean_run)
    aggregate = {name: (float(np.mean([per_query[name][q] for q in counted])) if counted else 0.0) for name in names}
    return RunScores(aggregate, per_query, counted, averaging)


def paired_test(
    baseline: Mapping[str, float],
    other: Mapping[str, float],
    query_ids: Sequence[str],
    *,
    measure: str = "",
    permutations: int = 10_000,
    seed: int = 0,
) -> PairedTest:
    """Compare ``other`` with ``baseline`` on ``query_ids``: paired t-test and a paired randomization test.

    The randomization test flips the sign of each query's difference at random ``permutations`` times (fixed
    ``seed``, so reruns give the same p) and counts how often the mean difference is at least as large in magnitude
    as the observed one: p = (count + 1) / (permutations + 1), two-sided. A tie is a difference below 1e-9.

    Example:
        >>> t = paired_test({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 1.0}, ["a", "b"])
        >>> (t.delta, t.wins, t.ties, t.losses)
        (0.25, 1, 1, 0)
    """
    a = np.array([baseline.get(q, 0.0) for q in query_ids], dtype=np.float64)
    b = np.array([other.get(q, 0.0) for q in query_ids], dtype=np.float64)
    diff = b - a
    wins, losses = int((diff > 1e-9).sum()), int((diff < -1e-9).sum())
    return PairedTest(
        measure,
        len(diff),
        float(diff.mean()) if len(diff) else 0.0,
        paired_t_pvalue(diff),
        randomization_pvalue(diff, permutations=permutations, seed=seed),
        wins,
        len(diff) - wins - losses,
        losses,
    )


def paired_t_pvalue(diff: np.ndarray) -> float:
    """Two-sided p-value of a paired t-test on per-query differences (1.0 when all differences are equal)."""
    from scipy import stats

    if len(diff) < 2 or np.allclose(diff, diff[0], atol=1e-12, rtol=0):
        return 1.0 if len(diff) < 2 or abs(float(diff[0])) < 1e-12 else 0.0
    return float(stats.ttest_1samp(diff, 0.0).pvalue)


def randomization_pvalue(diff: np.ndarray, *, permutations: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip randomization test (see `paired_test`)."""
    if len(diff) == 0:
        return 1.0
    observed = abs(float(diff.mean()))
    rng = np.random.default_rng(seed)
    count, done = 0, 0
    block = max(1, min(permutations, 4_000_000 // max(1, len(diff))))
    while done < permutations:
        size = min(block, permutations - done)
        signs = rng.integers(0, 2, size=(size, len(diff)), dtype=np.int8) * 2 - 1
        means = np.abs(signs @ diff) / len(diff)
        count += int((means >= observed - 1e-12).sum())
        done += size
    return (count + 1) / (permutations + 1)
