"""reforge eval --mteb-results: MTEB v2 result files, their task names and identical-id rule, and (where the mteb
package is installed) mteb's own loader reading back reforge's numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_data_beir import write_beir
from test_eval import llama_folder, run_cli, toy_dataset

from reforge.eval.mteb import BEIR_TASKS, K_VALUES, mteb_scores, mteb_task

FIELDS = ("ndcg", "map", "recall", "precision", "mrr")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("mteb-models") / "llama")


def _hide_mteb(monkeypatch) -> dict:
    """Make ``import mteb`` (and its submodules) fail as where it is not installed; returns what was hidden."""
    hidden = {m: sys.modules[m] for m in list(sys.modules) if m == "mteb" or m.startswith("mteb.")}
    for name in hidden:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mteb", None)
    return hidden


@pytest.fixture
def no_mteb(monkeypatch):
    """The writer as it runs where mteb is not installed."""
    _hide_mteb(monkeypatch)


def _evaluate(llama, data, out, *extra):
    args = [llama, "--data", data, "--profile", "repllama", "--json", "--mteb-results", out, *extra]
    result = run_cli(*args)
    return json.loads(result.stdout), result.stderr


def _files(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*/*/*.json") if p.name != "model_meta.json"}


def _check_schema(result: dict, task: str, split: str, main: float, languages: list[str]) -> None:
    assert result["task_name"] == task and result["dataset_revision"].startswith("reforge-sha256:")
    assert set(result) >= {"mteb_version", "evaluation_time", "date", "scores", "kg_co2_emissions"}
    assert isinstance(result["date"], float) and result["evaluation_time"] >= 0
    (entry,) = result["scores"][split]
    assert entry["hf_subset"] == "default" and entry["languages"] == languages
    assert entry["main_score"] == entry["ndcg_at_10"] == pytest.approx(main, abs=1e-6)
    assert {f"{f}_at_{k}" for f in FIELDS for k in K_VALUES} <= set(entry)


@pytest.mark.parametrize("installed", [True, False], ids=["with-mteb-if-installed", "without-mteb"])
def test_files_layout_schema_task_names_and_notes(llama, tmp_path, request, installed):
    if not installed:
        request.getfixturevalue("no_mteb")
    scifact = toy_dataset(tmp_path / "scifact")  # a folder named like a BEIR dataset: MTEB's task name
    custom = toy_dataset(tmp_path / "toy")
    out = tmp_path / "mteb"
    summary, stderr = _evaluate(llama, scifact, out, "--data", custom)
    (model_dir,) = out.iterdir()
    assert model_dir.name == "local__llama"
    (revision,) = model_dir.iterdir()
    assert revision.name == summary["models"][0]["fingerprint"][:16]
    meta = json.loads((revision / "model_meta.json").read_text())
    assert meta["name"] == "local/llama" and meta["revision"] == revision.name and meta["max_tokens"] == 512
    files = _files(out)
    assert set(files) == {"SciFact", "reforge-toy"}
    scores = {r["dataset"]: r["scores"]["nDCG@10"] for r in summary["results"]}
    _check_schema(files["SciFact"], "SciFact", "test", scores["scifact"], ["eng-Latn"])
    _check_schema(files["reforge-toy"], "reforge-toy", "test", scores["toy"], [])
    assert "toy is no MTEB task: custom name reforge-toy" in stderr
    assert "identical query/document ids kept (MTEB's rule for SciFact)" in stderr
    assert "not an HF revision" in stderr


def test_identical_ids_follow_mteb_per_task_and_unconvertible_runs_are_refused(llama, tmp_path):
    def dataset(name):
        return write_beir(
            tmp_path / name,
            docs=[("q1", "", "cats purr"), ("d2", "", "cats purr and sleep"), ("d3", "", "dogs bark")],
            queries=[("q1", "cats purr"), ("q2", "dogs bark")],
            qrels=[("q1", "d2", 1), ("q2", "d3", 1)],
        )

    arguana, scifact = dataset("arguana"), dataset("scifact")
    # ArguAna: MTEB drops, as reforge does by default
    _evaluate(llama, arguana, tmp_path / "a")
    assert "q1" not in json.dumps(_files(tmp_path / "a"))  # sanity: files hold scores, not runs
    args = ["--profile", "repllama", "--keep-identical-ids", "--mteb-results", tmp_path / "b"]
    refused = run_cli(llama, "--data", arguana, *args, ok=False)
    assert refused.exit_code == 1
    assert "MTEB drops hits whose document id equals the query id for ArguAna" in refused.stderr
    assert "Rerun without --keep-identical-ids" in refused.stderr and not (tmp_path / "b").exists()
    # SciFact: MTEB keeps them, so the default (dropped) run cannot be converted
    refused = run_cli(llama, "--data", scifact, "--profile", "repllama", "--mteb-results", tmp_path / "c", ok=False)
    assert "MTEB keeps hits" in refused.stderr and "Rerun with --keep-identical-ids" in refused.stderr
    summary, stderr = _evaluate(llama, scifact, tmp_path / "d", "--keep-identical-ids")
    assert _files(tmp_path / "d")["SciFact"]["scores"]["test"][0]["main_score"] == pytest.approx(
        summary["results"][0]["scores"]["nDCG@10"], abs=1e-6
    )


def test_samples_and_short_top_k_are_refused(llama, tmp_path):
    data = toy_dataset(tmp_path / "scifact")
    for extra, text in ((["--max-queries", "2"], "whole-split"), (["--top-k", "100"], "--top-k 100 is too small")):
        result = run_cli(llama, "--data", data, "--mteb-results", tmp_path / "m", *extra, ok=False)
        assert result.exit_code == 1 and text in result.stderr


def test_mteb_scores_by_hand_on_ties_and_a_query_without_hits():
    qrels = {"a": {"d1": 1, "d2": 0}, "b": {"d3": 2}, "c": {"d9": 1}}
    run = {"a": {"d2": 1.0, "d1": 1.0, "x": 0.5}, "b": {"x": 3.0, "d3": 2.0}, "c": {}}
    scores = mteb_scores(qrels, run, drop_identical_ids=True)
    # ties broken by document id descending: a ranks d2 then d1; MRR counts c (no hit) as 0, the rest do not count it
    assert scores["mrr_at_1"] == pytest.approx((0 + 0 + 0) / 3)
    assert scores["mrr_at_10"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert scores["precision_at_1"] == 0.0 and scores["recall_at_3"] == pytest.approx(1.0)
    assert scores["hit_rate_at_1"] == 0.0 and scores["hit_rate_at_3"] == 1.0


def test_task_table_without_mteb(no_mteb):
    assert mteb_task("SciFact") == mteb_task("scifact")
    assert mteb_task("arguana").ignore_identical_ids and not mteb_task("nfcorpus").ignore_identical_ids
    assert mteb_task("nfcorpus-partial").name == "reforge-nfcorpus-partial" and not mteb_task("x").known


# ------------------------------------------------------------------------------ against the mteb package itself


def test_task_table_agrees_with_mteb():
    mteb = pytest.importorskip("mteb", reason="mteb not installed (pip install 'reforge[mteb]')")
    for folder, (name, ignore, split) in BEIR_TASKS.items():
        task = mteb.get_task(name)
        assert (task.metadata.name, bool(task.ignore_identical_ids), task.metadata.eval_splits[0]) == (
            name,
            ignore,
            split,
        ), folder


def test_mteb_scores_equal_mteb_own_computation():
    pytest.importorskip("mteb", reason="mteb not installed (pip install 'reforge[mteb]')")
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    qrels = {"a": {"d1": 1, "d2": 0, "d5": 2}, "b": {"d3": 2}, "c": {"d9": 1}, "d": {"d4": 1}}
    run = {
        "a": {"d2": 1.0, "d1": 1.0, "x": 0.5, "d5": 0.25},
        "b": {"x": 3.0, "d3": 2.0},
        "c": {"y": 1.0},
        "d": {f"z{i}": 1.0 / (i + 1) for i in range(30)} | {"d4": 0.01},
    }
    ours = mteb_scores(qrels, run, drop_identical_ids=False)
    theirs = calculate_retrieval_scores({q: dict(h) for q, h in run.items()}, qrels, list(K_VALUES))
    for k in K_VALUES:
        assert ours[f"ndcg_at_{k}"] == pytest.approx(theirs.ndcg[f"NDCG@{k}"], abs=1e-5)
        assert ours[f"map_at_{k}"] == pytest.approx(theirs.map[f"MAP@{k}"], abs=1e-5)
        assert ours[f"recall_at_{k}"] == pytest.approx(theirs.recall[f"Recall@{k}"], abs=1e-5)
        assert ours[f"precision_at_{k}"] == pytest.approx(theirs.precision[f"P@{k}"], abs=1e-5)
        assert ours[f"mrr_at_{k}"] == pytest.approx(theirs.mrr[f"MRR@{k}"], abs=1e-5)
        assert ours[f"hit_rate_at_{k}"] == pytest.approx(theirs.hit_rate[f"HitRate@{k}"], abs=1e-5)


@pytest.mark.parametrize("installed", [True, False], ids=["written-with-mteb", "written-without-mteb"])
def test_mteb_loader_reads_what_reforge_wrote(llama, tmp_path, monkeypatch, installed):
    mteb = pytest.importorskip("mteb", reason="mteb not installed (pip install 'reforge[mteb]')")
    from mteb.models.model_meta import ModelMeta

    hidden = _hide_mteb(monkeypatch) if not installed else {}
    data = toy_dataset(tmp_path / "scifact")
    out = tmp_path / "cache" / "results"
    summary, _ = _evaluate(llama, data, out, "--metric", "nDCG@10", "--metric", "R@100")
    for name, module in hidden.items():
        monkeypatch.setitem(sys.modules, name, module)
    results = mteb.ResultCache(tmp_path / "cache").load_results(
        models=["local/llama"], tasks=["SciFact"], include_remote=False, require_model_meta=True
    )
    (model,) = results.model_results
    assert model.model_name == "local/llama" and model.model_revision == summary["models"][0]["fingerprint"][:16]
    (task,) = model.task_results
    scores = summary["results"][0]["scores"]
    assert task.task_name == "SciFact" and task.get_score() == pytest.approx(scores["nDCG@10"], abs=1e-6)
    assert task.scores["test"][0]["recall_at_100"] == pytest.approx(scores["R@100"], abs=1e-6)
    meta_fields = set(ModelMeta.model_fields)
    written = json.loads(next(out.glob("*/*/model_meta.json")).read_text())
    assert {"name", "revision", "framework", "similarity_fn_name"} <= set(written)
    if not installed:  # the fallback writes only fields mteb's ModelMeta has
        assert set(written) <= meta_fields | {"loader"}
    ModelMeta.model_validate({**written, "loader": None})  # the fields mteb requires are all there
