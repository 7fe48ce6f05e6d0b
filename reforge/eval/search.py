"""Exact inner-product search, streamed over blocks of document vectors with a running top-k per query.

Each block (a shard of the embedding cache, or a slice of one) is searched exactly, by faiss (``faiss.knn``, the
brute-force kernel behind ``IndexFlatIP``) on the CPU or by a matmul + ``torch.topk`` on a GPU, and merged into a
`TopK` table of ``(queries, k)`` scores and row numbers. Memory is one block plus that table, whatever the corpus
size; under torchrun each rank searches its own shards and only the tables cross ranks (`TopK.merge`).

Ties are broken by row number (lower first), so the result does not depend on block size or rank count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_BYTES = 256 * 2**20  # float32 bytes of one searched block: bounds host (or GPU) memory per step


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
        unused = all_rows < 0
        keys = np.where(unused, np.inf, -all_scores)
        order = np.argsort(keys, axis=1, kind="stable")  # one key: ~5x faster than lexsort
        rows = np.take_along_axis(all_rows, order, 1)
        ranked = np.take_along_axis(keys, order, 1)
        ties = (ranked[:, 1:] == ranked[:, :-1]) & (rows[:, 1:] < rows[:, :-1]) & (rows[:, 1:] >= 0)
        redo = np.nonzero(ties.any(axis=1))[0]  # queries with equal scores out of row order: sort those by row too
        if redo.size:
            by_row = np.where(unused[redo], np.iinfo(np.int64).max, all_rows[redo])
            order[redo] = np.lexsort((by_row, keys[redo]), axis=1)
        order = order[:, :k]
        return TopK(np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_rows, order, 1))


def block_rows_for(dim: int) -> int:
    """Rows per searched block: `BLOCK_BYTES` of float32 (at least 1024 rows)."""
    return max(1024, BLOCK_BYTES // (4 * max(1, dim)))


def search_blocks(
    query_vectors: np.ndarray,
    blocks: Iterable[tuple[int, np.ndarray]],
    k: int,
    *,
    device: str = "cpu",
    chunk_size: int = 1024,
) -> TopK:
    """The top ``k`` rows per query over ``blocks`` of ``(first row, float32 vectors)``, searched one at a time.

    Args:
        query_vectors: float32 (queries, dim).
        blocks: document vectors in pieces; each is searched and dropped before the next is read.
        k: hits kept per query.
        device: ``cpu`` searches with faiss; ``cuda[:n]`` with a torch matmul + top-k on that GPU.
        chunk_size: queries searched at once against a block, bounding the score tile.
    """
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    table = TopK.empty(queries.shape[0], k)
    search_one = _torch_block(queries, device) if device.startswith("cuda") else _faiss_block(queries)
    for first, block in blocks:
        if block.shape[0] == 0:
            continue
        width = min(k, block.shape[0])
        parts = [search_one(block, start, start + chunk_size, width) for start in range(0, len(queries), chunk_size)]
        scores = np.concatenate([p[0] for p in parts])
        rows = np.concatenate([p[1] for p in parts])
        rows = np.where(rows >= 0, rows + first, -1)
        table = table.merge(scores, rows)
    return table


BlockSearch = Callable[[np.ndarray, int, int, int], tuple[np.ndarray, np.ndarray]]


def _faiss_block(queries: np.ndarray) -> BlockSearch:
    import faiss

    def search_one(block: np.ndarray, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        block = np.ascontiguousarray(block, dtype=np.float32)
        scores, rows = faiss.knn(queries[start:stop], block, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, rows

    return search_one


def _torch_block(queries: np.ndarray, device: str) -> BlockSearch:
    import torch

    on_device = torch.from_numpy(queries).to(device)
    state: dict[int, torch.Tensor] = {}

    def search_one(block: np.ndarray, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        if start == 0:  # a new block: copy it to the GPU once for all query chunks
            state[0] = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device)
        scores, rows = torch.topk(on_device[start:stop] @ state[0].T, k, dim=1)
        return scores.cpu().numpy(), rows.cpu().numpy().astype(np.int64)

    return search_one


def to_run(
    table: TopK,
    query_ids: Sequence[str],
    ids_of: Callable[[np.ndarray], dict[int, str]],
    *,
    top_k: int,
    drop_identical_ids: bool = True,
) -> dict[str, dict[str, float]]:
    """A run ``{query_id: {doc_id: score}}`` from a `TopK` table: ``ids_of(rows)`` names the rows that occur, a hit
    whose doc id equals its query id is dropped (BEIR), and ``top_k`` hits are kept per query."""
    names = ids_of(np.unique(table.rows[table.rows >= 0]))
    run: dict[str, dict[str, float]] = {}
    for query, query_id in enumerate(query_ids):
        hits: dict[str, float] = {}
        for score, row in zip(table.scores[query].tolist(), table.rows[query].tolist()):
            if row < 0 or len(hits) >= top_k:
                continue
            doc_id = names[row]
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
        lambda rows: {int(r): doc_ids[int(r)] for r in rows},
        top_k=top_k,
        drop_identical_ids=drop_identical_ids,
    )
