"""`reforge train --resume` trusts nothing it did not write: a base replaced at the same path, a checkpoint adapter
missing a tensor or holding a NaN, a garbage meta.json, a missing or hostile optim.pt are refused with one line; a
diverged run writes no adapter. Equal spellings of the same options resume."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_train import SCIFACT, Crash, _crash_at, build_tokenizer, config, make_base

from reforge.cli import cli
from reforge.errors import InvalidOptionError, NonFiniteError, ResumeError
from reforge.train import train_adapter
from reforge.train.state import latest_checkpoint, work_dir

COMMON = dict(max_docs=6, max_length=32, batch_size=1, save_every=1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, tokenizer):
    return make_base("llama-causal", tmp_path_factory.mktemp("resume") / "llama", tokenizer)


def _stopped_run(base, out, **options):
    """A run crashed after its second optimizer step, with a checkpoint at step 2; return that checkpoint."""
    with pytest.raises(Crash):
        train_adapter(config(base, out, **{**COMMON, **options}), progress=_crash_at(3))
    return latest_checkpoint(work_dir(out))


def _resume(base, out, **options):
    return train_adapter(config(base, out, resume=True, **{**COMMON, **options}))


def _cli_resume(base, out):
    args = [str(base), "--corpus", str(SCIFACT), "-o", str(out), "--max-docs", "6", "--max-length", "32"]
    args += ["--batch-size", "1", "--save-every", "1", "-r", "4", "--lora-alpha", "8", "--resume"]
    return CliRunner().invoke(cli, ["train", *args])


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr and result.stderr.count("Error:") == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_resume_refuses_a_base_replaced_at_the_same_path(llama_base, tokenizer, tmp_path):
    base = shutil.copytree(llama_base, tmp_path / "base")
    _stopped_run(base, tmp_path / "psi")
    shutil.rmtree(base)
    make_base("llama-causal", base, tokenizer, seed=1)  # same path, same shapes, other weights
    with pytest.raises(InvalidOptionError, match=r"Cannot resume .*: the base .* is not the one it was trained on"):
        _resume(base, tmp_path / "psi")
    assert not (tmp_path / "psi").exists()


def test_resume_refuses_a_base_whose_norm_weights_alone_were_scaled(llama_base, tmp_path):
    # the case: a norm-only tune changes a few bytes between any sampled reads; only the whole content tells
    base = shutil.copytree(llama_base, tmp_path / "base")
    _stopped_run(base, tmp_path / "psi")
    weights = load_file(base / "model.safetensors")
    # the final RMSNorm alone: 32 of 230,112 bytes, between the 4 KB reads the old sampled fingerprint made
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidOptionError, match=r"the base .* is not the one it was trained on"):
        _resume(base, tmp_path / "psi")


def test_resume_accepts_the_same_base_under_another_spelling(llama_base, tmp_path, monkeypatch):
    base = shutil.copytree(llama_base, tmp_path / "base")
    _stopped_run(base, tmp_path / "psi")
    monkeypatch.chdir(tmp_path)
    resumed = _resume("base/", tmp_path / "psi")
    assert resumed.resumed_from == 2 and resumed.steps == 6


def _rewrite_adapter(checkpoint, change):
    file = checkpoint / "adapter.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)
    return sorted(tensors)


def test_resume_refuses_a_checkpoint_adapter_missing_a_tensor(llama_base, tmp_path):
    checkpoint = _stopped_run(llama_base, tmp_path / "psi")
    dropped = []
    _rewrite_adapter(checkpoint, lambda t: dropped.append(sorted(t)[0]) or t.pop(dropped[0]))
    with pytest.raises(ResumeError, match=r"adapter.safetensors lacks 1 of the \d+ trainable tensors") as caught:
        _resume(llama_base, tmp_path / "psi")
    assert caught.value.tensor == dropped[0] and dropped[0] in str(caught.value)


def test_resume_refuses_a_checkpoint_holding_a_nan(llama_base, tmp_path):
    checkpoint = _stopped_run(llama_base, tmp_path / "psi")
    name = [n for n in load_file(checkpoint / "adapter.safetensors") if "lora_B" in n][0]
    _rewrite_adapter(checkpoint, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(ResumeError, match=rf"holds a NaN or Inf in {name}"):
        _resume(llama_base, tmp_path / "psi")
    assert not (tmp_path / "psi").exists()


def test_a_diverged_run_writes_no_adapter_and_names_the_tensor(llama_base, tmp_path):
    # LoRA at lr 1e20: A and B each grow ~1e20 a step until their product overflows, and then everything is NaN
    # (DoRA's normalised direction keeps the same run finite)
    options = {**COMMON, "save_every": 0, "lr": 1e20, "use_dora": False}
    with pytest.raises(NonFiniteError, match=r"Not writing the adapter .*: base_model\.model\..*lora_.* holds a NaN"):
        train_adapter(config(llama_base, tmp_path / "psi", **options))
    assert not (tmp_path / "psi").exists()


def test_a_diverged_run_writes_no_checkpoint_of_it(llama_base, tmp_path):
    cfg = config(llama_base, tmp_path / "psi", **{**COMMON, "lr": 1e20, "use_dora": False})
    with pytest.raises(NonFiniteError, match=r"Training diverged: .*lora_.* holds a NaN or Inf after step \d"):
        train_adapter(cfg)
    checkpoint = latest_checkpoint(work_dir(tmp_path / "psi"))
    assert checkpoint is None or all(
        torch.isfinite(t).all() for t in load_file(checkpoint / "adapter.safetensors").values()
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [("{not json", "is not JSON"), ("[1, 2]", "holds a JSON list"), ('{"step": 2}', "lacks 'predicted'")],
)
def test_resume_with_a_garbage_meta_json_is_one_line(llama_base, tmp_path, content, says):
    checkpoint = _stopped_run(llama_base, tmp_path / "psi")
    (checkpoint / "meta.json").write_text(content)
    _one_line_error(_cli_resume(llama_base, tmp_path / "psi"), "meta.json", says, "--overwrite")


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["missing", "garbage", "hostile", "other dict"])
def test_resume_with_a_missing_or_hostile_optim_pt_is_one_line(llama_base, tmp_path, how):
    checkpoint = _stopped_run(llama_base, tmp_path / "psi")
    optim, marker = checkpoint / "optim.pt", tmp_path / "pwned"
    if how == "missing":
        optim.unlink()
    elif how == "garbage":
        optim.write_bytes(os.urandom(512))
    elif how == "hostile":
        optim.write_bytes(pickle.dumps({"optimizer": _Hostile(marker), "scheduler": {}}, protocol=2))
    else:
        torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}, optim)
    says = {"missing": "is missing", "other dict": "cannot take"}.get(how, "is not a weights-only torch file")
    _one_line_error(_cli_resume(llama_base, tmp_path / "psi"), "optim.pt", says)
    assert not marker.exists()


def test_resume_accepts_a_relative_corpus_and_auto_precision_as_what_they_resolve_to(llama_base, tmp_path, monkeypatch):
    monkeypatch.chdir(SCIFACT.parent)
    _stopped_run(llama_base, tmp_path / "psi", corpus=["scifact"], precision="auto")
    monkeypatch.chdir(tmp_path)
    resumed = _resume(llama_base, tmp_path / "psi", corpus=[str(SCIFACT)], precision="fp32")  # auto is fp32 on CPU
    assert resumed.resumed_from == 2 and resumed.steps == 6
    _stopped_run(llama_base, tmp_path / "other", corpus=[str(SCIFACT)])
    with pytest.raises(InvalidOptionError, match=r"options changed \(corpus: "):  # another file is another corpus
        _resume(llama_base, tmp_path / "other", corpus=[str(SCIFACT / "corpus.jsonl")])


def test_a_resumed_adapter_is_byte_identical_to_an_uninterrupted_one(llama_base, tmp_path):
    whole = train_adapter(config(llama_base, tmp_path / "whole", **COMMON))
    _stopped_run(llama_base, tmp_path / "psi")
    resumed = _resume(llama_base, tmp_path / "psi")
    assert resumed.resumed_from == 2

    def sha256(result):
        return hashlib.sha256((result.output / "adapter_model.safetensors").read_bytes()).hexdigest()

    assert sha256(resumed) == sha256(whole)
    assert json.loads((resumed.output / "adapter_config.json").read_text()) == json.loads(
        (whole.output / "adapter_config.json").read_text()
    )


def test_resume_with_a_bad_rng_state_is_one_line(llama_base, tmp_path):
    checkpoint = _stopped_run(llama_base, tmp_path / "psi")
    torch.save({"torch": torch.zeros(3)}, checkpoint / "rng-rank0.pt")  # a float tensor where bytes belong
    _one_line_error(_cli_resume(llama_base, tmp_path / "psi"), "rng-rank0.pt is not a torch RNG state")


def test_train_state_files_are_written_whole_or_not_at_all(tmp_path):
    """optim.pt / rng-rank{R}.pt go through reforge.io.train_state (the io layer, atomic): a save that fails part way
    leaves the earlier file as it was and no temporary file; what was saved reads back weights only, exactly."""
    from reforge.io.train_state import load_state, save_state

    path = tmp_path / "optim.pt"
    state = {"optimizer": {"state": {0: {"exp_avg": torch.arange(4.0)}}, "param_groups": [{"lr": 1e-4}]}}
    save_state(path, state)
    before = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        save_state(path, {"optimizer": lambda: None})  # torch.save cannot pickle a lambda: fails mid-write
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optim.pt"]
    loaded = load_state(path)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.arange(4.0))
    assert loaded["optimizer"]["param_groups"] == [{"lr": 1e-4}]
