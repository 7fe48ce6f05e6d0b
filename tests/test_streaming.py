"""Streaming tensors in pieces: reading rows, writing rows, and diff/merge outputs that do not depend on it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import build_model, make_adapter, perturbed_bare, save
from reforge.io.buffers import BufferPool
from reforge.io.checkpoint import open_model
from reforge.io.index import ShardIndex
from reforge.io.reader import ShardReader
from reforge.io.writer import CheckpointWriter, TensorSpec
from reforge.ops import stream
from reforge.ops.diff import diff
from reforge.ops.job import WriteOptions
from reforge.ops.merge import merge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """bf16 base CausalLM; a bare retriever; one with 2 tokens added; a DoRA adapter; a LoRA retriever."""
    root = tmp_path_factory.mktemp("pieces")
    base = build_model("llama-causal")
    retriever = perturbed_bare(copy.deepcopy(base))
    grown = perturbed_bare(copy.deepcopy(base), seed=3)
    grown.resize_token_embeddings(130)
    grown.config.vocab_size = 130
    make_adapter(base, root / "dora", dora=True, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    make_adapter(base, root / "lora-retriever", seed=9, targets=("q_proj", "o_proj", "down_proj"))
    return dict(
        root=root,
        base=save(base, root / "base", dtype=torch.bfloat16),
        retriever=save(retriever, root / "retriever", dtype=torch.bfloat16, shard_size="40KB"),
        grown=save(grown, root / "grown", dtype=torch.bfloat16),
        dora=root / "dora",
        lora=root / "lora-retriever",
    )


def _outputs(folder):
    """Every weight file's bytes, and the recorded rounding of every tensor."""
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
    return files, json.loads((folder / "reforge.json").read_text())["records"]


def _both_ways(monkeypatch, tmp_path, job):
    """Run ``job(output)`` with tensors streamed whole, then in pieces of 2 blocks of 2-4 rows each."""
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)  # 32-wide rows: blocks of 2 rows
    results = []
    for name, blocks in (("whole", 10**9), ("pieces", 2)):
        monkeypatch.setattr(stream, "PIECE_BLOCKS", blocks)
        job(tmp_path / name)
        results.append(_outputs(tmp_path / name))
    assert len(stream.pieces((130, 32))) == 32  # the embedding really went in pieces (the last one of 6 rows)
    return results


CASES = {
    "retriever + DoRA": lambda m, out: merge(m["base"], out, retriever=m["retriever"], adapters=[(m["dora"], 0.5)]),
    "beta 0.5 + DoRA": lambda m, out: merge(
        m["base"], out, retriever=m["retriever"], adapters=[(m["dora"], -1.25)], beta=0.5
    ),
    "LoRA retriever + DoRA": lambda m, out: merge(m["base"], out, retriever=m["lora"], adapters=[(m["dora"], 0.5)]),
    "dtype float32": lambda m, out: merge(
        m["base"], out, retriever=m["retriever"], adapters=[(m["dora"], 0.5)], write=WriteOptions(dtype="float32")
    ),
    "diff, tokens added": lambda m, out: diff(m["base"], m["grown"], out),
    "diff, LoRA retriever": lambda m, out: diff(m["base"], m["lora"], out),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pieces_write_the_same_bytes_as_whole_tensors(models, tmp_path, monkeypatch, case):
    (whole_files, whole_records), (piece_files, piece_records) = _both_ways(
        monkeypatch, tmp_path, lambda out: CASES[case](models, out)
    )
    assert piece_files == whole_files and piece_records == whole_records
    assert any(r["max_abs_rounding"] > 0 for r in whole_records.values()) or case == "dtype float32"


def test_merge_of_a_delta_with_added_tokens_in_pieces(models, tmp_path, monkeypatch):
    """base + Delta where the base lacks the added rows: pieces past the base's rows hold Delta alone."""
    delta = tmp_path / "delta"
    diff(models["base"], models["grown"], delta)
    whole, pieces = _both_ways(
        monkeypatch, tmp_path, lambda out: merge(models["base"], out, delta=delta, adapters=[(models["dora"], 0.5)])
    )
    assert pieces == whole
    embedding = open_model(tmp_path / "pieces").reader().get("embed_tokens.weight")
    grown = open_model(models["grown"]).reader().get("embed_tokens.weight")
    assert embedding.shape == (130, 32) and torch.equal(embedding[128:], grown[128:])


def test_pieces_are_whole_row_blocks_and_short_tails_join(monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(stream, "PIECE_BLOCKS", 3)
    assert stream.pieces((20, 30)) == [slice(0, 9), slice(9, 20)]  # blocks of 3 rows, pieces of 3 blocks + tail
    assert list(stream.row_blocks((20, 30)))[-2:] == [slice(12, 15), slice(15, 20)]  # a tail of 2 rows joins
    assert stream.pieces((12, 30)) == [None] and stream.pieces(()) == [None]
    assert stream.pieces((1000,)) == [slice(0, 300), slice(300, 600), slice(600, 900), slice(900, 1000)]
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64 * 30)  # blocks of 64 rows: a tail of 5 joins the last block
    assert list(stream.row_blocks((133, 30))) == [slice(0, 64), slice(64, 133)]
    assert list(stream.row_blocks((5, 30))) == [slice(0, 5)] and list(stream.row_blocks((0, 30))) == []
    assert stream.piece_shape((10, 30), slice(9, 10)) == (1, 30)
    assert stream.shifted(slice(3, 6), slice(9, 18)) == slice(12, 15)
    assert stream.clipped(slice(8, 12), 10) == slice(8, 10) and stream.clipped(None, 10) is None


def test_blocks_round_no_worse_than_the_whole_product():
    """Row blocks (a short tail joined, as in row_blocks) give the formula's value as closely as one whole product.

    Bit-identity with the whole product is a property of the BLAS kernel, not of reforge: MKL's AVX2 kernels give
    it for blocks of 8 rows and more (why short tails join, MIN_BLOCK_ROWS), its AVX-512 kernels round some blocks
    differently (seen 2026-12-07, up to 3.3e-6 apart on these values). What holds on every kernel, and what merge's
    exactness rests on, is that a blocked product is one fp32 rounding of the same sum: checked here against float64.
    """
    generator = torch.Generator().manual_seed(0)
    weight, b, a = (torch.randn(shape, generator=generator) for shape in ((300, 512), (300, 32), (32, 512)))
    exact = weight.double() + 0.37 * (b.double() @ a.double())
    whole_error = (torch.addmm(weight, b, a, alpha=0.37).double() - exact).abs().max().item()
    for rows in (stream.MIN_BLOCK_ROWS, 12, 64, 256):
        starts = [*range(0, 300 - stream.MIN_BLOCK_ROWS, rows), 300]  # a short tail joins, as in row_blocks
        blocks = torch.cat([torch.addmm(weight[i:j], b[i:j], a, alpha=0.37) for i, j in zip(starts, starts[1:])])
        assert blocks.shape == exact.shape
        # fp32 accumulation over 32 terms: a few units in the last place of the largest value, like the whole product
        assert (blocks.double() - exact).abs().max().item() <= 2 * whole_error + 1e-6


def test_reader_reads_rows_alone(tmp_path):
    """Rows of a large tensor (read with O_DIRECT where the filesystem has it) and of a small one."""
    from safetensors.torch import save_file

    large = torch.arange(600 * 1024, dtype=torch.float32).reshape(600, 1024)  # 2.4 MB: the direct-read path
    small = torch.arange(40, dtype=torch.bfloat16).reshape(10, 4)
    save_file({"small": small, "large": large}, str(tmp_path / "model.safetensors"))
    with ShardReader(ShardIndex.from_dir(tmp_path), BufferPool()) as reader:
        assert torch.equal(reader.get("large", slice(37, 411)), large[37:411])
        assert torch.equal(reader.get("large", slice(599, 600)), large[599:])
        assert torch.equal(reader.get("small", slice(3, 7)), small[3:7])
        assert reader.get("small", slice(10, 10)).shape == (0, 4)


def test_writer_takes_rows_in_any_order(tmp_path):
    value = torch.randn(300, 1024)
    specs = [TensorSpec("a", "F32", (300, 1024)), TensorSpec("empty", "F32", (0,)), TensorSpec("c", "BF16", (3,))]
    with CheckpointWriter(tmp_path / "whole", specs, plan_id="p") as writer:
        writer.write("a", value)
        writer.write("empty", torch.zeros(0))
        writer.write("c", torch.ones(3, dtype=torch.bfloat16))
    with CheckpointWriter(tmp_path / "rows", specs, plan_id="p") as writer:
        writer.write("c", torch.ones(3, dtype=torch.bfloat16))
        for rows in (slice(100, 300), slice(0, 7), slice(7, 100)):
            assert writer.pending("a")
            writer.write("a", value[rows], rows)
        assert not writer.pending("a") and writer.pending("empty")
        writer.write("empty", torch.zeros(0))
        with pytest.raises(ValueError, match="planned F32"):
            CheckpointWriter(tmp_path / "x", specs, plan_id="q").write("a", value[:5], slice(0, 6))
    assert (tmp_path / "rows" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()


def test_writer_refuses_a_tensor_left_unfinished(tmp_path):
    specs = [TensorSpec("a", "F32", (10, 4))]
    with pytest.raises(RuntimeError, match="never written"):
        with CheckpointWriter(tmp_path / "out", specs, plan_id="p") as writer:
            writer.write("a", torch.zeros(6, 4), slice(0, 6))
    assert not (tmp_path / "out").exists()


# --- --device -------------------------------------------------------------------------------------------------
def _staged(monkeypatch):
    """Route every computed piece through `reforge.ops.device.Transfer` on the CPU (buffers, copies there and
    back: the GPU path's steps without a GPU) and count the pieces that took it."""
    from reforge.ops import device as device_ops
    from reforge.ops import job as job_ops  # diff and merge stream through job.streamed
    from reforge.ops import verify as verify_ops  # noqa: F401 - verify imports scratch_for from stream

    runs = []
    real_run = device_ops.Transfer.run

    def counted(self, *args, **kwargs):
        runs.append(self.device.type)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(device_ops.Transfer, "run", counted)
    original = stream.scratch_for
    staged = lambda device: original(torch.device("cpu"), staged=True)  # noqa: E731
    for module in (job_ops, stream):
        monkeypatch.setattr(module, "scratch_for", staged)
    return runs


@pytest.mark.parametrize("case", ["retriever + DoRA", "beta 0.5 + DoRA", "LoRA retriever + DoRA", "diff, tokens added"])
def test_device_path_computes_the_same_bytes(models, tmp_path, monkeypatch, case):
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(stream, "PIECE_BLOCKS", 2)
    CASES[case](models, tmp_path / "plain")
    runs = _staged(monkeypatch)
    CASES[case](models, tmp_path / "device")
    assert _outputs(tmp_path / "device") == _outputs(tmp_path / "plain")
    assert runs and set(runs) == {"cpu"}
    if case == "retriever + DoRA":  # copied tensors (norms, o_proj, gate_proj, the embedding) never travel
        from reforge.io.adapter import LoraAdapter
        from reforge.io.checkpoint import open_checkpoint

        base = open_model(models["base"])
        shapes = {k: base.index.tensors[v].shape for k, v in base.canonical_keys().items()}
        adapted = LoraAdapter(open_checkpoint(models["dora"])).modules
        assert len(runs) == sum(len(stream.pieces(shapes[key])) for key in adapted) > len(adapted)


def test_verify_recomputes_on_the_device_path(models, tmp_path, monkeypatch):
    from reforge.ops.verify import verify_checkpoint

    out = tmp_path / "out"
    merge(models["base"], out, retriever=models["retriever"], adapters=[(models["dora"], 0.5)], device="cpu")
    runs = _staged(monkeypatch)
    report = verify_checkpoint(out, embeddings=False, full=True, device="cpu")
    assert report.ok, report.failures
    assert runs, "recompute did not go through the device path"


def test_device_auto_is_the_cpu_here_and_cuda_is_refused_without_one():
    from reforge.errors import InvalidOptionError
    from reforge.ops.device import resolve_device

    assert resolve_device("cpu").type == "cpu" and resolve_device(None).type == "cpu"
    assert resolve_device("auto").type == ("cuda" if _cuda() else "cpu")
    with pytest.raises(InvalidOptionError, match="--device 'tpu'") as error:
        resolve_device("tpu")
    assert error.value.option == "--device"
    if not _cuda():
        with pytest.raises(InvalidOptionError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "command", [["merge", "--base", "b", "--retriever", "r", "-o", "o"], ["diff", "b", "r", "-o", "o"], ["verify", "f"]]
)
def test_cli_device_cuda_without_cuda_is_a_usage_error(command):
    from click.testing import CliRunner

    from reforge.cli import cli

    result = CliRunner().invoke(cli, [*command, "--device", "cuda"])
    assert result.exit_code == 2
    assert "Invalid value for '--device'" in result.stderr and "no CUDA support" in result.stderr


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_diff_is_the_cpu_bytes_and_dora_merge_within_a_rounding(models, tmp_path):
    diff(models["base"], models["grown"], tmp_path / "cpu-diff", device="cpu")
    diff(models["base"], models["grown"], tmp_path / "gpu-diff", device="cuda")
    assert _outputs(tmp_path / "gpu-diff") == _outputs(tmp_path / "cpu-diff")
    for where in ("cpu", "cuda"):
        merge(
            models["base"],
            tmp_path / where,
            retriever=models["retriever"],
            adapters=[(models["dora"], 0.5)],
            device=where,
        )
    cpu, gpu = (open_model(tmp_path / where).reader() for where in ("cpu", "cuda"))
    for name in cpu.keys():
        a, b = cpu.get(name).float(), gpu.get(name).float()
        assert torch.allclose(a, b, rtol=2**-7, atol=0), name  # at most one bf16 rounding apart


def test_diff_merge_and_verify_default_to_the_cpu_until_the_gpu_path_has_run_on_a_gpu():
    from click.testing import CliRunner

    from reforge.cli import cli

    for command in ("diff", "merge", "verify"):
        result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "[default: cpu]" in " ".join(result.output.split()), command
