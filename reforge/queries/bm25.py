"""The optional BM25 filter: keep a query only if BM25 over the whole corpus ranks its document in the top ``k``.

A query BM25 cannot place near its document is often too vague to have one answer ("what is the purpose of the
study?"); dropping it leaves queries that point at their document. BM25 (`reforge.eval.bm25`, bm25s with MTEB's
English settings) is independent of the retriever being judged: a filter that used that retriever would keep the
queries it already answers, and favour alpha 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from reforge.data.lazy import Document
from reforge.queries.filters import Candidate


def bm25_filter(
    kept: list[Candidate], corpus: Sequence[Document], top: int
) -> tuple[list[Candidate], list[tuple[Candidate, str]], dict]:
    """``(kept, dropped with reason "bm25", the BM25 settings)``: BM25 indexes ``corpus`` and ranks the first
    ``top`` documents for each query.

    Raises:
        InvalidOptionError: bm25s is not installed (from `reforge.eval.bm25`).
    """
    from reforge.eval.bm25 import BM25Settings, bm25_run

    settings = BM25Settings()
    run = bm25_run(corpus, {str(i): c.text for i, c in enumerate(kept)}, k=top, settings=settings)
    passed, dropped = [], []
    for i, candidate in enumerate(kept):
        if candidate.doc_id in run.get(str(i), {}):
            passed.append(candidate)
        else:
            dropped.append((candidate, "bm25"))
    return passed, dropped, {**settings.to_dict(), "top": top}
