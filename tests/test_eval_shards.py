"""Embedding shards on disk and the streamed search: same hits as one flat index, stored dtypes, resuming an
interrupted encode, damaged and old-format cache entries, a full disk, and torchrun ranks that search their own
shards (or refuse to start when they read different corpora)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import models, toy_dataset  # noqa: F401  (fixture)

from reforge.data.beir import load_beir
from reforge.errors import DiskFullError, InvalidOptionError
from reforge.eval import EvalSettings, evaluate, resolve_model
from reforge.eval.cache import EmbeddingCache, embedding_key, from_stored, to_stored
from reforge.eval.search import TopK, read_blocks, search, search_blocks, search_shards


def _cache_folder() -> Path:
    return Path(os.environ["REFORGE_HOME"]) / "cache" / "embeddings"


def _corpus_entry_folder() -> Path:
    (folder,) = [p.parent for p in _cache_folder().glob("*/meta.json") if "documents" in p.read_text()]
    return folder


# ------------------------------------------------------------------------------------------------------ search


def test_streamed_search_equals_one_flat_index_and_merges_across_ranks():
    import faiss

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((2000, 48)).astype(np.float32)
    queries = rng.standard_normal((30, 48)).astype(np.float32)
    index = faiss.IndexFlatIP(48)
    index.add(docs)
    want_scores, want_rows = index.search(queries, 50)
    blocks = ((at, docs[at : at + 137]) for at in range(0, 2000, 137))
    table = search_blocks(queries, blocks, 50, chunk_size=7)
    assert (table.rows == want_rows).all()
    np.testing.assert_allclose(table.scores, want_scores, rtol=0, atol=1e-5)
    # two "ranks" with interleaved shards of 300 rows: merging their tables gives the same top-k
    halves = [
        search_blocks(queries, ((at, docs[at : at + 300]) for at in range(r * 300, 2000, 600)), 50) for r in (0, 1)
    ]
    merged = TopK.empty(30, 50).merge(halves[0].scores, halves[0].rows).merge(halves[1].scores, halves[1].rows)
    assert (merged.rows == want_rows).all()
    # the torch kernel (used on GPUs) finds the same rows
    on_torch = search_blocks(queries, iter([(0, docs)]), 50, device="cuda:0") if torch.cuda.is_available() else None
    assert on_torch is None or (on_torch.rows == want_rows).all()


def test_a_block_holding_every_best_hit_late_is_searched_with_the_full_k():
    import faiss

    rng = np.random.default_rng(4)
    queries = rng.standard_normal((25, 32)).astype(np.float32)
    docs = rng.standard_normal((3000, 32)).astype(np.float32)
    docs[2900:] = queries[3] * 4 + rng.standard_normal((100, 32)).astype(np.float32)  # query 3's best, all last
    index = faiss.IndexFlatIP(32)
    index.add(docs)
    want_scores, want_rows = index.search(queries, 60)
    # blocks of 100: by the last one a query expects ~2 of its 60 hits there, query 3 finds 60
    table = search_blocks(queries, ((at, docs[at : at + 100]) for at in range(0, 3000, 100)), 60)
    assert (table.rows == want_rows).all() and (table.scores == want_scores).all()
    assert (table.rows[3] >= 2900).all()  # all 60 from the last block


def _random_entry(folder: Path, rows: int, dim: int, shard_docs: int, dtype: str, seed: int = 5):
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    entry = EmbeddingCache(folder).entry("k", rows, shard_docs=shard_docs, dtype=dtype)
    for index in range(entry.shard_count):
        first, count = entry.bounds(index)
        entry.write_shard(index, vectors[first : first + count], [str(first + i) for i in range(count)])
    return entry, from_stored(to_stored(vectors, dtype), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_several_devices_and_the_read_ahead_give_the_run_of_one_flat_index(tmp_path, monkeypatch, dtype):
    import faiss

    from reforge.eval import search as search_module

    entry, stored = _random_entry(tmp_path, 5000, 24, 700, dtype)
    queries = np.random.default_rng(6).standard_normal((40, 24)).astype(np.float32)
    index = faiss.IndexFlatIP(24)
    index.add(stored)
    want_scores, want_rows = index.search(queries, 100)
    monkeypatch.setattr(search_module, "BLOCK_BYTES", 4 * 24 * 1024)  # blocks of 1024 rows span shards
    one = search_shards(queries, entry.shards(), 100, devices=["cpu"])
    three = search_shards(queries, entry.shards(), 100, devices=["cpu", "cpu", "cpu"])  # GPUs' code path
    assert (one.rows == want_rows).all() and (one.scores == want_scores).all()
    assert (three.rows == one.rows).all() and (three.scores == one.scores).all()
    ahead = search_blocks(queries, read_blocks(entry.shards(), 1024, buffers=3), 100)  # a GPU's reader thread
    assert (ahead.rows == one.rows).all() and (ahead.scores == one.scores).all()


def test_a_shard_cut_short_after_it_was_listed_fails_the_search_clearly(tmp_path):
    entry, _ = _random_entry(tmp_path, 300, 8, 100, "float16")
    shards = entry.shards()
    path = entry.shard_path(2)
    path.write_bytes(path.read_bytes()[:-160])
    for buffers in (1, 3):
        with pytest.raises(FileNotFoundError, match="00002.npy ended early"):
            list(read_blocks(shards, 64, buffers=buffers))


def test_tied_scores_keep_the_lowest_rows_whatever_the_block_size():
    import faiss

    # every document scores the same: one flat index keeps rows 0..149; so must blocks smaller than k, whose hits
    # come back from faiss in no particular order among equal scores
    docs, queries = np.ones((3000, 8), dtype=np.float32), np.ones((3, 8), dtype=np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(docs)
    assert (np.sort(index.search(queries, 150)[1], axis=1) == np.arange(150)).all()
    for block in (100, 120, 1024):
        table = search_blocks(queries, ((at, docs[at : at + block]) for at in range(0, 3000, block)), 150)
        assert (table.rows == np.arange(150)).all(), block


def test_nan_documents_are_never_hits_on_the_gpu_kernel_either():
    from reforge.eval.search import _faiss_kernel, _torch_kernel

    rng = np.random.default_rng(8)
    docs, queries = rng.standard_normal((200, 16)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    docs[[3, 50, 199]] = np.nan  # faiss skips them; torch.topk ranks NaN above every number
    want_scores, want_rows = _faiss_kernel(queries)(docs, 20)
    scores, rows = _torch_kernel(queries, "cpu", 1024)(docs, 20)  # the GPU code, run on the CPU
    assert (rows == want_rows).all() and np.allclose(scores, want_scores, rtol=1e-5)


def test_two_read_buffers_are_refused_rather_than_overwritten_while_searched(tmp_path):
    entry, _ = _random_entry(tmp_path, 300, 8, 100, "float32")
    with pytest.raises(ValueError, match="1 or at least 3"):
        list(read_blocks(entry.shards(), 64, buffers=2))


def test_fewer_documents_than_k_and_ties_by_row():
    vectors = np.ones((3, 2), dtype=np.float32)
    run = search(np.ones((1, 2), dtype=np.float32), vectors, ["q"], ["a", "b", "c"], top_k=10)
    assert list(run["q"]) == ["a", "b", "c"] and set(run["q"].values()) == {2.0}


def test_stored_dtypes_round_trip():
    rng = np.random.default_rng(1)
    vectors = (rng.standard_normal((64, 16)) * 3).astype(np.float32)
    assert (from_stored(to_stored(vectors, "float32"), "float32") == vectors).all()
    half = to_stored(vectors, "float16")
    assert half.dtype == np.float16 and (from_stored(half, "float16") == vectors.astype(np.float16)).all()
    brain = to_stored(vectors, "bfloat16")
    expected = torch.from_numpy(vectors).to(torch.bfloat16).float().numpy()  # torch rounds to nearest even too
    assert brain.dtype == np.uint16 and (from_stored(brain, "bfloat16") == expected).all()
    with pytest.raises(InvalidOptionError, match="beyond float16's range"):
        to_stored(np.array([[1e6]], dtype=np.float32), "float16")


# ---------------------------------------------------------------------------------------------------- pipeline


def test_shard_size_and_float32_storage_do_not_change_the_run(models, tmp_path):  # noqa: F811
    data = toy_dataset(tmp_path / "toy")
    # batch size 1: every text is encoded alone, so vectors do not depend on which texts share a shard
    one = evaluate([models["llama"]], [data], EvalSettings(cache=False, batch_size=1))
    many = evaluate([models["llama"]], [data], EvalSettings(shard_docs=2, embedding_dtype="float32", batch_size=1))
    assert many.results[0].run == one.results[0].run  # same documents, same float32 scores
    half = evaluate([models["llama"]], [data], EvalSettings(shard_docs=4, embedding_dtype="float16", batch_size=1))
    assert half.score("llama", "toy") == pytest.approx(one.score("llama", "toy"), abs=0.02)
    meta = json.loads((_cache_folder() / _keys_with_dtype("float16")[0] / "meta.json").read_text())
    assert meta["dtype"] == "float16" and meta["shard_docs"] == 4 and meta["rows"] == 6


def _keys_with_dtype(dtype: str) -> list[str]:
    return [
        p.parent.name
        for p in _cache_folder().glob("*/meta.json")
        if json.loads(p.read_text())["dtype"] == dtype and "documents" in json.loads(p.read_text())
    ]


def test_interrupted_encode_resumes_at_the_missing_shard(models, tmp_path):  # noqa: F811
    data = toy_dataset(tmp_path / "toy")
    settings = EvalSettings(shard_docs=2)
    first = evaluate([models["st"]], [data], settings)
    folder = _corpus_entry_folder()
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.ids.json",
        "00000.npy",
        "00001.ids.json",
        "00001.npy",
        "00002.ids.json",
        "00002.npy",
        "meta.json",
    ]
    assert json.loads((folder / "00001.ids.json").read_text())["ids"] == ["d3", "d4"]
    (folder / "00001.npy").unlink()  # as if the run had stopped there
    shard_2 = (folder / "00002.npy").read_bytes()
    (folder / "00002.npy").write_bytes(shard_2[:-8])  # and shard 2 were cut short
    totals: list[int | None] = []
    again = evaluate([models["st"]], [data], settings, progress=lambda done, total: totals.append(total))
    assert totals[0] == 4  # only the 2 + 2 documents of the two broken shards were encoded again
    assert not again.results[0].corpus_cached and again.results[0].run == first.results[0].run
    assert (folder / "00002.npy").read_bytes() == shard_2


def test_old_single_file_cache_entry_is_converted_not_reencoded(models, tmp_path):  # noqa: F811
    data = toy_dataset(tmp_path / "toy")
    first = evaluate([models["st"]], [data], EvalSettings(cache=False))
    folder = _cache_folder()
    source = resolve_model(models["st"])
    dataset = load_beir(data)
    vectors = np.stack([np.full(32, i, dtype=np.float32) for i in range(6)])  # recognizable, not the model's
    settings = {"kind": "corpus", "dtype": "torch.float32", **source.profile.passage_settings()}
    key = embedding_key(
        model_fingerprint=source.cache_identity, texts_hash=dataset.corpus_hash, settings=settings, version=1
    )
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{key}.npy", vectors)
    stages: list[str] = []
    report = evaluate([models["st"]], [data], stage=stages.append)
    assert any("old single-file cache format" in s for s in stages)
    assert not any("corpus with" in s for s in stages)  # nothing encoded
    shards = sorted(_corpus_entry_folder().glob("0*.npy"))
    assert (np.load(shards[0]) == vectors).all()
    assert report.results[0].run != first.results[0].run  # the converted (made-up) vectors were searched


def test_disk_full_while_writing_a_shard_leaves_no_whole_looking_file(models, tmp_path, monkeypatch):  # noqa: F811
    data = toy_dataset(tmp_path / "toy")
    import reforge.io.atomic as cache_module

    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up while shard 1 (its ids, written first) is being written
        if ".00001." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(cache_module.os, "fsync", fsync)
    with pytest.raises(DiskFullError, match="disk filled up while writing embedding shard .*00001"):
        evaluate([models["st"]], [data], EvalSettings(shard_docs=2))
    folder = _corpus_entry_folder()
    assert sorted(p.name for p in folder.iterdir()) == ["00000.ids.json", "00000.npy", "meta.json"]
    monkeypatch.setattr(cache_module.os, "fsync", real_fsync)
    assert evaluate([models["st"]], [data], EvalSettings(shard_docs=2)).results[0].scored_queries == 4


def test_missing_shard_at_search_time_is_a_clear_error(tmp_path):
    entry = EmbeddingCache(tmp_path).entry("k", 5, shard_docs=2, dtype="float16")
    entry.write_shard(0, np.zeros((2, 4), dtype=np.float32), ["a", "b"])
    assert entry.missing() == [1, 2]
    with pytest.raises(FileNotFoundError, match="00001.npy is missing or damaged"):
        entry.shards()


# ------------------------------------------------------------------------------------------------- torchrun


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)


@pytest.mark.slow
def test_two_gloo_ranks_search_their_own_shards_and_equal_one_process(models, tmp_path):  # noqa: F811
    data = toy_dataset(tmp_path / "toy")
    args = [
        str(models["st"]),
        "--data",
        str(data),
        "--json",
        "--device",
        "cpu",
        "--shard-docs",
        "2",
        "--metric",
        "nDCG@10",
        "--metric",
        "R@100",
    ]
    done = _torchrun(["-m", "reforge.cli.eval", *args, "--output", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = json.loads(done.stdout)  # only rank 0 printed
    assert distributed["settings"]["world_size"] == 2
    assert len(list(_corpus_entry_folder().glob("0*.npy"))) == 3  # ranks 0 and 1 wrote shards 0, 2 and 1
    from click.testing import CliRunner

    from reforge.cli import cli

    single = CliRunner().invoke(cli, ["eval", *args, "--no-cache", "--output", str(tmp_path / "one")])
    assert single.exit_code == 0, single.stderr
    runs = [(tmp_path / d / "runs" / "st__toy.trec").read_text() for d in ("one", "two")]
    assert runs[0] == runs[1] and len(runs[0].splitlines()) == 4 * 6
    assert distributed["results"][0]["scores"] == json.loads(single.stdout)["results"][0]["scores"]


@pytest.mark.slow
def test_ranks_reading_different_corpora_stop_before_encoding(models, tmp_path):  # noqa: F811
    for rank in (0, 1):
        toy_dataset(tmp_path / f"toy{rank}" / "toy")
    corpus = tmp_path / "toy1" / "toy" / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("dogs bark", "dogs growl"))
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys\n"
        "from reforge.eval import EvalSettings, evaluate\n"
        "from reforge.errors import DataError\n"
        "try:\n"
        f"    evaluate([{str(models['st'])!r}], [f'toy{{os.environ[\"RANK\"]}}/toy'], EvalSettings(device='cpu'))\n"
        "except DataError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    done = _torchrun([str(script)], tmp_path)
    assert done.returncode != 0 and "Ranks disagree on the corpus of toy" in done.stdout, done.stderr[-2000:]
    assert not list(_cache_folder().glob("*/*.npy"))  # nothing was encoded


@pytest.mark.slow
def test_ranks_leave_the_gloo_group_with_its_threads_before_they_exit(models, tmp_path):  # noqa: F811
    # Loading the model imports torch.distributed.nn, which used to pin the group (its default arguments) so that
    # gloo's threads outlived `evaluate` and now and then aborted a finished rank at exit (exit -6 in CI).
    toy_dataset(tmp_path / "toy")
    script = tmp_path / "run.py"
    script.write_text(
        "import os\n"
        "import torch.distributed as dist\n"
        "from reforge.eval import EvalSettings, evaluate\n"
        f"evaluate([{str(models['st'])!r}], ['toy'], EvalSettings(device='cpu', cache=False, shard_docs=2))\n"
        "gloo = [t for t in os.listdir('/proc/self/task') if 'gloo' in open(f'/proc/self/task/{t}/comm').read()]\n"
        "open(f'rank{os.environ[\"RANK\"]}.txt', 'w').write(f'{dist.is_initialized()} {len(gloo)}')\n"
    )
    done = _torchrun([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False 0"] * 2  # not initialized, no threads


def test_merge_breaks_score_ties_by_row_whatever_the_order_hits_arrive_in():
    scores = np.array([[0.5, 0.75, 0.5, 0.5]], dtype=np.float32)
    for rows in ([[7, 3, 2, 9]], [[9, 3, 7, 2]]):
        table = TopK.empty(1, 3).merge(scores, np.array(rows))
        assert table.rows.tolist() == [[3, 2, 7]] and table.scores.tolist() == [[0.75, 0.5, 0.5]]
    big = np.random.default_rng(3).standard_normal((2, 2**20 // 2 + 5)).astype(np.float16)  # the torch widening
    assert (from_stored(big, "float16") == big.astype(np.float32)).all()


def test_one_process_searches_on_every_gpu_it_sees_unless_one_is_named_or_ranks_split_them(monkeypatch):
    from reforge.dist import Ranks
    from reforge.eval.pipeline import _search_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert _search_devices("cpu", Ranks()) == ["cpu"]
    assert _search_devices("cuda", Ranks()) == ["cuda:0", "cuda:1", "cuda:2"]
    assert _search_devices("cuda:1", Ranks()) == ["cuda:1"]
    assert _search_devices("cuda:1", Ranks(rank=1, world=2, local=1)) == ["cuda:1"]
