"""BEIR folders for `reforge eval`: what is read, and every bad input named with counts and a next step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import DATA
from reforge.cli import cli
from reforge.data.beir import load_beir
from reforge.errors import DataError

DOCS = [("d1", "Cats", "cats purr and sleep"), ("d2", "", "dogs bark loudly"), ("d3", "Fish", "fish swim in water")]
QUERIES = [("q1", "do cats purr"), ("q2", "which animals bark"), ("q3", "unjudged query")]
QRELS = [("q1", "d1", 1), ("q2", "d2", 2), ("q2", "d3", 0)]


def write_beir(folder: Path, docs=DOCS, queries=QUERIES, qrels=QRELS, split: str = "test") -> Path:
    """A BEIR folder from tuples; ``None`` for docs/queries/qrels leaves that file out."""
    folder.mkdir(parents=True, exist_ok=True)
    if docs is not None:
        (folder / "corpus.jsonl").write_text(
            "".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs)
        )
    if queries is not None:
        (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries))
    if qrels is not None:
        (folder / "qrels").mkdir(exist_ok=True)
        (folder / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels)
        )
    return folder


def eval_error(folder: Path, *extra: str) -> str:
    """Run `reforge eval` on a dataset that is refused before any model is touched; return its one-line error."""
    result = CliRunner().invoke(cli, ["eval", "no-model-needed", "--data", str(folder), *extra])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    return result.stderr


def test_load_keeps_judged_queries_grade_zero_rows_and_file_order(tmp_path):
    ds = load_beir(write_beir(tmp_path / "toy"))
    assert ds.name == "toy" and ds.split == "test"
    assert [d.id for d in ds.corpus] == ["d1", "d2", "d3"]
    assert ds.queries == {"q1": "do cats purr", "q2": "which animals bark"}  # q3 has no judgments
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}
    assert ds.warnings == ()
    assert ds.corpus[0].passage() == "Cats cats purr and sleep" and ds.corpus[1].passage() == "dogs bark loudly"
    assert set(ds.files_sha256) == {"corpus", "queries", "qrels"}


def test_hashes_follow_content_not_location(tmp_path):
    a = load_beir(write_beir(tmp_path / "a"))
    b = load_beir(write_beir(tmp_path / "b"))
    changed = load_beir(write_beir(tmp_path / "c", docs=DOCS[:2] + [("d3", "Fish", "fish swim in the sea")]))
    assert a.corpus_hash == b.corpus_hash and a.content_hash == b.content_hash
    assert a.corpus_hash != changed.corpus_hash
    assert len(a.corpus_hash) == 64


def test_subset_keeps_ideal_ranking_and_refuses_unknown_ids(tmp_path):
    ds = load_beir(write_beir(tmp_path / "toy"))
    small = ds.subset(query_ids=["q2"], doc_ids=["d2", "d1"], name="small")
    assert small.name == "small" and list(small.queries) == ["q2"]
    assert [d.id for d in small.corpus] == ["d1", "d2"]  # corpus order kept
    assert small.qrels == {"q2": {"d2": 2, "d3": 0}}  # d3 stays judged though not in the corpus
    with pytest.raises(DataError, match=r"1 requested query ids are not evaluated queries of toy \(e.g. q3\)"):
        ds.subset(query_ids=["q1", "q3"])


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl"])
def test_missing_corpus_or_queries_file(tmp_path, missing):
    folder = write_beir(tmp_path / "toy")
    (folder / missing).unlink()
    kind = missing.split(".")[0]
    assert eval_error(folder) == (
        f"Error: {folder / missing} does not exist. A BEIR folder holds corpus.jsonl, "
        f"queries.jsonl and qrels/<split>.tsv; {folder} has no {kind} file.\n"
    )


def test_missing_folder(tmp_path):
    assert eval_error(tmp_path / "nowhere") == (
        f"Error: Dataset folder {tmp_path / 'nowhere'} does not exist. Pass a "
        "BEIR folder holding corpus.jsonl, queries.jsonl and "
        "qrels/<split>.tsv.\n"
    )


def test_split_that_does_not_exist_lists_the_ones_that_do(tmp_path):
    folder = write_beir(tmp_path / "toy")
    write_beir(folder, docs=None, queries=None, split="train")
    assert eval_error(folder, "--split", "dev") == (
        f"Error: Split 'dev' does not exist in {folder} (it has: test, train). Pass --split test.\n"
    )
    with pytest.raises(DataError) as info:
        load_beir(folder, "dev")
    assert info.value.available == ["test", "train"] and info.value.split == "dev"


def test_no_qrels_at_all(tmp_path):
    folder = write_beir(tmp_path / "toy", qrels=None)
    assert eval_error(folder) == (
        f"Error: Split 'test' does not exist in {folder} (it has no qrels/*.tsv file at all). Add qrels/<split>.tsv.\n"
    )


def test_duplicate_document_ids_name_both_lines(tmp_path):
    folder = write_beir(tmp_path / "toy", docs=DOCS + [("d2", "", "a second d2")])
    assert eval_error(folder) == (
        f"Error: {folder / 'corpus.jsonl'}, line 4: duplicate document id 'd2' (first at "
        "line 2). Document ids must be unique: remove or rename the duplicate.\n"
    )


def test_duplicate_query_ids(tmp_path):
    folder = write_beir(tmp_path / "toy", queries=QUERIES + [("q1", "again")])
    assert "line 4: duplicate query id 'q1' (first at line 1)" in eval_error(folder)


def test_qrels_that_match_no_query(tmp_path):
    folder = write_beir(tmp_path / "toy", qrels=[("x1", "d1", 1), ("x2", "d2", 1)])
    assert eval_error(folder) == (
        f"Error: None of the 2 query ids in {folder / 'qrels' / 'test.tsv'} matches a query "
        f"in {folder / 'queries.jsonl'} (e.g. x1, x2). Check that the qrels and queries "
        "files belong to the same dataset.\n"
    )


def test_qrels_that_match_no_document(tmp_path):
    folder = write_beir(tmp_path / "toy", qrels=[("q1", "z1", 1), ("q2", "z2", 1), ("q2", "z3", 1)])
    assert eval_error(folder) == (
        f"Error: None of the 3 document ids in {folder / 'qrels' / 'test.tsv'} matches a "
        f"document in {folder / 'corpus.jsonl'} (e.g. z1, z2, z3). Check that the qrels and "
        "corpus files belong to the same dataset.\n"
    )


def test_partly_unmatched_qrels_are_counted_in_warnings(tmp_path):
    folder = write_beir(tmp_path / "toy", qrels=QRELS + [("ghost", "d1", 1), ("q1", "gone", 1)])
    ds = load_beir(folder)
    qrels_file = folder / "qrels" / "test.tsv"
    assert ds.warnings == (
        f"1 of 3 query ids in {qrels_file} match no query in {folder / 'queries.jsonl'} (e.g. ghost); they are left "
        "out.",
        f"1 of 4 judged document ids in {qrels_file} match no document in {folder / 'corpus.jsonl'} (e.g. gone); "
        "they still count in the ideal ranking but can never be retrieved.",
    )
    assert "ghost" not in ds.qrels and ds.qrels["q1"] == {"d1": 1, "gone": 1}


def test_empty_judged_query_is_refused(tmp_path):
    folder = write_beir(tmp_path / "toy", queries=[("q1", "  "), ("q2", "which animals bark")])
    assert eval_error(folder) == (
        f"Error: 1 judged queries in {folder / 'queries.jsonl'} have empty text (e.g. q1). "
        "Fix or remove those queries (and their qrels rows).\n"
    )


def test_empty_documents_are_kept_with_a_warning(tmp_path):
    folder = write_beir(tmp_path / "toy", docs=DOCS + [("d4", "", ""), ("d5", " ", "")])
    ds = load_beir(folder)
    assert [d.id for d in ds.corpus][-2:] == ["d4", "d5"]
    assert ds.warnings == (
        f"2 documents in {folder / 'corpus.jsonl'} have no title and no text (e.g. d4, d5); they "
        "are kept and encoded as empty passages.",
    )


def test_malformed_lines_name_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "toy")
    with (folder / "corpus.jsonl").open("a") as f:
        f.write("{not json\n")
    assert f"{folder / 'corpus.jsonl'}, line 4: not a valid JSON object" in eval_error(folder)


@pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason="../shared/data/scifact is not here")
def test_real_scifact_counts():
    ds = load_beir(DATA / "scifact", "test")
    assert (len(ds.corpus), len(ds.queries), sum(len(j) for j in ds.qrels.values())) == (5183, 300, 339)
    assert ds.warnings == ()


@pytest.mark.parametrize("kind", ["corpus", "queries"])
def test_a_null_id_is_an_error_not_the_id_none(tmp_path, kind):
    """``"_id": null`` used to become the id "None" (and ``[1]`` the id "[1]"): a document no qrels row names."""
    folder = write_beir(tmp_path / "toy")
    name = "corpus.jsonl" if kind == "corpus" else "queries.jsonl"
    lines = (folder / name).read_text().splitlines()
    lines[1] = json.dumps({"_id": None, "title": "", "text": "the id is missing"})
    (folder / name).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{name}, line 2: '_id' is null, not a string or a number"):
        load_beir(folder)
    assert "line 2: '_id' is null" in eval_error(folder)
