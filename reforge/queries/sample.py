"""Which documents get a query: ``n`` spread evenly over the corpus, each long enough to ask about.

The corpus is cut into ``n`` equal runs of consecutive documents (strata) and one document is drawn from each run,
so a corpus sorted by topic or date is covered from end to end. Inside a run, positions are tried in a seeded random
order until one holds at least ``min_words`` words (title and text): only the documents tried are parsed (a
`reforge.data.lazy.LazyCorpus` reads each one at its offset), so a 10 GB corpus is never held in memory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from reforge.data.lazy import Document


@dataclass(frozen=True)
class Sample:
    """The drawn documents in corpus order, and what was skipped to find them.

    ``too_short`` counts documents read and skipped for having fewer than ``min_words`` words; ``empty_strata``
    counts runs of the corpus in which no document was long enough (each costs one query).
    """

    documents: tuple[Document, ...]
    corpus_size: int
    too_short: int
    empty_strata: int


def word_count(doc: Document) -> int:
    """Words (whitespace-separated) in the title and text."""
    return len(doc.title.split()) + len(doc.text.split())


def sample_documents(corpus: Sequence[Document], n: int, *, seed: int, min_words: int) -> Sample:
    """Up to ``n`` documents of at least ``min_words`` words, one per stratum of ``len(corpus) / n`` documents.

    Example:
        >>> docs = [Document(str(i), "", "word " * (i % 30)) for i in range(100)]
        >>> s = sample_documents(docs, 5, seed=0, min_words=10)
        >>> len(s.documents), all(len(d.text.split()) >= 10 for d in s.documents)
        (5, True)
    """
    size = len(corpus)
    strata = min(n, size)
    rng = random.Random(f"reforge-queries-sample:{seed}")
    chosen: list[Document] = []
    too_short = empty = 0
    for k in range(strata):
        lo, hi = k * size // strata, (k + 1) * size // strata
        order = list(range(lo, hi))
        rng.shuffle(order)
        for position in order:
            doc = corpus[position]
            if word_count(doc) >= min_words:
                chosen.append(doc)
                break
            too_short += 1
        else:
            empty += 1
    return Sample(tuple(chosen), size, too_short, empty)
