"""Exact inner-product search with faiss (``IndexFlatIP``), on the GPU when faiss sees one, queries in chunks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GPU_MAX_K = 2048  # faiss GPU indexes return at most this many hits per query


def search(
    query_vectors: np.ndarray,
    doc_vectors: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    *,
    top_k: int = 1000,
    drop_identical_ids: bool = True,
    chunk_size: int = 1024,
    use_gpu: bool | None = None,
) -> dict[str, dict[str, float]]:
    """The ``top_k`` documents of each query by inner product, as a run ``{query_id: {doc_id: score}}``.

    Args:
        query_vectors, doc_vectors: float32 arrays (n, dim), rows aligned with ``query_ids`` / ``doc_ids``.
        top_k: hits kept per query (fewer when the corpus is smaller).
        drop_identical_ids: remove a hit whose doc id equals the query id, as BEIR does (one extra hit is fetched
            so ``top_k`` hits remain).
        chunk_size: queries searched at once, bounding memory to ``chunk_size * top_k`` results.
        use_gpu: None = on the GPU when ``faiss.get_num_gpus() > 0`` and ``top_k`` fits faiss's GPU limit.

    Example:
        >>> search(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), ["a", "b"], ["a", "x"], top_k=1)
        {'a': {'x': 0.0}, 'b': {'x': 1.0}}
    """
    import faiss

    if doc_vectors.shape[0] != len(doc_ids) or query_vectors.shape[0] != len(query_ids):
        raise ValueError("vectors and ids differ in length")
    extra = 1 if drop_identical_ids and not set(query_ids).isdisjoint(doc_ids) else 0
    k = min(top_k + extra, len(doc_ids))
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0 and k <= GPU_MAX_K
    if use_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(np.ascontiguousarray(doc_vectors, dtype=np.float32))
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(query_ids), chunk_size):
        chunk = np.ascontiguousarray(query_vectors[start : start + chunk_size], dtype=np.float32)
        scores, indices = index.search(chunk, k)
        for row, query_id in enumerate(query_ids[start : start + chunk_size]):
            hits: dict[str, float] = {}
            for score, index_ in zip(scores[row].tolist(), indices[row].tolist()):
                if index_ < 0:
                    continue
                doc_id = doc_ids[index_]
                if drop_identical_ids and doc_id == query_id:
                    continue
                if len(hits) < top_k:
                    hits[doc_id] = score
            run[query_id] = hits
    return run
