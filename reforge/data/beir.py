"""BEIR-style datasets: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/<split>.tsv`` (header ``query-id corpus-id score``).

Readers raise `DataError` naming the file and line of anything malformed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from reforge.errors import DataError, short_path


@dataclass(frozen=True)
class Document:
    """One corpus entry."""

    id: str
    title: str
    text: str

    def passage(self, separator: str = " ") -> str:
        """Title and text joined the way retrievers see passages (BEIR: ``title + " " + text``)."""
        return f"{self.title}{separator}{self.text}".strip() if self.title else self.text.strip()


def iter_jsonl(path: str | Path, *, skip_bad_lines: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-empty line of a JSONL file (1-based line numbers).

    Raises:
        DataError: the file is missing, or a line is not a JSON object (unless ``skip_bad_lines``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{short_path(path)} does not exist.", path=path, line=None)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if skip_bad_lines:
                    continue
                raise DataError(f"{short_path(path)}, line {number}: not a valid JSON object ({e}).",
                                hint="Fix the line, or pass --skip-bad-lines to skip such lines.",
                                path=path, line=number) from e
            yield number, value


def iter_corpus(path: str | Path, *, skip_bad_lines: bool = False) -> Iterator[Document]:
    """Yield the documents of a BEIR ``corpus.jsonl`` (or of the folder holding it), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    for number, row in iter_jsonl(path, skip_bad_lines=skip_bad_lines):
        if "_id" not in row:
            if skip_bad_lines:
                continue
            raise DataError(f"{short_path(path)}, line {number}: no '_id' field.", path=path, line=number)
        yield Document(str(row["_id"]), str(row.get("title") or ""), str(row.get("text") or ""))


def read_queries(path: str | Path) -> dict[str, str]:
    """``{query_id: text}`` from a BEIR ``queries.jsonl``."""
    path = Path(path)
    queries: dict[str, str] = {}
    for number, row in iter_jsonl(path):
        if "_id" not in row:
            raise DataError(f"{short_path(path)}, line {number}: no '_id' field.", path=path, line=number)
        queries[str(row["_id"])] = str(row.get("text") or "")
    return queries


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``{query_id: {doc_id: grade}}`` from a BEIR qrels TSV (header line optional). Grade-0 rows are kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{short_path(path)} does not exist.", path=path, line=None)
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip() or (number == 1 and parts[0] == "query-id"):
                continue
            if len(parts) == 4:  # TREC qrels: qid 0 docid grade
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DataError(f"{short_path(path)}, line {number}: expected 3 tab-separated fields "
                                f"(query-id, corpus-id, score), got {len(parts)}.", path=path, line=number)
            try:
                grade = int(float(parts[2]))
            except ValueError as e:
                raise DataError(f"{short_path(path)}, line {number}: score {parts[2]!r} is not a number.",
                                path=path, line=number) from e
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    return qrels


def available_splits(folder: str | Path) -> list[str]:
    """The qrels splits a BEIR folder has (``test``, ``dev``, ``train``, ...)."""
    qrels_dir = Path(folder) / "qrels"
    return sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
