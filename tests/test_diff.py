"""reforge diff: exact deltas across layouts, dtypes and bad inputs."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model, perturbed_bare, run, save
from reforge.io.checkpoint import open_checkpoint
from reforge.ops.delta import DeltaCheckpoint


def _all_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_diff_bf16_fp32_delta_reconstructs_retriever_bit_exactly(llama_pair, tmp_path):
    base_dir, retriever_dir = llama_pair
    out = tmp_path / "delta"
    result = run("diff", base_dir, retriever_dir, "-o", out, "--dtype", "float32", "--json")
    report = json.loads(result.stdout)
    assert report["dtype"] == "F32" and report["max_abs_rounding"] == 0.0
    base, retriever, delta = _all_tensors(base_dir), _all_tensors(retriever_dir), _all_tensors(out)
    assert set(delta) == set(retriever)  # bare layout, no lm_head
    assert "lm_head.weight" in base and "lm_head.weight" not in delta
    for key, value in retriever.items():
        rebuilt = (base["model." + key].float() + delta[key]).to(torch.bfloat16)
        assert torch.equal(rebuilt, value), key


def test_diff_auto_dtype_records_measured_rounding(llama_pair, tmp_path):
    base_dir, retriever_dir = llama_pair
    out = tmp_path / "delta"
    run("diff", base_dir, retriever_dir, "-o", out)
    manifest = json.loads((out / "reforge.json").read_text())
    assert manifest["kind"] == "delta" and manifest["dtype"] == "BF16"
    base, retriever, delta = _all_tensors(base_dir), _all_tensors(retriever_dir), _all_tensors(out)
    worst = 0.0
    for key in retriever:
        exact = retriever[key].float() - base["model." + key].float()
        error = float((delta[key].float() - exact).abs().max())
        assert error == pytest.approx(manifest["records"][key]["max_abs_rounding"], abs=0)
        worst = max(worst, error)
    assert 0 < worst == manifest["max_abs_rounding"]
    assert manifest["base"]["fingerprint"] and manifest["retriever"]["fingerprint"]


def test_diff_of_model_with_itself_is_zero(llama_pair, tmp_path):
    base_dir, _ = llama_pair
    out = tmp_path / "delta"
    run("diff", base_dir, base_dir, "-o", out)
    delta = _all_tensors(out)
    assert delta and all(not value.any() for value in delta.values())
    assert "lm_head.weight" not in delta and "embed_tokens.weight" in delta


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_diff_other_decoder_families(family, tmp_path):
    import copy

    base = build_model(f"{family}-causal")
    base_dir = save(base, tmp_path / "base")
    retriever_dir = save(perturbed_bare(copy.deepcopy(base)), tmp_path / "retriever")
    out = tmp_path / "delta"
    run("diff", base_dir, retriever_dir, "-o", out, "--max-shard-size", "30KB")
    delta, base_t, retr = _all_tensors(out), _all_tensors(base_dir), _all_tensors(retriever_dir)
    assert set(delta) == set(retr)
    key = next(k for k in retr if "q_proj.weight" in k)
    assert torch.equal(delta[key], retr[key] - base_t["model." + key])
    assert (out / "model.safetensors.index.json").is_file()


def test_diff_tied_embeddings_keeps_embed_tokens(tmp_path):
    import copy

    base = build_model("llama-causal", tie_word_embeddings=True)
    base_dir = save(base, tmp_path / "base")
    assert "lm_head.weight" not in load_file(base_dir / "model.safetensors")
    retriever_dir = save(perturbed_bare(copy.deepcopy(base)), tmp_path / "retriever")
    out = tmp_path / "delta"
    run("diff", base_dir, retriever_dir, "-o", out)
    assert "embed_tokens.weight" in _all_tensors(out)


def test_diff_bert_mlm_base_against_bert_retriever(tmp_path):
    """BertForMaskedLM has no pooler; a BertModel retriever does: refused unless --allow-missing."""
    base = build_model("bert-mlm")
    base_dir = save(base, tmp_path / "base")
    retriever = build_model("bert-bare", seed=3)
    retriever_dir = save(retriever, tmp_path / "retriever")
    result = run("diff", base_dir, retriever_dir, "-o", tmp_path / "d1", ok=False)
    assert result.exit_code == 1 and "pooler" in result.stderr and "--allow-missing" in result.stderr
    run("diff", base_dir, retriever_dir, "-o", tmp_path / "d2", "--allow-missing", "--dtype", "float32")
    delta, base_t, retr = _all_tensors(tmp_path / "d2"), _all_tensors(base_dir), _all_tensors(retriever_dir)
    assert torch.equal(delta["pooler.dense.weight"], retr["pooler.dense.weight"])
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(delta[key], retr[key] - base_t["bert." + key])
    manifest = json.loads((tmp_path / "d2" / "reforge.json").read_text())
    assert "pooler.dense.weight" in manifest["retriever_only"]


def test_diff_grown_vocabulary_stores_extra_rows(tmp_path):
    import copy

    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    retriever = perturbed_bare(copy.deepcopy(base))
    retriever.resize_token_embeddings(130)
    retriever.config.vocab_size = 130
    retriever_dir = save(retriever, tmp_path / "retriever")
    out = tmp_path / "delta"
    result = run("diff", base_dir, retriever_dir, "-o", out, "--json")
    assert json.loads(result.stdout)["extra_vocab_rows"] == {"embed_tokens.weight": 2}
    delta, base_t, retr = _all_tensors(out), _all_tensors(base_dir), _all_tensors(retriever_dir)
    emb = delta["embed_tokens.weight"]
    assert emb.shape == (130, 32)
    assert torch.equal(emb[128:], retr["embed_tokens.weight"][128:])
    assert torch.equal(emb[:128], retr["embed_tokens.weight"][:128] - base_t["model.embed_tokens.weight"])


def test_output_files_are_world_readable(llama_pair, tmp_path):
    base_dir, retriever_dir = llama_pair
    old = os.umask(0o022)
    try:
        run("diff", base_dir, retriever_dir, "-o", tmp_path / "delta", "--max-shard-size", "20KB")
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "delta").rglob("*") if f.is_file()]
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    assert stat.S_IMODE((tmp_path / "delta").stat().st_mode) == 0o755
    assert (tmp_path / "delta" / "retriever" / "config.json").is_file()


def test_delta_checkpoint_reader_matches_files(llama_pair, tmp_path):
    base_dir, retriever_dir = llama_pair
    out = tmp_path / "delta"
    run("diff", base_dir, retriever_dir, "-o", out)
    delta = DeltaCheckpoint.open(out)
    with open_checkpoint(out).reader() as reader:
        key = "layers.1.mlp.down_proj.weight"
        assert torch.equal(delta.get(reader, key), _all_tensors(out)[key].float())
