"""One rule per fact, and no silent wrong output: pickle inputs, key prefixes, missing keys, vocabulary rows, NaN.

Each test here failed on main at be54a18 (issue 12 cases 1, 2 and 6; issue 13's pickle, NaN and malformed-index
and adapter_config cases).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge import tensors

from conftest import build_model, make_adapter, perturbed_bare, run, save, save_tokenizer


def as_pickle(folder, target):
    """The same checkpoint with its weights in ``pytorch_model.bin`` (config and tokenizer kept)."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    torch.save(tensors(folder), target / "pytorch_model.bin")
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """fp32 base CausalLM, a sharded bare retriever, a DoRA adapter; and pickle copies of base and retriever."""
    root = tmp_path_factory.mktemp("rules")
    base = build_model("llama-causal")
    base_dir = save(base, root / "base")
    retriever_dir = save(perturbed_bare(copy.deepcopy(base)), root / "retriever", shard_size="30KB")
    make_adapter(base, root / "dora", dora=True)
    return dict(
        root=root,
        base=base_dir,
        retriever=retriever_dir,
        dora=root / "dora",
        base_pickle=as_pickle(base_dir, root / "base_pickle"),
        retriever_pickle=as_pickle(retriever_dir, root / "retriever_pickle"),
    )


@pytest.mark.parametrize("which", ["base", "retriever", "both"])
def test_merge_with_pickle_inputs_equals_the_safetensors_run(models, tmp_path, which):
    """Case 1: a pickle base used to be left out (0.5*R written instead of base + 0.5*(R - base))."""
    common = ["--adapter", models["dora"], "--alpha", "0.5", "--beta", "0.5"]
    run("merge", "--base", models["base"], "--retriever", models["retriever"], *common, "-o", tmp_path / "st")
    base = models["base_pickle"] if which != "retriever" else models["base"]
    retriever = models["retriever_pickle"] if which != "base" else models["retriever"]
    run("merge", "--base", base, "--retriever", retriever, *common, "--allow-pickle", "-o", tmp_path / "pk")
    expected, got = tensors(tmp_path / "st"), tensors(tmp_path / "pk")
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    plan = json.loads(
        run(
            "merge",
            "--base",
            base,
            "--retriever",
            retriever,
            *common,
            "--allow-pickle",
            "--dry-run",
            "--json",
            "-o",
            tmp_path / "dry",
        ).stdout
    )["plan"]
    assert plan["layers.0.mlp.gate_proj.weight"] == ["base", "0.5*delta"]


@pytest.mark.parametrize("which", ["base", "retriever"])
def test_diff_with_pickle_inputs_equals_the_safetensors_run(models, tmp_path, which):
    run("diff", models["base"], models["retriever"], "-o", tmp_path / "st", "--dtype", "float32")
    base = models["base_pickle"] if which == "base" else models["base"]
    retriever = models["retriever_pickle"] if which == "retriever" else models["retriever"]
    run("diff", base, retriever, "-o", tmp_path / "pk", "--dtype", "float32", "--allow-pickle")
    expected, got = tensors(tmp_path / "st"), tensors(tmp_path / "pk")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert any(float(v.abs().max()) > 0 for v in got.values())


def test_pickle_adapter_is_folded_like_its_safetensors_copy(models, tmp_path):
    adapter = tmp_path / "dora_pickle"
    shutil.copytree(models["dora"], adapter, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(tensors(models["dora"]), adapter / "adapter_model.bin")
    args = ["merge", "--base", models["base"], "--retriever", models["retriever"], "--alpha", "0.5"]
    run(*args, "--adapter", models["dora"], "-o", tmp_path / "st")
    assert run(*args, "--adapter", adapter, "-o", tmp_path / "refused", ok=False).exit_code == 1
    run(*args, "--adapter", adapter, "--allow-pickle", "-o", tmp_path / "pk")
    expected, got = tensors(tmp_path / "st"), tensors(tmp_path / "pk")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "content,reason",
    [("", "not a valid index"), ('{"weight_map": {}}', "names no tensors"), ("[1]", "not a JSON object")],
)
def test_pickle_index_empty_or_not_json_is_a_clear_error(models, tmp_path, content, reason):
    folder = tmp_path / "m"
    shutil.copytree(models["base_pickle"], folder)
    (folder / "pytorch_model.bin.index.json").write_text(content)
    result = run("diff", folder, models["retriever"], "-o", tmp_path / "out", "--allow-pickle", ok=False)
    assert result.exit_code == 1 and reason in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "weight_map,reason",
    [([1, 2], "weight_map is not an object"), ({"norm.weight": 3}, "not a file name"), ({"a": None}, "not a file")],
)
def test_index_weight_map_of_the_wrong_type_is_a_clear_error(models, tmp_path, weight_map, reason):
    folder = tmp_path / "m"
    shutil.copytree(models["retriever"], folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    result = run("diff", models["base"], folder, "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and reason in result.stderr and "index.json" in result.stderr


def test_model_prefixed_retriever_through_delta_keeps_its_names(tmp_path):
    """Case 2: a body saved through *ForCausalLM without lm_head (keys model.*) lost its prefix via --delta."""
    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    prefixed = {f"model.{k}": v.contiguous() for k, v in perturbed_bare(copy.deepcopy(base)).state_dict().items()}
    retriever = tmp_path / "retriever"
    retriever.mkdir()
    save_file(prefixed, retriever / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base_dir / "config.json", retriever / "config.json")
    save_tokenizer(retriever)
    run("diff", base_dir, retriever, "-o", tmp_path / "delta", "--dtype", "float32")
    run("merge", "--base", base_dir, "--delta", tmp_path / "delta", "-o", tmp_path / "via_delta")
    run("merge", "--base", base_dir, "--retriever", retriever, "-o", tmp_path / "via_retriever")
    via_delta, via_retriever = tensors(tmp_path / "via_delta"), tensors(tmp_path / "via_retriever")
    assert set(via_delta) == set(via_retriever) == set(prefixed)
    assert all(torch.equal(via_delta[k], prefixed[k]) for k in prefixed)
    result = run("verify", tmp_path / "via_delta", "--json")
    assert json.loads(result.stdout)["ok"] is True


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """BertForMaskedLM base (no pooler) and a BertModel retriever (with one), and their --allow-missing delta."""
    root = tmp_path_factory.mktemp("bert")
    base_dir = save(build_model("bert-mlm"), root / "base")
    retriever_dir = save(build_model("bert-bare", seed=3), root / "retriever")
    run("diff", base_dir, retriever_dir, "-o", root / "delta", "--allow-missing", "--dtype", "float32")
    return base_dir, retriever_dir, root / "delta"


@pytest.mark.parametrize("source", ["--retriever", "--delta"])
def test_tensor_the_base_lacks_is_refused_at_beta_other_than_one(bert, tmp_path, source):
    """Case 6: a BERT pooler came out as beta * R; now the missing-key rule refuses it, naming the tensor."""
    base_dir, retriever_dir, delta = bert
    given = retriever_dir if source == "--retriever" else delta
    result = run("merge", "--base", base_dir, source, given, "--beta", "0.5", "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and "pooler.dense" in result.stderr and "--beta 1" in result.stderr
    assert not (tmp_path / "out").exists()
    run("merge", "--base", base_dir, source, given, "-o", tmp_path / "kept")  # beta 1 keeps the retriever's pooler
    retriever = tensors(retriever_dir)
    assert torch.equal(tensors(tmp_path / "kept")["pooler.dense.weight"], retriever["pooler.dense.weight"])


def _grown(tmp_path, key_rows: int = 130):
    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    retriever = perturbed_bare(copy.deepcopy(base))
    retriever.resize_token_embeddings(key_rows)
    retriever.config.vocab_size = key_rows
    return base_dir, save(retriever, tmp_path / "retriever")


def test_vocabulary_rule_is_the_same_in_diff_and_merge(tmp_path):
    """Case 6: extra rows were allowed for any 2-D tensor in merge, for embeddings only in diff."""
    base_dir, retriever_dir = _grown(tmp_path)
    run("merge", "--base", base_dir, "--retriever", retriever_dir, "-o", tmp_path / "ok")  # embeddings: allowed
    retriever = tensors(retriever_dir)
    retriever["layers.0.mlp.up_proj.weight"] = torch.cat([retriever["layers.0.mlp.up_proj.weight"]] * 2)
    odd = tmp_path / "odd"
    shutil.copytree(retriever_dir, odd)
    save_file(retriever, odd / "model.safetensors", metadata={"format": "pt"})
    for command in (["diff", base_dir, odd], ["merge", "--base", base_dir, "--retriever", odd]):
        result = run(*command, "-o", tmp_path / "out", ok=False)
        assert result.exit_code == 1 and "layers.0.mlp.up_proj.weight" in result.stderr, command
    result = run(
        "merge", "--base", base_dir, "--retriever", retriever_dir, "--beta", "0.5", "-o", tmp_path / "b", ok=False
    )
    assert result.exit_code == 1 and "embed_tokens.weight" in result.stderr and "128 of its 130 rows" in result.stderr


def test_nan_in_an_adapter_is_an_error_naming_the_tensor(models, tmp_path):
    adapter = tmp_path / "nan_adapter"
    shutil.copytree(models["dora"], adapter)
    state = tensors(adapter)
    key = next(k for k in state if "layers.1.mlp.up_proj.lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    args = ["--base", models["base"], "--retriever", models["retriever"], "--adapter", adapter]
    result = run("merge", *args, "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and "'layers.1.mlp.up_proj.weight'" in result.stderr and "NaN" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_in_a_retriever_is_an_error_in_diff_and_merge(models, tmp_path, dtype):
    retriever = tmp_path / "nan_retriever"
    shutil.copytree(models["retriever"], retriever)
    file = next(f for f in sorted(retriever.glob("*.safetensors")) if "norm.weight" in load_file(f))
    state = load_file(file)
    key = next(k for k in state if k == "norm.weight")
    state[key][3] = float("inf")
    save_file(state, file, metadata={"format": "pt"})
    result = run("diff", models["base"], retriever, "-o", tmp_path / "delta", "--dtype", dtype, ok=False)
    assert result.exit_code == 1 and "'norm.weight'" in result.stderr and "NaN or Inf" in result.stderr
    result = run("merge", "--base", models["base"], "--retriever", retriever, "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and "'norm.weight'" in result.stderr


@pytest.mark.parametrize("flags", [["--energy", "0.9"], ["--rank", "2"]])
def test_nan_before_an_svd_is_an_error_naming_the_tensor(models, tmp_path, flags):
    retriever = tmp_path / "nan_retriever"
    shutil.copytree(models["retriever"], retriever)
    key = "layers.0.self_attn.q_proj.weight"
    file = next(f for f in sorted(retriever.glob("*.safetensors")) if key in load_file(f))
    state = load_file(file)
    state[key][1, 2] = float("nan")
    save_file(state, file, metadata={"format": "pt"})
    result = run("diff", models["base"], retriever, "-o", tmp_path / "delta", *flags, ok=False)
    assert result.exit_code == 1 and f"{key!r}" in result.stderr and "NaN or Inf" in result.stderr


def test_overflow_to_inf_in_the_output_dtype_is_an_error(models, tmp_path):
    retriever = tmp_path / "big"
    shutil.copytree(models["retriever"], retriever)
    file = next(f for f in sorted(retriever.glob("*.safetensors")) if "norm.weight" in load_file(f))
    state = load_file(file)
    state["norm.weight"][0] = 1e6  # fine in fp32, Inf in fp16
    save_file(state, file, metadata={"format": "pt"})
    result = run("diff", models["base"], retriever, "-o", tmp_path / "delta", "--dtype", "float16", ok=False)
    assert result.exit_code == 1 and "'norm.weight'" in result.stderr and "overflows" in result.stderr


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lora_alpha": "sixteen"}, "lora_alpha for module"),
        ({"lora_alpha": float("nan")}, "not a finite number"),
        ({"r": 8}, "declares rank 8"),
        ({"rank_pattern": {"q_proj": 2}}, "declares rank 2"),
    ],
)
def test_adapter_config_non_numeric_or_rank_mismatch_is_a_clear_error(models, tmp_path, change, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(models["dora"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    args = ["--base", models["base"], "--retriever", models["retriever"], "--adapter", adapter]
    result = run("merge", *args, "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr
