"""`reforge train` interrupted with Ctrl-C (SIGINT) in a real process, then resumed from the command line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_train import SCIFACT, build_tokenizer, make_base

from reforge.cli import cli
from reforge.train.state import work_dir

ROOT = Path(__file__).resolve().parents[1]


def _options(base, out):
    # 60 documents cut to 24 tokens, one row per step: 60 steps, a checkpoint every 3; dropout on, so the resumed run
    # must restore the RNG as well as the optimizer. --exclude-judged is a multiple=True option (a tuple in the CLI).
    return [
        str(base),
        "--corpus",
        str(SCIFACT),
        "-o",
        str(out),
        "--max-docs",
        "60",
        "--max-length",
        "24",
        "--batch-size",
        "1",
        "-r",
        "4",
        "--lora-alpha",
        "8",
        "--target-modules",
        "q_proj,v_proj",
        "--exclude-judged",
        str(SCIFACT / "qrels" / "test.tsv"),
        "--save-every",
        "3",
    ]


def _interrupt_after_a_checkpoint(options, out) -> subprocess.CompletedProcess:
    checkpoints = work_dir(out) / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    # SIGINT back to its default: a shell's background job (nohup, `&`) would otherwise pass it on ignored
    process = subprocess.Popen(
        [sys.executable, "-m", "reforge", "train", *options],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob("step-*[0-9]")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_ctrl_c_then_resume_from_the_cli_gives_the_uninterrupted_adapter(tmp_path):
    base = make_base("llama-causal", tmp_path / "base", build_tokenizer())
    out = tmp_path / "psi"
    stopped = _interrupt_after_a_checkpoint(_options(base, out), out)
    assert stopped.returncode == 130, stopped.stderr
    assert "Rerun the same command with --resume" in stopped.stderr
    assert not out.exists()

    runner = CliRunner()
    again = runner.invoke(cli, ["train", *_options(base, out)])
    assert again.exit_code == 1 and "Pass --resume to continue it" in again.stderr
    resumed = runner.invoke(cli, ["train", *_options(base, out), "--resume", "--json"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed_from"] >= 3 and report["resumed_from"] % 3 == 0 and report["steps"] == 60

    whole = runner.invoke(cli, ["train", *_options(base, tmp_path / "whole"), "--json"], catch_exceptions=False)
    assert whole.exit_code == 0, whole.stderr
    # "equals" is bit for bit: same steps, same data order, restored optimizer, schedule and dropout RNG
    a, b = (load_file(folder / "adapter_model.safetensors") for folder in (out, tmp_path / "whole"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # and so is the file: two processes, so safetensors' metadata (a Rust HashMap) came out in two orders
    digests = {
        hashlib.sha256((f / "adapter_model.safetensors").read_bytes()).hexdigest() for f in (out, tmp_path / "whole")
    }
    assert len(digests) == 1
    assert report["record"]["loss"]["history"] == json.loads(whole.stdout)["record"]["loss"]["history"]
