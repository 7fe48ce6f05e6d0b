"""BM25 with bm25s (reforge.eval.bm25): the Lucene formula by hand, what a run holds, MTEB's English tokenization,
and nDCG@10 on the real SciFact test split."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("Stemmer")

from conftest import DATA  # noqa: E402
from reforge.data.lazy import Document  # noqa: E402
from reforge.errors import InvalidOptionError  # noqa: E402
from reforge.eval.bm25 import BM25Settings, bm25_run, build_index  # noqa: E402

PLAIN = BM25Settings(stopwords=None, stemmer=None)


def _lucene(tf: int, df: int, n: int, dl: int, avgdl: float, k1: float = 1.5, b: float = 0.75) -> float:
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))


def test_scores_are_lucene_bm25_by_hand():
    docs = [Document("d1", "", "aa bb"), Document("d2", "", "aa aa cc"), Document("d3", "", "bb cc cc cc")]
    run = bm25_run(docs, {"q": "aa cc"}, settings=PLAIN)
    avgdl = 9 / 3
    expected = {
        "d2": _lucene(2, 2, 3, 3, avgdl) + _lucene(1, 2, 3, 3, avgdl),
        "d3": _lucene(3, 2, 3, 4, avgdl),
        "d1": _lucene(1, 2, 3, 2, avgdl),
    }
    assert list(run["q"]) == sorted(expected, key=expected.get, reverse=True)
    for doc_id, score in expected.items():
        assert run["q"][doc_id] == pytest.approx(score, rel=1e-6)


def test_title_counts_and_non_matching_documents_are_left_out():
    docs = [Document("d1", "zebra", "aa"), Document("d2", "", "bb"), Document("d3", "", "cc")]
    run = build_index(docs, PLAIN).search({"q1": "zebra", "q2": "nothing here", "q3": "bb cc"}, k=10)
    assert list(run["q1"]) == ["d1"]
    assert run["q2"] == {}
    assert set(run["q3"]) == {"d2", "d3"}
    assert list(run) == ["q1", "q2", "q3"]


def test_k_caps_the_hits_and_is_checked():
    docs = [Document(f"d{i}", "", "aa " * (i + 1)) for i in range(5)]
    index = build_index(docs, PLAIN)
    assert len(index.search({"q": "aa"}, k=2)["q"]) == 2
    assert len(index.search({"q": "aa"}, k=50)["q"]) == 5
    with pytest.raises(InvalidOptionError, match="k >= 1"):
        index.search({"q": "aa"}, k=0)


def test_default_settings_are_mteb_english_stop_words_and_stemmer():
    docs = [Document("d1", "Cats", "The cats was purring."), Document("d2", "", "Dogs bark loudly.")]
    run = bm25_run(docs, {"stem": "a purring cat", "stop": "the was", "one": "a"})
    assert list(run["stem"]) == ["d1"]  # cats/cat and purring/purr meet through the Snowball stemmer
    assert run["stop"] == {}  # stop words only
    assert run["one"] == {}  # one-letter words are not tokens
    assert bm25_run(docs, {"q": "the was"}, settings=PLAIN)["q"] == {"d1": pytest.approx(run_plain_d1(docs))}


def run_plain_d1(docs) -> float:
    """d1 = "Cats The cats was purring." (5 tokens), d2 = 3 tokens; "the" and "was" occur once, only in d1."""
    avgdl = (5 + 3) / 2
    return 2 * _lucene(1, 1, 2, 5, avgdl)


def test_bad_settings_and_empty_corpus_are_one_line_errors():
    with pytest.raises(InvalidOptionError, match="method 'okapi'"):
        BM25Settings(method="okapi")
    with pytest.raises(InvalidOptionError, match="0 <= b <= 1"):
        BM25Settings(b=2.0)
    with pytest.raises(InvalidOptionError, match="no 'klingon' stemmer"):
        build_index([Document("d", "", "aa")], BM25Settings(stemmer="klingon"))
    with pytest.raises(InvalidOptionError, match="corpus is empty"):
        build_index([])


@pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason="needs ../shared/data/scifact")
def test_scifact_test_ndcg10_with_mteb_settings():
    """0.6863 on the rebuilt SciFact corpus (BEIR paper, Elasticsearch BM25: 0.665; see docs/eval.md)."""
    from reforge.data.beir import load_beir
    from reforge.eval.metrics import parse_measures, score_run

    dataset = load_beir(DATA / "scifact", "test")
    run = build_index(dataset.corpus).search(dataset.queries, k=1000)
    scores = score_run(dataset.qrels, run, parse_measures(["nDCG@10", "R@100"]), "all")
    assert scores.aggregate["nDCG@10"] == pytest.approx(0.68630, abs=5e-5)
    assert scores.aggregate["R@100"] == pytest.approx(0.91267, abs=5e-5)
    assert all(len(hits) <= 1000 for hits in run.values()) and len(run) == 300
