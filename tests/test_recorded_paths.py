"""reforge.json names local inputs relative to its own folder (issue 26): a pushed or copied record carries no
absolute path (no user name, no home folder, no token-like folder name), and `reforge verify` still finds the inputs
it recomputes from."""

from __future__ import annotations

import json
import os

from test_tune import one_thread, run, setup  # noqa: F401  (fixtures: one_thread is autouse)

from reforge.io.paths import RECORDED_RELATIVE_TO, located_inputs, recorded_inputs
from reforge.ops.verify import verify_checkpoint


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
