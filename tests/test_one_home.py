"""Issue 23, one home per fact: each fact below is kept in one module, and a second copy is caught here.

Each test either checks the shared home's behaviour with real values, or scans the package for a second copy of
the fact (which would drift from the first).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import build_model, make_adapter, run, save, save_tokenizer

PACKAGE = Path(__file__).resolve().parents[1] / "reforge"


def _sources(exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Every module's source text under reforge/, by path relative to the package, minus ``exclude``."""
    return {
        str(path.relative_to(PACKAGE)): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(PACKAGE)) not in exclude
    }


# -- finite checks: reforge.io.tensors.all_finite -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_sees_nan_and_both_infinities_in_every_float_dtype(dtype):
    from reforge.io.tensors import all_finite, first_non_finite

    clean = torch.linspace(-3, 3, 1000, dtype=dtype).reshape(10, 100)
    assert all_finite(clean) and all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.tensor(2.0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = clean.clone()
        broken[7, 42] = bad
        assert not all_finite(broken)
        tensors = [("a.weight", clean), ("b.weight", broken), ("c.weight", broken)]
        assert first_non_finite(tensors) == "b.weight"  # the first one, by name
    assert first_non_finite([("a", clean), ("ids", torch.arange(5))]) is None  # integers are never non-finite
    assert all_finite(torch.nn.Parameter(clean))  # a parameter that requires grad


def test_all_finite_has_one_home():
    """No module but io/tensors.py tests finiteness with torch.isfinite or defines all_finite."""
    others = {
        name: text.count("torch.isfinite(")
        for name, text in _sources(exclude=("io/tensors.py",)).items()
        if "torch.isfinite(" in text
    }
    assert others == {}
    assert "def all_finite(" in (PACKAGE / "io" / "tensors.py").read_text()
    assert [n for n, t in _sources(exclude=("io/tensors.py",)).items() if re.search(r"def all_finite\(", t)] == []


# -- one adapter opening and one LoRA fold: reforge.io.adapter ----------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_eval_folds_an_adapter_bit_for_bit_as_merge_does(tmp_path, dora):
    """eval's in-memory merge of an adapter is merge's fold: every weight equals `reforge merge`'s base + 1 * Psi.

    Before issue 23 eval folded through peft's merge_and_unload (in the weights' dtype, peft's own order), a second
    LoRA fold that could drift from merge's fp32 one."""
    from safetensors.torch import load_file

    from reforge.eval.model import resolve_model

    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    save_tokenizer(base_dir)
    make_adapter(base, tmp_path / "adapter", dora=dora)
    options = ["--adapter", tmp_path / "adapter", "--alpha", "1", "--beta", "1"]
    run("merge", "--base", base_dir, "--retriever", base_dir, *options, "-o", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")  # base + 1 * Psi + 1 * (base - base)
    source = resolve_model(tmp_path / "adapter", base=str(base_dir))
    loaded = source.load(device="cpu", dtype=torch.float32).model
    original = dict(build_model("llama-causal").model.named_parameters())
    changed = 0
    for name, param in loaded.named_parameters():
        key = name if name in merged else f"model.{name}"
        assert torch.equal(param, merged[key]), name
        changed += not torch.equal(param, original[name])
    assert changed == 2 * 4  # q, v, up and down projections of both layers


def test_the_adapter_opening_has_one_home():
    """io.adapter alone defines the adapter opening and fold; ops imports them from there (no second path through
    ops.fold); nothing reads adapter weights on its own or folds with peft."""
    via_fold = [
        name
        for name, text in _sources().items()
        if re.search(r"from reforge\.ops\.fold import .*(open_adapter|LoraAdapter|Factors)", text)
    ]
    assert via_fold == []
    defined = [
        name
        for name, text in _sources(exclude=("io/adapter.py",)).items()
        if re.search(r"^(def open_adapter|class LoraAdapter|class Factors)\b", text, re.M)
    ]
    assert defined == []
    peft_merges = [name for name, text in _sources().items() if "merge_and_unload" in text]
    assert peft_merges == []


# -- checkpoint JSON read by its io reader ------------------------------------------------------------------------


def test_eval_reads_adapter_config_and_manifest_through_io(tmp_path):
    """eval.model has no exception left in the layer check: adapter_config.json through io.adapter_config, reforge.json
    through io.manifest; a damaged adapter_config.json is a one-line error naming the file, not a traceback."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("check_layers", PACKAGE.parent / "scripts" / "check_layers.py")
    layers_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers_check)

    from reforge.errors import CorruptCheckpointError
    from reforge.eval.model import resolve_model

    assert not [key for key in layers_check.IO_EXCEPTIONS if key[0] == "reforge.eval.model"]
    assert not [key for key in layers_check.SIDEWAYS if key[0] == "reforge.eval.model"]
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(CorruptCheckpointError, match=r"adapter_config.json is not a readable adapter config"):
        resolve_model(folder)


# -- reforge.json read only by io.manifest ------------------------------------------------------------------------


def test_reforge_json_is_parsed_only_by_io_manifest():
    """io.writer (resume of a partial folder) and io.target (is this output reforge's) read reforge.json through
    io.manifest.peek_record; no other io module parses a JSON text that names the manifest."""
    import ast

    parsers = []
    for name, text in _sources(exclude=("io/manifest.py",)).items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and name.startswith("io/"):
                body = ast.unparse(node)
                if "json.load" in body and ("manifest" in node.name.lower() or "MANIFEST" in body):
                    parsers.append(f"{name}:{node.name}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("json.loads", "json.load"):
                argument = ast.unparse(node.args[0]) if node.args else ""
                if "MANIFEST" in argument or "reforge.json" in argument:
                    parsers.append(f"{name}:{node.lineno}")
    assert parsers == []


def test_peek_record_treats_a_damaged_record_as_none(tmp_path):
    from reforge.io.manifest import MANIFEST, TRAINING_RECORD, peek_record
    from reforge.io.target import written_by_reforge

    assert peek_record(tmp_path) == {} and not written_by_reforge(tmp_path)
    for damaged in ("{not json", "[1, 2]", '"text"', "\xff\xfe"):
        (tmp_path / MANIFEST).write_text(damaged, encoding="latin-1")
        assert peek_record(tmp_path) == {} and not written_by_reforge(tmp_path)
    (tmp_path / MANIFEST).write_text('{"plan_id": "abc", "state": "partial"}')
    assert peek_record(tmp_path) == {"plan_id": "abc", "state": "partial"} and written_by_reforge(tmp_path)
    (tmp_path / MANIFEST).unlink()
    (tmp_path / TRAINING_RECORD).write_text('{"reforge_version": "1"}')
    assert peek_record(tmp_path) == {} and peek_record(tmp_path, TRAINING_RECORD) == {"reforge_version": "1"}
    assert written_by_reforge(tmp_path)


# -- one commit protocol: reforge.io.target.commit_staging ---------------------------------------------------------


def _fail_rename_into(monkeypatch, output: Path):
    """Make the rename of a whole staged folder onto ``output`` fail (EIO), as a crash there would leave it."""
    import errno
    import os

    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == output and Path(src).is_dir():
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_writer_commits_through_commit_staging_and_a_rerun_finishes(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from reforge.errors import OutputRefusedError
    from reforge.io.format import safetensors_dtype
    from reforge.io.writer import CheckpointWriter, TensorSpec

    tensors = {"a.weight": torch.arange(12.0).reshape(3, 4), "b.weight": torch.ones(2, 2)}
    specs = [TensorSpec(k, safetensors_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    out = tmp_path / "out"

    def write(plan_id):
        with CheckpointWriter(out, specs, plan_id=plan_id, overwrite=True) as writer:
            for name, value in tensors.items():
                writer.write(name, value * (2 if plan_id == "new" else 1))

    write("old")
    with monkeypatch.context() as patched:
        _fail_rename_into(patched, out)
        with pytest.raises(OutputRefusedError, match=r"writing .*out failed: Input/output error") as caught:
            write("new")
    assert ".out.reforge-partial: move that folder to" in caught.value.hint
    assert not out.exists() and (tmp_path / ".out.reforge-old" / "reforge.json").is_file()  # the old one, whole
    write("new")  # the rerun keeps the whole staged shards and commits
    assert torch.equal(load_file(out / "model.safetensors")["a.weight"], tensors["a.weight"] * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial, old or lock folder left


def test_train_commits_through_commit_staging_and_a_rerun_finishes(tmp_path, monkeypatch):
    """train's output is committed as the writer's is: the same old-output folder, the same error and hint."""
    from test_train import build_tokenizer, config, make_base

    from reforge.errors import OutputRefusedError
    from reforge.train import train_adapter

    base = make_base("llama-causal", tmp_path / "base", build_tokenizer())
    out = tmp_path / "runs" / "out"
    first = train_adapter(config(base, out, max_steps=1))
    before = (first.output / "adapter_model.safetensors").read_bytes()
    with monkeypatch.context() as patched:
        _fail_rename_into(patched, out)
        with pytest.raises(OutputRefusedError, match=r"writing .*out failed: Input/output error") as caught:
            train_adapter(config(base, out, max_steps=1, overwrite=True, seed=3))
    assert "The trained adapter is whole in" in caught.value.hint and ".out.reforge-train/final" in caught.value.hint
    old = tmp_path / "runs" / ".out.reforge-old"
    assert not out.exists() and (old / "adapter_model.safetensors").read_bytes() == before
    train_adapter(config(base, out, max_steps=1, overwrite=True, seed=3))
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out"]


def test_commit_staging_is_the_only_folder_commit():
    """No module renames a whole folder into place on its own (the writer's, train's, the recipe runner's and
    queries' did): everything outside io commits through io.target.commit_staging."""
    renames = {name: text.count("os.replace(") for name, text in _sources().items() if "os.replace(" in text}
    # target: the two renames of commit_staging; atomic: one file; writer: a shard file and a small file
    assert renames == {"io/target.py": 2, "io/atomic.py": 1, "io/writer.py": 2}
