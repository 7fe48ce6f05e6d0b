"""reforge.card: the model card of a merged retriever (metadata, provenance, and a usage snippet that runs)."""

from __future__ import annotations

import re

import pytest

from fakehub import build_tiny_llama
from reforge.card import render_chat_card, render_model_card
from reforge.errors import InvalidOptionError

FULL = {
    "retriever": {"ref": "castorini/repllama-v1-7b-lora-passage", "revision": "6097554", "fingerprint": "fp-ret-1"},
    "base": {"ref": "meta-llama/Llama-2-7b-hf", "fingerprint": "fp-base-2"},
    "adapters": [
        {
            "ref": "/home/alice/private-project/psi-scifact/",
            "alpha": 0.5,
            "corpus": "scifact",
            "kind": "dora",
            "rank": 16,
            "steps": 200,
        }
    ],
    "beta": 1.0,
    "dtype": "bfloat16",
    "reforge_version": "0.1.0",
    "command": "reforge merge --base meta-llama/Llama-2-7b-hf --retriever castorini/repllama-v1-7b-lora-passage "
    "--adapter psi-scifact/ --alpha 0.5 -o scifact-repllama/",
    "library_name": "transformers",
    "pipeline_tag": "feature-extraction",
    "encoding": {
        "query_prefix": "query: ",
        "passage_prefix": "passage: ",
        "pooling": "last",
        "normalize": True,
        "append_eos": True,
    },
    "evaluation": [{"dataset": "scifact", "metric": "nDCG@10", "value": 0.7523, "retriever_value": 0.7311}],
}


def _metadata(card: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


def test_full_card_metadata():
    meta = _metadata(render_model_card(FULL))
    assert meta["base_model"] == ["castorini/repllama-v1-7b-lora-passage", "meta-llama/Llama-2-7b-hf"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "feature-extraction"
    assert meta["tags"] == ["reforge", "re-adaptir", "retrieval", "feature-extraction", "dense-retrieval", "merge"]


def test_full_card_records_provenance_recipe_and_encoding():
    card = render_model_card(FULL)
    assert (
        "| retriever | [castorini/repllama-v1-7b-lora-passage](https://huggingface.co/castorini/repllama-v1-7b-"
        "lora-passage) @ `6097554` | `fp-ret-1` |" in card
    )
    assert (
        "| base | [meta-llama/Llama-2-7b-hf](https://huggingface.co/meta-llama/Llama-2-7b-hf) | `fp-base-2` |" in card
    )
    assert (
        "`merged = base + 0.5 * Psi + 1 * Delta`, computed in float32 tensor by tensor and stored as bfloat16." in card
    )
    assert "- Psi: local folder `psi-scifact` (alpha 0.5, DoRA, rank 16, 200 steps, trained on `scifact`)" in card
    assert f"```bash\n{FULL['command']}\n```" in card
    assert "Made with reforge 0.1.0." in card and "Adapted to: `scifact`." in card
    assert "| scifact | nDCG@10 | 0.7523 | 0.7311 |" in card
    assert "- queries are prefixed with `'query: '`" in card and "- an EOS token is appended to every text" in card
    assert "alice" not in card and "private-project" not in card  # local paths are reduced to the folder name


def test_minimal_card_leaves_missing_fields_out():
    card = render_model_card({"retriever": {"ref": "./my-retriever"}})
    assert "None" not in card and "null" not in card
    meta = _metadata(card)
    assert "base_model" not in meta and "base_model_relation" not in meta  # local refs are not Hub ids
    assert [line for line in card.splitlines() if line.startswith("## ")] == ["## Provenance", "## Usage"]
    assert "| retriever | local folder `my-retriever` |" in card
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# my-retriever (readapted)"


def test_several_adapters_each_with_alpha():
    card = render_model_card(
        {
            **FULL,
            "adapters": [{"ref": "org/psi-a", "alpha": 0.5, "corpus": "scifact"}, {"ref": "org/psi-b", "alpha": 0.3}],
            "beta": 0.9,
        }
    )
    assert "`merged = base + 0.5 * Psi1 + 0.3 * Psi2 + 0.9 * Delta`" in card
    assert "| adapter 2 | [org/psi-b](https://huggingface.co/org/psi-b) | |" in card
    assert "- Psi2: [org/psi-b](https://huggingface.co/org/psi-b) (alpha 0.3)" in card


def test_sentence_transformers_card():
    card = render_model_card({**FULL, "library_name": "sentence-transformers", "repo_id": "me/repllama-scifact"})
    meta = _metadata(card)
    assert meta["library_name"] == "sentence-transformers"
    assert {"sentence-transformers", "sentence-similarity"} <= set(meta["tags"])
    assert 'model = SentenceTransformer("me/repllama-scifact")' in card
    assert "queries = model.encode([\"how do vaccines work?\"], prompt='query: ')" in card


@pytest.mark.parametrize(
    "info, message",
    [
        (
            {},
            "A model card needs the retriever it was made from (info['retriever']['ref']). Pass the retriever's Hub id "
            "or local path.",
        ),
        (
            {"retriever": {"ref": "a/b"}, "beta": float("nan")},
            "The model card's beta is nan, not a finite number. Pass the values the merge used.",
        ),
        (
            {"retriever": {"ref": "a/b"}, "adapters": [{"ref": "p", "alpha": "0.5"}]},
            "The model card's alpha of adapter 1 is '0.5', not a finite number. Pass the values the merge used.",
        ),
    ],
)
def test_bad_info_is_refused(info, message):
    with pytest.raises(InvalidOptionError) as error:
        render_model_card(info)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "encoding",
    [
        {
            "pooling": "last",
            "append_eos": True,
            "normalize": True,
            "query_prefix": "query: ",
            "passage_prefix": "passage: ",
        },
        {"pooling": "mean", "normalize": False},
    ],
)
def test_transformers_usage_snippet_runs(tmp_path, encoding):
    import torch

    model = build_tiny_llama(tmp_path / "tiny")
    card = render_model_card({"retriever": {"ref": "org/tiny"}, "repo_id": str(model), "encoding": encoding})
    code = re.search(r"## Usage\n\n```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "model-card-usage", "exec"), scope)  # noqa: S102 - the card's own snippet, on a local model
    queries, passages, scores = scope["queries"], scope["passages"], scope["scores"]
    assert queries.shape == passages.shape == (1, 32) and scores.shape == (1, 1)
    assert torch.isfinite(scores).all()
    norms = queries.norm(dim=-1)
    if encoding["normalize"]:
        assert torch.allclose(norms, torch.ones(1), atol=1e-5)
    else:
        assert not torch.allclose(norms, torch.ones(1), atol=1e-3)


def test_card_from_a_merge_manifest():
    """The dict `reforge merge` passes: provenance records, a stored delta, a DoRA adapter with a local corpus."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    manifest = {
        "kind": "merge",
        "base": {
            "ref": "meta-llama/Llama-2-7b-hf",
            "repo_id": "meta-llama/Llama-2-7b-hf",
            "revision": "main",
            "commit": sha,
            "fingerprint": "f-base",
        },
        "retriever": {"ref": "castorini/repllama-v1-7b-lora-passage@v1", "fingerprint": "f-ret"},
        "delta": {"path": "/home/alice/runs/repllama-delta", "plan_id": "p1", "max_abs_rounding": 0.000123},
        "adapters": [
            {
                "ref": "psi/",
                "path": "/home/alice/runs/psi",
                "fingerprint": "f-psi",
                "alpha": 0.5,
                "dora": True,
                "corpus": "/home/alice/data/scifact/corpus.jsonl",
            }
        ],
        "beta": 1.0,
        "dtype": "float16",
        "command": None,
        "reforge_version": "0.1.0",
        "library_name": "transformers",
    }
    card = render_model_card(manifest)
    assert _metadata(card)["base_model"] == ["castorini/repllama-v1-7b-lora-passage", "meta-llama/Llama-2-7b-hf"]
    assert (
        "| base | [meta-llama/Llama-2-7b-hf](https://huggingface.co/meta-llama/Llama-2-7b-hf) @ `main` (commit "
        "`0123456789ab`) | `f-base` |" in card
    )
    assert (
        "| retriever | [castorini/repllama-v1-7b-lora-passage](https://huggingface.co/castorini/repllama-v1-7b-"
        "lora-passage) @ `v1` | `f-ret` |" in card
    )
    assert "| delta | local folder `repllama-delta` | |" in card
    assert "Delta was read from a stored delta checkpoint (largest rounding error 0.000123)." in card
    assert "- Psi: local folder `psi` (alpha 0.5, DoRA, trained on `scifact/corpus.jsonl`)" in card
    assert "alice" not in card and "None" not in card and "The exact command" not in card


# ---- measured results in the card: reforge eval --card ----------------------------------------------------------


def _summary(value: float = 0.71, retriever_value: float = 0.65, dataset: str = "scifact", fp: str = "fp-m") -> dict:
    """What `EvalReport.to_dict()` holds for a retriever and its readapted form on one dataset."""
    test = {"delta": value - retriever_value, "n": 300, "p_ttest": 0.012, "p_randomization": 0.0131}
    return {
        "reforge_version": "9.9",
        "measures": ["nDCG@10"],
        "averaging": {"name": "beir", "meaning": "mean over queries with results (BEIR)"},
        "settings": {"top_k": 1000, "keep_identical_ids": False, "permutations": 10000, "seed": 0, "split": "test"},
        "models": [{"name": "retriever", "ref": "org/ret", "fingerprint": "fp-r"}, {"name": "ours", "fingerprint": fp}],
        "datasets": [
            {
                "name": dataset,
                "split": "test",
                "documents": 5183,
                "queries": 300,
                "judgments": 339,
                "content_hash": "ab" * 32,
                "sample": None,
            }
        ],
        "results": [
            {"model": "retriever", "dataset": dataset, "scores": {"nDCG@10": retriever_value}},
            {"model": "ours", "dataset": dataset, "scores": {"nDCG@10": value}},
        ],
        "comparisons": [
            {
                "dataset": dataset,
                "model": "ours",
                "baseline": "retriever",
                "measure": "nDCG@10",
                **test,
                "wins": 40,
                "ties": 230,
                "losses": 30,
            }
        ],
    }


def test_card_model_index_holds_both_models_and_validates():
    from huggingface_hub import ModelCard

    from reforge.card import card_with_evaluation, evaluation_record

    record = evaluation_record(_summary(), "ours", "retriever")
    card = card_with_evaluation(render_model_card(FULL), record)
    parsed = ModelCard(card, ignore_metadata_errors=False)  # an invalid model-index raises here
    results = {(r.metric_name, r.metric_type): r for r in parsed.data.eval_results}
    ours = results[("nDCG@10", "ndcg_at_10")]
    theirs = results[("nDCG@10 of the original retriever (retriever)", "ndcg_at_10")]
    assert (ours.metric_value, theirs.metric_value) == (0.71, 0.65)
    assert ours.task_type == "retrieval" and ours.dataset_type == "scifact" and ours.dataset_split == "test"
    assert ours.dataset_revision == "reforge-sha256:" + "ab" * 8 and ours.source_url == "reforge_eval.json"
    assert ours.source_name == "reforge eval 9.9"
    meta = parsed.data.to_dict()
    assert meta["base_model_relation"] == "merge" and meta["model-index"][0]["name"] == parsed.data.model_name
    # the body: the side-by-side table replaces the old one; everything else is kept
    assert card.count("## Evaluation") == 1 and "0.7523" not in card
    row = "| scifact | test | nDCG@10 | 0.6500 | 0.7100 | +0.0600 | 0.012 | 0.013 | 40/230/30 |"
    assert row in card and "## Provenance" in card and "## Encoding convention" in card
    assert "averaging: mean over queries with results (BEIR)." in card


def test_rerun_updates_datasets_of_the_same_weights_and_drops_those_of_others():
    from reforge.card import evaluation_record, merge_evaluation

    first = evaluation_record(_summary(), "ours", "retriever")
    other = evaluation_record(_summary(0.4, 0.3, dataset="nfcorpus"), "ours", "retriever")
    again = evaluation_record(_summary(0.72), "ours", "retriever")
    merged = merge_evaluation(merge_evaluation(first, other), again)
    assert set(merged["datasets"]) == {"scifact", "nfcorpus"}
    assert merged["datasets"]["scifact"]["scores"]["nDCG@10"]["model"] == 0.72
    retrained = evaluation_record(_summary(0.5, fp="fp-new"), "ours", "retriever")
    assert set(merge_evaluation(merged, retrained)["datasets"]) == {"scifact"}  # older numbers were other weights


def test_a_card_refuses_samples_and_unknown_or_untested_models():
    from reforge.card import evaluation_record

    sampled = _summary()
    sampled["datasets"][0]["sample"] = {"max_queries": 30}
    with pytest.raises(InvalidOptionError, match="evaluated on a sample"):
        evaluation_record(sampled, "ours", "retriever")
    with pytest.raises(InvalidOptionError, match="'nobody' is not a model"):
        evaluation_record(_summary(), "nobody", "retriever")
    with pytest.raises(InvalidOptionError, match="was not compared"):
        evaluation_record(_summary(), "retriever", "ours")


def test_eval_card_then_push_carries_the_measured_numbers(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner
    from huggingface_hub import ModelCard
    from test_eval import llama_folder, toy_dataset

    from fakehub import WRITE_TOKEN, fake_hub_fixture
    from reforge import publish
    from reforge.cli import cli

    retriever, ours = llama_folder(tmp_path / "retriever"), llama_folder(tmp_path / "readapted", seed=7)
    (ours / "README.md").write_text(render_model_card({"retriever": {"ref": str(retriever)}, "beta": 1.0}))
    toy, other = toy_dataset(tmp_path / "toy"), toy_dataset(tmp_path / "toy2")

    def run(*args, ok=True):
        result = CliRunner().invoke(cli, ["eval", str(retriever), str(ours), "--profile", "repllama", *map(str, args)])
        assert (result.exit_code == 0) == ok, result.output + result.stderr
        return result

    summary = json.loads(run("-d", toy, "--card", ours, "--json").stdout)
    scores = {r["model"]: r["scores"]["nDCG@10"] for r in summary["results"]}
    card = ModelCard((ours / "README.md").read_text(), ignore_metadata_errors=False)
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {
        "nDCG@10": round(scores["readapted"], 4),
        "nDCG@10 of the original retriever (retriever)": round(scores["retriever"], 4),
    }
    run("-d", other, "--card", ours)  # rerun on another dataset: both are in the card now
    record = json.loads((ours / "reforge_eval.json").read_text())
    assert set(record["datasets"]) == {"toy", "toy2"} and record["model"]["name"] == "readapted"
    assert "| toy2 | test | nDCG@10 |" in (ours / "README.md").read_text()
    # refused: a sample, a folder that is not evaluated, the retriever as the card's model
    assert "whole-split" in run("-d", toy, "--card", ours, "--max-queries", "2", ok=False).stderr
    assert "is the first model" in run("-d", toy, "--card", retriever, ok=False).stderr
    # push carries README.md and reforge_eval.json as they are
    hub = fake_hub_fixture(tmp_path, monkeypatch)
    fake = next(hub)
    try:
        publish.push_folder(ours, "user/readapted", token=WRITE_TOKEN, verify=False)
        files = fake.files("user/readapted")
    finally:
        next(hub, None)
    assert files["README.md"] == (ours / "README.md").read_bytes()
    assert files["reforge_eval.json"] == (ours / "reforge_eval.json").read_bytes()
    pushed = ModelCard(files["README.md"].decode(), ignore_metadata_errors=False)
    assert len(pushed.data.eval_results) == 4 and fake.calls("POST", r"^/api/validate-yaml$")


def test_chat_card_is_rendered_by_the_card_module():
    """A readapted chat model's card (merge --keep-lm-head) comes from reforge.card, the one renderer: Hub inputs in
    base_model, the formula with each alpha and beta, local inputs by the ref they were given."""
    import reforge.ops.chat

    card = render_chat_card(
        {
            "retriever": {
                "ref": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
            },
            "base": {"ref": "/data/smollm2-135m", "path": "/data/smollm2-135m"},
            "adapters": [{"ref": "psi/", "alpha": 0.5}],
            "beta": 0.8,
            "command": "reforge merge --keep-lm-head -o out",
        }
    )
    assert _metadata(card) == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["reforge", "re-adapt"],
        "base_model": ["HuggingFaceTB/SmolLM2-135M-Instruct"],
        "base_model_relation": "merge",
    }
    assert "base + 0.5 * Psi[psi/] + 0.8 * Delta, where Delta = instruct - base" in card
    assert "- Instruction-tuned model: `HuggingFaceTB/SmolLM2-135M-Instruct`" in card
    assert "- Base model: `/data/smollm2-135m`" in card
    assert "- Command: `reforge merge --keep-lm-head -o out`" in card
    assert not hasattr(reforge.ops.chat, "chat_card")


def test_a_folder_made_by_a_recipe_gets_a_reproduce_section(tmp_path):
    """The recipe's stamp (`reforge.recipe.state.write_stamp`) copies the recipe into the output and adds a Reproduce
    section to its card naming it; a second stamp leaves the card as it was; a folder without the copy gets none."""
    from reforge.card import card_with_recipe, write_card_recipe
    from reforge.recipe.state import RECIPE_COPY, write_stamp

    card = render_model_card(FULL)
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "README.md").write_text(card, encoding="utf-8")
    assert write_card_recipe(folder, RECIPE_COPY) is None  # no copy of a recipe: the card is not touched
    assert (folder / "README.md").read_text(encoding="utf-8") == card
    write_stamp(folder, {"fingerprint": "f1"}, "recipe: 1\n")
    stamped = (folder / "README.md").read_text(encoding="utf-8")
    assert stamped.startswith(card.strip())
    assert stamped[len(card.strip()) :] == (
        "\n\n## Reproduce\n\nThis folder holds the recipe that made it, `reforge-recipe.yaml`. With its paths pointing "
        "at the same inputs (local folders and files, or Hub ids), this runs it again; a job whose output already "
        "holds the same fingerprint is skipped:\n\n```bash\nreforge run reforge-recipe.yaml\n```\n"
    )
    assert _metadata(stamped) == _metadata(card)
    assert card_with_recipe(stamped, RECIPE_COPY) == stamped  # replaced, not added twice
    before = (folder / "README.md").stat().st_mtime_ns
    write_stamp(folder, {"fingerprint": "f1"}, "recipe: 1\n")
    assert (folder / "README.md").stat().st_mtime_ns == before
