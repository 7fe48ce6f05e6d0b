"""RE-Adapt of instruction-tuned chat models (issue 14) and a chat model given as a retriever (issue 12 case 3)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import build_model, make_adapter, run, save, save_tokenizer


def _instruct(base, seed=11, scale=0.02):
    """A stand-in for an instruction-tuned model: every weight of the CausalLM nudged, lm_head included."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return tuned


def _reference(base, instruct, adapter_model, alpha, beta):
    """base + alpha * Psi + beta * (instruct - base), computed in memory with peft's own merge for Psi."""
    merged_base = copy.deepcopy(adapter_model).merge_and_unload().state_dict()
    base_state, instruct_state = base.state_dict(), instruct.state_dict()
    reference = copy.deepcopy(instruct)
    state = {
        k: base_state[k] + alpha * (merged_base[k] - base_state[k]) + beta * (instruct_state[k] - base_state[k])
        for k in instruct_state
    }
    reference.load_state_dict(state)
    return reference.eval()


@pytest.fixture(scope="module", params=["untied", "tied"])
def chat(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"chat-{request.param}")
    base = build_model("llama-causal", tie_word_embeddings=request.param == "tied")
    instruct = _instruct(base)
    base_dir, instruct_dir = save(base, root / "base"), save(instruct, root / "instruct")
    for folder in (base_dir, instruct_dir):
        save_tokenizer(folder)
    adapter = make_adapter(base, root / "psi", dora=True)
    return {
        "root": root,
        "base": base,
        "instruct": instruct,
        "adapter": adapter,
        "tied": request.param == "tied",
        "base_dir": base_dir,
        "instruct_dir": instruct_dir,
    }


@pytest.mark.parametrize("path", ["retriever", "delta"])
def test_readapted_chat_model_loads_as_causal_lm_and_matches_reference(chat, tmp_path, path):
    from transformers import AutoModelForCausalLM

    root = chat["root"]
    if path == "delta":
        delta = tmp_path / "delta"
        run("diff", chat["base_dir"], chat["instruct_dir"], "-o", delta, "--keep-lm-head", "--dtype", "float32")
        manifest = json.loads((delta / "reforge.json").read_text())
        assert manifest["keep_lm_head"] is True
        assert ("lm_head.weight" in manifest["shapes"]) == (not chat["tied"])
        source = ["--delta", delta]
    else:
        source = ["--retriever", chat["instruct_dir"]]
    out = tmp_path / "out"
    run(
        "merge",
        "--base",
        chat["base_dir"],
        *source,
        "--adapter",
        root / "psi",
        "--alpha",
        "0.5",
        "--beta",
        "0.8",
        "--keep-lm-head",
        "-o",
        out,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = _reference(chat["base"], chat["instruct"], chat["adapter"], 0.5, 0.8)
    ids = torch.tensor([[5, 9, 17, 33, 2, 70]])
    with torch.no_grad():
        got, expected = model.eval()(ids).logits, reference(ids).logits
    assert (got - expected).abs().max() < 1e-5
    if chat["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 10)
    card = (out / "README.md").read_text()
    assert "# Readapted chat model (RE-Adapt)" in card and "pipeline_tag: text-generation" in card
    assert not (out / "reforge_encoding.json").exists()
    report = json.loads(run("verify", out, "--json", "--full").stdout)
    assert report["ok"] and {c["name"] for c in report["checks"] if c["ok"]} >= {"layout", "recompute"}


def test_chat_model_as_retriever_is_refused_naming_the_option(chat, tmp_path):
    if chat["tied"]:
        pytest.skip("a tied causal LM stores no lm_head: it is indistinguishable from a retriever saved as a CausalLM")
    for args in (
        ("merge", "--base", chat["base_dir"], "--retriever", chat["instruct_dir"], "-o", tmp_path / "m"),
        ("diff", chat["base_dir"], chat["instruct_dir"], "-o", tmp_path / "d"),
    ):
        result = run(*args, ok=False)
        assert result.exit_code == 1
        assert "is a causal LM with an lm_head (LlamaForCausalLM)" in result.stderr
        assert "pass --keep-lm-head to diff and merge" in result.stderr
        assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()


def test_keep_lm_head_must_match_the_delta(chat, tmp_path):
    delta = tmp_path / "delta"
    run("diff", chat["base_dir"], chat["instruct_dir"], "-o", delta, "--keep-lm-head")
    result = run("merge", "--base", chat["base_dir"], "--delta", delta, "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1
    assert "was made with --keep-lm-head" in result.stderr
