"""reforge train under torchrun: 2 CPU processes (gloo) give the adapter of one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_train import SCIFACT, build_tokenizer, config, make_base

from reforge.train import train_adapter

# The runs differ only in fp32 rounding: one process multiplies a (4 rows x 64) batch at once, two processes each a
# (2 x 64) half and gloo sums their gradients, so sums are taken in another order (relative error ~1e-7). With
# lr 1e-3, Adam moves each adapter element by up to ~1e-3 a step; we allow 1e-5, 1% of one step's move, and measured
# about 5e-7 after 12 steps. Dropout is 0 because each rank draws its own masks.
ATOL = 1e-5


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    base = make_base("llama-causal", tmp_path / "llama", build_tokenizer())
    common = dict(max_docs=16, max_length=64, lr=1e-3, lora_dropout=0.0)
    single = train_adapter(config(base, tmp_path / "single", batch_size=4, **common))
    script = tmp_path / "reforge_main.py"
    script.write_text("from reforge.cli import main\nmain()\n")
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        "train",
        str(base),
        "--corpus",
        str(SCIFACT),
        "-o",
        str(tmp_path / "ddp"),
        "--max-docs",
        "16",
        "--max-length",
        "64",
        "-r",
        "4",
        "--lora-alpha",
        "8",
        "--lr",
        "1e-3",
        "--lora-dropout",
        "0",
        "--batch-size",
        "2",
        "--json",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # only rank 0 prints
    record = report["record"]
    assert record["world_size"] == 2 and record["global_batch"] == 4 and report["steps"] == single.steps == 4
    assert record["tokens"] == single.record["tokens"]
    assert report["final_loss"] == pytest.approx(single.final_loss, abs=1e-5)
    a = load_file(tmp_path / "single" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # lora_B starts at 0
    assert worst <= ATOL and moved > 100 * ATOL, (worst, moved)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    base = make_base("llama-causal", tmp_path / "llama", build_tokenizer())
    common = dict(max_docs=8, max_length=48, lr=1e-3, lora_dropout=0.0)
    whole = train_adapter(config(base, tmp_path / "whole", batch_size=4, **common))
    accumulated = train_adapter(config(base, tmp_path / "accum", batch_size=1, grad_accum=4, **common))
    assert whole.steps == accumulated.steps == 2 and whole.tokens == accumulated.tokens
    a, b = (load_file(r.output / "adapter_model.safetensors") for r in (whole, accumulated))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # lora_B starts at 0
    assert worst <= ATOL and moved > 100 * ATOL, (worst, moved)
