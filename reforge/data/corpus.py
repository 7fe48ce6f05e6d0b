"""Unlabeled training text: BEIR corpora, any JSONL, plain ``.txt`` files, saved HF ``datasets`` folders.

`load_corpus` reads one or more sources into a list of `TextDoc` (id + text), applies the id filters of a
`DocSelection` (``--only-ids``, ``--exclude-ids``, ``--only-judged``, ``--exclude-judged``, ``--max-docs``) and
returns a `Corpus` with the counts and a content hash for provenance. BEIR passages are joined exactly as the
retrievers see them (`Document.passage`, ``title + " " + text``).

Sources, chosen from what the path holds:

- a BEIR folder (has ``corpus.jsonl``) or any ``.jsonl`` file: BEIR rows give ``title`` + ``text``; other JSONL
  needs ``text_field``. Ids come from ``_id`` or ``id``, else the line number.
- a ``.txt`` file or a folder of them (searched recursively, sorted): one document per file, or per non-empty
  line with ``per_line``. Ids are the file's path relative to the folder (``name.txt`` or ``name.txt:LINE``).
- a folder written by ``datasets``' ``save_to_disk``: column ``text_field`` (default ``text``, joined with
  ``title`` when there is one). A DatasetDict uses its only split, else ``train``.

JSONL and BEIR documents are not held: `Corpus.docs` keeps each kept document's byte offset, line number and a
64-bit hash of its id and text (20 bytes a document) and reads its line again when asked (`CorpusDocs`), so memory
does not grow with the text; a line that no longer gives the text hashed is an error, not other training text. The
pass that finds them (filters, empty documents, the hash) is cached under ``$REFORGE_HOME/cache/corpus-index/``,
keyed by the files (`file_stamp`: path, size, times, inode) and the options, so a second run opens a corpus without
reading it. The lines, the id rule, the duplicate-id check and the cache layout are eval's (`reforge.data.lazy`).
``.txt`` and saved-dataset documents are held in memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from reforge.data.beir import Document, read_qrels
from reforge.data.lazy import (
    check_unique_ids,
    id_hash,
    index_key,
    index_path,
    json_object,
    jsonl_rows,
    load_index,
    row_id,
    save_index,
)
from reforge.errors import DataError, short_path

CORPUS_KINDS = ("beir", "jsonl", "text", "datasets")
INDEX_KIND = "train"  # this pass's kind in the corpus-index cache (`reforge.data.lazy.index_path`)
_INDEX_ARRAYS = {"source": np.uint16, "where": np.uint64, "line": np.uint32, "check": np.uint64}
_READ_AGAIN = ("beir", "jsonl")  # kinds whose documents are re-read on demand from a byte offset


@dataclass(frozen=True)
class TextDoc:
    """One training document: an id (for filters and records) and the text the model reads."""

    id: str
    text: str


@dataclass(frozen=True)
class DocSelection:
    """Which documents to keep: ``only`` (None = all), minus ``exclude``, then the first ``max_docs``."""

    only: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()
    max_docs: int | None = None

    @classmethod
    def from_files(
        cls,
        *,
        only_ids: str | Path | None = None,
        exclude_ids: str | Path | None = None,
        only_judged: Sequence[str | Path] = (),
        exclude_judged: Sequence[str | Path] = (),
        max_docs: int | None = None,
    ) -> "DocSelection":
        """Build a selection from id-list files (one id per line) and qrels files (their judged doc ids).

        ``only_ids`` and ``only_judged`` together keep the documents in both. A judged document is any doc id in
        the qrels file, whatever its grade.
        """
        only: set[str] | None = None
        if only_ids is not None:
            only = read_id_list(only_ids)
        if only_judged:
            judged = judged_ids(only_judged)
            only = judged if only is None else only & judged
        exclude = set(read_id_list(exclude_ids)) if exclude_ids is not None else set()
        if exclude_judged:
            exclude |= judged_ids(exclude_judged)
        return cls(None if only is None else frozenset(only), frozenset(exclude), max_docs)

    def keeps(self, doc_id: str) -> bool:
        """Whether the id filters keep ``doc_id`` (``max_docs`` is applied by `load_corpus`)."""
        return (self.only is None or doc_id in self.only) and doc_id not in self.exclude


@dataclass(frozen=True)
class Corpus:
    """Documents ready to train on, with what it took to get them.

    Fields: ``docs`` (a `CorpusDocs`, read on demand, or a list); ``paths`` and ``kinds`` (one per source);
    ``read`` (documents read), ``empty`` (dropped for having no text), ``filtered`` (dropped by the id filters or
    ``max_docs``); ``only_missing`` (ids asked for with an ``only`` filter that no source has); ``sha256`` (hash of
    the kept ids and texts, in order).
    """

    docs: Sequence[TextDoc]
    paths: tuple[Path, ...]
    kinds: tuple[str, ...]
    read: int
    empty: int
    filtered: int
    only_missing: int = 0
    sha256: str = field(default="")


def read_id_list(path: str | Path) -> set[str]:
    """Document ids from a text file, one per line (blank lines and lines starting with ``#`` are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Id list {short_path(path)} does not exist.", path=path, line=None)
    with path.open(encoding="utf-8") as handle:
        return {line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")}


def judged_ids(qrels_paths: Iterable[str | Path]) -> set[str]:
    """Every doc id judged (any grade) in the given BEIR qrels files."""
    ids: set[str] = set()
    for qrels_path in qrels_paths:
        qrels_path = Path(qrels_path)
        if qrels_path.is_dir():
            raise DataError(
                f"{short_path(qrels_path)} is a folder; the judged-document filters need a qrels file.",
                hint=f"Pass e.g. {short_path(qrels_path / 'qrels' / 'test.tsv')}.",
                path=qrels_path,
                line=None,
            )
        for docs in read_qrels(qrels_path).values():
            ids.update(docs)
    return ids


def detect_kind(path: str | Path) -> str:
    """Which reader a corpus path needs: ``beir``, ``jsonl``, ``text`` or ``datasets`` (see the module docstring).

    Raises:
        DataError: the path does not exist or holds nothing reforge can read.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return "beir"
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "datasets"
        if next(iter(sorted(path.rglob("*.txt"))), None) is not None:
            return "text"
        raise DataError(
            f"{short_path(path)} holds no corpus.jsonl, no .txt files and no saved HF dataset.",
            hint="Pass a BEIR folder, a .jsonl file, .txt files or a datasets.save_to_disk folder.",
            path=path,
            line=None,
        )
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return "text"
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        raise DataError(
            f"{short_path(path)}: unknown corpus file type {path.suffix or '(no suffix)'!r}.",
            hint="Use a .jsonl file (one JSON object per line) or a .txt file.",
            path=path,
            line=None,
        )
    raise DataError(f"Corpus {short_path(path)} does not exist.", path=path, line=None)


def load_corpus(
    paths: str | Path | Sequence[str | Path],
    *,
    text_field: str | None = None,
    per_line: bool = False,
    skip_bad_lines: bool = False,
    selection: DocSelection | None = None,
    lazy: bool = True,
) -> Corpus:
    """Read every source in ``paths`` (in order), drop empty and filtered documents, and hash what is kept.

    Args:
        paths: one path or several (see the module docstring for what each may be).
        text_field: the JSONL field or dataset column holding the text (default: BEIR ``title`` + ``text``).
        per_line: for ``.txt`` sources, one document per non-empty line instead of per file.
        skip_bad_lines: skip JSONL lines that are not JSON objects or lack the text field, instead of failing.
        selection: id filters and ``max_docs``.
        lazy: keep only where each JSONL/BEIR document is and read it on demand (`CorpusDocs`), reusing a cached
            pass; False holds every document in a list.

    Returns:
        A `Corpus` with at least one document.

    Raises:
        DataError: a source is missing or malformed, or no document with text is left.

    Example:
        >>> corpus = load_corpus("../shared/data/scifact", selection=DocSelection(max_docs=3))
        >>> len(corpus.docs), corpus.kinds
        (3, ('beir',))
    """
    sources = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not sources:
        raise DataError("No corpus given.", hint="Pass --corpus PATH.", path=None, line=None)
    selection = selection or DocSelection()
    kinds = tuple(detect_kind(p) for p in sources)
    readers = tuple(_Source(_file_of(p, k), k, text_field) for p, k in zip(sources, kinds))
    options = [text_field, per_line, skip_bad_lines, _selection_digest(selection)]
    files, options = [r.file for r in readers], [list(kinds), *options]
    key = index_key(INDEX_KIND, files, options) if lazy and all(k in _READ_AGAIN for k in kinds) else None
    corpus = _read_layout(key, sources, kinds, readers) if key else None
    if corpus is None:
        corpus = _scan(sources, kinds, readers, selection, lazy=lazy, per_line=per_line, skip_bad_lines=skip_bad_lines)
        if key:
            _write_layout(key, corpus)
    if not len(corpus.docs):
        names = ", ".join(short_path(p) for p in sources)
        raise DataError(
            f"{names}: no usable text: {corpus.read} documents read, {corpus.empty} empty, {corpus.filtered} removed "
            "by the filters.",
            hint="Check the corpus path, --text-field and the id filters.",
            path=sources[0],
            line=None,
        )
    return corpus


def _scan(
    sources: list[Path],
    kinds: tuple[str, ...],
    readers: tuple["_Source", ...],
    selection: DocSelection,
    *,
    lazy: bool,
    per_line: bool,
    skip_bad_lines: bool,
) -> Corpus:
    """One pass over every source: filters, empty documents, the hash, and where each kept document is."""
    held: list[TextDoc] = []
    source, where, line, check = array("H"), array("Q"), array("I"), array("Q")
    found: set[str] = set()
    read = empty = filtered = kept = 0
    digest = hashlib.sha256()
    for number, (path, kind, reader) in enumerate(zip(sources, kinds, readers)):
        ids = array("Q")  # this source's id hashes, to refuse a repeated id as eval does
        for doc, offset, line_number in _iter_source(path, kind, reader, per_line=per_line, skip=skip_bad_lines):
            read += 1
            ids.append(id_hash(doc.id))
            if selection.only is not None and doc.id in selection.only:
                found.add(doc.id)
            if not doc.text.strip():
                empty += 1
            elif not selection.keeps(doc.id) or (selection.max_docs is not None and kept >= selection.max_docs):
                filtered += 1
            else:
                kept += 1
                digest.update(f"{doc.id}\x1f{doc.text}\x1e".encode())
                source.append(number)
                line.append(line_number)
                check.append(_doc_hash(doc))
                if lazy and offset is not None:
                    where.append(offset)
                else:
                    where.append(len(held))
                    held.append(doc)
        check_unique_ids(
            reader.file,
            np.frombuffer(ids, np.uint64),
            functools.partial(_ids_by_reading, path, kind, reader, per_line=per_line, skip=skip_bad_lines),
            where="line" if kind in _READ_AGAIN else "document",
        )
    only_missing = len(selection.only - found) if selection.only is not None else 0
    docs: Sequence[TextDoc] = held
    if len(held) < kept:
        arrays = ((source, np.uint16), (where, np.uint64), (line, np.uint32), (check, np.uint64))
        docs = CorpusDocs(readers, *(np.frombuffer(a, dtype) for a, dtype in arrays), held)
    return Corpus(docs, tuple(sources), kinds, read, empty, filtered, only_missing, digest.hexdigest())


@dataclass(frozen=True)
class _Source:
    """How to turn one line of a JSONL source back into its document (``file``: the JSONL file itself)."""

    file: Path
    kind: str
    text_field: str | None

    def doc(self, row: dict, number: int, skip: bool) -> TextDoc | None:
        """The document of a parsed line (None when ``skip`` and the line lacks what it needs)."""
        if self.kind == "beir" and self.text_field is None:
            if skip and "_id" not in row:
                return None
            doc_id = row_id(row, self.file, number)  # an id that is null, a list... is an error even with skip
            return TextDoc(doc_id, Document(doc_id, str(row.get("title") or ""), str(row.get("text") or "")).passage())
        field_name = self.text_field or "text"
        value = row.get(field_name)
        if not isinstance(value, str):
            if skip:
                return None
            what = "has no field" if field_name not in row else "has a non-string field"
            fields = ", ".join(row) or "none"
            raise DataError(
                f"{short_path(self.file)}, line {number} {what} {field_name!r} (fields there: {fields}).",
                hint="Pass --text-field with the field that holds the text, or --skip-bad-lines.",
                path=self.file,
                line=number,
            )
        doc_id = row_id(row, self.file, number, keys=("_id", "id"), default="") or str(number)
        if self.text_field is None:
            value = Document(doc_id, str(row.get("title") or ""), value).passage()
        return TextDoc(doc_id, value)


class CorpusDocs(Sequence):
    """The kept documents of a `Corpus`, in order, read on demand: per document the source it comes from, its line's
    byte offset and line number, and `_doc_hash` of what was read then (documents of ``.txt`` and dataset sources
    are held, ``where`` indexing ``held``). Slices are views; `take` reads many documents with one open file per
    source."""

    def __init__(
        self,
        sources: tuple[_Source, ...],
        source: np.ndarray,
        where: np.ndarray,
        line: np.ndarray,
        check: np.ndarray,
        held: list[TextDoc],
    ) -> None:
        self.sources, self.source, self.where, self.line, self.check = sources, source, where, line, check
        self.held = held

    def __len__(self) -> int:
        return len(self.source)

    @overload
    def __getitem__(self, item: int) -> TextDoc: ...

    @overload
    def __getitem__(self, item: slice) -> "CorpusDocs": ...

    def __getitem__(self, item):
        if isinstance(item, slice):
            return CorpusDocs(
                self.sources, self.source[item], self.where[item], self.line[item], self.check[item], self.held
            )
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(item)
        return self.take([item])[0]

    def take(self, rows: Iterable[int]) -> list[TextDoc]:
        """The documents at ``rows`` (positions in this sequence), in that order."""
        handles: dict[int, Any] = {}
        out: list[TextDoc] = []
        try:
            for row in rows:
                number, where = int(self.source[row]), int(self.where[row])
                reader = self.sources[number]
                if reader.kind not in _READ_AGAIN:
                    out.append(self.held[where])
                    continue
                if number not in handles:
                    handles[number] = reader.file.open("rb")
                handles[number].seek(where)
                line = int(self.line[row])
                doc = reader.doc(json_object(handles[number].readline(), reader.file, line), line, skip=False)
                assert doc is not None  # the line gave a document when the corpus was first read
                if _doc_hash(doc) != int(self.check[row]):
                    raise _changed(reader.file, line, doc.id)
                out.append(doc)
        finally:
            for handle in handles.values():
                handle.close()
        return out

    def __iter__(self) -> Iterator[TextDoc]:
        for start in range(0, len(self), 4096):
            yield from self.take(range(start, min(len(self), start + 4096)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    @property
    def texts(self) -> "DocTexts":
        """The documents' texts, read on demand too."""
        return DocTexts(self)


class DocTexts(Sequence):
    """The texts of a `CorpusDocs` (a ``Sequence[str]``): items, slices (views) and iteration read on demand."""

    def __init__(self, docs: CorpusDocs) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    @overload
    def __getitem__(self, item: int) -> str: ...

    @overload
    def __getitem__(self, item: slice) -> "DocTexts": ...

    def __getitem__(self, item):
        return DocTexts(self.docs[item]) if isinstance(item, slice) else self.docs[item].text

    def take(self, rows: Iterable[int]) -> list[str]:
        """The texts at ``rows``, read with one open file per source."""
        return [doc.text for doc in self.docs.take(rows)]

    def __iter__(self) -> Iterator[str]:
        return (doc.text for doc in self.docs)


def corpus_texts(corpus: Corpus) -> Sequence[str]:
    """The texts of ``corpus.docs`` in order, without reading them all (`DocTexts`) when the corpus is read lazily."""
    docs = corpus.docs
    return docs.texts if isinstance(docs, CorpusDocs) else [doc.text for doc in docs]


def _doc_hash(doc: TextDoc) -> int:
    """64 bits of what `Corpus.sha256` hashes for one document, to check a line read again gives the same."""
    return id_hash(f"{doc.id}\x1f{doc.text}")


def _changed(file: Path, line: int, doc_id: str) -> DataError:
    return DataError(
        f"{short_path(file)}, line {line}: document {doc_id!r} changed since the corpus was read: the recorded "
        "corpus hash no longer describes the text.",
        hint="Leave a corpus unchanged while a run reads it, then run again (a changed file is read anew).",
        path=file,
        line=line,
    )


def _ids_by_reading(
    path: Path, kind: str, reader: "_Source", rows: Iterable[int], /, *, per_line: bool, skip: bool
) -> dict[int, tuple[str, int]]:
    """`reforge.data.lazy.check_unique_ids`' ``ids_at`` for one source: ``{row: (id, line, or document number for
    .txt and dataset sources)}``, read by going through the source again."""
    wanted, found = set(rows), {}
    for index, (doc, _, line) in enumerate(_iter_source(path, kind, reader, per_line=per_line, skip=skip)):
        if index in wanted:
            found[index] = (doc.id, line or index + 1)
    return found


def _file_of(path: Path, kind: str) -> Path:
    return path / "corpus.jsonl" if kind == "beir" and path.is_dir() else path


def _iter_source(
    path: Path, kind: str, reader: _Source, *, per_line: bool, skip: bool
) -> Iterator[tuple[TextDoc, int | None, int]]:
    """``(document, byte offset of its line or None, line number or 0)`` for each document of one source."""
    if kind in _READ_AGAIN:
        for number, offset, row in jsonl_rows(reader.file, skip_bad_lines=skip, skip_option="--skip-bad-lines"):
            doc = reader.doc(row, number, skip)
            if doc is not None:
                yield doc, offset, number
    elif kind == "text":
        yield from ((doc, None, 0) for doc in _iter_text_docs(path, per_line))
    else:
        yield from ((doc, None, 0) for doc in _iter_dataset_docs(path, reader.text_field))


def _selection_digest(selection: DocSelection) -> str:
    digest = hashlib.sha256(json.dumps([selection.max_docs, selection.only is None]).encode())
    for ids in (sorted(selection.only or ()), sorted(selection.exclude)):
        digest.update(b"\x1d" + "\x1f".join(ids).encode())
    return digest.hexdigest()


def _read_layout(key: str, sources: list[Path], kinds: tuple[str, ...], readers: tuple[_Source, ...]) -> Corpus | None:
    """The cached pass of `_scan` for ``key`` (None when absent, unreadable or of another format)."""
    found = load_index(index_path(INDEX_KIND, key), INDEX_KIND, _INDEX_ARRAYS)
    if found is None:
        return None
    facts, data = found
    try:
        docs = CorpusDocs(readers, data["source"], data["where"], data["line"], data["check"], [])
        counts = [int(facts[name]) for name in ("read", "empty", "filtered", "only_missing")]
        return Corpus(docs, tuple(sources), kinds, *counts, sha256=str(facts["sha256"]))
    except (KeyError, ValueError, TypeError):
        return None


def _write_layout(key: str, corpus: Corpus) -> None:
    docs = corpus.docs
    if isinstance(docs, CorpusDocs):
        facts = {name: getattr(corpus, name) for name in ("read", "empty", "filtered", "only_missing", "sha256")}
        arrays = {"source": docs.source, "where": docs.where, "line": docs.line, "check": docs.check}
        save_index(index_path(INDEX_KIND, key), INDEX_KIND, facts, arrays)


def _iter_text_docs(path: Path, per_line: bool) -> Iterator[TextDoc]:
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{short_path(file)} is not UTF-8 text ({e.reason} at byte {e.start}).",
                hint="Convert it to UTF-8 or leave it out of the corpus.",
                path=file,
                line=None,
            ) from e
        if per_line:
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    yield TextDoc(f"{name}:{number}", line.strip())
        else:
            yield TextDoc(name, text.strip())


def _iter_dataset_docs(path: Path, text_field: str | None) -> Iterator[TextDoc]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = splits[0] if len(splits) == 1 else "train" if "train" in loaded else None
        if split is None:
            raise DataError(
                f"{short_path(path)} is a DatasetDict with splits {', '.join(splits)} and no 'train'.",
                hint="Save the split to train on by itself (dataset['name'].save_to_disk(...)).",
                path=path,
                line=None,
            )
        loaded = loaded[split]
    field_name = text_field or "text"
    if field_name not in loaded.column_names:
        raise DataError(
            f"{short_path(path)} has no column {field_name!r} (columns: {', '.join(loaded.column_names)}).",
            hint="Pass --text-field with the column that holds the text.",
            path=path,
            line=None,
        )
    id_column = next((c for c in ("_id", "id") if c in loaded.column_names), None)
    join_title = text_field is None and "title" in loaded.column_names
    for index, row in enumerate(loaded):
        if id_column and row[id_column] is None:
            raise DataError(
                f"{short_path(path)}, row {index}: column {id_column!r} is null, not a document id.",
                hint=f"Give every row a {id_column!r}, or drop the rows without one.",
                path=path,
                line=index,
            )
        doc_id = str(row[id_column]) if id_column else str(index)
        text = row[field_name] if isinstance(row[field_name], str) else ""
        if join_title:
            text = Document(doc_id, str(row["title"] or ""), text).passage()
        yield TextDoc(doc_id, text)
