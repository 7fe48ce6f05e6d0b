"""reforge eval --bm25: a BM25 row in the same table, scored and tested on the same queries as the models."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("Stemmer")

from test_data_beir import write_beir  # noqa: E402
from test_eval import llama_folder, run_cli, toy_dataset  # noqa: E402

from reforge.data.beir import load_beir  # noqa: E402
from reforge.eval.bm25 import bm25_run  # noqa: E402
from reforge.eval.metrics import paired_test, parse_measures, score_run  # noqa: E402


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25-models")
    return llama_folder(root / "llama"), llama_folder(root / "llama2", seed=7)


def test_bm25_row_scores_and_paired_tests_match_a_direct_computation(llamas, tmp_path):
    data = toy_dataset(tmp_path / "toy")
    args = [*llamas, "--data", data, "--profile", "repllama", "--metric", "nDCG@10", "--metric", "R@100", "--bm25"]
    summary = json.loads(run_cli(*args, "--json", "--output", tmp_path / "out").stdout)
    assert [m["name"] for m in summary["models"]] == ["llama", "llama2", "BM25"]
    assert summary["settings"]["bm25"]["k1"] == 1.5 and summary["settings"]["bm25"]["method"] == "lucene"
    assert "Snowball english stemmer" in summary["settings"]["bm25"]["description"]
    # BM25's scores: bm25s on the folder, scored with ir-measures, by hand here
    dataset = load_beir(data, "test")
    measures = parse_measures(["nDCG@10", "R@100"])
    expected = score_run(dataset.qrels, bm25_run(dataset.corpus, dataset.queries), measures, "beir")
    results = {r["model"]: r for r in summary["results"]}
    assert results["BM25"]["scores"] == pytest.approx(expected.aggregate)
    assert results["BM25"]["scores"]["nDCG@10"] > 0.5  # the toy queries share words with their documents
    # the table's row (BM25 against the first model) and every model against BM25, same test as the pipeline's
    pairs = {(c["model"], c["baseline"], c["measure"]): c for c in summary["comparisons"] if c["dataset"] == "toy"}
    assert set(pairs) == {
        (m, b, k)
        for k in ("nDCG@10", "R@100")
        for m, b in [("llama2", "llama"), ("BM25", "llama"), ("llama", "BM25"), ("llama2", "BM25")]
    }
    row = pairs[("BM25", "llama", "nDCG@10")]
    dense = results["llama"]["scores"]["nDCG@10"]
    assert row["delta"] == pytest.approx(expected.aggregate["nDCG@10"] - dense)
    assert pairs[("llama", "BM25", "nDCG@10")]["delta"] == pytest.approx(-row["delta"])
    query_ids = [q for q in dataset.qrels if expected.per_query["nDCG@10"][q] is not None]
    per_query = {}
    for line in (tmp_path / "out" / "per_query" / "llama__toy.tsv").read_text().splitlines()[1:]:
        per_query[line.split("\t")[0]] = float(line.split("\t")[1])
    test = paired_test(per_query, expected.per_query["nDCG@10"], query_ids, measure="nDCG@10")
    assert row["p_randomization"] == pytest.approx(test.p_randomization)
    assert (row["wins"], row["ties"], row["losses"]) == (test.wins, test.ties, test.losses)
    assert (tmp_path / "out" / "runs" / "BM25__toy.trec").is_file()
    # the table: the BM25 row, its settings, and a second table of both models against BM25
    shown = run_cli(*args)
    table = shown.stdout
    # the BM25 row (found by its kind, not its place) says what it indexed; the models' rows come from the cache
    documents = len(dataset.corpus)
    assert f"BM25 on toy: {documents} docs indexed in" in shown.stderr
    assert "llama on toy: corpus from cache" in shown.stderr and "llama2 on toy: corpus from cache" in shown.stderr
    assert "BM25" in table and f"{expected.aggregate['nDCG@10']:.4f}" in table and f"{row['delta']:+.4f}" in table
    assert "against BM25" in table and "bm25s" in table and "k1 1.5, b 0.75" in table


def test_bm25_keeps_the_identical_id_rule_and_the_sample(llamas, tmp_path):
    data = write_beir(
        tmp_path / "self",
        docs=[("q1", "", "cats cats purr purr"), ("d2", "", "cats purr"), ("d3", "", "dogs bark"), ("d4", "", "fish")],
        queries=[("q1", "cats purr"), ("q2", "dogs bark"), ("q3", "fish swim")],
        qrels=[("q1", "d2", 1), ("q2", "d3", 1), ("q3", "d4", 1)],
    )
    base = [llamas[0], "--data", data, "--profile", "repllama", "--bm25", "--json"]
    dropped = json.loads(run_cli(*base, "--output", tmp_path / "a").stdout)
    kept = json.loads(run_cli(*base, "--keep-identical-ids", "--output", tmp_path / "b").stdout)
    bm25 = {s: {r["model"]: r for r in x["results"]}["BM25"] for s, x in (("dropped", dropped), ("kept", kept))}
    assert bm25["dropped"]["scores"]["nDCG@10"] == pytest.approx(1.0)  # q1 as its own document is not a hit
    assert bm25["kept"]["scores"]["nDCG@10"] < 1.0
    assert "q1 Q0 q1 " not in (tmp_path / "a" / "runs" / "BM25__self.trec").read_text()
    assert "q1 Q0 q1 1 " in (tmp_path / "b" / "runs" / "BM25__self.trec").read_text()
    sampled = json.loads(run_cli(*base, "--max-queries", "2", "--output", tmp_path / "c").stdout)
    rows = {r["model"]: r for r in sampled["results"]}
    assert rows["BM25"]["scored_queries"] == 2 and sampled["datasets"][0]["queries"] == 2
    lines = (tmp_path / "c" / "per_query" / "BM25__self.tsv").read_text().splitlines()
    dense = (tmp_path / "c" / "per_query" / "llama__self.tsv").read_text().splitlines()
    assert [x.split("\t")[0] for x in lines] == [x.split("\t")[0] for x in dense]


def test_a_model_named_bm25_is_refused(tmp_path):
    folder = llama_folder(tmp_path / "BM25")
    data = toy_dataset(tmp_path / "toy")
    result = run_cli(folder, "--data", data, "--profile", "repllama", "--bm25", ok=False)
    assert result.exit_code == 1 and "already named 'BM25'" in result.stderr
