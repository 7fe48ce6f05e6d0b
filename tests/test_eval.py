"""reforge eval: metrics worked out by hand, encoders checked against independent implementations, profiles,
adapters, the embedding cache, the CLI table/JSON/files, and the distributed shard path."""

from __future__ import annotations

import json
import math
import os
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_data_beir import write_beir

from conftest import build_model, save
from reforge.cli import cli
from reforge.data.beir import load_beir
from reforge.errors import AdapterError, InvalidOptionError, PoolingUndeterminedError
from reforge.eval import EvalSettings, Retriever, evaluate, resolve_model
from reforge.eval.encode import _tokenize, encode, pool, shard_indices
from reforge.eval.metrics import paired_test, parse_measures, randomization_pvalue, score_run
from reforge.eval.search import search
from reforge.profiles import (
    EncodingProfile,
    apply_overrides,
    builtin_profile,
    detect_profile,
    e5_task,
    save_profile,
)

WORDS = (
    "cats purr and sleep dogs bark loudly fish swim in water which animals do the a of query passage : "
    "birds fly high sky trees grow tall forest unjudged"
).split()


def make_tokenizer(folder: Path, style: str = "llama") -> Path:
    """A word-level fast tokenizer: ``<s> $A`` (llama style) or ``[CLS] $A [SEP]`` (bert style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"] if style == "llama" else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    fast.save_pretrained(folder)
    return folder


def llama_folder(folder: Path, seed: int = 0) -> Path:
    save(build_model("llama-bare", seed=seed), folder)
    return make_tokenizer(folder, "llama")


def st_folder(
    folder: Path, *, pooling: str = "mean", normalize: bool = True, max_length: int = 16, prompts: dict | None = None
) -> Path:
    """A sentence-transformers folder around a tiny BertModel."""
    save(build_model("bert-bare", seed=5), folder)
    make_tokenizer(folder, "bert")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False})
    )
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts or {}}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": llama_folder(root / "llama"),
        "llama2": llama_folder(root / "llama2", seed=7),
        "st": st_folder(root / "st", prompts={"query": "query: "}),
    }


def toy_dataset(folder: Path) -> Path:
    docs = [
        ("d1", "Cats", "cats purr and sleep"),
        ("d2", "", "dogs bark loudly"),
        ("d3", "Fish", "fish swim in water"),
        ("d4", "", "birds fly high in the sky"),
        ("d5", "Trees", "trees grow tall in the forest"),
        ("d6", "", "the dogs and the cats sleep"),
    ]
    queries = [("q1", "do cats purr"), ("q2", "which animals bark"), ("q3", "fish in water"), ("q4", "birds fly")]
    qrels = [("q1", "d1", 1), ("q1", "d6", 1), ("q2", "d2", 2), ("q2", "d6", 1), ("q3", "d3", 1), ("q4", "d4", 1)]
    return write_beir(folder, docs, queries, qrels)


def run_cli(*args, ok: bool = True):
    result = CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=not ok)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


# --------------------------------------------------------------------------------------------------- metrics


def test_ndcg_at_10_equals_hand_computation_with_both_averagings():
    qrels = {"q1": {"d1": 1, "d2": 0, "d3": 2}, "q2": {"d9": 1}, "q3": {"d1": 1}}
    run = {"q1": {"d1": 3.0, "x": 2.5, "d3": 2.0}, "q2": {"d1": 1.0}}  # q3 got no hits
    # trec_eval's nDCG: gain = grade, discount log2(rank + 1).
    # q1 ranks d1 (grade 1), x (unjudged), d3 (grade 2): DCG = 1/log2(2) + 0 + 2/log2(4) = 2.
    # Ideal order d3, d1: IDCG = 2/log2(2) + 1/log2(3).
    q1 = 2.0 / (2.0 + 1.0 / math.log2(3))
    assert q1 == pytest.approx(0.760188, abs=1e-6)
    measures = parse_measures(["nDCG@10", "R@100", "RR@10"])
    beir = score_run(qrels, run, measures, "beir")
    assert beir.per_query["nDCG@10"] == pytest.approx({"q1": q1, "q2": 0.0, "q3": 0.0}, abs=1e-12)
    assert beir.query_ids == ("q1", "q2")
    assert beir.aggregate["nDCG@10"] == pytest.approx(q1 / 2, abs=1e-12)  # q3 has no results: not counted
    assert beir.aggregate["R@100"] == pytest.approx(0.5) and beir.aggregate["RR@10"] == pytest.approx(0.5)
    every = score_run(qrels, run, measures, "all")
    assert every.aggregate["nDCG@10"] == pytest.approx(q1 / 3, abs=1e-12)  # trec_eval -c: q3 counts as 0


def test_unknown_metric_is_a_usage_error():
    result = run_cli("model", "--data", "x", "--metric", "bogus@3", ok=False)
    assert result.exit_code == 2
    assert "Unknown metric 'bogus@3'" in result.stderr and "nDCG@10, R@100" in result.stderr


def test_paired_tests_agree_with_scipy_and_exact_enumeration():
    from scipy import stats

    base = {"a": 0.2, "b": 0.5, "c": 0.1, "d": 0.9, "e": 0.4, "f": 0.3}
    other = {"a": 0.6, "b": 0.5, "c": 0.3, "d": 0.8, "e": 0.7, "f": 0.35}
    ids = list(base)
    test = paired_test(base, other, ids, permutations=20_000, seed=3)
    diff = np.array([other[q] - base[q] for q in ids])
    assert test.delta == pytest.approx(diff.mean())
    assert (test.wins, test.ties, test.losses) == (4, 1, 1)
    assert test.p_ttest == pytest.approx(stats.ttest_rel([other[q] for q in ids], [base[q] for q in ids]).pvalue)
    exact = np.mean([abs(np.dot(signs, diff)) >= abs(diff.sum()) - 1e-12 for signs in product([-1, 1], repeat=6)])
    # By hand: the differences are +.4, 0, +.2, -.1, +.3, +.05 (sum .85, absolute sum 1.05). A flip pattern reaches
    # |sum| >= .85 when the terms pointing against the majority sum to at most .1 ({}, {.1} or {.05}), in either
    # direction: 6 of the 32 patterns of the five non-zero terms.
    assert exact == pytest.approx(6 / 32)
    assert test.p_randomization == pytest.approx(exact, abs=0.01)
    again = paired_test(base, other, ids, permutations=20_000, seed=3)
    assert again.p_randomization == test.p_randomization  # fixed seed: same p on every run
    assert randomization_pvalue(np.zeros(4)) == 1.0 and paired_test(base, base, ids).p_ttest == 1.0


# ---------------------------------------------------------------------------------------------------- search


def test_search_drops_identical_ids_keeps_top_k_and_is_chunk_independent():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(20, 8)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    doc_ids = [f"d{i}" for i in range(20)]
    queries = np.concatenate([docs[:3], rng.normal(size=(2, 8)).astype(np.float32)])
    query_ids = ["d0", "d1", "d2", "q3", "q4"]  # the first three are their own nearest document
    run = search(queries, docs, query_ids, doc_ids, top_k=5)
    assert all(len(hits) == 5 for hits in run.values())
    assert all(q not in run[q] for q in query_ids)
    kept = search(queries, docs, query_ids, doc_ids, top_k=5, drop_identical_ids=False)
    assert list(kept["d0"])[0] == "d0" and len(kept["d0"]) == 5
    exact = queries @ docs.T
    for row, q in enumerate(query_ids):
        best = [doc_ids[i] for i in np.argsort(-exact[row]) if doc_ids[i] != q][:5]
        assert list(run[q]) == best
        assert run[q][best[0]] == pytest.approx(float(exact[row, doc_ids.index(best[0])]), rel=1e-5)
    assert search(queries, docs, query_ids, doc_ids, top_k=5, chunk_size=2) == run


# -------------------------------------------------------------------------------------------------- encoding


def test_pooling_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean", False).tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "cls", False).tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, "last", False).tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, "last", True)[0].tolist() == pytest.approx([0.6, 0.8], abs=1e-7)
    left_padded = torch.tensor([[0, 1, 1]])
    assert pool(hidden, left_padded, "last", False).tolist() == [[9.0, 9.0]]


def test_eos_is_appended_after_truncation(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    profile = builtin_profile("repllama", max_length=4)
    inputs = _tokenize(tokenizer, ["query: cats purr and sleep", "cats"], profile, model=None)
    tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in inputs["input_ids"]]
    assert tokens == [["<s>", "query", ":", "</s>"], ["<s>", "cats", "</s>", "<pad>"]]  # truncated to 3, then EOS
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    no_eos = EncodingProfile("custom", "mean", False, 4)
    plain = _tokenize(tokenizer, ["query: cats purr and sleep"], no_eos, model=None)
    assert tokenizer.convert_ids_to_tokens(plain["input_ids"][0].tolist()) == ["<s>", "query", ":", "cats"]


def test_last_token_vectors_match_a_plain_forward_and_ignore_batching(models):
    source = resolve_model(models["llama"])
    assert source.profile.name == "last-token"
    retriever = source.load(device="cpu", dtype=torch.float32)
    texts = ["cats purr", "dogs bark loudly and the cats sleep", "fish", "birds fly high in the sky", "trees"]
    batched = encode(retriever, texts, source.profile, batch_size=2)
    singles = np.stack([encode(retriever, [t], source.profile)[0] for t in texts])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    ids = retriever.tokenizer("dogs bark loudly and the cats sleep")["input_ids"] + [retriever.tokenizer.eos_token_id]
    with torch.no_grad():
        hidden = retriever.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    np.testing.assert_allclose(batched[1], (hidden / hidden.norm()).numpy(), atol=1e-5)


def test_sentence_transformers_folder_matches_sentence_transformers(models):
    from sentence_transformers import SentenceTransformer

    source = resolve_model(models["st"])
    assert source.profile == EncodingProfile("sentence-transformers", "mean", True, 16, query_prefix="query: ")
    retriever = source.load(device="cpu", dtype=torch.float32)
    long = " ".join(["cats purr and sleep"] * 8)  # 32 words: truncated at 16 tokens
    texts = ["cats purr", long, "the dogs bark", "fish swim in water"]
    st = SentenceTransformer(str(models["st"]), device="cpu")
    np.testing.assert_allclose(encode(retriever, texts, source.profile), st.encode(texts), atol=1e-5)
    queries = encode(retriever, ["query: " + t for t in texts], source.profile)
    np.testing.assert_allclose(queries, st.encode(texts, prompt_name="query"), atol=1e-5)


# -------------------------------------------------------------------------------------------------- profiles


def test_profile_detection_rules(models, tmp_path):
    assert detect_profile(models["st"]).name == "sentence-transformers"
    assert detect_profile(models["llama"]) == EncodingProfile("last-token", "last", True, 512, append_eos=True)
    e5 = save(build_model("mistral-bare"), tmp_path / "my-e5-mistral-7b")
    profile = detect_profile(e5)
    assert profile.name == "e5-mistral" and profile.passage_prefix == "" and profile.append_eos
    assert profile.query_prefix_for("scifact") == (
        "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery: "
    )
    assert (
        e5_task("nfcorpus-partial")
        == e5_task("NFCorpus")
        == ("Given a question, retrieve relevant documents that best answer the question")
    )
    assert e5_task("climate-fever").startswith("Given a claim about climate change")
    with pytest.raises(InvalidOptionError, match=r"needs a task instruction for dataset 'mydata'.*--query-prefix"):
        profile.query_prefix_for("mydata")
    assert apply_overrides(profile, task="Find it").query_prefix_for("mydata") == "Instruct: Find it\nQuery: "
    assert detect_profile(e5, profile="repllama").query_prefix == "query: "
    save_profile(tmp_path / "my-e5-mistral-7b", builtin_profile("repllama", max_length=128))
    assert detect_profile(e5) == builtin_profile("repllama", max_length=128)  # a saved profile wins
    qwen = save(build_model("qwen2-bare"), tmp_path / "qwen")
    assert detect_profile(qwen).name == "last-token"


def test_pooling_that_cannot_be_determined_asks_for_pooling(tmp_path):
    bert = save(build_model("bert-bare"), tmp_path / "bert")
    make_tokenizer(bert, "bert")
    with pytest.raises(PoolingUndeterminedError) as info:
        detect_profile(bert)
    assert info.value.model_type == "bert"
    data = toy_dataset(tmp_path / "toy")
    result = run_cli(bert, "--data", data, ok=False)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: Cannot tell how to pool {bert}: it is not a sentence-transformers folder (no "
        "modules.json), not a known retriever and not a decoder LM (model_type 'bert'). Pass "
        "--pooling mean|cls|last (and --query-prefix / --passage-prefix if the model expects "
        "them).\n"
    )
    ok = run_cli(bert, "--data", data, "--pooling", "cls", "--json")
    assert json.loads(ok.stdout)["models"][0]["profile"]["pooling"] == "cls"
    max_pool = st_folder(tmp_path / "maxpool", pooling="max")
    assert detect_profile(max_pool).pooling == "max"  # every sentence-transformers mode is implemented (test_families)


# -------------------------------------------------------------------------------------------------- adapters


def _lora(base_dir: Path, out: Path, *, causal: bool, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = build_model("llama-causal" if causal else "llama-bare", seed=0)
    if causal:  # same weights as the bare base
        model.model.load_state_dict(build_model("llama-bare", seed=0).state_dict())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["bare-trained", "causal-trained"])
def test_lora_retriever_is_merged_into_its_bare_base(models, tmp_path, causal):
    from safetensors.torch import load_file

    adapter = _lora(models["llama"], tmp_path / "adapter", causal=causal)
    source = resolve_model(adapter)
    assert source.base_path == models["llama"] and source.profile.name == "repllama"  # adapter over a Llama
    merged = source.load(device="cpu", dtype=torch.float32).model
    state = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model." if causal else "base_model.model."
    a = state[f"{prefix}layers.1.self_attn.v_proj.lora_A.weight"]
    b = state[f"{prefix}layers.1.self_attn.v_proj.lora_B.weight"]
    base = load_file(models["llama"] / "model.safetensors")["layers.1.self_attn.v_proj.weight"]
    expected = base + (8 / 4) * b @ a  # W + (lora_alpha / r) B A
    torch.testing.assert_close(merged.layers[1].self_attn.v_proj.weight, expected, atol=1e-6, rtol=0)
    assert not torch.equal(expected, base)


def test_adapter_whose_keys_match_nothing_fails_loudly(models, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _lora(models["llama"], tmp_path / "adapter", causal=False)
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace(".layers.", ".blocks."): v for k, v in state.items()}, adapter / "adapter_model.safetensors")
    # refused before loading, by the check merge and inspect make (reforge.io.adapter.open_adapter)
    with pytest.raises(AdapterError, match=r"adapts 4 tensor\(s\) the base does not have \(e.g. 'blocks.0"):
        resolve_model(adapter)


# ------------------------------------------------------------------------------------------- cache, pipeline


def _npy_files(home: Path) -> list[Path]:
    return sorted((home / "cache" / "embeddings").glob("*/*.npy"))


def test_cache_makes_reruns_skip_encoding_and_misses_on_changes(models, tmp_path):
    data = toy_dataset(tmp_path / "toy")
    home = Path(os.environ["REFORGE_HOME"])
    first = evaluate([models["st"]], [data])
    assert not first.results[0].corpus_cached and first.results[0].timings["load"] > 0
    assert len(_npy_files(home)) == 2  # one corpus shard, one query shard
    assert not list((home / "cache" / "embeddings").rglob(".*tmp"))
    again = evaluate([models["st"]], [data])
    assert again.results[0].corpus_cached and again.results[0].timings["load"] == 0  # no model loaded at all
    assert again.results[0].per_query == first.results[0].per_query
    shorter = evaluate([models["st"]], [data], EvalSettings(max_length=8))
    assert not shorter.results[0].corpus_cached and len(_npy_files(home)) == 4
    toy_dataset(tmp_path / "toy2")
    (tmp_path / "toy2" / "corpus.jsonl").write_text(
        (tmp_path / "toy2" / "corpus.jsonl").read_text().replace("dogs bark", "dogs growl")
    )
    assert not evaluate([models["st"]], [tmp_path / "toy2"]).results[0].corpus_cached
    for path in _npy_files(home):
        path.write_bytes(path.read_bytes()[:140])  # a truncated shard is re-encoded, not trusted
    healed = evaluate([models["st"]], [data])
    assert not healed.results[0].corpus_cached and healed.results[0].per_query == first.results[0].per_query


def test_in_memory_retriever_and_query_subset_for_tuning(models, tmp_path, monkeypatch):
    """What `reforge tune` needs: a loaded model object and a subset of queries, same numbers as from disk."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # an in-memory entry's folder is only a name: nothing may appear here
    data = load_beir(toy_dataset(tmp_path / "toy"))
    subset = data.subset(query_ids=["q1", "q3"])
    on_disk = evaluate([models["llama"]], [subset], EvalSettings(cache=False))
    source = resolve_model(models["llama"])
    loaded = source.load(device="cpu", dtype=torch.float32)
    in_memory = Retriever(loaded.model, loaded.tokenizer, "alpha=0.5")  # profile from the architecture
    report = evaluate([in_memory], [subset])
    assert report.models[0].name == "alpha=0.5" and report.results[0].scored_queries == 2
    assert report.score("alpha=0.5", "toy") == pytest.approx(on_disk.score("llama", "toy"), abs=1e-9)
    assert not _npy_files(Path(os.environ["REFORGE_HOME"]))  # no fingerprint: nothing cached
    assert list(workdir.iterdir()) == []


def test_identical_ids_and_averaging_end_to_end(models, tmp_path):
    """A query whose only hit is itself: dropped (BEIR), so BEIR averaging skips it and trec_eval -c counts 0."""
    data = write_beir(
        tmp_path / "self",
        docs=[("q1", "", "cats purr")],
        queries=[("q1", "cats"), ("q2", "purr")],
        qrels=[("q1", "q1", 1), ("q2", "q1", 1)],
    )
    beir = json.loads(run_cli(models["st"], "--data", data, "--json").stdout)
    assert beir["results"][0]["scores"] == {"nDCG@10": 1.0} and beir["results"][0]["scored_queries"] == 1
    every = json.loads(run_cli(models["st"], "--data", data, "--json", "--averaging", "all").stdout)
    assert every["results"][0]["scores"] == {"nDCG@10": 0.5} and every["results"][0]["scored_queries"] == 2
    assert every["averaging"]["meaning"] == "mean over all judged queries, no result = 0 (trec_eval -c)"
    kept = json.loads(run_cli(models["st"], "--data", data, "--json", "--keep-identical-ids").stdout)
    assert kept["results"][0]["scores"] == {"nDCG@10": 1.0} and kept["results"][0]["scored_queries"] == 2


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_compares_models_in_json_table_and_files(models, tmp_path):
    data = toy_dataset(tmp_path / "toy")
    other = write_beir(
        tmp_path / "toy-b",
        docs=[("d1", "", "cats purr"), ("d2", "", "fish swim")],
        queries=[("q1", "cats"), ("q2", "fish")],
        qrels=[("q1", "d1", 1), ("q2", "d2", 1)],
    )
    args = [
        models["llama"],
        models["llama2"],
        "--data",
        data,
        "--data",
        other,
        "--metric",
        "nDCG@10",
        "--metric",
        "R@100",
        "--profile",
        "repllama",
    ]
    summary = json.loads(run_cli(*args, "--json", "--output", tmp_path / "out").stdout)
    assert [m["name"] for m in summary["models"]] == ["llama", "llama2"]
    assert summary["models"][0]["profile"]["query_prefix"] == "query: "
    assert summary["datasets"][0]["documents"] == 6 and len(summary["datasets"][0]["content_hash"]) == 64
    assert summary["reforge_version"] and summary["settings"]["dtype"] == "float32"
    scores = {(r["model"], r["dataset"]): r["scores"] for r in summary["results"]}
    comparisons = [c for c in summary["comparisons"] if c["dataset"] == "toy" and c["measure"] == "nDCG@10"]
    (c,) = comparisons
    assert c["delta"] == pytest.approx(scores[("llama2", "toy")]["nDCG@10"] - scores[("llama", "toy")]["nDCG@10"])
    assert c["wins"] + c["ties"] + c["losses"] == c["n"] == 4 and 0 <= c["p_ttest"] <= 1
    assert summary["averages"]["llama"]["nDCG@10"] == pytest.approx(
        (scores[("llama", "toy")]["nDCG@10"] + scores[("llama", "toy-b")]["nDCG@10"]) / 2
    )
    # files: a TREC run and per-query scores per model and dataset, and the summary
    run_lines = (tmp_path / "out" / "runs" / "llama2__toy.trec").read_text().splitlines()
    assert len(run_lines) == 4 * 6 and run_lines[0].split()[1] == "Q0" and run_lines[0].split()[3] == "1"
    rows = [line.split("\t") for line in (tmp_path / "out" / "per_query" / "llama__toy.tsv").read_text().splitlines()]
    assert rows[0] == ["query_id", "nDCG@10", "R@100", "counted"] and len(rows) == 5
    assert np.mean([float(r[1]) for r in rows[1:]]) == pytest.approx(scores[("llama", "toy")]["nDCG@10"], abs=1e-6)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["results"] == summary["results"]
    # the table: the same numbers, the difference and the counts, and the averaging in words
    table = run_cli(*args).stdout
    assert f"{scores[('llama', 'toy')]['nDCG@10']:.4f}" in table and f"{c['delta']:+.4f}" in table
    assert f"{c['wins']}/{c['ties']}/{c['losses']}" in table and "Average" in table
    assert "mean over queries with results (BEIR)" in table and "paired t-test" in table


def test_dataset_warnings_reach_stderr(models, tmp_path):
    data = toy_dataset(tmp_path / "toy")
    with (data / "qrels" / "test.tsv").open("a") as f:
        f.write("q1\tmissing-doc\t1\n")
    result = run_cli(models["st"], "--data", data, "-q")
    assert "Warning: 1 of 6 judged document ids" in result.stderr and "nDCG@10" in result.stdout


# ------------------------------------------------------------------------------------------------ distributed


def test_shard_indices_cover_everything_once_and_balance_length():
    texts = [("x" * n) for n in [5, 50, 7, 300, 12, 44, 1, 90, 3]]
    for world in (1, 2, 3, 4):
        shards = [shard_indices(texts, r, world) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(len(texts)))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    two = [shard_indices(texts, r, 2) for r in range(2)]
    assert two == [[3, 1, 4, 0, 6], [7, 5, 2, 8]]  # length order 3,7,1,5,4,2,0,8,6 dealt to ranks in turn
    with pytest.raises(ValueError):
        shard_indices(texts, 2, 2)


def test_e5_mistral_task_prefix_from_cli(tmp_path):
    e5 = save(build_model("mistral-bare"), tmp_path / "tiny-e5-mistral")
    make_tokenizer(e5, "llama")
    data = toy_dataset(tmp_path / "toy")
    refused = run_cli(e5, "--data", data, ok=False)
    assert refused.exit_code == 1 and refused.stderr.startswith(
        "Error: The e5-mistral profile needs a task instruction for dataset 'toy', and none is known"
    )
    by_task = json.loads(run_cli(e5, "--data", data, "--task", "Find animals", "--json").stdout)
    assert by_task["results"][0]["query_prefix"] == "Instruct: Find animals\nQuery: "
    assert by_task["models"][0]["profile"]["name"] == "e5-mistral"
    by_prefix = json.loads(run_cli(e5, "--data", data, "--query-prefix", r"Instruct: Find\nQuery: ", "--json").stdout)
    assert by_prefix["results"][0]["query_prefix"] == "Instruct: Find\nQuery: "  # '\n' typed in a shell = newline


def test_eval_samples_queries_and_corpus_like_tune_and_records_it(models, tmp_path):
    from reforge.data.beir import sample_dataset
    from reforge.tune import select_subset

    data = toy_dataset(tmp_path / "toy")
    result = run_cli(
        models["st"],
        "--data",
        data,
        "--json",
        "--max-queries",
        "2",
        "--corpus-sample",
        "4",
        "--seed",
        "3",
        "--output",
        tmp_path / "out",
    )
    summary = json.loads(result.stdout)
    expected = sample_dataset(load_beir(data), max_queries=2, corpus_sample=4, seed=3)
    assert select_subset is sample_dataset  # one implementation for eval and tune
    sample = summary["datasets"][0]["sample"]
    assert sample == {
        "max_queries": 2,
        "corpus_sample": 4,
        "seed": 3,
        "queries": 2,
        "documents": 4,
        "split_queries": 4,
        "split_documents": 6,
        "query_ids": list(expected.queries),
    }
    judged = {d for q in expected.queries for d in expected.qrels[q]}
    assert judged <= {d.id for d in expected.corpus}  # every judged document of the drawn queries is kept
    assert summary["datasets"][0]["documents"] == 4 and summary["results"][0]["scored_queries"] == 2
    run_lines = (tmp_path / "out" / "runs" / "st__toy.trec").read_text().splitlines()
    assert {line.split()[0] for line in run_lines} == set(expected.queries)
    assert {line.split()[2] for line in run_lines} == {d.id for d in expected.corpus}
    stderr = run_cli(models["st"], "-d", data, "--max-queries", "2").stderr
    assert "toy: sample of 2 of 4 queries and 6 of 6 documents (seed 0)" in stderr
    whole = json.loads(run_cli(models["st"], "--data", data, "--json").stdout)
    assert whole["datasets"][0]["sample"] is None
