"""A small BM25 in numpy, used to mine hard negatives for the miniature retriever.

Scoring is Lucene's BM25 (what Pyserini and BEIR's Elasticsearch baseline use), with k1 0.9 and b 0.4:

    score(q, d) = sum over query tokens t of  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Tokens are lowercased runs of word characters (``\\w+``): no stemming, no stop-word list. A token repeated in the
query counts once per occurrence, as in a Lucene bag-of-words query. Ties rank the earlier document first.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercased ``\\w+`` tokens of ``text``."""
    return _TOKEN.findall(text.lower())


class BM25:
    """An inverted index over a list of texts, scored with BM25.

    Args:
        texts: the documents' texts (for BEIR, ``title + " " + text``).
        ids: one id per text (default: the positions as strings).
        k1, b: BM25's term-frequency saturation and length normalisation.

    Example:
        >>> index = BM25(["the cat sat", "a dog barked", "cat and dog"], ids=["c", "d", "cd"])
        >>> [doc_id for doc_id, _ in index.search("cat", k=2)]
        ['c', 'cd']
    """

    def __init__(
        self, texts: Sequence[str], ids: Sequence[str] | None = None, *, k1: float = 0.9, b: float = 0.4
    ) -> None:
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"BM25 got {len(texts)} texts but {len(ids)} ids; give one id per text.")
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
        self.k1, self.b = k1, b
        counts = [Counter(tokenize(text)) for text in texts]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        self.n_docs = len(texts)
        self.avgdl = float(lengths.mean()) if self.n_docs and lengths.sum() else 1.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for doc, counter in enumerate(counts):
            for term, tf in counter.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(doc)
                tfs.append(tf)
        norm = k1 * (1.0 - b + b * lengths / self.avgdl)
        # Per term: the documents holding it and their precomputed BM25 weight (idf included).
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, (docs, tfs) in postings.items():
            docs_a, tf_a = np.array(docs, dtype=np.int64), np.array(tfs, dtype=np.float64)
            idf = math.log(1.0 + (self.n_docs - len(docs) + 0.5) / (len(docs) + 0.5))
            self._postings[term] = (docs_a, idf * tf_a * (k1 + 1.0) / (tf_a + norm[docs_a]))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every document, in index order (float64, zeros where nothing matches)."""
        total = np.zeros(self.n_docs, dtype=np.float64)
        for term in tokenize(query):
            if term in self._postings:
                docs, weights = self._postings[term]
                total[docs] += weights
        return total

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best ``(doc_id, score)`` pairs with a score above 0, best first (ties: earlier document first)."""
        total = self.scores(query)
        order = np.argsort(-total, kind="stable")[:k]
        return [(self.ids[i], float(total[i])) for i in order if total[i] > 0]
