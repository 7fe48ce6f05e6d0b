"""A legacy (pre-zip) ``pytorch_model.bin`` with --allow-pickle: one rule for every command (issue 26). eval loaded
it through transformers; diff, merge and inspect refused it (torch cannot memory-map the old format)."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from conftest import build_model, perturbed_bare
from reforge.cli import cli
from reforge.io.pickled import load_state


def _legacy_folder(model, folder):
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return folder


def test_a_legacy_pickle_loads_like_a_zip_one(tmp_path):
    model = build_model("llama-causal")
    legacy = _legacy_folder(model, tmp_path / "legacy")
    state = load_state(legacy / "pytorch_model.bin")
    assert sorted(state) == sorted(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_inspect_and_diff_accept_a_legacy_pickle_with_allow_pickle(tmp_path):
    import copy

    base = build_model("llama-causal")
    base_dir = _legacy_folder(base, tmp_path / "base")
    retriever = perturbed_bare(copy.deepcopy(base))
    retriever_dir = _legacy_folder(retriever, tmp_path / "retriever")
    runner = CliRunner()
    refused = runner.invoke(cli, ["inspect", str(base_dir)])
    assert refused.exit_code == 1 and "--allow-pickle" in refused.stderr  # still opt-in
    shown = runner.invoke(cli, ["inspect", str(base_dir), "--allow-pickle", "--json"])
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)  # on main: "could not be loaded as a weights-only pickle (... mmap ...)"
    delta = runner.invoke(
        cli, ["diff", str(base_dir), str(retriever_dir), "-o", str(tmp_path / "delta"), "--allow-pickle"]
    )
    assert delta.exit_code == 0, delta.stderr
    assert (tmp_path / "delta" / "reforge.json").is_file()
