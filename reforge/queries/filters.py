"""What is dropped from the generated queries, and why (each dropped query keeps its reason for the record).

In order: ``empty`` (no word), ``too_long`` (more than ``max_words`` words), ``copied`` (an LM query that repeats
``max_copy`` or more consecutive words of its document: a query that copies its answer only tests word matching;
cropped queries are spans by design and skip it), ``duplicate`` (the same words, ignoring case and punctuation, as
a query kept before it). The optional BM25 filter (`reforge.queries.bm25`) comes last. None of them uses the
retriever being judged: a filter that keeps the queries the retriever already answers would favour alpha 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from reforge.data.lazy import Document

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class FilterSettings:
    """The limits of the filters; ``max_copy`` 0 turns the copy filter off."""

    max_words: int = 32
    max_copy: int = 8

    def to_dict(self) -> dict:
        """JSON form, for the record."""
        return {"max_words": self.max_words, "max_copy": self.max_copy}


@dataclass(frozen=True)
class Candidate:
    """A generated query for one document, before filtering."""

    doc_id: str
    text: str


def words(text: str) -> list[str]:
    """Lowercased word tokens (letters, digits, underscore), the unit of every filter."""
    return _WORD.findall(text.lower())


def copied_span(query: str, document: str) -> int:
    """The length in words of the longest run of consecutive query words that also occurs in the document.

    Example:
        >>> copied_span("does aspirin lower the risk of heart attack", "Aspirin lowers the risk of heart attack.")
        5
    """
    q, d = words(query), words(document)
    best = 0
    previous = [0] * (len(d) + 1)
    for qi in range(1, len(q) + 1):
        current = [0] * (len(d) + 1)
        for di in range(1, len(d) + 1):
            if q[qi - 1] == d[di - 1]:
                current[di] = previous[di - 1] + 1
                best = max(best, current[di])
        previous = current
    return best


def apply_filters(
    candidates: Iterable[Candidate], documents: dict[str, Document], settings: FilterSettings, *, copy_check: bool
) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """``(kept, dropped)``: ``dropped`` pairs each query with its reason (``empty``, ``too_long``, ``copied``,
    ``duplicate``), in input order.

    Example:
        >>> docs = {"a": Document("a", "", "one two three four five six seven eight nine")}
        >>> kept, dropped = apply_filters(
        ...     [Candidate("a", "what is two"), Candidate("a", "What is two?"), Candidate("a", "")],
        ...     docs, FilterSettings(), copy_check=True)
        >>> [c.text for c in kept], [reason for _, reason in dropped]
        (['what is two'], ['duplicate', 'empty'])
    """
    kept: list[Candidate] = []
    dropped: list[tuple[Candidate, str]] = []
    seen: set[tuple[str, ...]] = set()
    for candidate in candidates:
        reason = _reason(candidate, documents, settings, copy_check, seen)
        if reason is None:
            seen.add(tuple(words(candidate.text)))
            kept.append(candidate)
        else:
            dropped.append((candidate, reason))
    return kept, dropped


def _reason(
    candidate: Candidate,
    documents: dict[str, Document],
    settings: FilterSettings,
    copy_check: bool,
    seen: set[tuple[str, ...]],
) -> str | None:
    tokens = tuple(words(candidate.text))
    if not tokens:
        return "empty"
    if len(candidate.text.split()) > settings.max_words:
        return "too_long"
    if copy_check and settings.max_copy > 0:
        doc = documents[candidate.doc_id]
        if copied_span(candidate.text, f"{doc.title} {doc.text}") >= settings.max_copy:
            return "copied"
    if tokens in seen:
        return "duplicate"
    return None


def count_reasons(dropped: Sequence[tuple[Candidate, str]]) -> dict[str, int]:
    """``{reason: count}`` over the dropped queries, every reason listed (0 when none)."""
    counts = dict.fromkeys(("empty", "too_long", "copied", "duplicate", "bm25"), 0)
    for _, reason in dropped:
        counts[reason] = counts.get(reason, 0) + 1
    return counts
