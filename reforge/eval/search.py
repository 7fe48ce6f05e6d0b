"""Exact inner-product search, streamed over blocks of document vectors with a running top-k per query.

Each block (a shard of the embedding cache, or a slice of one) is searched exactly, by faiss (``faiss.knn``, the
brute-force kernel behind ``IndexFlatIP``) on the CPU or by a matmul + ``torch.topk`` on a GPU, and merged into a
`TopK` table of ``(queries, k)`` scores and row numbers. Memory is one block plus that table, whatever the corpus
size; under torchrun each rank searches its own shards and only the tables cross ranks (`TopK.merge`).

Ties are broken by row number (lower first), so the result does not depend on block size or rank count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# faiss multiplies the queries by 1,024 documents at a time (``distance_compute_blas_database_bs``), and another
# split can change a score's last bit (OpenBLAS picks kernels by shape): blocks of whole tiles keep the scores of one
# flat index
TILE_ROWS = 1024
BLOCK_BYTES = 64 * 2**20  # float32 bytes of one searched block (3 of them per GPU, which reads ahead; 1 on the CPU)


@dataclass(frozen=True)
class TopK:
    """The best ``k`` hits per query so far: ``scores`` (queries, k) float32, best first (-inf where there is none),
    and ``rows`` (queries, k) int64 row numbers into the corpus (-1 where there is none)."""

    scores: np.ndarray
    rows: np.ndarray

    @classmethod
    def empty(cls, queries: int, k: int) -> "TopK":
        """A table with no hits yet."""
        return cls(np.full((queries, k), -np.inf, dtype=np.float32), np.full((queries, k), -1, dtype=np.int64))

    def merge(self, scores: np.ndarray, rows: np.ndarray) -> "TopK":
        """This table merged with more hits for the same queries (any width), keeping the best ``k`` per query."""
        k = self.scores.shape[1]
        all_scores = np.concatenate([self.scores, scores.astype(np.float32, copy=False)], axis=1)
        all_rows = np.concatenate([self.rows, rows.astype(np.int64, copy=False)], axis=1)
        keys = np.where(all_rows < 0, np.inf, -all_scores)
        order = _ties_by_row(np.argsort(keys, axis=1, kind="stable"), keys, all_rows)[:, :k]  # one key: ~5x lexsort
        return TopK(np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_rows, order, 1))


def _ties_by_row(order: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``order`` (which sorts each query's ``keys``) with equal keys in row order: only the queries whose equal keys
    are out of row order are sorted again, by ``(key, row)``."""
    redo = _out_of_row_order(np.take_along_axis(keys, order, 1), np.take_along_axis(rows, order, 1))
    if redo.size:
        order[redo] = _by_key_then_row(keys[redo], rows[redo])
    return order


def _ranked_ties_by_row(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hits already best first (faiss's order) with equal scores put in row order, for the queries that need it."""
    redo = _out_of_row_order(-scores, rows)
    if redo.size:
        order = _by_key_then_row(-scores[redo], rows[redo])
        scores, rows = scores.copy(), rows.copy()
        scores[redo], rows[redo] = np.take_along_axis(scores[redo], order, 1), np.take_along_axis(rows[redo], order, 1)
    return scores, rows


def _out_of_row_order(ranked: np.ndarray, ranked_rows: np.ndarray) -> np.ndarray:
    """The queries whose sorted ``ranked`` keys hold equal keys with a higher row first."""
    ties = (ranked[:, 1:] == ranked[:, :-1]) & (ranked_rows[:, 1:] < ranked_rows[:, :-1]) & (ranked_rows[:, 1:] >= 0)
    return np.nonzero(ties.any(axis=1))[0]


def _by_key_then_row(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), keys), axis=1)


def block_rows_for(dim: int) -> int:
    """Rows per searched block: `BLOCK_BYTES` of float32, in whole tiles of `TILE_ROWS` (at least one)."""
    return max(1, BLOCK_BYTES // (4 * max(1, dim)) // TILE_ROWS) * TILE_ROWS


Rows = int | np.ndarray  # a block's first row (its rows follow on), or the row number of each of its vectors


def search_blocks(
    query_vectors: np.ndarray,
    blocks: Iterable[tuple[Rows, np.ndarray]],
    k: int,
    *,
    device: str = "cpu",
    chunk_size: int = 1024,
) -> TopK:
    """The top ``k`` rows per query over ``blocks`` of ``(rows, float32 vectors)``, searched one at a time.

    The running top-k lives in a faiss heap (`faiss.ResultHeap`, merged in C++). Once it is full, a block is asked
    only for the hits each query can expect from it (``k * block / rows seen`` plus 5 standard deviations), not
    ``k``: selecting and merging 1,000 hits per query per block cost more than the matmul at 16k rows. A query whose
    last hit still beats its running k-th score makes the block be searched again with the full ``k``, so the table is
    the one ``k`` per block gives: hits no better than the k-th score so far never enter (a later row loses a tie).

    Args:
        query_vectors: float32 (queries, dim).
        blocks: document vectors in pieces, in increasing row order; each is searched before the next is read.
        k: hits kept per query.
        device: ``cpu`` searches with faiss; ``cuda[:n]`` with a torch matmul + top-k on that GPU.
        chunk_size: queries searched at once against a block, bounding the score tile.
    """
    import faiss

    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    kernel = _torch_kernel(queries, device, chunk_size) if device.startswith("cuda") else _faiss_kernel(queries)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    seen = 0
    for rows, block in blocks:
        if block.shape[0] == 0:
            continue
        _add_block(heap, kernel, block, _row_numbers(rows, block.shape[0]), seen)
        seen += block.shape[0]
    heap.finalize()  # best first, but equal scores in no particular order
    scores, rows = _ranked_ties_by_row(np.where(heap.I < 0, -np.inf, heap.D).astype(np.float32), heap.I)
    return TopK(scores, rows)


Kernel = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _add_block(heap: Any, kernel: Kernel, block: np.ndarray, rows: np.ndarray, seen: int) -> None:
    """Merge one block's hits into ``heap`` (see `search_blocks`)."""
    k = heap.k
    full = min(k, block.shape[0])
    expected = k * block.shape[0] / max(1, seen)  # rows that beat the k-th of ``seen`` random ones, on average
    width = full if seen < k else min(full, int(expected + 5 * expected**0.5) + 16)  # + 5 standard deviations
    kth = heap.D[:, 0].copy()  # a min-heap: its top is each query's k-th best score so far
    scores, found = kernel(block, width)
    if width < full and (scores[:, width - 1] > kth).any():  # a query may have more hits here: take the full k
        scores, found = kernel(block, full)  # for every query: a smaller product can round a last bit otherwise
    hits = np.where(found < 0, -1, rows[found])  # faiss gives -1 for a NaN score
    # the heap keeps the first of equal scores it is given, and faiss returns ties in no particular order
    heap.add_result(*_ranked_ties_by_row(scores, hits))


def _row_numbers(rows: Rows, count: int) -> np.ndarray:
    if isinstance(rows, np.ndarray):
        return rows.astype(np.int64, copy=False)
    return np.arange(rows, rows + count, dtype=np.int64)


def _faiss_kernel(queries: np.ndarray) -> Kernel:
    import faiss

    def kernel(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        block = np.ascontiguousarray(block, dtype=np.float32)
        return faiss.knn(queries, block, k, metric=faiss.METRIC_INNER_PRODUCT)

    return kernel


def _torch_kernel(queries: np.ndarray, device: str, chunk_size: int) -> Kernel:
    import torch

    on_device = torch.from_numpy(queries).to(device)

    def kernel(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device)
        chunks = range(0, len(on_device), chunk_size)
        parts = [torch.topk(_no_nan(on_device[at : at + chunk_size] @ vectors.T), k, dim=1) for at in chunks]
        scores = torch.cat([p.values for p in parts]).cpu().numpy()
        return scores, torch.cat([p.indices for p in parts]).cpu().numpy().astype(np.int64)

    return kernel


def _no_nan(scores: Any) -> Any:
    """``scores`` with NaN as -inf: torch.topk ranks NaN above every number, faiss never returns it."""
    import torch

    return scores.masked_fill_(scores.isnan(), -torch.inf)


def search_shards(
    query_vectors: np.ndarray,
    shards: Sequence[Any],
    k: int,
    *,
    devices: Sequence[str] = ("cpu",),
    chunk_size: int = 1024,
) -> TopK:
    """The top ``k`` rows per query over cache shards (`reforge.eval.cache.Shard`), spread over ``devices``.

    Device ``i`` searches shards ``i, i + len(devices), ...`` in its own thread (faiss and CUDA release the GIL),
    block by block (`read_blocks`; a GPU's blocks are read one ahead); the devices' tables are merged on the host
    (`TopK.merge`, ties by row), so the run does not depend on the number of devices: one device is the same path
    with a list of one.
    """
    from concurrent.futures import ThreadPoolExecutor

    block_rows = block_rows_for(query_vectors.shape[1])

    def one(device: str, mine: Sequence[Any]) -> TopK:
        # a GPU leaves the CPU free to read the next block meanwhile; on the CPU faiss uses every core and a reader
        # thread only takes a core from it (9.0 s against 8.3 s at 1M documents on 2 cores, docs/eval.md)
        blocks = read_blocks(mine, block_rows, buffers=3 if device.startswith("cuda") else 1)
        return search_blocks(query_vectors, blocks, k, device=device, chunk_size=chunk_size)

    parts = [list(shards[i :: len(devices)]) for i in range(len(devices))]
    with ThreadPoolExecutor(len(devices), thread_name_prefix="reforge-search") as pool:
        tables = list(pool.map(one, devices, parts))
    table = tables[0]
    for other in tables[1:]:
        table = table.merge(other.scores, other.rows)
    return table


def read_blocks(shards: Sequence[Any], block_rows: int, *, buffers: int = 3) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(row numbers, float32 vectors)`` blocks of at most ``block_rows`` rows over ``shards``, read and widened into
    ``buffers`` reused arrays (no allocation, and no page faults, per block): with one buffer in the caller's thread,
    with more by a reader thread one block ahead.

    A yielded block is valid until the next one is asked for (its buffer is then refilled).
    """
    import queue
    import threading

    if buffers == 2:  # the reader would refill the block being searched (one is searched, one queued, one filled)
        raise ValueError("read_blocks needs 1 or at least 3 buffers")
    if not shards:
        return
    dim = _shard_dim(shards[0])
    if buffers == 1:  # read in the searching thread
        out = np.empty((block_rows, dim), dtype=np.float32)
        for pieces in _plan(shards, block_rows):
            yield _fill(pieces, out)
        return
    pool = [np.empty((block_rows, dim), dtype=np.float32) for _ in range(buffers)]
    ready: queue.Queue = queue.Queue(maxsize=buffers - 2)  # one buffer searched, one queued, one being filled
    stop = threading.Event()

    def fill() -> None:
        try:
            for count, pieces in enumerate(_plan(shards, block_rows)):
                block = _fill(pieces, pool[count % buffers])
                if stop.is_set():
                    return
                ready.put(block)
            ready.put(None)
        except BaseException as error:  # handed to the searching thread, which raises it
            ready.put(error)

    reader = threading.Thread(target=fill, name="reforge-shard-reader", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        reader.join()


def _fill(pieces: list[tuple[Any, int, int]], out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    at, rows = 0, []
    for shard, first, last in pieces:
        shard.read_into(first, last, out[at : at + last - first])
        rows.append(np.arange(shard.start + first, shard.start + last, dtype=np.int64))
        at += last - first
    return np.concatenate(rows), out[:at]


def _plan(shards: Sequence[Any], block_rows: int) -> Iterator[list[tuple[Any, int, int]]]:
    """Blocks as lists of ``(shard, first, last)`` row ranges (shard-local), at most ``block_rows`` rows each."""
    pieces: list[tuple[Any, int, int]] = []
    rows = 0
    for shard in shards:
        at = 0
        while at < shard.rows:
            take = min(shard.rows - at, block_rows - rows)
            pieces.append((shard, at, at + take))
            rows, at = rows + take, at + take
            if rows == block_rows:
                yield pieces
                pieces, rows = [], 0
    if pieces:
        yield pieces


def _shard_dim(shard: Any) -> int:
    return int(shard.array().shape[1])


def to_run(
    table: TopK,
    query_ids: Sequence[str],
    ids_of: Callable[[np.ndarray], Sequence[str]],
    *,
    top_k: int,
    drop_identical_ids: bool = True,
) -> dict[str, dict[str, float]]:
    """A run ``{query_id: {doc_id: score}}`` from a `TopK` table: ``ids_of(rows)`` names the rows that occur (sorted,
    distinct; one id each, in that order), a hit whose doc id equals its query id is dropped (BEIR), and ``top_k``
    hits are kept per query. What is held besides the run is a row array and a list of ids, ~16 bytes a hit document
    plus its id (a dict by row took ~100 more)."""
    rows = np.unique(table.rows[table.rows >= 0])
    names = ids_of(rows)
    where = np.searchsorted(rows, np.maximum(table.rows, 0))  # each hit's place in ``names``
    run: dict[str, dict[str, float]] = {}
    for query, query_id in enumerate(query_ids):
        hits: dict[str, float] = {}
        for score, row, at in zip(table.scores[query].tolist(), table.rows[query].tolist(), where[query].tolist()):
            if row < 0 or len(hits) >= top_k:
                continue
            doc_id = names[at]
            if drop_identical_ids and doc_id == query_id:
                continue
            hits[doc_id] = score
        run[query_id] = hits
    return run


def search(
    query_vectors: np.ndarray,
    doc_vectors: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    *,
    top_k: int = 1000,
    drop_identical_ids: bool = True,
    chunk_size: int = 1024,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """The ``top_k`` documents of each query by inner product, as a run ``{query_id: {doc_id: score}}``, for
    vectors already in memory (the pipeline streams cache shards through `search_blocks` instead).

    Args:
        query_vectors, doc_vectors: float32 arrays (n, dim), rows aligned with ``query_ids`` / ``doc_ids``.
        top_k: hits kept per query (fewer when the corpus is smaller).
        drop_identical_ids: remove a hit whose doc id equals the query id, as BEIR does (one extra hit is fetched
            so ``top_k`` hits remain).
        chunk_size: queries searched at once.
        device: ``cpu`` (faiss) or a CUDA device (torch).

    Example:
        >>> search(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), ["a", "b"], ["a", "x"], top_k=1)
        {'a': {'x': 0.0}, 'b': {'x': 1.0}}
    """
    if doc_vectors.shape[0] != len(doc_ids) or query_vectors.shape[0] != len(query_ids):
        raise ValueError("vectors and ids differ in length")
    k = min(top_k + int(drop_identical_ids), len(doc_ids))
    step = block_rows_for(doc_vectors.shape[1])
    blocks = ((at, doc_vectors[at : at + step]) for at in range(0, len(doc_ids), step))
    table = search_blocks(query_vectors, blocks, k, device=device, chunk_size=chunk_size)
    return to_run(
        table,
        query_ids,
        lambda rows: [doc_ids[r] for r in rows.tolist()],
        top_k=top_k,
        drop_identical_ids=drop_identical_ids,
    )
