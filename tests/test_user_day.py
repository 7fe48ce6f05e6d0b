"""What a new user hits along the pipeline (issue 17): the corpus on the card, tune's split hint, grids, swapped
diff inputs."""

from __future__ import annotations

import copy
import json
import os

import pytest
from test_train import llama_base, tokenizer  # noqa: F401 - session fixtures: a tiny Llama with a SciFact BPE

from conftest import DATA, build_model, perturbed_bare, run, save
from reforge.errors import InvalidOptionError
from reforge.tune import parse_grid

SCIFACT = DATA / "scifact"


def test_the_training_corpus_reaches_the_manifest_and_the_card(llama_base, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    psi, retriever, out = tmp_path / "psi", tmp_path / "retriever", tmp_path / "merged"
    run(
        "train",
        llama_base,
        "--corpus",
        SCIFACT,
        "-o",
        psi,
        "--max-docs",
        4,
        "--max-length",
        32,
        "-r",
        2,
        "--max-steps",
        1,
        "-q",
    )
    save(perturbed_bare(copy.deepcopy(AutoModelForCausalLM.from_pretrained(llama_base))), retriever)
    AutoTokenizer.from_pretrained(llama_base).save_pretrained(retriever)
    run("merge", "--base", llama_base, "--retriever", retriever, "--adapter", psi, "-o", out, "-q")
    adapter = json.loads((out / "reforge.json").read_text())["adapters"][0]
    assert adapter["corpus"] == os.path.relpath(SCIFACT.resolve(), out)  # relative to the record's folder (issue 26)
    card = (out / "README.md").read_text()
    assert "Adapted to: `data/scifact`." in card and "trained on `data/scifact`" in card

    # the adapter folder has its own short card, so it pushes with no hand-written README
    adapter_card = (psi / "README.md").read_text()
    assert "library_name: peft" in adapter_card and "DoRA r 2, alpha 64 on q_proj" in adapter_card
    assert "trained by next-token prediction on `data/scifact` (4 documents" in adapter_card
    dry = run("push", psi, "me/psi", "--dry-run")
    assert "README.md" in dry.stdout and "no README.md" not in dry.stderr

    # --dry-run runs the verification a real push runs: a NaN that only `reforge verify` sees stops both
    run("push", out, "me/merged", "--dry-run")
    _poison_one_value(out / "model.safetensors")
    refused = run("push", out, "me/merged", "--dry-run", ok=False)
    assert refused.exit_code == 1 and "is not ready to push: finite: NaN/Inf in 1 tensor(s)" in refused.stderr
    run("push", out, "me/merged", "--dry-run", "--skip-verify")


def _poison_one_value(shard):
    """A NaN in the first float32 tensor's data; the header stays whole, so only verify can see it."""
    import struct

    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    tensor = next(v for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + length + tensor["data_offsets"][0]
    data[start : start + 4] = struct.pack("<f", float("nan"))
    shard.write_bytes(bytes(data))


def test_tune_points_at_a_split_it_accepts(tmp_path):
    # SciFact has train and test only; tune's default --split dev is missing and test is refused: the hint says train
    result = run(
        "tune",
        "--base",
        tmp_path / "unused",
        "--retriever",
        tmp_path / "unused",
        "--adapter",
        tmp_path / "unused",
        "-d",
        SCIFACT,
        "--no-plot",
        ok=False,
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Split 'dev' does not exist in ")
    assert "(it has: test, train). Pass --split train (held out from --test-split test)." in result.stderr
    assert "see docs/tune.md" in result.stderr and "--split test" not in result.stderr


def test_grid_items_may_not_be_empty_and_big_grids_need_yes(tmp_path):
    for text in ("0,,1", "0,1,", ",0"):
        with pytest.raises(InvalidOptionError, match="has an empty item"):
            parse_grid(text)
    assert parse_grid("0, 1") == (0.0, 1.0)
    common = ["tune", "--base", "b", "--retriever", "r", "--adapter", "a", "-d", SCIFACT, "--no-plot"]
    result = run(*common, "--alpha", "0,,1", ok=False)
    assert result.exit_code == 2 and "has an empty item" in result.stderr
    result = run(*common, "--alpha", "0:10:0.01", ok=False)  # 1,001 points; CliRunner's stdin is not a terminal
    assert result.exit_code == 2 and "The grid has 1,001 points" in result.stderr and "Pass --yes" in result.stderr
    result = run(*common, "--alpha", "0:10:0.01", "--yes", ok=False)  # past the question: the missing split
    assert result.exit_code == 1 and "Split 'dev' does not exist" in result.stderr


def test_diff_with_base_and_retriever_swapped_warns(tmp_path):
    base = build_model("llama-causal")
    base_dir, retriever_dir = save(base, tmp_path / "base"), save(perturbed_bare(copy.deepcopy(base)), tmp_path / "r")
    swapped = run("diff", retriever_dir, base_dir, "-o", tmp_path / "d1", "--dry-run")
    assert "the two look swapped" in swapped.stderr and "reforge diff BASE RETRIEVER" in swapped.stderr
    assert "--keep-lm-head" not in swapped.stderr
    right = run("diff", base_dir, retriever_dir, "-o", tmp_path / "d2", "--dry-run", "--json")
    assert "Warning" not in right.stderr and json.loads(right.stdout)["warnings"] == []


def test_plain_progress_lines_stages_throttle_and_eta():
    from reforge.cli.output import PlainProgress

    now, lines = [0.0], []
    progress = PlainProgress("Training", "items", [lines.append], every=30, clock=lambda: now[0])
    progress.update(0, None, "Reading the corpus")  # a short command prints nothing: the first line is due at 30 s
    now[0] = 50.0
    progress.update(0, None, "Reading the corpus")  # a long stage: a heartbeat
    now[0] = 55.0
    progress.update(0, None, "Loading the model")
    now[0] = 60.0
    progress.update(1, 10, "loss 3.000 | 500 tok/s")  # counting starts at 60 s
    now[0] = 85.0
    progress.update(2, 10, "loss 2.900 | 510 tok/s")  # due: 2 done in 25 s, 8 to go
    now[0] = 100.0
    progress.update(5, 10, "loss 2.500 | 520 tok/s")  # 15 s after the last line: quiet
    now[0] = 180.0
    progress.update(10, 10, "loss 2.000 | 530 tok/s")  # the end of a command that printed: always
    progress.finish()  # nothing new to say
    assert [line.split("] ", 1)[1] for line in lines] == [
        "Training: Reading the corpus | elapsed 50s",
        "Training: 2/10 (20%) | loss 2.900 | 510 tok/s | elapsed 1m25s | ETA 1m40s",
        "Training: 10/10 (100%) | loss 2.000 | 530 tok/s | elapsed 3m00s",
    ]
    quiet: list[str] = []
    short = PlainProgress("diff", "bytes", [quiet.append], every=30, clock=lambda: 0.0)
    short.update(0, 100)
    short.update(100, 100)
    short.finish()
    assert quiet == []


def test_train_without_a_terminal_prints_stages_and_steps_keeps_a_log_and_reports_to_tensorboard(
    llama_base,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("REFORGE_PROGRESS_EVERY", "0")
    log, runs = tmp_path / "train.log", tmp_path / "runs"
    result = run(
        "train",
        llama_base,
        "--corpus",
        SCIFACT,
        "-o",
        tmp_path / "psi",
        "--max-docs",
        6,
        "--max-length",
        32,
        "--batch-size",
        1,
        "-r",
        2,
        "--max-steps",
        3,
        "--log-file",
        log,
        "--report-to",
        "tensorboard",
        "--logging-dir",
        runs,
    )
    lines = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split(" | ")[0] for line in lines[:4]] == [
        "Training: Reading the corpus",
        "Training: Counting the tokens of 6 documents",
        "Training: Loading llama and adding the adapter",
        "Training: Starting step 1 of 3",
    ]
    assert [line.split(" | ")[0] for line in lines[4:]] == [
        "Training: 1/3 (33%)",
        "Training: 2/3 (67%)",
        "Training: 3/3 (100%)",
    ]
    assert all(" tok/s | elapsed " in line for line in lines[4:])  # tokens per second from the first step
    assert [line.split("] ", 1)[1] for line in log.read_text().splitlines()] == lines
    history = json.loads((tmp_path / "psi" / "training_record.json").read_text())["loss"]["history"]
    (run_dir,) = runs.iterdir()
    assert run_dir.name.startswith("psi-")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")]
    assert logged == [(step, round(loss, 4)) for step, loss in history]
    assert len(events.Scalars("train/tokens_per_s")) == 3
