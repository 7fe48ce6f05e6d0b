"""Hostile files: malformed safetensors headers fail with CorruptCheckpointError naming the file, never a traceback.

A table of the cases users met (issue 13), then a seeded fuzzer that mutates one header field at a time over a
valid file and checks that reading it either succeeds with a consistent layout or raises CorruptCheckpointError.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from reforge.cli import cli
from reforge.errors import CorruptCheckpointError
from reforge.io.format import read_header


def write_raw(path: Path, header: object, data: bytes, *, raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def valid_header() -> tuple[dict, bytes]:
    """Two F32 tensors, a (2, 3) and a (4,), laid out back to back, and their 40 bytes."""
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
    }
    return header, bytes(range(40))


CASES = [
    ("dtype is a list", lambda h: h["a"].__setitem__("dtype", ["F32"]), "unknown dtype ['F32']"),
    ("dtype unknown", lambda h: h["a"].__setitem__("dtype", "F31"), "unknown dtype 'F31'"),
    ("metadata is a list", lambda h: h.__setitem__("__metadata__", ["pt"]), "__metadata__ is not a map"),
    ("metadata is a string", lambda h: h.__setitem__("__metadata__", "pt"), "__metadata__ is not a map"),
    ("metadata value not a string", lambda h: h["__metadata__"].__setitem__("n", 3), "__metadata__ is not a map"),
    (
        "overlapping offsets",
        lambda h: (h["a"].__setitem__("data_offsets", [0, 24]), h["b"].update(shape=[4], data_offsets=[16, 32])),
        "overlaps",
    ),
    ("gap between tensors", lambda h: h["a"].update(shape=[2, 2], data_offsets=[0, 16]), "leaves a gap"),
    ("negative dimension", lambda h: h["a"].__setitem__("shape", [-2, -3]), "not a list of non-negative"),
    ("float dimension", lambda h: h["a"].__setitem__("shape", [2.0, 3]), "not a list of non-negative"),
    ("string dimension", lambda h: h["a"].__setitem__("shape", ["2", 3]), "not a list of non-negative"),
    ("shape is a number", lambda h: h["a"].__setitem__("shape", 6), "not a list of non-negative"),
    ("offsets of floats", lambda h: h["a"].__setitem__("data_offsets", [0.0, 24.0]), "do not hold"),
    ("three offsets", lambda h: h["a"].__setitem__("data_offsets", [0, 12, 24]), "lacks dtype, shape or"),
    ("entry is a list", lambda h: h.__setitem__("a", [1, 2]), "lacks dtype, shape or data_offsets"),
    ("no dtype", lambda h: h["a"].pop("dtype"), "lacks dtype, shape or data_offsets"),
    ("past the end", lambda h: h["b"].update(shape=[40], data_offsets=[24, 184]), "past the end"),
]


@pytest.mark.parametrize("mutate, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_header_fields(tmp_path, mutate, message):
    header, data = valid_header()
    mutate(header)
    path = write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CorruptCheckpointError) as caught:
        read_header(path)
    assert message in str(caught.value) and "model.safetensors" in str(caught.value)


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            "names 'a' twice",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b"\xff\xfe not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
    ],
    ids=["duplicate name", "deep list", "deep object", "not utf-8", "a list"],
)
def test_malformed_header_text(tmp_path, raw, message):
    path = write_raw(tmp_path / "model.safetensors", None, bytes(8), raw=raw)
    with pytest.raises(CorruptCheckpointError, match=message):
        read_header(path)


def test_cli_reports_a_hostile_header_in_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    header, data = valid_header()
    header["a"]["dtype"] = ["F32"]
    write_raw(folder / "model.safetensors", header, data)
    (folder / "config.json").write_text("{}")
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unknown dtype ['F32']" in result.stderr


HOSTILE_VALUES = [
    None,
    True,
    -1,
    0,
    1,
    2**64,
    1.5,
    float("inf"),
    "",
    "F32",
    "x" * 1000,
    [],
    [0],
    [-1, 2],
    [0, 2**63],
    [[0]],
    {},
    {"a": 1},
    ["F32"],
    [1e308],
    "\u0000",
    [True, 1],
]


def test_fuzzed_headers_fail_only_with_corrupt_checkpoint_error(tmp_path):
    """Property: whatever one field of a valid header becomes, reading it either gives a layout that tiles the data
    exactly, or raises CorruptCheckpointError; no other exception escapes. 600 seeded mutations."""
    rng = random.Random(13)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(600):
        header, data = valid_header()
        name = rng.choice(["a", "b", "__metadata__"])
        if name == "__metadata__":
            header["__metadata__"] = rng.choice(HOSTILE_VALUES + [{"format": rng.choice(HOSTILE_VALUES)}])
        else:
            field = rng.choice(["dtype", "shape", "data_offsets", None])
            if field is None:
                header[name] = rng.choice(HOSTILE_VALUES)
            else:
                header[name][field] = rng.choice(HOSTILE_VALUES)
        try:
            body = json.dumps(header, allow_nan=True).encode()
        except (TypeError, ValueError):
            continue
        path = write_raw(tmp_path / f"fuzz-{i}.safetensors", None, data, raw=body)
        try:
            tensors, metadata = read_header(path)
        except CorruptCheckpointError as e:
            assert e.path == path and str(e)
            outcomes["refused"] += 1
        else:
            spans = sorted((t.start, t.end) for t in tensors.values())
            assert all(s1[1] == s2[0] for s1, s2 in zip(spans, spans[1:]))
            assert all(isinstance(v, str) for v in metadata.values())
            outcomes["ok"] += 1
        path.unlink()
    assert outcomes["refused"] > 300 and outcomes["ok"] > 10, outcomes


def test_a_real_safetensors_file_still_reads(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "e": torch.zeros(0), "b": torch.ones(4)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    found, metadata = read_header(tmp_path / "model.safetensors")
    assert {k: v.shape for k, v in found.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    assert metadata == {"format": "pt"}


# ---- data files --------------------------------------------------------------------------------------------------
def test_non_utf8_jsonl_names_its_line_and_is_skipped_with_skip_bad_lines(tmp_path):
    from reforge.data.beir import iter_corpus, read_qrels
    from reforge.data.corpus import load_corpus
    from reforge.errors import DataError

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(
        b'{"_id": "d1", "text": "fine"}\n{"_id": "d2", "text": "caf\xe9 latin-1"}\n{"_id": "d3", "text": "also fine"}\n'
    )
    with pytest.raises(DataError, match=r"corpus.jsonl, line 2: not UTF-8 text \(invalid continuation byte") as e:
        load_corpus(corpus)
    assert "--skip-bad-lines" in str(e.value)  # train has it
    assert [d.id for d in load_corpus(corpus, skip_bad_lines=True).docs] == ["d1", "d3"]
    with pytest.raises(DataError, match="line 2: not UTF-8") as e:
        list(iter_corpus(corpus))  # what eval reads: it has no --skip-bad-lines, so none is suggested
    assert "--skip-bad-lines" not in str(e.value)
    qrels = tmp_path / "test.tsv"
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\nq1\td\xe91\t1\n")
    with pytest.raises(DataError, match="test.tsv, line 2: not UTF-8"):
        read_qrels(qrels)


def test_eval_never_suggests_an_option_it_lacks(tmp_path):
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\nnot json\n')
    (data / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "no-model"), "-d", str(data)])
    assert "--skip-bad-lines" not in result.output + result.stderr
    from reforge.data.beir import load_beir
    from reforge.errors import DataError

    with pytest.raises(DataError, match="line 2: not a valid JSON object") as e:
        load_beir(data, "test")
    assert "--skip-bad-lines" not in str(e.value)


# ---- options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "eval"])
def test_device_that_does_not_exist_is_refused_at_parse_time(tmp_path, command):
    args = {
        "train": ["train", "base", "--corpus", str(tmp_path), "-o", str(tmp_path / "o")],
        "eval": ["eval", "model", "-d", str(tmp_path)],
    }[command]
    no_gpu = "cuda:99" if torch.cuda.is_available() else "cuda"
    for device, message in (
        ("nonsense", "'nonsense' is not a torch device"),
        (no_gpu, "no CUDA support" if torch.version.cuda is None else "CUDA device(s) visible"),
        ("fpga", "reforge runs on cpu, cuda or mps"),
    ):
        result = CliRunner().invoke(cli, [*args, "--device", device])
        assert result.exit_code == 2 and message in result.stderr, (device, result.stderr)
        assert "Traceback" not in result.output


# ---- reforge.json ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "manifest", [b'{"kind": "delta", "state": "compl', b"[1, 2]", b"\xff\xfe"], ids=["truncated", "a list", "not utf-8"]
)
def test_verify_never_calls_a_malformed_manifest_sound(llama_pair, tmp_path, manifest):
    base_dir, retriever_dir = llama_pair
    delta = tmp_path / "delta"
    assert CliRunner().invoke(cli, ["diff", str(base_dir), str(retriever_dir), "-o", str(delta), "-q"]).exit_code == 0
    (delta / "reforge.json").write_bytes(manifest)
    result = CliRunner().invoke(cli, ["verify", str(delta), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["ok"], result.stdout
    assert "reforge.json is not a readable JSON object" in report["failures"][0]


# ------------------------------------------------------------------------------ eval reads weights as merge does


def _eval_model(tmp_path: Path, name: str = "m") -> tuple[Path, Path]:
    """A tiny Llama folder with a tokenizer, and a toy BEIR dataset."""
    from test_eval import make_tokenizer, toy_dataset

    from conftest import build_model, save

    folder = make_tokenizer(save(build_model("llama-bare"), tmp_path / name), "llama")
    return folder, toy_dataset(tmp_path / "toy")


def _eval_error(*args: object) -> str:
    result = CliRunner().invoke(cli, ["eval", *map(str, args), "--no-cache"])
    assert result.exit_code == 1, result.output + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def _as_pickle(folder: Path, **save_options) -> dict:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", **save_options)
    return state


def test_eval_with_a_pickle_that_is_not_weights_only_is_one_line(tmp_path):
    import datetime

    folder, data = _eval_model(tmp_path)
    state = _as_pickle(folder)
    torch.save({**state, "when": datetime.date(2020, 1, 1)}, folder / "pytorch_model.bin")
    error = _eval_error(folder, "--data", data, "--allow-pickle")
    assert "pytorch_model.bin could not be loaded as a weights-only pickle" in error


def test_eval_refuses_a_legacy_pickle_as_diff_merge_and_inspect_do(tmp_path):
    """One rule: a pre-zip torch pickle cannot be memory-mapped, so every command refuses it (a one-time conversion
    to safetensors is the way); eval used to load it whole."""
    folder, data = _eval_model(tmp_path)
    _as_pickle(folder, _use_new_zipfile_serialization=False)
    error = _eval_error(folder, "--data", data, "--allow-pickle")
    assert "pytorch_model.bin could not be loaded as a weights-only pickle" in error
    inspect = CliRunner().invoke(cli, ["inspect", str(folder), "--allow-pickle"])
    assert inspect.exit_code == 1 and "could not be loaded as a weights-only pickle" in inspect.stderr


def test_eval_of_a_pt_only_folder_is_one_line(tmp_path):
    folder, data = _eval_model(tmp_path)
    state = _as_pickle(folder)
    (folder / "pytorch_model.bin").unlink()
    torch.save(state, folder / "weights.pt")
    assert "holds no model.safetensors" in _eval_error(folder, "--data", data, "--allow-pickle")
    assert "weights.pt is a pickle file" in _eval_error(folder, "--data", data)


def test_eval_of_overlapping_safetensors_offsets_is_one_line(tmp_path):
    folder, data = _eval_model(tmp_path)
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    first, second = [k for k in header if k != "__metadata__"][:2]
    start, _ = header[second]["data_offsets"]
    header[second]["data_offsets"] = [start - 4, header[second]["data_offsets"][1] - 4]  # overlaps the first
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    file.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + size :])
    assert "overlaps the previous tensor" in _eval_error(folder, "--data", data)


def test_eval_does_not_follow_a_shard_linked_out_of_the_folder(tmp_path):
    folder, data = _eval_model(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (folder / "model.safetensors").rename(outside / "model.safetensors")
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    assert "outside the checkpoint folder" in _eval_error(folder, "--data", data)
