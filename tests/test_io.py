"""Checkpoint reading and writing: round trips, bad inputs, atomicity, resume and locking."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_model, save
from reforge.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiskFullError,
    OutputExistsError,
    OutputLockedError,
    PickleRefusedError,
    ShardNotFoundError,
    UnsafePathError,
)
from reforge.io.checkpoint import open_checkpoint
from reforge.io.index import ShardIndex
from reforge.io.keymap import detect_layout
from reforge.io.reader import ShardReader
from reforge.io.writer import CheckpointWriter, ShardPlan, TensorSpec


def _specs(tensors):
    from reforge.io.format import safetensors_dtype

    return [TensorSpec(k, safetensors_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()]


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(8, generator=g),
        "c.weight": torch.randn(4, 4, generator=g).half(),
        "d.step": torch.tensor(3, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
    }


def test_read_write_round_trip_is_bit_exact_and_readable_by_safetensors(tmp_path, tensors):
    out = tmp_path / "out"
    with CheckpointWriter(out, _specs(tensors), plan_id="p", max_shard_size=200) as writer:
        for name in reversed(list(tensors)):  # any order: offsets are planned
            writer.write(name, tensors[name])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(set(index["weight_map"].values())) == len(list(out.glob("model-*-of-*.safetensors"))) > 1
    loaded = {}
    for file in out.glob("*.safetensors"):
        loaded.update(load_file(file))  # the reference implementation reads our files
    with ShardReader(ShardIndex.from_dir(out)) as reader:
        for name, value in tensors.items():
            assert torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype
            assert torch.equal(reader.get(name), value)
    assert not list(tmp_path.glob(".out.*")), "no partial folder or lock left behind"


def test_shard_plan_caps_bytes_and_names_like_transformers():
    specs = [TensorSpec(f"t{i}", "F32", (10,)) for i in range(5)]  # 40 bytes each
    plan = ShardPlan.build(specs, max_shard_size=100)
    assert [len(s) for s in plan.shards] == [2, 2, 1]
    assert plan.filenames[0] == "model-00001-of-00003.safetensors"
    assert ShardPlan.build(specs, 10**9).filenames == ("model.safetensors",)
    big = ShardPlan.build([TensorSpec("huge", "F32", (100,))] + specs[:1], max_shard_size=100)
    assert [len(s) for s in big.shards] == [1, 1]


def _safetensors_file(path, tensors):
    save_file(tensors, str(path))
    return path


def test_truncated_file_is_reported_with_name_and_tensor(tmp_path, tensors):
    folder = tmp_path / "m"
    folder.mkdir()
    file = _safetensors_file(folder / "model.safetensors", {"x": torch.zeros(100)})
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors, tensor 'x': data ends at byte"):
        ShardIndex.from_dir(folder)


def test_bad_header_length_is_reported(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length 1000000 runs past the end"):
        ShardIndex.from_dir(folder)


def test_offsets_inconsistent_with_shape_are_reported(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'x': data_offsets \[0, 8\] do not hold"):
        ShardIndex.from_dir(folder)


def test_missing_shard_named_by_index(tmp_path):
    folder = save(build_model("llama-bare"), tmp_path / "m", shard_size="20KB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ShardNotFoundError, match=f"{victim.name} is named by .*index.json but missing"):
        open_checkpoint(folder)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_paths_may_not_escape_the_folder(tmp_path, entry):
    folder = tmp_path / "m"
    folder.mkdir()
    _safetensors_file(tmp_path / "outside.safetensors", {"x": torch.zeros(2)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"x": entry}}))
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        ShardIndex.from_dir(folder)


def test_pickle_refused_unless_allowed_then_loaded_weights_only(tmp_path):
    folder = tmp_path / "m"
    model = build_model("llama-bare")
    model.save_pretrained(folder, safe_serialization=False)
    if not (folder / "pytorch_model.bin").exists():  # transformers 5 always writes safetensors
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin is a pickle checkpoint.*--allow-pickle"):
        open_checkpoint(folder)
    checkpoint = open_checkpoint(folder, allow_pickle=True)
    with checkpoint.reader() as reader:
        key = "layers.0.mlp.up_proj.weight"
        assert torch.equal(reader.get(key), model.state_dict()[key])


def test_malicious_pickle_is_refused_even_when_allowed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "m"
    folder.mkdir()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"x": Evil()}, handle)
    with pytest.raises(CorruptCheckpointError, match="weights-only pickle"):
        with open_checkpoint(folder, allow_pickle=True).reader() as reader:
            reader.keys()
    assert not (tmp_path / "pwned").exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="holds no model.safetensors"):
        ShardIndex.from_dir(tmp_path)


def test_layout_detection():
    assert detect_layout(["model.layers.0.w", "model.norm.weight", "lm_head.weight"]).prefix == "model."
    bare = detect_layout(["layers.0.w", "norm.weight", "embed_tokens.weight"])
    assert bare.prefix == "" and bare.is_bare
    peft = detect_layout(["base_model.model.model.layers.0.w", "base_model.model.lm_head.weight"])
    assert peft.prefix == "base_model.model.model." and peft.canonical("base_model.model.lm_head.weight") is None
    bert = detect_layout(["bert.embeddings.x", "bert.encoder.y", "cls.predictions.bias"])
    assert bert.prefix == "bert." and bert.canonical("bert.encoder.y") == "encoder.y"
    assert detect_layout(["embeddings.x", "encoder.y", "pooler.z"]).prefix == ""


def test_output_holding_something_else_is_refused(tmp_path, tensors):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for overwrite in (False, True):  # files reforge did not write are never replaced
        with pytest.raises(OutputExistsError, match="holds files reforge did not write; they are never replaced"):
            CheckpointWriter(out, _specs(tensors), plan_id="p", overwrite=overwrite).__enter__()
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    with CheckpointWriter(out, _specs(tensors), plan_id="p") as writer:
        for name, value in tensors.items():
            writer.write(name, value)
    with pytest.raises(OutputExistsError, match="already holds something else.*--overwrite"):
        CheckpointWriter(out, _specs(tensors), plan_id="other").__enter__()
    with CheckpointWriter(out, _specs(tensors), plan_id="other", overwrite=True) as writer:  # reforge's: replaced
        for name, value in tensors.items():
            writer.write(name, value)
    assert json.loads((out / "reforge.json").read_text())["plan_id"] == "other"


def test_same_plan_rerun_is_a_no_op(tmp_path, tensors):
    out = tmp_path / "out"
    for _ in range(2):
        with CheckpointWriter(out, _specs(tensors), plan_id="p") as writer:
            for name, value in tensors.items():
                writer.write(name, value)
    with CheckpointWriter(out, _specs(tensors), plan_id="p") as writer:
        assert writer.already_complete and not writer.pending("a.weight")


def test_crash_leaves_no_complete_looking_output_and_rerun_resumes(tmp_path, tensors):
    out = tmp_path / "out"
    specs = _specs(tensors)
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out, specs, plan_id="p", max_shard_size=200) as writer:
            for name in ["a.weight", "b.weight"]:  # a (256 bytes) fills shard 1; b starts shard 2
                writer.write(name, tensors[name])
                writer.record(name, {"n": name})
            raise KeyboardInterrupt
    assert not out.exists(), "nothing under the final name until the whole output is written"
    partial = tmp_path / ".out.reforge-partial"
    assert (partial / "model-00001-of-00002.safetensors").is_file()
    with CheckpointWriter(out, specs, plan_id="p", max_shard_size=200) as writer:
        assert writer.resumed_shards == 1 and not writer.pending("a.weight") and writer.pending("c.weight")
        assert writer.records == {"a.weight": {"n": "a.weight"}}
        for name, value in tensors.items():
            writer.write(name, value)
    with ShardReader(ShardIndex.from_dir(out)) as reader:
        assert all(torch.equal(reader.get(n), v) for n, v in tensors.items())
    assert json.loads((out / "reforge.json").read_text())["records"] == {"a.weight": {"n": "a.weight"}}


def test_different_plan_discards_partial_work(tmp_path, tensors):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, _specs(tensors), plan_id="old", max_shard_size=200) as writer:
            writer.write("a.weight", tensors["a.weight"])
            writer.write("b.weight", tensors["b.weight"])
            raise RuntimeError("crash")
    with CheckpointWriter(out, _specs(tensors), plan_id="new", max_shard_size=200) as writer:
        assert writer.resumed_shards == 0 and writer.pending("a.weight")
        for name, value in tensors.items():
            writer.write(name, value)


def _hold_lock(out, specs, ready, release):
    with CheckpointWriter(out, specs, plan_id="p"):
        ready.set()
        release.wait(20)


def test_two_runs_into_one_output_are_serialized_by_a_lock(tmp_path, tensors):
    out = tmp_path / "out"
    specs = _specs(tensors)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, specs, ready, release))
    holder.start()
    try:
        assert ready.wait(20)
        with pytest.raises(OutputLockedError, match="another reforge run is writing"):
            CheckpointWriter(out, specs, plan_id="p").__enter__()
    finally:
        release.set()
        holder.join(20)
    # the lock was released (the holder's run failed on purpose: nothing written), so a new run proceeds
    with CheckpointWriter(out, specs, plan_id="p") as writer:
        for name, value in tensors.items():
            writer.write(name, value)


def test_not_enough_space_is_refused_before_writing(tmp_path):
    huge = [TensorSpec("x", "F32", (2**40,))]  # 4 TiB
    with pytest.raises(DiskFullError, match="needs .* GB more, but only .* GB are free"):
        CheckpointWriter(tmp_path / "out", huge, plan_id="p").__enter__()
    assert not (tmp_path / "out").exists()


def test_disk_filling_up_mid_write_is_a_clear_error(tmp_path, tensors):
    """A real full disk: a 64 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mount / "filler").write_bytes(bytes(40 * 1024))
        big = {"x": torch.zeros(8 * 1024), "y": torch.zeros(8 * 1024)}  # 64 KiB in two 32 KiB shards
        writer = CheckpointWriter(mount / "out", _specs(big), plan_id="p", max_shard_size=40 * 1024)
        writer._check_space = lambda: None  # skip the up-front check to reach the write itself
        with pytest.raises(DiskFullError, match="disk filled up while writing .*Free some space and rerun"):
            with writer:
                for name, value in big.items():
                    writer.write(name, value)
        assert not (mount / "out").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_durable_mode_writes_the_same_bytes(tmp_path, tensors):
    outputs = []
    for durable in (False, True):
        out = tmp_path / f"out-{durable}"
        with CheckpointWriter(out, _specs(tensors), plan_id="p", max_shard_size=200, durable=durable) as writer:
            for name, value in tensors.items():
                writer.write(name, value)
        outputs.append({f.name: f.read_bytes() for f in out.glob("*.safetensors")})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


def _large_tensors():
    """Tensors of over 1 MiB (read with O_DIRECT where the filesystem allows) at offsets that are not 4 KiB
    aligned (a small tensor first), with lengths that are not whole blocks either."""
    g = torch.Generator().manual_seed(1)
    return {
        "a.small": torch.randn(3, generator=g).to(torch.bfloat16),
        "b.large": torch.randn(1031, 517, generator=g).to(torch.bfloat16),
        "c.large": torch.randn(700, 450, generator=g),
        "d.odd": torch.randn(3, generator=g).to(torch.bfloat16),
        "e.misaligned": torch.randn(600, 450, generator=g),  # starts 2 bytes past a multiple of 4
        "f.small": torch.randn(5, generator=g),
    }


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("cached", [True, False])
def test_large_tensors_round_trip_through_direct_io_and_the_page_cache(tmp_path, monkeypatch, direct, cached):
    """Pooled, page-aligned outputs are written with O_DIRECT; reads take O_DIRECT or the page cache: the bytes
    are the same either way, and safetensors reads the file."""
    from reforge.io import format as fmt
    from reforge.io import reader as reader_module
    from reforge.io import writer as writer_module
    from reforge.io.buffers import BufferPool
    from reforge.ops.stream import empty

    if not direct:  # a filesystem without O_DIRECT (tmpfs)
        monkeypatch.setattr(reader_module, "open_direct", lambda path, flags: None)
        monkeypatch.setattr(writer_module, "open_direct", lambda path, flags: None)
    monkeypatch.setattr(fmt, "page_cached", lambda fd, offset, length: cached)
    tensors, pool, out = _large_tensors(), BufferPool(), tmp_path / "out"
    with CheckpointWriter(out, _specs(tensors), plan_id="p") as writer:
        for name, value in tensors.items():
            placed = empty(tuple(value.shape), value.dtype, pool, writer.alignment(name))
            writer.write(name, placed.copy_(value))
    loaded = load_file(out / "model.safetensors")
    with ShardReader(ShardIndex.from_dir(out), pool) as reader:
        for name, value in tensors.items():
            assert torch.equal(loaded[name], value)
            assert torch.equal(reader.get(name), value)


def test_pool_lends_a_buffer_again_only_once_nothing_uses_it():
    from reforge.io.buffers import BufferPool

    pool = BufferPool()
    first = torch.frombuffer(pool.take(3 << 20), dtype=torch.uint8)
    view = first[10:].view(torch.int16)
    del first
    second = torch.frombuffer(pool.take(3 << 20), dtype=torch.uint8)
    assert second.data_ptr() != view.data_ptr() - 10, "a view still used the first buffer"
    address = second.data_ptr()
    del second
    assert torch.frombuffer(pool.take(2 << 20), dtype=torch.uint8).data_ptr() == address, "freed buffer reused"
    assert view.data_ptr() % 4096 == 10 and address % 4096 == 0


def test_page_cached_sees_what_was_just_written_and_evicted(tmp_path):
    from reforge.io.format import page_cached

    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert page_cached(fd, 0, 1 << 20)
        if hasattr(os, "posix_fadvise"):
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert not page_cached(fd, 0, 1 << 20)
    finally:
        os.close(fd)


def test_one_rule_says_whether_a_folder_has_its_own_tokenizer(tmp_path):
    """eval (`_tokenizer_dir`) and tune (delta and LoRA retrievers) choose between a model's and its base's
    tokenizer by this one rule (issue 23: there were three)."""
    from reforge.io.companions import TOKENIZER_MARKERS, has_tokenizer

    assert not has_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")  # a vocabulary alone is no loadable tokenizer
    assert not has_tokenizer(tmp_path)
    for name in TOKENIZER_MARKERS:
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text("{}")
        assert has_tokenizer(folder), name


def test_an_adapter_config_is_the_same_bytes_in_every_process(tmp_path):
    """peft keeps target_modules as a set, which json writes in string-hash order: a new order each process, so
    one training run gave adapters whose config, content key, merge plan id and merged header all differed from
    the next (found by bench/bench_same.py). The writer sorts them."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from peft import LoraConfig; from reforge.io.tensors import save_peft_adapter; "
        "c = LoraConfig(r=2, target_modules=['q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj']); "
        "save_peft_adapter(sys.argv[1], c, {'x.lora_A.weight': torch.zeros(2, 2)})"
    )
    written = []
    for seed in ("1", "2", "3"):
        folder = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(folder)], check=True, env=env)
        written.append((folder / "adapter_config.json").read_bytes())
    assert written[0] == written[1] == written[2]
    assert json.loads(written[0])["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("text", ['{"r": 8, "lora_alpha": ', '["not", "an", "object"]'], ids=["cut short", "a list"])
def test_a_damaged_adapter_config_reads_the_same_through_open_checkpoint_and_its_reader(tmp_path, text):
    """issue 23: adapter_config.json has one reader (io.adapter_config); opening the adapter folder goes through it,
    so a damaged file is the same one-line error whether a merge opens the adapter or verify's recheck reads it."""
    from reforge.io.adapter_config import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(CorruptCheckpointError) as by_reader:
        read_adapter_config(tmp_path)
    with pytest.raises(CorruptCheckpointError) as by_open:
        open_checkpoint(tmp_path)
    assert str(by_open.value) == str(by_reader.value)
    assert "adapter_config.json is not a readable adapter config (" in str(by_open.value)
    assert by_open.value.path == tmp_path / "adapter_config.json"


def test_a_checkpoint_folders_json_files_have_one_reader(tmp_path):
    """issue 23: config.json, adapter_config.json, reforge.json and training_record.json are read by one reader
    (io.jsonfile.read_json_object): a damaged one is the same kind of one-line error (the file, what it should be,
    why), and the modules that open them parse no JSON of their own."""
    from pathlib import Path

    import reforge.io
    from reforge.io.adapter_config import read_adapter_config
    from reforge.io.manifest import read_manifest, read_training_record

    cases = [
        ("config.json", lambda: open_checkpoint(tmp_path), "valid JSON"),
        ("adapter_config.json", lambda: read_adapter_config(tmp_path), "a readable adapter config"),
        ("reforge.json", lambda: read_manifest(tmp_path), "a readable JSON object"),
        ("training_record.json", lambda: read_training_record(tmp_path), "a readable JSON object"),
    ]
    for name, read, what in cases:
        (tmp_path / name).write_text("[1, 2]")
        with pytest.raises(CorruptCheckpointError) as caught:
            read()
        assert str(caught.value).startswith(f"{tmp_path / name} is not {what} (not a JSON object).")
        assert caught.value.path == tmp_path / name
        (tmp_path / name).unlink()
    home = Path(reforge.io.__file__).parent
    for module in ("checkpoint.py", "adapter_config.py", "manifest.py"):
        assert "json.loads" not in (home / module).read_text(), module
