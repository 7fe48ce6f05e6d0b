"""Folding peft adapters into dense updates: against peft's own merge, and the LoRA-retriever forms of diff."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import build_model, make_adapter, save
from reforge.cli import cli
from reforge.io.adapter import LoraAdapter
from reforge.io.checkpoint import open_checkpoint


def merged_state(peft_model):
    return {k: v for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize(
    "dora,extra",
    [
        (False, {}),
        (True, {}),
        (False, {"use_rslora": True}),
        (True, {"use_rslora": True}),
        (False, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"up_proj": 3}}),
    ],
)
def test_fold_matches_peft_merge_and_unload(tmp_path, dora, extra):
    base = build_model("llama-causal")
    peft_model = make_adapter(base, tmp_path / "adapter", dora=dora, **extra)
    expected = merged_state(peft_model)
    base_state = base.state_dict()
    adapter = LoraAdapter(open_checkpoint(tmp_path / "adapter"))
    assert len(adapter.modules) == 2 * 4
    with open_checkpoint(tmp_path / "adapter").reader() as reader:
        for target in adapter.modules:
            weight = base_state["model." + target]
            folded = weight + adapter.psi(target, reader.get, weight)
            assert (folded - expected["model." + target]).abs().max() < 1e-6, target


def test_diff_of_lora_retriever_over_bare_model(tmp_path):
    """RepLLaMA form: a LoRA over the bare LlamaModel; Delta = s*B@A on targets, zero elsewhere."""
    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    peft_model = make_adapter(base.model, tmp_path / "retriever")
    keys = load_file(tmp_path / "retriever" / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.layers.") for k in keys)
    result = CliRunner().invoke(
        cli,
        ["diff", str(base_dir), str(tmp_path / "retriever"), "-o", str(tmp_path / "d"), "--dtype", "float32"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    delta = load_file(tmp_path / "d" / "model.safetensors")
    merged = merged_state(peft_model)
    bare_base = base.model.state_dict()
    assert set(delta) == set(bare_base)
    for key, value in bare_base.items():
        assert (value + delta[key] - merged[key]).abs().max() < 1e-6, key
        if "q_proj" not in key and "v_proj" not in key and "mlp.up" not in key and "mlp.down" not in key:
            assert not delta[key].any(), f"{key} should be zero"


def test_low_rank_delta_is_exact_and_small(tmp_path):
    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    make_adapter(base.model, tmp_path / "retriever")
    runner = CliRunner()
    for name, flags in (("dense", ["--dtype", "float32"]), ("lr", ["--low-rank"])):
        result = runner.invoke(
            cli,
            ["diff", str(base_dir), str(tmp_path / "retriever"), "-o", str(tmp_path / name), *flags],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.stderr
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    factors = load_file(tmp_path / "lr" / "model.safetensors")
    manifest = json.loads((tmp_path / "lr" / "reforge.json").read_text())
    assert len(manifest["factored"]) == 8 and manifest["zero"]
    assert (tmp_path / "lr" / "model.safetensors").stat().st_size < (
        tmp_path / "dense" / "model.safetensors"
    ).stat().st_size / 3
    for key in manifest["factored"]:
        stem = key.removesuffix(".weight")
        product = factors[stem + ".lora_B.weight"] @ factors[stem + ".lora_A.weight"]
        assert (product - dense[key]).abs().max() < 1e-6
    assert manifest["max_abs_rounding"] < 1e-6


def test_svd_rank_and_energy_compression_report_their_error(tmp_path):
    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    make_adapter(base.model, tmp_path / "retriever")  # rank-4 deltas
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "diff",
            str(base_dir),
            str(tmp_path / "retriever"),
            "-o",
            str(tmp_path / "r4"),
            "--rank",
            "4",
            "--dtype",
            "float32",
            "--json",
        ],
        catch_exceptions=False,
    )
    report = json.loads(result.stdout)
    assert report["low_rank_relative_error"] < 1e-5  # rank 4 captures a rank-4 delta
    result = runner.invoke(
        cli,
        [
            "diff",
            str(base_dir),
            str(tmp_path / "retriever"),
            "-o",
            str(tmp_path / "r1"),
            "--rank",
            "1",
            "--dtype",
            "float32",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert json.loads(result.stdout)["low_rank_relative_error"] > 0.05
    result = runner.invoke(
        cli,
        [
            "diff",
            str(base_dir),
            str(tmp_path / "retriever"),
            "-o",
            str(tmp_path / "e"),
            "--energy",
            "0.5",
            "--dtype",
            "float32",
            "--json",
        ],
        catch_exceptions=False,
    )
    manifest = json.loads((tmp_path / "e" / "reforge.json").read_text())
    ranks = {k: v["rank"] for k, v in manifest["records"].items() if "rank" in v}
    assert ranks and all(1 <= r <= 4 for r in ranks.values())
    for record in manifest["records"].values():
        if "rank" in record:  # energy kept >= 50%, so the squared relative error is <= 50%
            assert record["relative_error"] ** 2 <= 0.5 + 1e-6


def test_dora_adapter_without_magnitude_is_refused(tmp_path):
    from safetensors.torch import save_file

    base = build_model("llama-causal")
    make_adapter(base, tmp_path / "a", dora=True)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(file).items() if "magnitude" not in k}
    save_file(tensors, file)
    with pytest.raises(Exception, match="has no lora_magnitude_vector"):
        LoraAdapter(open_checkpoint(tmp_path / "a"))


def test_lora_retriever_for_another_base_is_refused(tmp_path):
    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    other = build_model("llama-causal", hidden_size=48, num_attention_heads=4)
    make_adapter(other.model, tmp_path / "retriever")
    result = CliRunner().invoke(cli, ["diff", str(base_dir), str(tmp_path / "retriever"), "-o", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "do not fit the base tensor" in result.stderr and "different base model" in result.stderr
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*")), "refused before writing anything"


def test_inspect_with_a_base_measures_the_adapter_against_peft_merge(tmp_path):
    import torch
    from safetensors.torch import save_file

    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    peft_model = make_adapter(base, tmp_path / "adapter", dora=True)
    merged, weights = merged_state(peft_model), base.state_dict()
    ratios = {  # ||merged - W|| / ||W||, from peft's own merge
        key.removeprefix("model."): float((merged[key].double() - w.double()).norm() / w.double().norm())
        for key, w in weights.items()
        if not torch.equal(merged[key], w)
    }
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter"), "--base", str(base_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    update = json.loads(result.stdout)["update"]
    assert update["modules"] == len(ratios) == 8
    expected_mean = sum(ratios.values()) / len(ratios)
    assert abs(update["relative"]["mean"] - expected_mean) < 1e-5 * expected_mean
    assert update["relative"]["max_tensor"] == max(ratios, key=ratios.__getitem__)
    assert set(update["by_target"]) == {"q_proj", "v_proj", "up_proj", "down_proj"}
    norm = sum(float((merged[k].double() - w.double()).norm()) ** 2 for k, w in weights.items()) ** 0.5
    assert abs(update["norm"] - norm) < 1e-5 * norm
    human = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter"), "--base", str(base_dir), "-q"])
    assert f"mean {update['relative']['mean']:.3g}" in human.stdout

    # a model is not an adapter; a non-finite factor is named, not measured as NaN
    wrong = CliRunner().invoke(cli, ["inspect", str(base_dir), "--base", str(base_dir)])
    assert wrong.exit_code == 2 and "--base measures a peft adapter" in wrong.stderr
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = next(k for k in sorted(factors) if "lora_B" in k)
    factors[key][0, 0] = float("nan")
    save_file(factors, tmp_path / "adapter" / "adapter_model.safetensors")
    broken = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter"), "--base", str(base_dir)])
    assert broken.exit_code == 1 and "is not finite" in broken.stderr, broken.stderr
