"""reforge eval with the real all-MiniLM-L6-v2 on a fixed SciFact subset, against a value computed independently.

The expected value comes from `python bench/bench_eval.py --reference-subset`: sentence-transformers vectors, numpy
dot products and a hand-written trec_eval nDCG@10 (no reforge code, no faiss, no ir-measures). The full-corpus run
of the same pipeline (`python bench/bench_eval.py --full`) gives 0.6451 against the published 0.645; see
docs/eval.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_data_beir import write_beir

from conftest import DATA
from reforge.cli import cli
from reforge.data.beir import load_beir

MODEL = Path(os.environ.get("REFORGE_MODELS", Path.home() / ".cache" / "reforge-models")) / "all-MiniLM-L6-v2"
REFERENCE_NDCG10 = 0.9402388842813988  # 30 queries, 132 documents; see the module docstring

needs_real = pytest.mark.skipif(
    not (MODEL / "model.safetensors").is_file() or not (DATA / "scifact").is_dir(),
    reason=f"needs {MODEL} (run ../shared/scripts/fetch-models.sh) and ../shared/data/scifact",
)


def scifact_subset(dest: Path, queries: int = 30, others: int = 100) -> Path:
    """The first ``queries`` judged queries (qrels order), their judged docs and the first ``others`` other docs."""
    full = load_beir(DATA / "scifact", "test")
    query_ids = list(full.qrels)[:queries]
    judged = {d for q in query_ids for d in full.qrels[q]}
    extra = [d.id for d in full.corpus if d.id not in judged][:others]
    small = full.subset(query_ids=query_ids, doc_ids=judged | set(extra))
    return write_beir(
        dest,
        [(d.id, d.title, d.text) for d in small.corpus],
        list(small.queries.items()),
        [(q, d, g) for q, judged_docs in small.qrels.items() for d, g in judged_docs.items()],
    )


@pytest.mark.slow
@needs_real
def test_minilm_on_scifact_subset_matches_the_plain_reference(tmp_path):
    data = scifact_subset(tmp_path / "scifact-sub")
    result = CliRunner().invoke(
        cli,
        ["eval", str(MODEL), "--data", str(data), "--json", "--metric", "nDCG@10", "--metric", "R@100"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["datasets"][0]["documents"] == 132 and summary["datasets"][0]["queries"] == 30
    assert summary["models"][0]["profile"]["name"] == "sentence-transformers"
    assert summary["models"][0]["profile"]["max_length"] == 256 and summary["models"][0]["profile"]["pooling"] == "mean"
    scores = summary["results"][0]["scores"]
    assert scores["nDCG@10"] == pytest.approx(REFERENCE_NDCG10, abs=1e-5)
    assert scores["R@100"] == 1.0  # every judged document of these 30 queries ranks within the top 100 of 132
    assert summary["settings"]["embedding_dtype"] is None  # auto: 384 dimensions are stored as float32


@pytest.mark.slow
@needs_real
def test_minilm_float16_shards_stay_within_0001_of_float32(tmp_path):
    """The same subset searched over float16 shards of 50 documents: nDCG@10 within 0.001 (the full-corpus numbers,
    0.6451 both ways, are in docs/eval.md: `python bench/bench_eval.py --full`)."""
    data = scifact_subset(tmp_path / "scifact-sub")
    args = ["eval", str(MODEL), "--data", str(data), "--json", "--embedding-dtype", "float16", "--shard-docs", "50"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    half = json.loads(result.stdout)["results"][0]["scores"]["nDCG@10"]
    assert half == pytest.approx(REFERENCE_NDCG10, abs=0.001)
