"""Issue 26, eval side: nothing reused unless it is the same, and no NaN scored.

Each test here failed before its fix with a wrong number and exit 0 (or a traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import _lora, make_tokenizer, toy_dataset

from conftest import build_model, save
from reforge.errors import NonFiniteError, ProvenanceMismatchError
from reforge.eval import EvalSettings, evaluate
from reforge.io.checkpoint import fingerprint


def _vectors_of(report, model: str) -> dict:
    """Every (query, document) score the run kept for one model: what the vectors decide."""
    result = next(r for r in report.results if r.model == model)
    return {q: dict(docs) for q, docs in result.run.items()}


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    """A Llama large enough (4.7 MB) that `fingerprint`'s sixteen 4 KB samples miss its norm weights."""
    folder = tmp_path_factory.mktemp("big") / "orig"
    save(build_model("llama-bare", hidden_size=256, intermediate_size=512), folder)
    return make_tokenizer(folder, "llama")


def _scaled_norm_copy(source: Path, target: Path) -> Path:
    """A copy whose first input RMSNorm is rescaled (a norm-only tune): same names, sizes, header and samples."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    state = load_file(source / "model.safetensors")
    torch.manual_seed(3)
    name = "layers.0.input_layernorm.weight"
    state[name] = state[name] * (0.5 + torch.rand_like(state[name]))
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_model_differing_only_between_fingerprint_samples_gets_its_own_vectors(big_llama, tmp_path):
    data = toy_dataset(tmp_path / "toy")
    tuned = _scaled_norm_copy(big_llama, tmp_path / "tuned")
    assert fingerprint(big_llama) == fingerprint(tuned)  # the old key could not tell them apart
    cached = evaluate([big_llama, tuned], [data], EvalSettings(permutations=10))
    uncached = evaluate([big_llama, tuned], [data], EvalSettings(cache=False, permutations=10))
    assert _vectors_of(cached, "tuned") == _vectors_of(uncached, "tuned")
    assert _vectors_of(cached, "tuned") != _vectors_of(cached, "orig")


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    data = toy_dataset(tmp_path / "toy")
    folder = save(build_model("llama-bare"), tmp_path / "nan")
    make_tokenizer(folder, "llama")
    state = load_file(folder / "model.safetensors")
    state["layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"'layers\.1\.mlp\.down_proj\.weight' holds NaN"):
        evaluate([folder], [data], EvalSettings(cache=False))


def test_a_nan_adapter_merged_in_memory_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    data = toy_dataset(tmp_path / "toy")
    base = make_tokenizer(save(build_model("llama-bare"), tmp_path / "base"), "llama")
    adapter = _lora(base, tmp_path / "adapter", causal=False)
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(state) if "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError, match=r"merged into .* holds NaN or Inf"):
        evaluate([adapter], [data], EvalSettings(cache=False))


def test_an_in_memory_model_encoding_nan_is_refused(tmp_path):
    from reforge.eval import Retriever
    from reforge.profiles import builtin_profile

    data = toy_dataset(tmp_path / "toy")
    folder = make_tokenizer(save(build_model("llama-bare"), tmp_path / "m"), "llama")
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    retriever = Retriever(model, AutoTokenizer.from_pretrained(folder), "nan-merge", builtin_profile("last-token"))
    with pytest.raises(NonFiniteError, match=r"nan-merge encoded \d+ of \d+ text\(s\) as NaN"):
        evaluate([retriever], [data], EvalSettings(cache=False))


def test_an_adapter_over_the_wrong_base_is_refused_as_merge_refuses_it(tmp_path):
    data = toy_dataset(tmp_path / "toy")
    base = make_tokenizer(save(build_model("llama-bare"), tmp_path / "base"), "llama")
    other = make_tokenizer(save(build_model("llama-bare", seed=9), tmp_path / "other"), "llama")
    adapter = _lora(base, tmp_path / "adapter", causal=False)
    (adapter / "training_record.json").write_text(json.dumps({"base": {"fingerprint": fingerprint(base)}}))
    evaluate([adapter], [data], EvalSettings(cache=False))  # its own base: fine
    with pytest.raises(ProvenanceMismatchError, match="was trained on base fingerprint"):
        evaluate([adapter], [data], EvalSettings(cache=False, base=str(other)))


def test_vectors_of_a_model_are_finite_after_the_check(tmp_path):
    """The finite check costs nothing for a sound model: same vectors with and without the cache."""
    data = toy_dataset(tmp_path / "toy")
    folder = make_tokenizer(save(build_model("llama-bare"), tmp_path / "m"), "llama")
    first = evaluate([folder], [data])
    again = evaluate([folder], [data])
    assert again.results[0].corpus_cached
    assert _vectors_of(first, "m") == _vectors_of(again, "m")
    assert all(np.isfinite(s) for docs in _vectors_of(first, "m").values() for s in docs.values())


# ------------------------------------------------------------------------------------------ the embedding cache


def _corpus_entry_folder() -> Path:
    home = Path(__import__("os").environ["REFORGE_HOME"])
    (folder,) = [p.parent for p in (home / "cache" / "embeddings").glob("*/meta.json") if "documents" in p.read_text()]
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tokenizer(save(build_model("llama-bare"), tmp_path_factory.mktemp("small") / "m"), "llama")


def test_a_shard_another_layout_wrote_is_not_read_as_these_rows(small, tmp_path):
    """Two evals of one entry with --shard-docs 4 and 2: the second one's shard 1 (rows 2-3) has the size of the
    first one's shard 1 (rows 4-5). It must not stand in for rows 4-5 (d5 and d6 would never be found)."""
    from reforge.eval.cache import Entry

    data = toy_dataset(tmp_path / "toy")
    first = evaluate([small], [data], EvalSettings(shard_docs=4))
    folder = _corpus_entry_folder()
    meta = json.loads((folder / "meta.json").read_text())
    other = Entry(folder, 6, 2, meta["dtype"])  # the other writer, which started before meta.json existed
    vectors = np.load(folder / "00000.npy")[2:4].astype(np.float32)
    other.write_shard(1, vectors, ["d3", "d4"])
    again = evaluate([small], [data], EvalSettings(shard_docs=4))
    assert not again.results[0].corpus_cached  # shard 1 was encoded again
    assert _vectors_of(again, "m") == _vectors_of(first, "m")


def test_stored_ids_are_checked_against_the_corpus_not_only_counted(small, tmp_path):
    data = toy_dataset(tmp_path / "toy")
    first = evaluate([small], [data], EvalSettings(shard_docs=2))
    sidecar = _corpus_entry_folder() / "00002.ids.json"
    facts = json.loads(sidecar.read_text())
    if isinstance(facts, dict):
        facts["ids"] = ["d3", "d4"]
    else:  # the format before the fix: a list of ids
        facts = ["d3", "d4"]
    sidecar.write_text(json.dumps(facts))
    stages: list[str] = []
    again = evaluate([small], [data], EvalSettings(shard_docs=2), stage=stages.append)
    assert not again.results[0].corpus_cached
    assert any("not the corpus's ids" in s for s in stages)
    assert _vectors_of(again, "m") == _vectors_of(first, "m")


def test_writers_with_different_shard_sizes_share_the_first_layout(tmp_path):
    from reforge.eval.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path)
    a = cache.claim(cache.entry("k", 10, shard_docs=4, dtype="float16"), {"documents": 10})
    b = cache.claim(cache.entry("k", 10, shard_docs=3, dtype="float16"), {"documents": 10})
    assert (a.shard_docs, b.shard_docs) == (4, 4)
    a.write_shard(0, np.ones((4, 8), dtype=np.float32), ["0", "1", "2", "3"])
    assert b.missing() == [1, 2]


def test_same_shape_garbage_in_a_shard_is_encoded_again_and_said(small, tmp_path):
    data = toy_dataset(tmp_path / "toy")
    first = evaluate([small], [data])
    shard = _corpus_entry_folder() / "00000.npy"
    raw = bytearray(shard.read_bytes())
    header = len(raw) - 6 * 32 * 4  # six float32 rows of 32 dims at the end
    raw[header:] = np.random.default_rng(0).standard_normal(6 * 32).astype(np.float32).tobytes()
    shard.write_bytes(bytes(raw))
    stages: list[str] = []
    again = evaluate([small], [data], stage=stages.append)
    assert not again.results[0].corpus_cached
    assert any("do not match their recorded SHA-256" in s for s in stages)
    assert _vectors_of(again, "m") == _vectors_of(first, "m")
    assert evaluate([small], [data]).results[0].corpus_cached  # healed


def test_a_corpus_edited_during_an_eval_is_an_error_not_mixed_vectors(small, tmp_path):
    """Same length, every id at its offset, one text changed after the corpus was indexed: the documents read no
    longer are what the corpus hash (the cache key) stands for."""
    from reforge.data.beir import load_beir
    from reforge.errors import DataError

    data = toy_dataset(tmp_path / "toy")
    dataset = load_beir(data)  # indexed now; encoded later
    corpus = data / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("fish swim", "fish dive"))
    with pytest.raises(
        DataError, match="changed since it was indexed: byte \\d+ no longer holds the same text \\(document .d3.\\)"
    ):
        evaluate([small], [dataset])
    corpus.write_text(corpus.read_text().replace("fish dive", "fish swim"))  # restored: a clean run, nothing mixed
    fresh = evaluate([small], [data])
    assert _vectors_of(fresh, "m") == _vectors_of(evaluate([small], [data], EvalSettings(cache=False)), "m")


def test_tune_keys_its_cached_points_by_content_not_by_the_sampled_fingerprint(big_llama, tmp_path):
    """tune's cache identity of a merge point: two bases that differ only between fingerprint samples get two."""
    from types import SimpleNamespace

    from reforge.tune import _input_keys, _point_fingerprint

    def source(base: Path) -> SimpleNamespace:
        def checkpoint(path: Path) -> SimpleNamespace:
            return SimpleNamespace(path=path, provenance={"fingerprint": fingerprint(path)}, manifest={})

        adapter = SimpleNamespace(checkpoint=checkpoint(big_llama))
        return SimpleNamespace(
            base=checkpoint(base), retriever=checkpoint(big_llama), retriever_adapter=None, delta=None,
            adapters=[(adapter, 0.5)],
        )  # fmt: skip

    tuned = _scaled_norm_copy(big_llama, tmp_path / "tuned")
    assert fingerprint(big_llama) == fingerprint(tuned)  # the old key could not tell them apart
    orig_key = _point_fingerprint(_input_keys(source(big_llama)), 0.5, 1.0)
    assert orig_key != _point_fingerprint(_input_keys(source(tuned)), 0.5, 1.0)
    assert orig_key == _point_fingerprint(_input_keys(source(big_llama)), 0.5, 1.0)  # and it is stable


def test_a_dense_module_after_pooling_is_checked_for_non_finite_weights():
    from reforge.eval.model import check_finite
    from reforge.eval.pooling import Dense

    weight = torch.ones(4, 8)
    check_finite(Dense(weight, torch.zeros(4), "tanh"), "st-model")  # finite: no error
    weight[2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"st-model: parameter 'weight' holds NaN or Inf"):
        check_finite(Dense(weight, torch.zeros(4), "tanh"), "st-model")
    check_finite(lambda v: v, "st-model")  # Normalize is a plain function: nothing to check
