"""examples/synthetic.py: the scoring subset keeps the drawn queries' judged documents, the plan scores real and
synthetic queries of one corpus, and the comparison (Kendall tau, regret, sign agreement) is right on known values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.reproduce import parse_args
from examples.synthetic import _wait_for, compare, make_subset, plan, report


def test_the_subset_keeps_each_drawn_query_s_best_judged_documents_and_restricts_the_qrels(tmp_path):
    source = tmp_path / "src"
    (source / "qrels").mkdir(parents=True)
    (source / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": f"t{i}"}) + "\n" for i in range(50))
    )
    (source / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"x{i}"}) + "\n" for i in range(6))
    )
    rows = [(f"q{q}", f"d{q * 5 + j}", 3 - j) for q in range(6) for j in range(4)]  # grades 3, 2, 1, 0
    (source / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows)
    )
    facts = make_subset(source, tmp_path / "sub", queries=3, docs=20, per_query=2, seed=0)
    corpus = [json.loads(line)["_id"] for line in (tmp_path / "sub" / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line)["_id"] for line in (tmp_path / "sub" / "queries.jsonl").read_text().splitlines()]
    assert (
        facts["queries"] == 3 and facts["documents"] == 20 == len(corpus) and facts["judged_kept"] >= 6
    )  # a random document may be judged too
    for q in queries:  # the two highest grades of each drawn query are in the corpus
        n = int(q[1:])
        assert f"d{n * 5}" in corpus and f"d{n * 5 + 1}" in corpus
    assert corpus == sorted(corpus, key=lambda d: int(d[1:]))  # the source's order
    qrels = (tmp_path / "sub" / "qrels" / "test.tsv").read_text().splitlines()[1:]
    assert all(line.split("\t")[1] in corpus and line.split("\t")[0] in queries for line in qrels)


def test_the_plan_scores_real_and_synthetic_queries_of_one_corpus(tmp_path):
    args = parse_args(["--synthetic", "--datasets", "scifact", "--out", str(tmp_path)])
    steps = {s.name: s for s in plan(Path("BASE"), Path("DATA"), tmp_path, args)}
    real, crop = steps["syn-tune-scifact-0-real"].args, steps["syn-last-tune-scifact-2-crop"].args
    assert real[real.index("-d") + 1] == str(tmp_path / "subset-scifact") and "--i-know" in real
    assert crop[crop.index("-d") + 1] == str(tmp_path / "syn-crop-scifact") and "--i-know" not in crop
    assert crop[crop.index("--split") + 1] == "synthetic" and real[real.index("--alpha") + 1] == "0:1:0.25"
    lm = steps["queries-lm-scifact"].args
    assert lm[1] == str(tmp_path / "subset-scifact") and lm[lm.index("--generator") + 1] == "BASE"
    crop_queries = steps["queries-crop-scifact"].args
    assert crop_queries[crop_queries.index("--generator") + 1] == "crop"


def test_synthetic_lm_names_the_generator_of_the_lm_queries_and_nothing_else(tmp_path):
    args = parse_args(
        ["--synthetic", "--datasets", "nfcorpus-partial", "--out", str(tmp_path), "--synthetic-lm", "big/LM"]
        + ["--synthetic-generators", "crop", "lm", "lm-bm25"]
    )
    steps = {s.name: s for s in plan(Path("BASE"), Path("DATA"), tmp_path, args)}
    generator = {name: steps[f"queries-{name}-nfcorpus-partial"].args for name in ("crop", "lm", "lm-bm25")}
    assert [a[a.index("--generator") + 1] for a in generator.values()] == ["crop", "big/LM", "big/LM"]
    assert "--bm25-top" in generator["lm-bm25"] and "--bm25-top" not in generator["lm"]
    tune = steps["syn-tune-nfcorpus-partial-0-lm"].args  # the retriever's base stays the base
    assert tune[tune.index("--base") + 1] == "BASE"


def test_a_runner_waits_while_another_runs_the_training_step(tmp_path):
    import threading
    import time

    partial = tmp_path / "psi-scifact-0.json.partial"  # what run_steps writes while a step runs
    partial.write_text("")

    def finish():
        partial.rename(tmp_path / "psi-scifact-0.json")

    timer = threading.Timer(0.3, finish)
    started = time.perf_counter()
    timer.start()
    _wait_for(tmp_path, "psi-scifact-0", poll=0.02)
    assert time.perf_counter() - started >= 0.3 and (tmp_path / "psi-scifact-0.json").is_file()
    _wait_for(tmp_path, "psi-scifact-1", poll=0.02)  # nobody on it: returns at once


def _tune(path: Path, scores: list[float], deltas_p: list[float], action: str = "noise", alpha: float = 0.0):
    points = [{"alpha": 0.0, "beta": 1.0, "score": scores[0], "test": None}]
    for a, s, p in zip((0.25, 0.5, 0.75, 1.0), scores[1:], deltas_p, strict=True):
        points.append({"alpha": a, "beta": 1.0, "score": s, "test": {"delta": s - scores[0], "p_randomization": p}})
    path.write_text(
        json.dumps({"points": points, "recommendation": {"action": action, "alpha": alpha}, "dataset": {"queries": 9}})
    )


def test_the_comparison_of_real_and_synthetic_scores(tmp_path):
    real = [0.50, 0.52, 0.55, 0.53, 0.45]  # best at 0.5
    _tune(tmp_path / "syn-tune-scifact-0-real.json", real, [0.5, 0.01, 0.2, 0.03])
    _tune(tmp_path / "syn-tune-scifact-0-crop.json", [0.8, 0.81, 0.79, 0.82, 0.70], [1] * 4, "merge", 0.75)
    result = compare(tmp_path, "mean", "scifact", "crop")
    assert result["adapters"] == 1 and result["rows"][0]["choice"] == 0.75
    assert result["mean_real_at_choice"] == 0.53 and result["mean_real_at_half"] == 0.55
    assert (
        result["regret_choice"] == pytest.approx(0.02)
        and result["regret_half"] == 0
        and result["regret_zero"] == pytest.approx(0.05)
    )
    assert result["regret_recommendation"] == pytest.approx(0.02)
    # significant real gains at 0.5 (+, synthetic -) and 1.0 (-, synthetic -): one of two agree
    assert (result["significant"], result["agree"]) == (2, 1)
    # Kendall tau-b of the five points: pairs (real, synthetic) concordant 7, discordant 3: (7 - 3) / 10
    assert result["tau"] == pytest.approx(0.4)
    assert "| SciFact | mean | crop | 1 | 9 / 9 | +0.400" in report(tmp_path)
    # the generator's line over its cells: one cell, tau > 0, regret 0.02 / recommendation 0.02 / alpha 0.5 0 /
    # alpha 0 0.05, and the choice's regret is above alpha 0.5's
    assert "| crop | 1 (1 adapters) | 1 of 1 | 0.0200 | 0.0200 | 0.0000 | 0.0500 | 0 of 1 |" in report(tmp_path)
    assert compare(tmp_path, "mean", "scifact", "lm") is None and compare(tmp_path, "last", "scifact", "crop") is None
    _tune(tmp_path / "syn-last-tune-scifact-0-real.json", real, [0.5, 0.01, 0.2, 0.03])
    _tune(tmp_path / "syn-last-tune-scifact-0-crop.json", [0.8, 0.7, 0.9, 0.6, 0.5], [1] * 4)  # chooses 0.5
    # the last-token cell: choice 0.5 (regret 0, as alpha 0.5), recommendation alpha 0 (0.05), tau (7 - 3) / 10
    assert "| crop | 2 (2 adapters) | 2 of 2 | 0.0100 | 0.0350 | 0.0000 | 0.0500 | 1 of 2 |" in report(tmp_path)


def test_results_md_holds_the_tables_built_from_the_committed_raw_outputs():
    repo = Path(__file__).resolve().parents[1]
    tables = report(repo / "docs" / "results" / "cpu-synthetic-2026-12-07")
    results = (repo / "docs" / "results.md").read_text()
    assert tables.count("| SciFact |") >= 6 + 30 and tables in results
