"""reforge verify: passes sound outputs, fails damaged ones with the reason."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_merge import setup  # noqa: F401  (module-scoped fixture)

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
    assert (
        run(
            "merge",
            "--base",
            setup["base_dir"],
            "--retriever",
            setup["retriever_dir"],
            "--adapter",
            setup["root"] / "dora",
            "-o",
            out,
        ).exit_code
        == 0
    )
    result = run("verify", out, "--json", "--full")
    report = json.loads(result.stdout)
    assert result.exit_code == 0, result.stdout
    assert {c["name"] for c in report["checks"]} == {"loads", "finite", "layout", "recompute", "encoding", "embeddings"}
    assert len(report["cosine"]) == 4 and min(report["cosine"]) > 0.5
    assert len(report["tensors"]) == 20
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
