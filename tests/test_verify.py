"""reforge verify: passes sound outputs, fails damaged ones with the reason."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_merge import merge, setup  # noqa: F401  (setup: the module-scoped fixture)

from reforge.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_verify_delta_passes_and_catches_a_changed_value(llama_pair, tmp_path):
    base_dir, retriever_dir = llama_pair
    delta = tmp_path / "delta"
    assert run("diff", base_dir, retriever_dir, "-o", delta, "--dtype", "bfloat16").exit_code == 0
    result = run("verify", delta, "--full", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["ok"], result.stdout
    assert {c["name"] for c in report["checks"]} == {"loads", "finite", "recompute"}
    file = next(delta.glob("*.safetensors"))
    tensors = load_file(file)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, file, metadata={"format": "pt"})
    result = run("verify", delta, "--full")
    assert result.exit_code == 1 and "FAIL recompute" in result.stdout and key in result.stdout


def test_verify_merge_with_recorded_inputs_and_embeddings(setup, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    merge(setup, "--adapter", setup["root"] / "dora", "-o", out)
    result = run("verify", out, "--json", "--full")
    report = json.loads(result.stdout)
    assert result.exit_code == 0, result.stdout
    names = {c["name"] for c in report["checks"]}
    assert names == {"loads", "finite", "layout", "recompute", "independent", "encoding", "embeddings"}
    assert not any(c["skipped"] for c in report["checks"]) and "sound" in run("verify", out, "--no-embeddings").stdout
    assert len(report["cosine"]) == 4 and min(report["cosine"]) > 0.5
    assert len(report["tensors"]) == 20
    # the Python API runs the embedding checks only with a comparison passed in (ops does not import eval)
    from reforge.ops.verify import verify_checkpoint

    api = verify_checkpoint(out, embeddings=True)
    assert api.ok and api.skipped == [
        "embeddings: skipped: no comparison given (pass embeddings=reforge.eval.agreement.compare_embeddings)"
    ]
    # a different alpha than the one used must fail the recomputation
    result = run("verify", out, "--adapter", setup["root"] / "dora", "--alpha", "0.25", "--no-embeddings")
    assert result.exit_code == 1 and "differs from the recomputed merge" in result.stdout


def test_verify_finds_nan_and_leftover_partial_files(setup, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run("merge", "--base", setup["base_dir"], "--retriever", setup["retriever_dir"], "-o", out)
    file = next(out.glob("*.safetensors"))
    tensors = load_file(file)
    key = next(iter(tensors))
    tensors[key][0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    (out / "model-00009-of-00009.safetensors.incomplete").write_bytes(b"")
    result = run("verify", out, "--no-embeddings")
    assert result.exit_code == 1
    assert "NaN/Inf in 1 tensor(s)" in result.stdout and "unfinished files left" in result.stdout


def test_verify_truncated_shard_fails_loads(setup, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run("merge", "--base", setup["base_dir"], "--retriever", setup["retriever_dir"], "-o", out)
    file = next(out.glob("*.safetensors"))
    file.write_bytes(file.read_bytes()[:-4])
    result = run("verify", out, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["ok"] and "truncated" in report["failures"][0]
    assert torch is not None


def test_independent_check_catches_a_wrong_merge_that_the_merge_path_agrees_with(setup, tmp_path, monkeypatch):  # noqa: F811
    from reforge.ops import merge as merge_ops
    from reforge.ops import merge_compute

    real, wrong_key = merge_compute.compute_output, "layers.1.mlp.down_proj.weight"

    def wrong(source, loaded, key, beta, dtype, *args, **kwargs):  # a bug in the merge path: one value off
        value, rounding = real(source, loaded, key, beta, dtype, *args, **kwargs)
        if key == wrong_key:
            value = value.clone()
            value[0, 0] += 0.01
        return value, rounding

    monkeypatch.setattr(merge_compute, "compute_output", wrong)  # as verify's recompute calls it
    monkeypatch.setattr(merge_ops, "compute_output", wrong)  # as merge imported it
    out = tmp_path / "out"
    args = ["--base", setup["base_dir"], "--retriever", setup["retriever_dir"], "--adapter", setup["root"] / "dora"]
    assert run("merge", *args, "-o", out).exit_code == 0
    result = run("verify", out, "--full", "--json", "--no-embeddings")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["recompute"]["ok"]  # the merge path recomputes its own bug and agrees
    assert not checks["independent"]["ok"] and wrong_key in checks["independent"]["detail"]
    assert result.exit_code == 1


def test_verifying_a_lora_retriever_delta_recomputes_it_or_says_what_it_could_not(setup, tmp_path):  # noqa: F811
    delta = tmp_path / "delta"
    assert run("diff", setup["base_dir"], setup["root"] / "lora", "-o", delta, "--dtype", "float32").exit_code == 0
    args = ["--base", setup["base_dir"], "--retriever", setup["root"] / "lora", "--full", "--json"]
    result = run("verify", delta, *args)
    recompute = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "recompute")
    assert result.exit_code == 0 and recompute["ok"] and not recompute["skipped"]
    assert "plain formula" in recompute["detail"]
    file = next(delta.glob("*.safetensors"))
    tensors = load_file(file)
    key = "layers.0.self_attn.q_proj.weight"
    tensors[key][1, 1] += 0.01
    save_file(tensors, file, metadata={"format": "pt"})
    result = run("verify", delta, *args)
    assert result.exit_code == 1 and key in result.stdout
    pickled = tmp_path / "lora_pickle"  # what cannot be recomputed is said, and not called sound
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((setup["root"] / "lora" / "adapter_config.json").read_text())
    torch.save(load_file(setup["root"] / "lora" / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    result = run("verify", delta, "--base", setup["base_dir"], "--retriever", pickled, "--allow-pickle")
    assert "not recomputed" in result.stdout and "sound" not in result.stdout.splitlines()[-1].split(":")[-1]


def test_the_independent_check_reads_adapter_config_through_io_and_names_a_broken_one(tmp_path):
    import pytest

    from reforge.errors import CorruptCheckpointError
    from reforge.ops.recheck import PlainAdapter

    (tmp_path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    with pytest.raises(CorruptCheckpointError, match=r"adapter_config\.json is not a readable adapter config \("):
        PlainAdapter(tmp_path)


def test_what_verify_is_told_and_what_it_completes_from_the_record_are_one_type(tmp_path):
    """`VerifyInputs` is both what the command line gives and, completed from reforge.json, what every recompute
    check reads (no twin type whose fields could drift apart): a given field wins, a missing one comes from the
    record (a local path while it exists, else the Hub ref), and a retriever given drops the recorded delta."""
    from dataclasses import fields

    from reforge.ops.verify import VerifyInputs, _sources

    record = {
        "base": {"path": str(tmp_path), "repo_id": "org/base"},
        "retriever": {"path": str(tmp_path / "gone"), "repo_id": "org/r", "revision": "abc"},
        "delta": {"path": str(tmp_path / "delta")},
        "adapters": [{"path": str(tmp_path), "alpha": 0.25}, {"path": str(tmp_path / "gone")}],
        "beta": 0.9,
        "keep_lm_head": True,
    }
    completed = _sources(record, VerifyInputs())
    assert completed == VerifyInputs(str(tmp_path), "org/r@abc", None, [(str(tmp_path), 0.25)], 0.9, True)
    given = VerifyInputs(base="b/", delta="d/", adapters=[("a/", 1.0)], beta=0.5)
    assert _sources(record, given) == VerifyInputs("b/", None, "d/", [("a/", 1.0)], 0.5, True)
    assert {f.name for f in fields(VerifyInputs)} == {"base", "retriever", "delta", "adapters", "beta", "keep_lm_head"}
