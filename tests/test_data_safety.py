"""Data safety: reforge never deletes an input or a file it did not write, one lock covers every writer (train
included), and a bad output fails before the work, not after it. Each test here failed on main at be54a18
(issue 13)."""

from __future__ import annotations

import copy
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from test_train import build_tokenizer, make_base

from conftest import DATA, make_adapter, perturbed_bare, run, save, save_tokenizer
from reforge.errors import DiskFullError, OutputLockedError, OutputRefusedError
from reforge.io.target import check_output
from reforge.io.writer import CheckpointWriter, TensorSpec
from reforge.train import TrainConfig, train_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

SCIFACT = DATA / "scifact"


def failed(result, pattern: str, codes=(1,)) -> None:
    text = " ".join(result.stderr.split())
    assert result.exit_code in codes and re.search(pattern, text) and "Traceback" not in result.output, (pattern, text)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder holding a base CausalLM (with tokenizer), a retriever, a DoRA adapter and the user's notes."""
    root = tmp_path_factory.mktemp("safety") / "work"
    base_dir = make_base("llama-causal", root / "base", build_tokenizer())
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    save(perturbed_bare(copy.deepcopy(base)), root / "retriever", shard_size="200KB")
    save_tokenizer(root / "retriever", vocab_size=base.config.vocab_size)
    make_adapter(base, root / "psi", dora=True)
    (root / "notes.txt").write_text("my notes")
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def merge_args(root: Path, output, *extra):
    return [
        "merge",
        "--base",
        root / "base",
        "--retriever",
        root / "retriever",
        "--adapter",
        root / "psi",
        "-o",
        output,
        "-q",
        *extra,
    ]


def train_config(base, output, **options) -> TrainConfig:
    values = dict(corpus=[str(SCIFACT)], max_docs=4, max_length=32, r=2, lora_alpha=4, batch_size=2, max_steps=2)
    values.update(options)
    return TrainConfig(base=str(base), output=str(output), **values)


# ---- the overwrite rule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_merge_into_the_folder_holding_its_inputs_deletes_nothing(inputs, overwrite):
    before = snapshot(inputs)
    failed(run(*merge_args(inputs, inputs, *overwrite), ok=False), "contains")
    assert snapshot(inputs) == before


def test_train_onto_its_own_base_deletes_nothing(inputs):
    before = snapshot(inputs / "base")
    result = run(
        "train",
        inputs / "base",
        "--corpus",
        SCIFACT,
        "--max-docs",
        2,
        "--max-length",
        32,
        "-o",
        inputs / "base",
        "--overwrite",
        ok=False,
    )
    failed(result, r"base is \S*base, an input of this command")
    assert snapshot(inputs / "base") == before


def test_outputs_inside_or_equal_to_an_input_are_refused_even_when_reforge_wrote_them(inputs, tmp_path):
    failed(run(*merge_args(inputs, inputs / "psi" / "merged"), ok=False), "lies inside")
    first = tmp_path / "merged"
    run(*merge_args(inputs, first))
    before = snapshot(first)
    result = run(
        "merge",
        "--base",
        inputs / "base",
        "--retriever",
        first,
        "--adapter",
        inputs / "psi",
        "--alpha",
        "0.25",
        "-o",
        first,
        "--overwrite",
        ok=False,
    )
    failed(result, r"merged is \S*merged, an input of this command")
    assert snapshot(first) == before


def test_only_what_reforge_wrote_is_replaced(inputs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for flags in ([], ["--overwrite"]):
        failed(run(*merge_args(inputs, mine, *flags), ok=False), "holds files reforge did not write")
    assert (mine / "thesis.tex").read_text() == "years of work"
    (mine / "thesis.tex").unlink()
    run(*merge_args(inputs, mine))
    failed(run(*merge_args(inputs, mine, "--alpha", "0.3"), ok=False), "--overwrite")
    run(*merge_args(inputs, mine, "--alpha", "0.3", "--overwrite"))  # reforge's own output: replaced


# ---- one lock ---------------------------------------------------------------------------------------------------
def test_train_holds_the_lock_merge_and_a_second_train_are_refused(inputs, tmp_path):
    out = tmp_path / "psi"
    seen: list[str] = []

    def meanwhile(step, total, stats):  # runs inside the training, while it holds the output
        if step == 1:
            seen.append(run(*merge_args(inputs, out), ok=False).stderr)
            with pytest.raises(OutputLockedError, match=r"another reforge run is writing \S*psi right now"):
                train_adapter(train_config(inputs / "base", out))

    result = train_adapter(train_config(inputs / "base", out), progress=meanwhile)
    assert result.steps == 2 and (out / "adapter_model.safetensors").is_file()
    assert seen and "another reforge run is writing" in " ".join(seen[0].split())
    assert not (out.parent / ".psi.reforge-lock").exists()  # released


def test_a_merge_in_progress_refuses_a_train(inputs, tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out, [TensorSpec("x", "F32", (2,))], plan_id="p") as writer:
        with pytest.raises(OutputLockedError):
            train_adapter(train_config(inputs / "base", out))
        writer.write("x", torch.zeros(2))
    assert (out / "model.safetensors").is_file()


# ---- bad outputs fail before the work ---------------------------------------------------------------------------
def _read_only_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        probe.mkdir()  # root ignores permissions: use a place the kernel refuses to anyone
        probe.rmdir()
    except OSError:
        return folder
    for candidate in (Path("/sys/fs"), Path("/proc/sys")):
        try:
            (candidate / "reforge-probe").mkdir()
        except OSError:
            return candidate
    pytest.skip("no read-only folder here")


def test_bad_outputs_are_refused_before_any_work(inputs, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    empty = tmp_path / "empty"
    empty.mkdir()
    read_only = _read_only_dir(tmp_path)
    cases = [
        (tmp_path / "a-file" / "sub", "a-file is a file"),
        (tmp_path / "a-file", "is a file"),
        (tmp_path / "link", "is a symbolic link"),
        (read_only / "out", "cannot be written"),
        (".", "names the current folder"),
        ("..", "names the current folder"),
    ]
    monkeypatch.chdir(empty)
    for output, message in cases:
        failed(run(*merge_args(inputs, output), ok=False), message, codes=(1, 2))  # 2: click's own path check
        with pytest.raises(OutputRefusedError, match=message):
            train_adapter(train_config(inputs / "base", output))
    assert list(empty.iterdir()) == [] and list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "elsewhere", "empty", "link", "read-only"]


def test_a_mount_point_is_refused():
    mounts = [Path(line.split()[1]) for line in Path("/proc/mounts").read_text().splitlines()]
    usable = [m for m in mounts if m.is_dir() and os.access(m, os.W_OK) and m != Path("/") and m.name]
    if not usable:
        pytest.skip("no writable mount point here")
    with pytest.raises(OutputRefusedError, match="is a mount point"):
        check_output(usable[0])


def test_tune_write_onto_a_foreign_folder_fails_before_tuning(inputs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    result = run(
        "tune",
        "--base",
        inputs / "base",
        "--retriever",
        inputs / "retriever",
        "--adapter",
        inputs / "psi",
        "-d",
        tmp_path / "no-such-data",
        "--no-plot",
        "--write",
        mine,
        ok=False,
    )
    failed(result, r"--write \S*mine holds files reforge did not write")  # the output is checked first


def test_free_space_refusal_leaves_no_partial_folder(tmp_path):
    huge = [TensorSpec("x", "F32", (10**15,))]  # 4 PB
    with pytest.raises(DiskFullError, match="are free"):
        CheckpointWriter(tmp_path / "out", huge, plan_id="p").__enter__()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_mistyped_local_path_is_not_reported_as_a_hub_repo(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(inputs.parent)
    result = run(
        "merge",
        "--base",
        "work/base",
        "--retriever",
        "work/retriver",
        "--adapter",
        "work/psi",
        "-o",
        tmp_path / "out",
        ok=False,
    )
    failed(
        result,
        r"work/retriver is not a folder here: work/ has no 'retriver' \(it holds base/, psi/, "
        r"retriever/\)",
    )
    assert not (tmp_path / "out").exists()


# ---- a full disk late in the work keeps the results ------------------------------------------------------------
FULL_DISK = """
import resource, signal, sys, json
from click.testing import CliRunner
from reforge.cli import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (BYTES, BYTES))
result = CliRunner().invoke(cli, json.loads(sys.argv[1]))
print(json.dumps({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                  "exception": repr(result.exception)}))
"""


def full_disk_run(args: list, limit: int) -> dict:
    import json
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK.replace("BYTES", str(limit)), json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_full_disk_in_eval_output_keeps_the_table(tmp_path):
    from test_eval import llama_folder, toy_dataset

    model, data = llama_folder(tmp_path / "llama"), toy_dataset(tmp_path / "toy")
    args = ["eval", model, "--data", data, "--profile", "repllama", "--no-cache", "-o", tmp_path / "results"]
    # --no-cache streams vectors through temporary shards (a few hundred bytes here), then the results (a few KB)
    result = full_disk_run(args, limit=2000)
    assert result["code"] == 1, result
    assert "nDCG@10" in result["stdout"] and "llama" in result["stdout"]  # the results were shown first
    assert "the disk filled up while writing" in result["stderr"] and "The results above are complete" in " ".join(
        result["stderr"].split()
    ), result["stderr"]
    # full before the first temporary shard: one line naming the file, no traceback, no table
    early = full_disk_run(args, limit=200)
    assert early["code"] == 1 and early["stdout"] == "", early
    assert early["stderr"].startswith("Error: The disk filled up while writing") and "Traceback" not in early["stderr"]


def test_a_full_disk_when_train_saves_is_a_clear_error(inputs, tmp_path):
    out = tmp_path / "psi"
    result = full_disk_run(
        [
            "train",
            inputs / "base",
            "--corpus",
            SCIFACT,
            "--max-docs",
            4,
            "--max-length",
            32,
            "-r",
            2,
            "--lora-alpha",
            4,
            "--batch-size",
            2,
            "--max-steps",
            2,
            "-o",
            out,
        ],
        limit=4096,
    )
    text = " ".join(result["stderr"].split())
    assert result["code"] == 1 and "Traceback" not in result["stdout"], result
    assert "the disk filled up while writing" in text and "nothing could be saved" in text, result
    assert not out.exists()
