"""The miniature retriever example: BM25, the encoding convention, the training recipe on a tiny model, the base
conversion's guards, and the committed adapters in examples/assets/ (repllama-smol, repllama-smol-last)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from examples import encoding  # noqa: E402
from examples.bm25 import BM25, tokenize  # noqa: E402
from examples.make_retriever import (  # noqa: E402
    ASSETS,
    RecipeConfig,
    contrastive_loss,
    encoding_profile,
    make_batches,
    make_retriever,
    setup_data,
)
from examples.prepare_base import BASE_NAME, GGUF_NAME, MARKER, is_complete, prepare_base  # noqa: E402
from reforge.errors import CheckpointNotFoundError, DataError, InvalidOptionError, OutputExistsError  # noqa: E402

# SmolLM2-135M: hidden 576, k/v 192 (3 of 9 heads), MLP 1536, 30 layers.
SMOL_SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}


# ---------------------------------------------------------------- BM25


def test_bm25_scores_match_the_formula_by_hand():
    # N 3, lengths 2, 3, 4 (avgdl 3); "a" and "c" are in 2 docs: idf = ln(1 + 1.5 / 2.5) = ln 1.6.
    # doc 0, tf(a) 1: ln1.6 * 1.9 / (1 + 0.9 * (0.6 + 0.4 * 2/3)) = 0.501689...; doc 1, tf(a) 2: ln1.6 * 3.8 / 2.9.
    index = BM25(["a b", "a a c", "b c c c"])
    assert index.scores("a").tolist() == pytest.approx([0.5016892672, 0.6158668245, 0.0], abs=1e-9)
    assert index.scores("c").tolist() == pytest.approx([0.0, 0.4700036292, 0.6664230564], abs=1e-9)
    assert index.scores("a c").tolist() == pytest.approx([0.5016892672, 1.0858704538, 0.6664230564], abs=1e-9)
    assert index.scores("A a").tolist() == pytest.approx([1.0033785343, 1.2317336491, 0.0], abs=1e-9)  # per occurrence


def test_bm25_search_ranks_breaks_ties_by_position_and_drops_non_matches():
    index = BM25(["b x", "a a c", "b y", "z"], ids=["d0", "d1", "d2", "d3"])
    assert [d for d, _ in index.search("b", 10)] == ["d0", "d2"]  # equal scores: earlier first; d1, d3 score 0
    assert index.search("nothing here") == []
    assert index.search("a b", k=1) == [("d1", pytest.approx(index.scores("a")[1]))]
    assert tokenize("Vitamin-D3, IL-6!") == ["vitamin", "d3", "il", "6"]


def test_bm25_rejects_ids_of_another_length():
    with pytest.raises(ValueError, match=r"^BM25 got 2 texts but 1 ids; give one id per text\.$"):
        BM25(["a", "b"], ids=["x"])


# ---------------------------------------------------------------- encoding


def test_last_token_pool_right_and_left_padding():
    import torch

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert encoding.last_token_pool(hidden, right).tolist() == [[2.0, 3.0], [10.0, 11.0]]
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert encoding.last_token_pool(hidden, left).tolist() == [[4.0, 5.0], [10.0, 11.0]]
    single = torch.tensor([[1, 0, 0], [1, 1, 0]])
    assert encoding.last_token_pool(hidden, single).tolist() == [[0.0, 1.0], [8.0, 9.0]]


def test_mean_pool_averages_only_real_tokens_and_embed_normalizes():
    import torch

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # rows [[0,1],[2,3],[4,5]], [[6,7],...]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert encoding.mean_pool(hidden, mask).tolist() == [[1.0, 2.0], [8.0, 9.0]]

    class Fixed(torch.nn.Module):  # stands in for a LlamaModel: returns the hidden states above
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": hidden})()

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": mask}
    mean = encoding.embed(Fixed(), batch, "mean")
    assert mean.flatten().tolist() == pytest.approx([1 / 5**0.5, 2 / 5**0.5, 8 / 145**0.5, 9 / 145**0.5], abs=1e-7)
    last = encoding.embed(Fixed(), batch, "last")
    assert last.flatten().tolist() == pytest.approx([2 / 13**0.5, 3 / 13**0.5, 10 / 221**0.5, 11 / 221**0.5], abs=1e-7)
    with pytest.raises(ValueError, match=r"^pooling must be one of mean, last, got 'cls'\.$"):
        encoding.embed(Fixed(), batch, "cls")


def test_formats_and_tokenize_append_eos_after_truncation(tiny_tokenizer):
    assert encoding.format_query("aspirin helps") == "query: aspirin helps"
    assert encoding.format_passage("Title", "Body text.") == "passage: Title Body text."
    assert encoding.format_passage("", "  Body  ") == "passage: Body"
    tok, vocab = tiny_tokenizer
    batch = encoding.tokenize(tok, ["query: alpha beta gamma delta", "query: alpha"], max_length=4)
    eos = vocab["</s>"]
    assert batch["input_ids"].tolist() == [
        [vocab["query"], vocab[":"], vocab["alpha"], eos],
        [vocab["query"], vocab[":"], vocab["alpha"], eos],
    ]
    batch = encoding.tokenize(tok, ["query: alpha beta", "passage: beta"], max_length=8)
    assert batch["input_ids"].tolist() == [
        [vocab["query"], vocab[":"], vocab["alpha"], vocab["beta"], eos],
        [vocab["passage"], vocab[":"], vocab["beta"], eos, eos],
    ]  # pad == eos
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match=r"^max_length must be at least 2 \(one token and the EOS\), got 1\.$"):
        encoding.tokenize(tok, ["query: alpha"], max_length=1)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_encoding_gives_the_same_vectors_as_reforge_eval(tiny_base, pooling):
    """The convention the adapter was trained with is exactly the profile it ships for `reforge eval`."""
    import numpy as np
    from transformers import AutoModel, AutoTokenizer

    from reforge.data.beir import Document
    from reforge.eval import Retriever
    from reforge.eval.encode import encode as eval_encode
    from reforge.eval.encode import passages

    profile = encoding_profile(RecipeConfig(pooling=pooling))
    assert (profile.pooling, profile.max_length, profile.append_eos, profile.normalize) == (pooling, 128, True, True)
    docs = [Document("1", "Alpha", "beta gamma " * 80), Document("2", "", "delta"), Document("3", "Gamma", "")]
    texts = [encoding.format_passage(d.title, d.text) for d in docs] + ["query: alpha beta"]
    assert texts[:3] == passages(docs, profile)
    model, tok = AutoModel.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base)
    ours = encoding.encode(model, tok, texts, max_length=encoding.MAX_LENGTH, pooling=pooling, batch_size=2)
    theirs = eval_encode(Retriever(model, tok, "tiny", profile), texts, profile, batch_size=3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert np.linalg.norm(ours, axis=1) == pytest.approx([1.0] * 4, abs=1e-6)


# ---------------------------------------------------------------- training pieces


def test_contrastive_loss_exact_values_and_mask():
    import torch

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    targets, none = torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.bool)
    row0 = -math.log(math.e / (math.e + 1 + math.exp(0.6)))
    row1 = -math.log(math.e / (1 + math.e + math.exp(0.8)))
    assert contrastive_loss(q, p, targets, none, 1.0).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    mask = none.clone()
    mask[0, 2] = True  # passage 2 is another judged positive of query 0: not a negative
    masked0 = -math.log(math.e / (math.e + 1))
    assert contrastive_loss(q, p, targets, mask, 1.0).item() == pytest.approx((masked0 + row1) / 2, abs=1e-6)
    assert contrastive_loss(q, p, targets, mask, 0.5).item() == pytest.approx(0.3589258194, abs=1e-6)


def test_setup_data_pairs_negatives_and_batches(tiny_beir):
    config = RecipeConfig(batch_queries=2, negative_depth=3, max_steps=None)
    data = setup_data(tiny_beir, config)
    assert data.pairs == [("q1", "d1"), ("q2", "d2"), ("q2", "d5"), ("q3", "d3")]  # grade 0 and unknown docs dropped
    assert data.queries["q1"] == "query: alpha beta" and data.passages["d1"] == "passage: Alpha alpha beta"
    for query, negatives in data.negatives.items():
        assert negatives and len(negatives) <= 3 and not set(negatives) & data.qrels[query]
    assert data.negatives["q1"][0] == "d4"  # d4 shares "beta" with q1, and d1 (its positive) is left out
    batches = make_batches(data, config)
    assert len(batches) == 2 and all(len(b) == 2 for b in batches)  # 4 pairs, batches of 2
    assert sorted((q, p) for b in batches for q, p, _ in b) == sorted(data.pairs)
    assert all(len(negs) == 1 and negs[0] in data.negatives[q] for b in batches for q, _, negs in b)
    assert make_batches(data, config) == batches  # seeded
    assert len(make_batches(data, RecipeConfig(batch_queries=3, max_steps=None, epochs=2))) == 2  # 1 per epoch
    assert len(make_batches(data, RecipeConfig(batch_queries=1, max_steps=3))) == 3


def test_setup_data_without_positive_pairs_fails_with_the_file(tiny_beir):
    (tiny_beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t0\n")
    with pytest.raises(
        DataError,
        match=r"qrels/dev\.tsv has no positive pair whose query and document exist\. "
        r"Check that the qrels match corpus\.jsonl and queries\.jsonl\.$",
    ):
        setup_data(tiny_beir, RecipeConfig(split="dev"))


def test_recipe_config_rejects_impossible_settings():
    with pytest.raises(InvalidOptionError, match=r"^batch_queries must be at least 1, got 0\.$"):
        RecipeConfig(batch_queries=0).check()
    with pytest.raises(InvalidOptionError, match=r"^max_steps must be at least 1, got 0\.$"):
        RecipeConfig(max_steps=0).check()
    with pytest.raises(InvalidOptionError, match=r"temperature > 0 .*got 1, 0.0, 128\.$"):
        RecipeConfig(temperature=0.0).check()
    with pytest.raises(InvalidOptionError, match=r"^pooling must be one of mean, last, got 'cls'\.$"):
        RecipeConfig(pooling="cls").check()


def test_make_retriever_on_a_tiny_model_writes_a_deterministic_peft_adapter(tiny_base, tiny_beir, tmp_path):
    from safetensors import safe_open

    from reforge.profiles import load_profile

    config = RecipeConfig(
        rank=2, lora_alpha=4, batch_queries=2, max_steps=2, negative_depth=3, warmup_steps=1, learning_rate=1e-2
    )
    record = make_retriever(tiny_base, tiny_beir, tmp_path / "a", config, log=None)
    folder = tmp_path / "a"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "reforge_encoding.json",
        "training.json",
    ]
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == BASE_NAME
    assert adapter_config["target_modules"] == sorted(SMOL_SHAPES)
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["task_type"]) == (
        2,
        4,
        "FEATURE_EXTRACTION",
    )
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        keys = sorted(handle.keys())
        assert len(keys) == 2 * 7 * 2 and all(k.startswith("base_model.model.layers.") for k in keys)
        assert handle.get_tensor("base_model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (2, 32)
        assert handle.get_tensor("base_model.model.layers.1.mlp.down_proj.lora_B.weight").abs().sum() > 0  # trained
    assert record["training"]["steps"] == 2 and len(record["training"]["loss"]["all"]) == 2
    assert json.loads((folder / "training.json").read_text()) == record
    assert record["adapter"]["sha256"] == _sha256(folder / "adapter_model.safetensors")
    assert load_profile(folder / "reforge_encoding.json").max_length == config.max_length
    again = make_retriever(tiny_base, tiny_beir, tmp_path / "b", config, log=None)
    assert again["adapter"]["sha256"] == record["adapter"]["sha256"]  # same seed, same bytes
    assert (tmp_path / "b" / "adapter_config.json").read_bytes() == (folder / "adapter_config.json").read_bytes()


def test_warm_start_continues_the_given_adapter_and_records_heldout_mrr(tiny_base, tiny_beir, tmp_path):
    config = RecipeConfig(
        rank=2,
        lora_alpha=4,
        batch_queries=2,
        max_steps=2,
        negative_depth=3,
        warmup_steps=1,
        learning_rate=1e-2,
        heldout_split="train",
    )
    first = make_retriever(tiny_base, tiny_beir, tmp_path / "a", config, log=None)["heldout_in_batch_mrr"]
    assert first["batches"] == 2 and first["passages_per_batch"] == 4
    assert first["chance_mrr"] == round((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, 4)
    assert 0.25 <= first["mrr_before"] <= 1 and 0.25 <= first["mrr_after"] <= 1
    warm = replace(config, init_adapter=str(tmp_path / "a"), pooling="last")
    # at learning rate 0 a warm start must hand back the saved adapter unchanged (a fresh LoRA has lora_B = 0)
    again = make_retriever(
        tiny_base, tiny_beir, tmp_path / "b", replace(warm, pooling="mean", learning_rate=0.0), log=None
    )
    assert (
        again["heldout_in_batch_mrr"]["mrr_before"] == first["mrr_after"] == again["heldout_in_batch_mrr"]["mrr_after"]
    )
    assert _tensors(tmp_path / "b") == _tensors(tmp_path / "a")
    record = make_retriever(tiny_base, tiny_beir, tmp_path / "c", warm, log=None)
    assert record["hyperparameters"]["init_adapter"] == str(tmp_path / "a") and record["encoding"]["pooling"] == "last"
    with pytest.raises(CheckpointNotFoundError, match=r"nowhere is not a peft adapter folder"):
        make_retriever(tiny_base, tiny_beir, tmp_path / "d", replace(warm, init_adapter=str(tmp_path / "nowhere")))


def test_make_retriever_without_a_base_says_to_prepare_it(tiny_beir, tmp_path):
    with pytest.raises(
        CheckpointNotFoundError,
        match=r"nowhere is not a model folder \(no config\.json\)\. "
        r"Run python -m examples\.prepare_base first\.$",
    ):
        make_retriever(tmp_path / "nowhere", tiny_beir, tmp_path / "out", RecipeConfig(max_steps=1), log=None)


# ---------------------------------------------------------------- prepare_base guards


def test_prepare_base_without_the_gguf_says_to_fetch(tmp_path):
    with pytest.raises(
        CheckpointNotFoundError,
        match=rf"{GGUF_NAME} does not exist\. Run "
        r"\.\./shared/scripts/fetch-models\.sh .*try again\.$",
    ):
        prepare_base(tmp_path, log=None)


def test_prepare_base_never_deletes_a_folder_it_did_not_finish(tmp_path):
    (tmp_path / GGUF_NAME).write_bytes(b"not read")
    out = tmp_path / BASE_NAME
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(
        OutputExistsError,
        match=rf"{BASE_NAME} exists but is not a complete conversion \(no valid "
        rf"{MARKER}\)\. Delete it, or pass --force to rebuild it\.$",
    ):
        prepare_base(tmp_path, log=None)
    assert (out / "config.json").read_text() == "{}"


def test_is_complete_checks_every_recorded_file_and_size(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert not is_complete(tmp_path)
    (tmp_path / MARKER).write_text(json.dumps({"files": {"model.safetensors": 5}}))
    assert is_complete(tmp_path)
    (tmp_path / MARKER).write_text(json.dumps({"files": {"model.safetensors": 6}}))
    assert not is_complete(tmp_path)
    (tmp_path / MARKER).write_text("{not json")
    assert not is_complete(tmp_path)
    assert prepare_base(tmp_path.parent, out=_complete_folder(tmp_path / "done"), log=None) == tmp_path / "done"


# ---------------------------------------------------------------- the committed adapter


def test_committed_adapter_has_the_expected_keys_ranks_and_record():
    from safetensors import safe_open

    from reforge.profiles import load_profile

    record = json.loads((ASSETS / "training.json").read_text())
    adapter_config = json.loads((ASSETS / "adapter_config.json").read_text())
    h = record["hyperparameters"]
    assert adapter_config["base_model_name_or_path"] == BASE_NAME == record["base"]["name"]
    assert (
        (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"])
        == (h["rank"], h["lora_alpha"], h["lora_dropout"])
        == (8, 16, 0.1)
    )
    assert adapter_config["target_modules"] == sorted(h["target_modules"]) == sorted(SMOL_SHAPES)
    assert adapter_config["peft_type"] == "LORA" and not adapter_config["use_dora"]
    weights = ASSETS / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        keys = set(handle.keys())
        mlp = ("gate_proj", "up_proj", "down_proj")
        expected = {
            f"base_model.model.layers.{n}.{'mlp' if m in mlp else 'self_attn'}.{m}.lora_{ab}.weight"
            for n in range(30)
            for m in SMOL_SHAPES
            for ab in "AB"
        }
        assert keys == expected
        for key in keys:
            module = key.split(".")[-3]
            fan_in, fan_out = SMOL_SHAPES[module]
            shape = tuple(handle.get_slice(key).get_shape())
            assert shape == ((8, fan_in) if ".lora_A." in key else (fan_out, 8)), key
        assert handle.get_tensor("base_model.model.layers.29.mlp.up_proj.lora_B.weight").abs().max() > 0
    params = sum(8 * (i + o) for i, o in SMOL_SHAPES.values()) * 30
    assert record["adapter"] == {
        "file": weights.name,
        "bytes": weights.stat().st_size,
        "sha256": _sha256(weights),
        "tensors": 420,
        "parameters": params,
    }
    assert params == 2_442_240 and weights.stat().st_size < 10 * 10**6
    t = record["training"]
    assert record["data"]["pairs"] == 919 and record["data"]["queries"] == 809
    assert t["steps"] == (h["max_steps"] or 919 // h["batch_queries"] * h["epochs"]) == len(t["loss"]["all"]) == 114
    assert t["examples"] == t["steps"] * h["batch_queries"]
    assert t["loss"]["last_10_mean"] < 0.5 * t["loss"]["first_10_mean"]
    profile = load_profile(ASSETS / "reforge_encoding.json")
    assert profile == encoding_profile(RecipeConfig(**{**h, "target_modules": tuple(h["target_modules"])}))
    assert (profile.name, profile.pooling, profile.normalize, profile.append_eos, profile.max_length) == (
        "custom",
        record["encoding"]["pooling"],
        True,
        True,
        record["encoding"]["max_length"],
    )
    assert (profile.query_prefix, profile.passage_prefix) == (encoding.QUERY_PREFIX, encoding.PASSAGE_PREFIX)


def test_committed_last_token_adapter_is_the_warm_started_run_of_docs_results():
    from examples.make_retriever import _readme
    from reforge.profiles import load_profile

    folder = ASSETS.with_name("repllama-smol-last")
    record = json.loads((folder / "training.json").read_text())
    first_run = json.loads((ROOT / "docs/results/cpu-lasttoken-2026-11-30/training-lasttoken.json").read_text())
    weights = folder / "adapter_model.safetensors"
    # retrained with today's code: the same bytes as the run docs/results.md section 1 first reported
    assert record["adapter"]["sha256"] == _sha256(weights) == first_run["adapter"]["sha256"]
    assert record["training"]["loss"]["all"] == first_run["training"]["loss"]["all"]
    h = record["hyperparameters"]
    assert (h["pooling"], h["init_adapter"], h["learning_rate"], h["temperature"], h["max_steps"]) == (
        "last",
        "examples/assets/repllama-smol",
        3e-4,
        0.01,
        60,
    )
    profile = load_profile(folder / "reforge_encoding.json")
    assert (profile.name, profile.pooling, profile.max_length) == ("repllama", "last", 128)
    assert (folder / "README.md").read_text() == _readme(record, folder.name)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_NAME


def test_committed_adapter_loads_onto_the_real_base():
    import torch
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from examples.prepare_base import default_base_dir

    base = default_base_dir()
    if not is_complete(base):
        pytest.skip(
            f"the converted base is not at {base}: run ../shared/scripts/fetch-models.sh, then "
            "python -m examples.prepare_base"
        )
    record = json.loads((ASSETS / "training.json").read_text())
    assert _sha256(base / "model.safetensors") == record["base"]["model_safetensors_sha256"]
    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    texts = ["query: aspirin prevents heart attacks", "passage: Aspirin and cardiovascular events"]
    before = encoding.encode(model, tok, texts, max_length=encoding.MAX_LENGTH)
    peft_model = PeftModel(model, PeftConfig.from_pretrained(ASSETS))
    result = set_peft_model_state_dict(peft_model, load_file(str(ASSETS / "adapter_model.safetensors")))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    after = encoding.encode(peft_model.merge_and_unload(), tok, texts, max_length=encoding.MAX_LENGTH)
    assert abs(float((before * after).sum(1).min())) < 0.999  # the adapter moves the vectors


@pytest.mark.slow
def test_prepare_base_converts_the_real_gguf_exactly(tmp_path):
    from examples.prepare_base import models_dir

    if not (models_dir() / GGUF_NAME).is_file():
        pytest.skip(f"{models_dir() / GGUF_NAME} is not there: run ../shared/scripts/fetch-models.sh")
    out = prepare_base(out=tmp_path / BASE_NAME, log=None)
    record = json.loads((out / MARKER).read_text())
    assert record["logits_check"]["equal"] and record["logits_check"]["max_abs_diff"] == 0.0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert record["eos_token"] == record["pad_token"] == "<|im_end|>"
    assert prepare_base(out=out, log=None) == out and is_complete(out)  # second run: nothing to do


# ---------------------------------------------------------------- fixtures

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "query", "passage", ":", "."]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", pad_token="</s>", unk_token="[UNK]")
    return tok, vocab


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama CausalLM with tied embeddings, saved like the converted SmolLM2 (weights and tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok, vocab = tiny_tokenizer
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=None,
    )
    folder = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_beir(tmp_path):
    folder = tmp_path / "tiny-beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [
        ("d1", "Alpha", "alpha beta"),
        ("d2", "", "gamma delta"),
        ("d3", "Theta", "eta theta ."),
        ("d4", "", "beta zeta"),
        ("d5", "Gamma", "gamma epsilon"),
        ("d6", "", "delta eta"),
    ]
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs)
    )
    queries = [("q1", "alpha beta"), ("q2", "gamma delta"), ("q3", "theta eta"), ("q4", "zeta")]
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td5\t2\nq3\td3\t1\nq4\td4\t0\nq4\tmissing\t1\n"
    )
    return folder


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.tolist() for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _complete_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"files": {"config.json": 2}}))
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
