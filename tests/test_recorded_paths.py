"""reforge.json names local inputs relative to its own folder (issue 26): a pushed or copied record carries no
absolute path (no user name, no home folder, no token-like folder name), and `reforge verify` still finds the inputs
it recomputes from."""

from __future__ import annotations

import json
import os

import pytest
from test_tune import setup  # noqa: F401  (the module-scoped fixture)

from conftest import run
from reforge.io.paths import RECORDED_RELATIVE_TO, located_inputs, recorded_inputs
from reforge.ops.verify import verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(folder):
    return json.loads((folder / "reforge.json").read_text())


def _recomputed(folder):
    report = verify_checkpoint(folder, embeddings=False)
    assert report.ok, report.failures
    assert not [s for s in report.skipped if s.startswith("recompute")], report.skipped
    return report


def test_a_merge_records_its_local_inputs_relative_to_itself_and_verifies(setup, tmp_path, monkeypatch):  # noqa: F811
    out = setup["root"] / "merged"
    run("merge", "--base", setup["base"], "--retriever", setup["retriever"], "--adapter", setup["psi"], "-o", out, "-q")
    text = (out / "reforge.json").read_text()
    assert str(setup["root"]) not in text and os.sep + "tmp" not in text  # on main: "/tmp/pytest-.../tune0/base"
    record = _record(out)
    assert record["paths_relative_to"] == RECORDED_RELATIVE_TO == "the folder holding this file"
    assert (record["base"]["path"], record["base"]["ref"]) == ("../base", "../base")
    assert record["retriever"]["path"] == "../retriever" and record["adapters"][0]["path"] == "../psi"
    monkeypatch.chdir(tmp_path)  # the record does not depend on where verify runs
    _recomputed(out)


def test_a_merge_from_a_delta_rebases_the_retriever_the_delta_recorded(setup, tmp_path, monkeypatch):  # noqa: F811
    assert _record(setup["delta"])["base"]["path"] == "../base"  # diff records the same way
    out = tmp_path / "nested" / "merged"
    run("merge", "--base", setup["base"], "--delta", setup["delta"], "--adapter", setup["psi"], "-o", out, "-q")
    record = _record(out)
    assert str(tmp_path) not in json.dumps(record) and str(setup["root"]) not in json.dumps(record)
    assert os.path.normpath(out / record["retriever"]["path"]) == str(setup["retriever"])
    assert os.path.normpath(out / record["delta"]["path"]) == str(setup["delta"])
    monkeypatch.chdir(tmp_path / "nested")
    _recomputed(out)


def test_records_written_before_keep_their_absolute_paths():
    old = {"base": {"ref": "/runs/base", "path": "/runs/base"}, "retriever": {"ref": "org/r", "repo_id": "org/r"}}
    assert located_inputs(old, "/elsewhere/merged") == old
    new = recorded_inputs(json.loads(json.dumps(old)), "/runs/merged")
    assert new["base"] == {"ref": "../base", "path": "../base"} and new["retriever"] == old["retriever"]
    assert located_inputs(new, "/runs/merged")["base"] == old["base"]


def test_a_training_records_corpus_is_located_by_the_same_function_as_its_inputs():
    """issue 23: one function turns recorded paths back into paths, for inputs and a training record's corpus files;
    a record written before paths were recorded relative comes back unchanged."""
    old = {"base": {"ref": "/runs/base", "path": "/runs/base"}, "corpus": {"paths": ["/data/a.jsonl", "b.jsonl"]}}
    assert located_inputs(old, "/elsewhere/psi") == old
    new = {
        "paths_relative_to": RECORDED_RELATIVE_TO,
        "base": {"ref": "../base", "path": "../base"},
        "corpus": {"paths": ["../../data/a.jsonl", "/abs/b.jsonl"], "sha256": "x"},
    }
    located = located_inputs(new, "/runs/psi")
    assert located["base"] == {"ref": "/runs/base", "path": "/runs/base"}
    assert located["corpus"] == {"paths": ["/data/a.jsonl", "/abs/b.jsonl"], "sha256": "x"}
    assert new["corpus"]["paths"][0] == "../../data/a.jsonl"  # a copy: the record read is not changed


def test_a_merge_names_an_adapters_corpus_from_its_training_record_old_or_new(tmp_path):
    """What merge records as an adapter's corpus is its training record's corpus, read through `located_inputs`:
    absolute paths of a record written before relative paths as they were; relative ones against the adapter."""
    from types import SimpleNamespace

    from reforge.ops.merge_folder import _adapter_corpus

    adapter = SimpleNamespace(checkpoint=SimpleNamespace(path=tmp_path / "runs" / "psi"))
    adapter.checkpoint.path.mkdir(parents=True)
    record = adapter.checkpoint.path / "training_record.json"
    assert _adapter_corpus(adapter) is None  # no training record
    record.write_text(json.dumps({"corpus": {"paths": ["/data/a.jsonl", "/data/b.jsonl"]}}))
    assert _adapter_corpus(adapter) == "/data/a.jsonl, /data/b.jsonl"
    record.write_text(json.dumps({"corpus": "scifact/corpus.jsonl"}))  # older still: one string, kept as it is
    assert _adapter_corpus(adapter) == "scifact/corpus.jsonl"
    relative = {"paths": ["../../data/a.jsonl", "b.jsonl"]}
    record.write_text(json.dumps({"paths_relative_to": RECORDED_RELATIVE_TO, "corpus": relative}))
    assert _adapter_corpus(adapter) == f"{tmp_path}/data/a.jsonl, {tmp_path}/runs/psi/b.jsonl"


def test_a_trained_adapter_names_its_base_relative_to_itself_and_loads_from_anywhere(tmp_path, monkeypatch):
    """adapter_config.json's base_model_name_or_path is ``../base`` (issue 26: no absolute local path published);
    peft with the base loaded by the caller, and reforge eval (resolving it against the adapter folder), merge and
    inspect (given --base) load the adapter from another working directory, and agree on its weights."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_train import build_tokenizer, config, make_base
    from transformers import AutoModelForCausalLM

    from reforge.eval.model import resolve_model
    from reforge.train import train_adapter

    base = make_base("llama-causal", tmp_path / "models" / "base", build_tokenizer())
    adapter = tmp_path / "models" / "psi"
    train_adapter(config(base, adapter, max_steps=2, lora_dropout=0.0, lr=1e-1))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "../base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "../base" from here is tmp_path/base, which does not exist
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, tuned(ids).logits)  # the adapter was loaded and applies
        folded = tuned.merge_and_unload()
    source = resolve_model(adapter)
    assert source.base_ref == "../base" and source.base_path == base
    loaded = source.load(device="cpu", dtype=torch.float32).model
    run("merge", "--base", base, "--retriever", base, "--adapter", adapter, "--beta", "1", "--alpha", "1", "-o", "m")
    merged = load_file(elsewhere / "m" / "model.safetensors")
    peft_weights = dict(folded.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, merged[f"model.{name}"]), name  # eval folds as merge does
        torch.testing.assert_close(param, peft_weights[name], rtol=0, atol=1e-5)  # and as peft does, to rounding
    inspected = json.loads(run("inspect", adapter, "--base", base, "--json").stdout)
    assert inspected["update"]["modules"] == 2 * 5 and inspected["update"]["norm"] > 0


def test_an_adapter_config_naming_an_absolute_base_or_a_hub_id_still_resolves(tmp_path, monkeypatch):
    """Adapters written before (absolute base) load as they did; a Hub id is still looked up as one."""
    import pytest
    from test_train import build_tokenizer, make_base
    from transformers import AutoModelForCausalLM

    from conftest import make_adapter
    from reforge.errors import CheckpointNotFoundError
    from reforge.eval.model import resolve_model

    base = make_base("llama-causal", tmp_path / "base", build_tokenizer())
    adapter = tmp_path / "adapter"
    make_adapter(AutoModelForCausalLM.from_pretrained(base), adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(base)}))
    monkeypatch.chdir(tmp_path / "adapter")
    assert resolve_model(adapter).base_path == base
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": "org/base"}))
    with pytest.raises(CheckpointNotFoundError, match=r"The base model 'org/base' named in .*could not be fetched"):
        resolve_model(adapter)


def test_the_docstring_examples_of_io_paths_run():
    import doctest

    import reforge.io.paths

    result = doctest.testmod(reforge.io.paths)
    assert result.failed == 0 and result.attempted >= 4
