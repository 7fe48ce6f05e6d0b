"""Encoding profiles of the retriever families (issue 14): exact prompt strings, pooling and padding on tiny models of
each architecture; sentence-transformers folders encoded exactly as sentence-transformers encodes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save, save_tokenizer
from reforge.errors import CheckpointNotFoundError, PickleRefusedError, UnsupportedModelError
from reforge.eval.encode import encode
from reforge.eval.model import resolve_model
from reforge.profiles import PROFILE_FILE, detect_profile, load_profile, profile_bytes, save_profile


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (vocab 600, EOS id 2): the per-family tokenizer classes of transformers 5 read it."""
    from test_train import build_tokenizer

    return build_tokenizer()


SCIFACT_TASK = "Given a scientific claim, retrieve documents that support or refute the claim"
TEXTS = ["the protein binds the cell membrane in mice", "cancer", "a study of blood"]


def _tiny(family: str):
    """A tiny bare model of ``family`` with random weights (the body of the matrix test's causal LM)."""
    from test_family_matrix import decoder

    return decoder(family).model


CASES = [
    # folder name (as the Hub id ends), family, profile, exact SciFact query prefix, padding side, EOS appended
    ("Qwen3-Embedding-0.6B", "qwen3", "qwen3-embedding", f"Instruct: {SCIFACT_TASK}\nQuery:", "left", False),
    ("gte-Qwen2-1.5B-instruct", "qwen2", "gte-qwen2", f"Instruct: {SCIFACT_TASK}\nQuery: ", "right", False),
    ("bge-multilingual-gemma2", "gemma2", "bge-gemma2", f"<instruct>{SCIFACT_TASK}\n<query>", "right", False),
    ("Linq-Embed-Mistral", "mistral", "linq-embed-mistral", f"Instruct: {SCIFACT_TASK}\nQuery: ", "right", True),
    ("SFR-Embedding-Mistral", "mistral", "sfr-embedding-mistral", f"Instruct: {SCIFACT_TASK}\nQuery: ", "right", True),
    ("e5-mistral-7b-instruct", "mistral", "e5-mistral", f"Instruct: {SCIFACT_TASK}\nQuery: ", "right", True),
]


@pytest.mark.parametrize("folder_name, family, name, prefix, side, eos", CASES, ids=[c[2] for c in CASES])
def test_named_profile_strings_pooling_and_padding(tmp_path, bpe, folder_name, family, name, prefix, side, eos):
    model = _tiny(family)
    folder = save(model, tmp_path / folder_name)
    bpe.save_pretrained(folder)
    source = resolve_model(folder)
    profile = source.profile
    assert (profile.name, profile.pooling, profile.normalize, profile.padding_side, profile.append_eos) == (
        name,
        "last",
        True,
        side,
        eos,
    )
    assert profile.query_prefix_for("scifact") == prefix
    assert profile.passage_prefix == ""
    retriever = source.load(device="cpu", dtype=torch.float32)
    texts = [prefix + t for t in TEXTS]
    vectors = encode(retriever, texts, profile, batch_size=3)  # one padded batch
    ids = [retriever.tokenizer(t)["input_ids"] + ([2] if eos else []) for t in texts]
    for row, text_ids in zip(vectors, ids):  # each text alone: no padding at all
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([text_ids])).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(hidden, dim=-1).numpy()
        assert np.abs(row - expected).max() < 1e-5
    # a batch really is padded on the profile's side
    from reforge.eval.encode import _tokenize

    mask = _tokenize(retriever.tokenizer, texts, profile, model)["attention_mask"]
    assert (mask[1, 0] == 0) if side == "left" else (mask[1, -1] == 0)


def test_remote_code_is_refused_unless_trusted(tmp_path, bpe):
    folder = save(_tiny("qwen2"), tmp_path / "gte-Qwen2-7B-instruct")
    bpe.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_qwen.Qwen2Model"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError, match="asks for the model's own code .modeling_qwen.Qwen2Model.*--trust-remote-code"
    ):
        resolve_model(folder)
    assert resolve_model(folder, trust_remote_code=True).profile.name == "gte-qwen2"
    # the weight commands never need it: diff, merge and verify (its embedding check uses transformers' own class)
    from click.testing import CliRunner

    from reforge.cli import cli

    base_dir = save(_tiny("qwen2"), tmp_path / "base")
    bpe.save_pretrained(base_dir)
    for args in (
        ["diff", str(base_dir), str(folder), "-o", str(tmp_path / "delta")],
        ["merge", "--base", str(base_dir), "--retriever", str(folder), "-o", str(tmp_path / "out")],
        ["verify", str(tmp_path / "out"), "--json"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["embeddings"]["ok"] and checks["embeddings"]["detail"].startswith("cosine(retriever, new)")


def test_model_without_tokenizer_is_an_error_unless_given(tmp_path):
    from conftest import build_model

    bert = save(build_model("bert-bare"), tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="has no tokenizer files"):
        resolve_model(bert, pooling="cls")
    tokenizer = tmp_path / "tok"
    save_tokenizer(tokenizer, 64, bert=True)
    source = resolve_model(bert, pooling="cls", tokenizer=tokenizer)
    assert source.load(device="cpu", dtype=torch.float32).tokenizer.vocab_size == 64
    (bert / "reforge.json").write_text(json.dumps({"kind": "merge", "base": {"path": str(tokenizer)}}))
    assert resolve_model(bert, pooling="cls").tokenizer_path == tokenizer  # found at the recorded base


def test_eval_cli_refuses_a_model_without_tokenizer_unless_given(tmp_path):
    from click.testing import CliRunner
    from test_eval import toy_dataset

    from conftest import build_model
    from reforge.cli import cli

    bert = save(build_model("bert-bare"), tmp_path / "bert")
    data = toy_dataset(tmp_path / "toy")
    result = CliRunner().invoke(cli, ["eval", str(bert), "-d", str(data), "--pooling", "cls"])
    assert result.exit_code == 1 and "has no tokenizer files" in result.stderr and "--tokenizer" in result.stderr
    tokenizer = tmp_path / "tok"
    save_tokenizer(tokenizer, 64, bert=True)
    args = ["eval", str(bert), "-d", str(data), "--pooling", "cls", "--tokenizer", str(tokenizer), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr


def test_pickle_only_model_needs_allow_pickle(tmp_path):
    from conftest import build_model

    model = build_model("bert-bare")
    folder = tmp_path / "bert"
    model.save_pretrained(folder, safe_serialization=False) if _can_save_pickle() else _save_bin(model, folder)
    save_tokenizer(folder, 64, bert=True)
    assert not list(folder.glob("*.safetensors"))
    with pytest.raises(PickleRefusedError, match="is a pickle file.*--allow-pickle"):
        resolve_model(folder, pooling="cls")
    source = resolve_model(folder, pooling="cls", allow_pickle=True)
    loaded = source.load(device="cpu", dtype=torch.float32, allow_pickle=True)
    assert torch.equal(loaded.model.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


def _can_save_pickle() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _save_bin(model, folder: Path) -> None:
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_adapter_base_from_its_config_that_is_missing_says_so(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base-model"}))
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_model(adapter)
    message = str(info.value)
    assert "'/nowhere/base-model' named in" in message and "adapter_config.json (base_model_name_or_path)" in message
    assert message.endswith("Pass --base PATH_OR_HUB_ID with the base model the adapter was trained on.")


def test_eval_cli_error_for_base_from_adapter_config(tmp_path):
    from click.testing import CliRunner

    from reforge.cli import cli

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base-model"}))
    from test_eval import toy_dataset

    result = CliRunner().invoke(cli, ["eval", str(adapter), "-d", str(toy_dataset(tmp_path / "toy"))])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: The base model '/nowhere/base-model' named in ")
    assert "--base" in result.stderr


# ------------------------------------------------------------------------------------ sentence-transformers folders


def _bert_dir(folder: Path) -> Path:
    from conftest import build_model

    save(build_model("bert-bare", seed=3), folder)
    save_tokenizer(folder, 64, bert=True)
    return folder


def _st_model(tmp_path: Path, pooling, *, dense: str | None = None, normalize: bool = True, prompts=None):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(_bert_dir(tmp_path / "bert")), max_seq_length=12)
    modules = [transformer, Pooling(32, pooling_mode=pooling)]
    width = 32 * (len(pooling) if isinstance(pooling, (list, tuple)) else 1)
    if dense is not None:
        torch.manual_seed(9)
        activation = {"tanh": torch.nn.Tanh(), "identity": torch.nn.Identity()}[dense]
        modules.append(Dense(width, 16, activation_function=activation))
    if normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, prompts=prompts or {}, device="cpu")


ST_CASES = [
    ("mean", None, True),
    ("cls", None, False),
    ("lasttoken", None, True),
    ("max", None, True),
    ("mean_sqrt_len_tokens", None, False),
    ("weightedmean", None, True),
    (("mean", "max"), None, True),
    ("mean", "tanh", True),
    ("cls", "identity", False),
]


@pytest.mark.parametrize("pooling, dense, normalize", ST_CASES, ids=[f"{p}-{d}-{n}" for p, d, n in ST_CASES])
def test_sentence_transformers_folder_encodes_as_sentence_transformers(tmp_path, pooling, dense, normalize):
    st = _st_model(tmp_path, pooling, dense=dense, normalize=normalize, prompts={"query": "w5 w6 ", "document": ""})
    folder = tmp_path / "st"
    st.save(str(folder))
    source = resolve_model(folder)
    profile = source.profile
    assert profile.name == "sentence-transformers"
    assert profile.modules == (("dense:2_Dense",) if dense else ())
    retriever = source.load(device="cpu", dtype=torch.float32)
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14", "w8 w9", "w10 w11 w12 w13"]
    ours_docs = encode(retriever, [profile.passage_prefix + t for t in texts], profile, batch_size=3)
    ours_queries = encode(retriever, [profile.query_prefix_for("scifact") + t for t in texts], profile, batch_size=3)
    assert np.abs(ours_docs - st.encode_document(texts, batch_size=3)).max() < 1e-5
    assert np.abs(ours_queries - st.encode_query(texts, batch_size=3)).max() < 1e-5
    if dense:  # the Dense module matters: ignoring it would change the vectors
        assert ours_docs.shape[1] == 16


@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens", "weightedmean"])
def test_old_pooling_booleans_and_new_pooling_mode_agree(tmp_path, mode):
    st = _st_model(tmp_path, mode, normalize=False)
    folder = tmp_path / "st"
    st.save(str(folder))
    new = detect_profile(folder)
    keys = {
        "mean": "pooling_mode_mean_tokens",
        "cls": "pooling_mode_cls_token",
        "lasttoken": "pooling_mode_lasttoken",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
    }
    old = {keys[m]: m == mode for m in keys} | {"word_embedding_dimension": 32}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(old))
    assert detect_profile(folder) == new
    assert new.pooling == {"lasttoken": "last", "mean_sqrt_len_tokens": "mean_sqrt_len"}.get(mode, mode)


def st6_lasttoken(folder: Path) -> Path:
    """Turn a model folder into a sentence-transformers 6 folder that pools the last token (no Normalize)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    return folder


def test_st6_lasttoken_pooling_file_is_read(tmp_path):
    """Issue 12 case 5: sentence-transformers 6 writes {"pooling_mode": "lasttoken"}."""
    folder = _bert_dir(tmp_path / "st")
    st6_lasttoken(folder)
    profile = detect_profile(folder)
    assert (profile.pooling, profile.normalize) == ("last", False)


def test_prompts_follow_default_prompt_name(tmp_path):
    from reforge.profiles import st_prompts

    assert st_prompts({"prompts": {"query": "q: ", "passage": "p: "}}) == ("q: ", "p: ")
    assert st_prompts({"prompts": {"retrieval": "r: "}, "default_prompt_name": "retrieval"}) == ("r: ", "r: ")
    assert st_prompts({"prompts": {"query": "", "retrieval": "r: "}, "default_prompt_name": "retrieval"}) == ("", "r: ")
    assert st_prompts({}) == ("", "")


def test_module_reforge_does_not_implement_is_an_error(tmp_path):
    st = _st_model(tmp_path, "mean")
    folder = tmp_path / "st"
    st.save(str(folder))
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 9, "name": "9", "path": "9_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="'sentence_transformers.models.LayerNorm' module .9_LayerNorm."):
        detect_profile(folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean", "include_prompt": False}))
    modules.pop()
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="include_prompt false"):
        detect_profile(folder)


def test_dense_module_without_weights_is_an_error(tmp_path):
    st = _st_model(tmp_path, "mean", dense="tanh")
    folder = tmp_path / "st"
    st.save(str(folder))
    (folder / "2_Dense" / "model.safetensors").unlink()
    source = resolve_model(folder)
    with pytest.raises(UnsupportedModelError, match="Dense module .* has no config.json and model.safetensors"):
        source.load(device="cpu", dtype=torch.float32)


def test_saved_profile_round_trips_modules(tmp_path):
    st = _st_model(tmp_path, ("cls", "mean"), dense="tanh")
    folder = tmp_path / "st"
    st.save(str(folder))
    profile = detect_profile(folder)
    assert (profile.pooling, profile.modules, profile.normalize) == ("cls+mean", ("dense:2_Dense",), True)
    assert load_profile(save_profile(tmp_path, profile)) == profile


def test_st6_lasttoken_retriever_merge_writes_and_verify_checks_the_profile(tmp_path):
    """Issue 12 case 5: merge writes reforge_encoding.json for an ST 6 lasttoken retriever, verify runs the embedding
    check (not skipped) and fails when the profile file is gone."""
    import copy

    from click.testing import CliRunner

    from conftest import build_model, perturbed_bare
    from reforge.cli import cli

    base = build_model("bert-mlm")
    base_dir = save(base, tmp_path / "base")
    save_tokenizer(base_dir, 64, bert=True)
    retriever = save(perturbed_bare(copy.deepcopy(base)), tmp_path / "retriever")
    save_tokenizer(retriever, 64, bert=True)
    st6_lasttoken(retriever)
    out = tmp_path / "out"
    merged = CliRunner().invoke(cli, ["merge", "--base", str(base_dir), "--retriever", str(retriever), "-o", str(out)])
    assert merged.exit_code == 0, merged.stderr
    assert PROFILE_FILE == "reforge_encoding.json"
    saved = load_profile(out / PROFILE_FILE)
    assert saved.pooling == "last"
    # one writer: merge's file holds the bytes save_profile writes for the same profile
    (tmp_path / "saved").mkdir()
    assert (out / PROFILE_FILE).read_bytes() == save_profile(tmp_path / "saved", saved).read_bytes()
    assert (out / PROFILE_FILE).read_bytes() == profile_bytes(detect_profile(retriever))
    result = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert result.exit_code == 0, result.stdout
    assert checks["encoding"]["ok"] and checks["embeddings"]["ok"]
    assert checks["embeddings"]["detail"].startswith("cosine(retriever, new) on 4 sentences")
    (out / "reforge_encoding.json").unlink()
    (out / "modules.json").unlink()
    result = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert result.exit_code == 1 and not checks["embeddings"]["ok"]
    assert "could not embed with both models" in checks["embeddings"]["detail"]


def test_merged_sentence_transformers_folder_keeps_its_dense_module(tmp_path):
    """A Dense module's weights travel with the merged folder, so it encodes like the retriever (and verify passes)."""
    from click.testing import CliRunner

    from conftest import build_model
    from reforge.cli import cli

    base_dir = save(build_model("bert-mlm"), tmp_path / "base")
    st = _st_model(tmp_path, "mean", dense="tanh")
    st.save(str(tmp_path / "st"))
    out = tmp_path / "out"
    merged = CliRunner().invoke(
        cli, ["merge", "--base", str(base_dir), "--retriever", str(tmp_path / "st"), "-o", str(out)]
    )
    assert merged.exit_code == 0, merged.stderr
    dense = "2_Dense/model.safetensors"
    assert (out / dense).read_bytes() == (tmp_path / "st" / dense).read_bytes()
    verified = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert verified.exit_code == 0, verified.stdout
    texts = ["w1 w2 w3", "w4 w5"]
    source = resolve_model(out)
    vectors = encode(source.load(device="cpu", dtype=torch.float32), texts, source.profile, batch_size=2)
    assert np.abs(vectors - st.encode_document(texts)).max() < 1e-5
