"""bench/bench_gpu.py --smoke: the GPU benchmark's code path on CPU at tiny sizes (CI keeps it working), and the
FLOP counts its MFU figures rest on, checked against real models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_gpu  # noqa: E402


@pytest.mark.parametrize("shared", [True, False], ids=["shared-scifact", "committed-lengths"])
def test_smoke_runs_every_measurement(shared, tmp_path, monkeypatch):
    """With ../shared/data/scifact, and without it (a GPU machine gets only the repository): then the committed
    bench/scifact_chars.json gives the same lengths."""
    from conftest import DATA

    if shared and not (DATA / "scifact" / "corpus.jsonl").is_file():
        pytest.skip(f"{DATA / 'scifact'} is absent (the committed-lengths case still runs)")
    if not shared:
        monkeypatch.setattr(bench_gpu, "SCIFACT_CANDIDATES", (tmp_path / "nowhere",))
    out = tmp_path / "smoke.json"
    rows = bench_gpu.main(["--smoke", "--json", str(out), "--tmp", str(tmp_path)])
    names = [row["name"] for row in rows]
    assert names == [
        "reforge train (packed rows, split attention)",
        "reforge train (paper batching, split attention)",
        "reforge train (paper batching, padded attention)",
        "HF Trainer + peft DoRA (padded batches, sdpa)",
        "reforge eval encode",
        "sentence-transformers encode",
    ]
    for row in rows:
        assert row["tokens"] > 0 and row["seconds"] > 0 and row["mfu"] is None and row["peak_gib"] is None
    split, padded, hf = rows[1], rows[2], rows[3]
    assert split["documents"] == padded["documents"] == hf["documents"] == 2 * 4  # 2 timed steps of batch 4
    assert split["tokens"] == padded["tokens"]  # the same documents, whichever attention
    assert rows[4]["tokens"] == rows[5]["tokens"] and rows[4]["max_diff_vs_st"] < 1e-5  # the same vectors
    saved = json.loads(out.read_text())
    assert saved["meta"]["shapes"]["smoke"]["hidden"] == 64 and len(saved["rows"]) == 6


def test_committed_lengths_are_scifacts(tmp_path, monkeypatch):
    from conftest import DATA

    corpus = DATA / "scifact" / "corpus.jsonl"
    if not corpus.is_file():
        pytest.skip(f"{corpus} is absent")
    monkeypatch.setattr(bench_gpu, "SCIFACT_CANDIDATES", (tmp_path / "nowhere",))
    committed = bench_gpu.scifact_lengths(1024, None)
    assert bench_gpu.scifact_lengths(1024, corpus) == committed and len(committed) == 5183


@pytest.mark.parametrize("name", ["1b", "7b-cut", "smoke"])
def test_flop_counts_match_the_models(name):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    shape = bench_gpu.SHAPES[name]
    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shape.matmul_weights() == linear  # the LM head counts even when tied
    assert shape.matmul_weights(lm_head=False) == linear - shape.hidden * shape.vocab
    if name == "smoke":
        peft = get_peft_model(model, LoraConfig(r=32, target_modules=bench_gpu.PAPER["target_modules"]))
        adapters = sum(p.numel() for n, p in peft.named_parameters() if "lora_A" in n or "lora_B" in n)
        assert shape.adapter_weights(32) == adapters
    # one 3-token document: 4N + 6A per token, plus 3 x (4 x layers x width x 3 x 4 / 2) for attention
    width = shape.heads * shape.head_dim
    assert (
        shape.train_flops([3], 32)
        == 3 * (4 * linear + 6 * shape.adapter_weights(32)) + 3 * 4 * shape.layers * width * 6
    )
    assert shape.attention_forward(1024) == 4 * shape.layers * width * 1024 * 1025 // 2
