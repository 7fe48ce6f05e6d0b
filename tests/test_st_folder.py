"""Every merged retriever is a sentence-transformers folder that encodes exactly as `reforge eval` does, for every
encoding profile: short texts and texts cut at max_length, queries (with prompts) and passages."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_train import build_tokenizer

from conftest import DATA, build_model, make_adapter, perturbed_bare, save
from reforge.cli import cli
from reforge.data.corpus import DocSelection, load_corpus
from reforge.eval.encode import encode
from reforge.eval.model import Retriever, resolve_model
from reforge.io.companions import companion_files
from reforge.io.st_folder import sentence_transformers_files, with_eos
from reforge.profiles import EncodingProfile, builtin_profile, e5_task, st_encoding

SCIFACT = DATA / "scifact"
MAX_LENGTH = 24


def llama_spm_tokenizer():
    """A Llama/Mistral-style tokenizer (``▁`` word marker, byte fallback, BOS by template) saved with
    ``tokenizer_class: LlamaTokenizer``: transformers 5 then rebuilds its post-processor from ``add_bos_token`` /
    ``add_eos_token``, the path on which e5-mistral lost its EOS in mteb (mteb PR 5237)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [doc.text for doc in load_corpus(SCIFACT, selection=DocSelection(max_docs=300)).docs]
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    spm.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    spm.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def bpe_tokenizer(style: str):
    """test_train's byte-level BPE (trained on SciFact passages), post-processed like a real family's tokenizer:
    ``llama`` adds BOS, ``qwen2`` adds nothing, ``qwen3-embedding`` appends EOS itself, ``bert`` adds CLS/SEP;
    ``llama-spm`` is `llama_spm_tokenizer`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if style in ("llama-spm", "e5-mistral"):
        return llama_spm_tokenizer()
    bpe = build_tokenizer().backend_tokenizer  # ids: <pad> 0, <s> 1, </s> 2, <unk> 3
    names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if style == "llama":
        names.pop("pad_token")  # no pad token: reforge and the folder pad with EOS
    elif style == "qwen2":
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
        names.pop("bos_token")
    elif style == "qwen3-embedding":
        bpe.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    elif style == "bert":
        bpe.post_processor = processors.BertProcessing(("</s>", 2), ("<s>", 1))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **names)


# (model kind, tokenizer style, profile): one row per profile of reforge.profiles.PROFILE_NAMES, and both ways a
# decoder gets its EOS
CASES = {
    "repllama": ("llama-bare", "llama", builtin_profile("repllama", max_length=MAX_LENGTH)),
    "e5-mistral": ("mistral-bare", "llama", builtin_profile("e5-mistral", max_length=MAX_LENGTH)),
    "e5-mistral-llama-tokenizer": ("mistral-bare", "llama-spm", builtin_profile("e5-mistral", max_length=MAX_LENGTH)),
    "repllama-llama-tokenizer": ("llama-bare", "llama-spm", builtin_profile("repllama", max_length=MAX_LENGTH)),
    "e5-mistral-as-shipped": ("mistral-bare", "e5-mistral", builtin_profile("e5-mistral", max_length=MAX_LENGTH)),
    "last-token": ("qwen2-bare", "qwen2", builtin_profile("last-token", max_length=MAX_LENGTH)),
    "last-token-tokenizer-eos": ("qwen2-bare", "qwen3-embedding", builtin_profile("last-token", max_length=MAX_LENGTH)),
    "qwen3-embedding": ("qwen2-bare", "qwen3-embedding", builtin_profile("qwen3-embedding", max_length=MAX_LENGTH)),
    "gte-qwen2": ("qwen2-bare", "qwen2", builtin_profile("gte-qwen2", max_length=MAX_LENGTH)),
    "bge-gemma2": ("llama-bare", "llama", builtin_profile("bge-gemma2", max_length=MAX_LENGTH)),
    "linq-embed-mistral": ("mistral-bare", "llama", builtin_profile("linq-embed-mistral", max_length=MAX_LENGTH)),
    "sfr-embedding-mistral": ("mistral-bare", "llama", builtin_profile("sfr-embedding-mistral", max_length=MAX_LENGTH)),
    "sentence-transformers": (
        "bert-bare",
        "bert",
        EncodingProfile("sentence-transformers", "mean", True, MAX_LENGTH, "query: ", "passage: ", lowercase=True),
    ),
    "custom": ("bert-bare", "bert", EncodingProfile("custom", "cls", False, MAX_LENGTH)),
}


def texts():
    docs = load_corpus(SCIFACT, selection=DocSelection(max_docs=6)).docs
    short = ["Vaccines train the immune system.", "a", "How do statins lower LDL?"]
    long = [doc.text for doc in docs]  # hundreds of tokens: cut at MAX_LENGTH
    return short + long


def original(case, tmp_path):
    kind, style, profile = CASES[case]
    tokenizer = bpe_tokenizer(style)
    if kind.startswith("bert"):
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        model = BertModel(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=len(tokenizer),
                pad_token_id=0,
            )
        ).eval()
    else:
        model = build_model(kind, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = save(model, tmp_path / "original")
    tokenizer.save_pretrained(folder)
    if style in ("llama-spm", "e5-mistral"):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        if style == "llama-spm":  # as Llama 2 and Mistral ship it
            config.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False)
        else:  # as intfloat/e5-mistral-7b-instruct ships it: add_eos_token, no add_bos_token, tokenizer.json adds <s>
            config.update(tokenizer_class="LlamaTokenizer", add_eos_token=True)
            config.pop("add_bos_token", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, profile


def reforge_vectors(folder, profile, inputs, prefix):
    from transformers import AutoModel, AutoTokenizer

    retriever = Retriever(AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), "r", profile)
    return encode(retriever, [prefix + t for t in inputs], profile, batch_size=4)


def st_vectors(folder, inputs, prompt_name):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(inputs, prompt_name=prompt_name, batch_size=4, convert_to_numpy=True)


def test_every_profile_has_a_case():
    from reforge.profiles import PROFILE_NAMES

    assert set(PROFILE_NAMES) <= {profile.name for _, _, profile in CASES.values()}


def with_st_files(folder, profile, out):
    """A copy of ``folder`` with the sentence-transformers files a merge writes for ``profile``."""
    result = sentence_transformers_files(companion_files(folder), st_encoding(profile))
    assert result.skipped is None
    shutil.copytree(folder, out)
    for name, content in result.files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_token_ids_agree_in_transformers_sentence_transformers_and_reforge(case, tmp_path):
    """The merged folder's ids, short texts and texts cut at max_length, queries with their prompt and passages:
    plain transformers (``AutoTokenizer(folder)(text, truncation=True, max_length=...)``), sentence-transformers
    (``SentenceTransformer(folder).tokenize``) and reforge eval (on the retriever and on the folder) give the same
    ids; BOS stays where the retriever's tokenizer adds one, EOS ends every text exactly once where the profile
    appends it, and a long text is cut to exactly max_length tokens."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from reforge.eval.encode import _token_ids

    folder, profile = original(case, tmp_path)
    out = with_st_files(folder, profile, tmp_path / "with-st")
    retriever_tokenizer, tokenizer = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(out)
    model = AutoModel.from_pretrained(folder)
    st = SentenceTransformer(str(out), device="cpu")
    bos = retriever_tokenizer("a")["input_ids"][0] == retriever_tokenizer.bos_token_id
    inputs = texts()
    for prefix in (profile.query_prefix_for("scifact"), profile.passage_prefix):
        batch = [prefix + t for t in inputs]
        ours, _ = _token_ids(retriever_tokenizer, batch, profile, model)
        ours_on_folder, _ = _token_ids(tokenizer, batch, profile, model)
        plain = [t.lower() for t in batch] if profile.lowercase else batch
        hf = tokenizer(plain, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        features = st.tokenize(batch)
        st_ids = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]
        for i, row in enumerate(ours):
            assert ours_on_folder[i] == hf[i] == st_ids[i] == row, (case, i, row, hf[i], st_ids[i])
            if bos:
                assert row[0] == retriever_tokenizer.bos_token_id and row[1] != row[0]
            if profile.append_eos:
                assert row[-1] == tokenizer.eos_token_id and row[-2] != tokenizer.eos_token_id
        assert [len(r) for r in ours[3:]] == [MAX_LENGTH] * len(inputs[3:])  # the SciFact abstracts are cut
        assert all(len(r) <= MAX_LENGTH for r in ours[:3])


@pytest.mark.parametrize("case", list(CASES))
def test_sentence_transformers_encodes_like_reforge(case, tmp_path):
    folder, profile = original(case, tmp_path)
    out = with_st_files(folder, profile, tmp_path / "with-st")
    inputs = texts()
    dataset = "scifact"
    for prompt_name, prefix in (
        ("query", profile.query_prefix_for("msmarco")),
        ("document", profile.passage_prefix),
        (dataset, profile.query_prefix_for(dataset)),
    ):
        if prompt_name == dataset and "{task}" not in profile.query_prefix:
            continue
        expected = reforge_vectors(folder, profile, inputs, prefix)
        got = st_vectors(out, inputs, prompt_name)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5, (prompt_name, np.abs(got - expected).max(axis=1))
        # reforge reading the new folder (its tokenizer now appends any EOS) gives the same vectors too
        assert np.abs(reforge_vectors(out, profile, inputs, prefix) - expected).max() <= 1e-5
    config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert set(config["prompts"]) >= {"query", "document"}
    if "{task}" in profile.query_prefix:
        assert config["prompts"]["scifact"] == profile.query_prefix_for("scifact")
        assert e5_task("scifact") in config["prompts"]["scifact"]
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == MAX_LENGTH


def test_eos_goes_after_what_the_post_processor_did():
    bos = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    single = with_eos(bos, "</s>", 2)["single"]
    assert [next(iter(p.values()))["id"] for p in single] == ["<s>", "A", "</s>"]
    assert with_eos(with_eos(bos, "</s>", 2), "</s>", 2)["single"] == single  # never twice
    wrapped = with_eos({"type": "ByteLevel", "trim_offsets": False}, "</s>", 2)
    assert wrapped["type"] == "Sequence" and wrapped["processors"][0]["type"] == "ByteLevel"


def test_merge_writes_a_folder_that_sentence_transformers_encodes_like_reforge_eval(tmp_path):
    tokenizer = bpe_tokenizer("llama")
    base = build_model("llama-causal", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base_dir = save(copy.deepcopy(base), tmp_path / "base")
    retriever_dir = save(perturbed_bare(copy.deepcopy(base)), tmp_path / "repllama-tiny")
    for folder in (base_dir, retriever_dir):
        tokenizer.save_pretrained(folder)
    make_adapter(base, tmp_path / "psi", dora=True)
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            "--base",
            str(base_dir),
            "--retriever",
            str(retriever_dir),
            "--adapter",
            str(tmp_path / "psi"),
            "-o",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads((out / "modules.json").read_text())[1]["path"] == "1_Pooling"
    card = (out / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and 'prompt_name="query"' in card
    source = resolve_model(out)
    assert source.profile.name == "repllama"  # read from reforge_encoding.json, as before
    retriever = source.load(device="cpu", dtype=torch.float32)
    inputs = texts()
    for prompt_name, prefix in (("query", "query: "), ("document", "passage: ")):
        profile = source.profile
        expected = encode(retriever, [prefix + t for t in inputs], profile, batch_size=4)
        assert np.abs(st_vectors(out, inputs, prompt_name) - expected).max() <= 1e-5
