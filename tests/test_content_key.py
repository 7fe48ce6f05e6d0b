"""`reforge.io.checkpoint.content_key`: models are keyed by all their bytes, computed at most once per file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from reforge.io.checkpoint import content_key, fingerprint, memo_dir, sha256_file
from reforge.io.writer import CheckpointWriter, TensorSpec
from tests.conftest import build_model, save


def _scale_between_samples(folder):
    """Change bytes of ``model.safetensors`` that `fingerprint`'s 16 samples do not read (same size, same header)."""
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    size = len(data)
    step = max(size // 16, 1)
    sampled = {p + i for p in range(0, size, step) for i in range(4096)}
    spot = next(p for p in range(size - 8, 0, -1) if p not in sampled and p - 1 not in sampled)
    data[spot] ^= 0x40
    file.write_bytes(bytes(data))


def test_a_change_between_fingerprint_samples_changes_the_content_key(tmp_path):
    original = save(build_model("llama-bare", hidden_size=256, intermediate_size=512), tmp_path / "a")
    copy = tmp_path / "b"
    shutil.copytree(original, copy)
    _scale_between_samples(copy)
    assert fingerprint(original) == fingerprint(copy)  # the sample misses it (the bug the key fixes)
    assert content_key(original) != content_key(copy)
    assert len(content_key(original)) == 64


def test_a_plain_folder_is_read_once_then_remembered_by_file_identity(tmp_path):
    folder = save(build_model("bert-bare"), tmp_path / "m")
    first = content_key(folder)
    memo = sorted(memo_dir().iterdir())
    assert [m.read_text() for m in memo] == [sha256_file(folder / "model.safetensors")]
    assert content_key(folder) == first
    assert sorted(memo_dir().iterdir()) == memo  # nothing read again
    # an edit in place (same size), even with the old mtime put back, is a new identity (ctime) and a new key
    stat = (folder / "model.safetensors").stat()
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_key(folder) != first
    # the key of a file is its SHA-256
    assert content_key(folder / "model.safetensors") == hashlib.sha256(bytes(data)).hexdigest()


def _write(out, pieces_in_order: bool):
    specs = [TensorSpec("a", "F32", (64, 8)), TensorSpec("b", "F32", (32,))]
    a, b = torch.arange(512, dtype=torch.float32).reshape(64, 8), torch.ones(32)
    with CheckpointWriter(out, specs, plan_id="p", max_shard_size=1 << 20) as writer:
        if pieces_in_order:
            writer.write("a", a)
        else:  # rows written last to first: the hash is completed by reading the file back
            writer.write("a", a[32:], rows=slice(32, 64))
            writer.write("a", a[:32], rows=slice(0, 32))
        writer.write("b", b)
    return out


def test_the_writer_records_each_file_hash_and_the_key_trusts_it_without_reading(tmp_path):
    for in_order in (True, False):
        out = _write(tmp_path / f"out-{in_order}", in_order)
        record = json.loads((out / "reforge.json").read_text())["file_sha256"]
        assert record["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
        key = content_key(out)
        assert not memo_dir().exists() or not any(memo_dir().iterdir())  # nothing was read to key it
    # a copy (even cp -a, keeping mtimes) is not trusted on the record: it is read, with the same result
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copy2)
    assert content_key(copy) == key
    assert len(list(memo_dir().iterdir())) == 1
    # and a copy edited after it was made gets its own key, although reforge.json still records the old hash
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert content_key(copy) != key
