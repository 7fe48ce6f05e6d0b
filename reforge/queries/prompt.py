"""The few-shot prompt of the LM generator (InPars-style: a few document -> query examples, then the document).

The examples shipped here were written for reforge on everyday topics (history, cycling, baking, geology) that none
of the collections in docs/results.md covers: a user without labels has no examples of their own, and examples
taken from the collection being judged would leak its query style into the score. Replace them with ``--examples
FILE`` (JSONL, one ``{"document": ..., "query": ...}`` per line).

Instruct models (a tokenizer with a chat template) get the instruction as a system message and each example as a
user turn (the document) and an assistant turn (the query); the document to ask about is the last user turn. Other
models get InPars' plain text, ``Document: ...`` / ``Query: ...`` blocks, and continue after the last ``Query:``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from reforge.data.beir import iter_jsonl
from reforge.data.lazy import Document
from reforge.errors import DataError, short_path

INSTRUCTION = (
    "You write search queries. Given a document, write one short question or keyword query that a person would type "
    "into a search engine and that this document answers. Use your own words. Reply with the query only."
)

EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "The Rosetta Stone is a granite slab inscribed in 196 BC with one decree in three scripts: Egyptian "
        "hieroglyphs, Demotic and ancient Greek. Because scholars could read the Greek, the stone became the key "
        "to deciphering hieroglyphs in the 1820s.",
        "why was the rosetta stone important",
    ),
    (
        "A derailleur moves the chain between sprockets of different sizes. A larger rear sprocket gives a lower "
        "gear: the rider pedals more easily uphill but travels a shorter distance with each turn of the pedals.",
        "which gear is easier for cycling uphill",
    ),
    (
        "Sourdough is leavened by a culture of wild yeast and lactic acid bacteria. The bacteria produce lactic and "
        "acetic acid, which give the bread its sour taste and keep it from going stale as fast as yeast bread.",
        "what makes sourdough bread sour",
    ),
    (
        "Basalt forms when lava rich in iron and magnesium cools quickly at the surface. Fast cooling leaves little "
        "time for crystals to grow, so the rock is fine grained and usually dark grey to black.",
        "how does basalt form",
    ),
)


@dataclass(frozen=True)
class Prompt:
    """The instruction and the ``(document, query)`` examples, and how many words of a document it shows."""

    instruction: str = INSTRUCTION
    examples: tuple[tuple[str, str], ...] = EXAMPLES
    max_doc_words: int = 160
    source: str = "reforge built-in"

    def document_text(self, doc: Document) -> str:
        """The document as shown to the model: title and text, cut to ``max_doc_words`` words."""
        words = f"{doc.title}. {doc.text}".split() if doc.title else doc.text.split()
        return " ".join(words[: self.max_doc_words])

    def messages(self, doc: Document, *, system: bool = True) -> list[dict[str, str]]:
        """The chat of an instruct model: system instruction, example turns, then the document. With ``system``
        False (templates that refuse a system turn, such as Gemma's) the instruction opens the first user turn."""
        turns = [(document, query) for document, query in self.examples] + [(self.document_text(doc), None)]
        chat = [{"role": "system", "content": self.instruction}] if system else []
        for i, (document, query) in enumerate(turns):
            lead = "" if system or i else f"{self.instruction}\n\n"
            chat.append({"role": "user", "content": f"{lead}Document: {document}"})
            if query is not None:
                chat.append({"role": "assistant", "content": query})
        return chat

    def plain(self, doc: Document) -> str:
        """InPars' plain-text prompt, for a model without a chat template."""
        blocks = [self.instruction, ""]
        for document, query in self.examples:
            blocks += [f"Document: {document}", f"Query: {query}", ""]
        return "\n".join([*blocks, f"Document: {self.document_text(doc)}", "Query:"])

    def to_dict(self) -> dict:
        """What the record shows (and the cache key hashes)."""
        return {
            "instruction": self.instruction,
            "examples": [{"document": d, "query": q} for d, q in self.examples],
            "max_doc_words": self.max_doc_words,
            "source": self.source,
        }

    @property
    def digest(self) -> str:
        """SHA-256 of `to_dict` without ``source`` (the same examples from another file are the same prompt)."""
        facts = {k: v for k, v in self.to_dict().items() if k != "source"}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def read_examples(path: str | Path) -> tuple[tuple[str, str], ...]:
    """``(document, query)`` pairs from a JSONL file of ``{"document": ..., "query": ...}`` objects.

    Raises:
        DataError: the file is missing, a line lacks one of the fields or has an empty one, or it holds no example.
    """
    path = Path(path)
    pairs = []
    for number, row in iter_jsonl(path):
        document, query = str(row.get("document") or "").strip(), str(row.get("query") or "").strip()
        if not document or not query:
            raise DataError(
                f"{short_path(path)}, line {number}: an example needs a non-empty 'document' and 'query'.",
                hint='Write one {"document": "...", "query": "..."} object per line.',
                path=path,
                line=number,
            )
        pairs.append((document, query))
    if not pairs:
        raise DataError(f"{short_path(path)} holds no example.", path=path, line=None)
    return tuple(pairs)
