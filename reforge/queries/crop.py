"""The model-free generator: a span of the document as its query (Contriever's independent cropping).

Contriever (Izacard et al., 2022) trains on pairs of spans cropped independently from one document, each 10% to 50%
of its length. Here the query is one such span of the document's text (the title when there is no text), at most
``max_words`` words so the over-long filter never drops it, and the document itself is what it must find. The span
is drawn from a generator seeded by the seed and the document id, so a document keeps its query when others change.
"""

from __future__ import annotations

import random

from reforge.data.lazy import Document

MIN_RATIO, MAX_RATIO = 0.1, 0.5  # Contriever's span lengths, as a fraction of the document


def crop_query(doc: Document, *, seed: int, max_words: int) -> str:
    """A span of 10% to 50% of the document's words (at least one, at most ``max_words``).

    Example:
        >>> doc = Document("d1", "", " ".join(f"w{i}" for i in range(40)))
        >>> q = crop_query(doc, seed=0, max_words=32)
        >>> q in doc.text, 4 <= len(q.split()) <= 20
        (True, True)
    """
    words = (doc.text or doc.title).split()
    if not words:
        return ""
    rng = random.Random(f"reforge-crop:{seed}:{doc.id}")
    length = round(rng.uniform(MIN_RATIO, MAX_RATIO) * len(words))
    length = max(1, min(length, max_words, len(words)))
    start = rng.randrange(0, len(words) - length + 1)
    return " ".join(words[start : start + length])
