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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reforge.data.beir import Document, iter_corpus, iter_jsonl, read_qrels
from reforge.errors import DataError, short_path

CORPUS_KINDS = ("beir", "jsonl", "text", "datasets")


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

    Fields: ``docs``; ``paths`` and ``kinds`` (one per source); ``read`` (documents read), ``empty`` (dropped for
    having no text), ``filtered`` (dropped by the id filters or ``max_docs``); ``only_missing`` (ids asked for with
    an ``only`` filter that no source has); ``sha256`` (hash of the kept ids and texts, in order).
    """

    docs: list[TextDoc]
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
) -> Corpus:
    """Read every source in ``paths`` (in order), drop empty and filtered documents, and hash what is kept.

    Args:
        paths: one path or several (see the module docstring for what each may be).
        text_field: the JSONL field or dataset column holding the text (default: BEIR ``title`` + ``text``).
        per_line: for ``.txt`` sources, one document per non-empty line instead of per file.
        skip_bad_lines: skip JSONL lines that are not JSON objects or lack the text field, instead of failing.
        selection: id filters and ``max_docs``.

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
    docs: list[TextDoc] = []
    seen_ids: set[str] = set()
    read = empty = filtered = 0
    digest = hashlib.sha256()
    for path, kind in zip(sources, kinds):
        for doc in _iter_source(path, kind, text_field=text_field, per_line=per_line, skip_bad_lines=skip_bad_lines):
            read += 1
            seen_ids.add(doc.id)
            if not doc.text.strip():
                empty += 1
            elif not selection.keeps(doc.id) or (selection.max_docs is not None and len(docs) >= selection.max_docs):
                filtered += 1
            else:
                docs.append(doc)
                digest.update(f"{doc.id}\x1f{doc.text}\x1e".encode())
    only_missing = len(selection.only - seen_ids) if selection.only is not None else 0
    if not docs:
        names = ", ".join(short_path(p) for p in sources)
        raise DataError(
            f"{names}: no usable text: {read} documents read, {empty} empty, {filtered} removed by the filters.",
            hint="Check the corpus path, --text-field and the id filters.",
            path=sources[0],
            line=None,
        )
    return Corpus(docs, tuple(sources), kinds, read, empty, filtered, only_missing, digest.hexdigest())


def _iter_source(
    path: Path, kind: str, *, text_field: str | None, per_line: bool, skip_bad_lines: bool
) -> Iterator[TextDoc]:
    if kind == "beir" and text_field is None:
        for doc in iter_corpus(path, skip_bad_lines=skip_bad_lines, skip_option="--skip-bad-lines"):
            yield TextDoc(doc.id, doc.passage())
    elif kind in ("beir", "jsonl"):
        yield from _iter_jsonl_docs(path / "corpus.jsonl" if kind == "beir" else path, text_field, skip_bad_lines)
    elif kind == "text":
        yield from _iter_text_docs(path, per_line)
    else:
        yield from _iter_dataset_docs(path, text_field)


def _iter_jsonl_docs(path: Path, text_field: str | None, skip_bad_lines: bool) -> Iterator[TextDoc]:
    field_name = text_field or "text"
    for number, row in iter_jsonl(path, skip_bad_lines=skip_bad_lines, skip_option="--skip-bad-lines"):
        value = row.get(field_name)
        if not isinstance(value, str):
            if skip_bad_lines:
                continue
            what = "has no field" if field_name not in row else "has a non-string field"
            fields = ", ".join(row) or "none"
            raise DataError(
                f"{short_path(path)}, line {number} {what} {field_name!r} (fields there: {fields}).",
                hint="Pass --text-field with the field that holds the text, or --skip-bad-lines.",
                path=path,
                line=number,
            )
        doc_id = str(row.get("_id", row.get("id", number)))
        if text_field is None:
            value = Document(doc_id, str(row.get("title") or ""), value).passage()
        yield TextDoc(doc_id, value)


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
        doc_id = str(row[id_column]) if id_column else str(index)
        text = row[field_name] if isinstance(row[field_name], str) else ""
        if join_title:
            text = Document(doc_id, str(row["title"] or ""), text).passage()
        yield TextDoc(doc_id, text)
