"""A BEIR ``corpus.jsonl`` read lazily: a byte-offset index built in one pass, cached, and documents read on demand.

`corpus_index` scans the file once (checking every line, as `load_beir` always did) and keeps, per document, the
byte offset of its line, a 64-bit hash of its id and one of its title and text (24 bytes a document: 212 MB for
MS MARCO's 8.8M passages, against ~10 GB as Python objects), plus the corpus hash, the file's SHA-256 and the empty
documents. The index is cached under ``$REFORGE_HOME/cache/corpus-index/``, keyed by the file's `file_stamp` (path,
size, times, inode), so a second run (or another rank on the same machine) opens a corpus without reading it.
`LazyCorpus` is a ``Sequence[Document]`` over those offsets: ``corpus[i]``, slices and iteration read only the lines
they need, and a line that no longer holds the id and the text indexed there (the file was edited meanwhile, even
keeping every id at its offset) is a `DataError`: what is read is always what the corpus hash, and so a cache key,
stands for.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from reforge.errors import DataError, short_path
from reforge.io.atomic import write_atomic
from reforge.io.paths import cache_dir

INDEX_VERSION = 3  # 2: keyed by inode and change time too; 3: a text hash per document
_EXAMPLES = 3


@dataclass(frozen=True)
class Document:
    """One corpus entry."""

    id: str
    title: str
    text: str

    def passage(self, separator: str = " ") -> str:
        """Title and text joined the way retrievers see passages (BEIR: ``title + " " + text``)."""
        return f"{self.title}{separator}{self.text}".strip() if self.title else self.text.strip()


def id_hash(doc_id: str) -> int:
    """A 64-bit hash of a document id (ids are looked up by hash; a collision has probability ~n²/2⁶⁴)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def text_hash(title: str, text: str) -> int:
    """A 64-bit hash of a document's title and text (what is encoded besides the prefixes)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in (title, text):
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return int.from_bytes(digest.digest(), "little")


def _id_hashes(ids: Iterable[str]) -> np.ndarray:
    return np.fromiter((id_hash(i) for i in ids), dtype=np.uint64)


def id_hashes_of(corpus: Sequence, start: int, stop: int) -> np.ndarray:
    """The `id_hash` of documents ``[start, stop)`` of a corpus (a `LazyCorpus` from its index, without reading)."""
    if isinstance(corpus, LazyCorpus):
        return corpus._hashes()[start:stop]
    return _id_hashes(doc.id for doc in corpus[start:stop])


@dataclass(frozen=True)
class CorpusIndex:
    """What one pass over ``corpus.jsonl`` learned. ``offsets``, ``id_hashes`` and ``text_hashes`` (uint64) have one
    entry per document in file order; ``empty`` counts documents with no title and no text (``empty_examples``: a few
    ids); ``corpus_hash`` is `BeirDataset.corpus_hash`; ``sha256`` the file's."""

    path: Path
    offsets: np.ndarray
    id_hashes: np.ndarray
    text_hashes: np.ndarray
    corpus_hash: str
    sha256: str
    empty: int
    empty_examples: tuple[str, ...]


def corpus_index(path: Path, cache_folder: Path | None = None) -> CorpusIndex:
    """The index of ``path``: from the cache when the file is unchanged, else built (one pass) and cached.

    Raises:
        DataError: a line is not a JSON object, has no ``_id``, repeats an id, or the file holds no document.
    """
    folder = cache_folder if cache_folder is not None else _default_folder()
    key = hashlib.sha256(json.dumps([INDEX_VERSION, *file_stamp(path)]).encode()).hexdigest()
    cached = _read_cached(folder / f"{key}.npz", path)
    if cached is not None:
        return cached
    index = _build(path)
    _write_cached(folder / f"{key}.npz", index)
    return index


def file_stamp(path: Path) -> list:
    """What says a file is unchanged without reading it: its resolved path, size, modification time, and the inode
    and change time, which a rewrite sets even when it keeps the size and the modification time (``rsync -t``,
    ``cp -p``, an editor saving through a new file)."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _build(path: Path) -> CorpusIndex:
    # compact arrays while scanning (8 bytes a document each; a list of Python ints costs ~36)
    offsets, hashes, texts = array("Q"), array("Q"), array("Q")
    empty: list[str] = []
    corpus_digest, file_digest = hashlib.sha256(), hashlib.sha256()
    at = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            file_digest.update(raw)
            start, at = at, at + len(raw)
            if not raw.strip():
                continue
            doc = _parse(raw, path, number)
            offsets.append(start)
            hashes.append(id_hash(doc[0]))
            texts.append(text_hash(doc[1], doc[2]))
            for part in doc:
                encoded = part.encode("utf-8")
                corpus_digest.update(len(encoded).to_bytes(8, "little"))
                corpus_digest.update(encoded)
            if not doc[1].strip() and not doc[2].strip():
                empty.append(doc[0])
    if not offsets:
        raise DataError(f"{short_path(path)} holds no documents.", path=path, line=None)
    id_array = np.frombuffer(hashes, dtype=np.uint64)
    offset_array = np.frombuffer(offsets, dtype=np.uint64)
    _check_unique_ids(path, id_array, offset_array)
    return CorpusIndex(
        path,
        offset_array,
        id_array,
        np.frombuffer(texts, dtype=np.uint64),
        corpus_digest.hexdigest(),
        file_digest.hexdigest(),
        len(empty),
        tuple(empty[:_EXAMPLES]),
    )


def json_object(raw: bytes, path: Path, number: int, skip_option: str | None = None) -> dict:
    """One JSONL line (bytes, decoded here so a bad byte names its line) as a dict.

    Raises:
        DataError: the line is not UTF-8 or not a JSON object, naming the file and line; the hint names
            ``skip_option`` when the command has one (eval has none, so none is suggested).
    """
    try:
        value = json.loads(raw.decode("utf-8"))
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        what = (
            f"not UTF-8 text ({e.reason} at byte {e.start})"
            if isinstance(e, UnicodeDecodeError)
            else f"not a valid JSON object ({e})"
        )
        skip = f", or pass {skip_option} to skip such lines" if skip_option else ""
        raise DataError(
            f"{short_path(path)}, line {number}: {what}.", hint=f"Fix the line{skip}.", path=path, line=number
        ) from e
    return value


def _parse(raw: bytes, path: Path, number: int) -> tuple[str, str, str]:
    row = json_object(raw, path, number)
    return row_id(row, path, number), str(row.get("title") or ""), str(row.get("text") or "")


def row_id(row: dict, path: Path, number: int) -> str:
    """The ``_id`` of a corpus or queries line as a string (a number is written as JSON writes it).

    Raises:
        DataError: the line has no ``_id``, or it is null, a list, an object or a boolean (``str`` would have made
            ``"None"`` or ``"[1, 2]"`` an id that no qrels row can name).
    """
    if "_id" not in row:
        raise DataError(f"{short_path(path)}, line {number}: no '_id' field.", path=path, line=number)
    value = row["_id"]
    if value is None or isinstance(value, (bool, list, dict)):
        raise DataError(
            f"{short_path(path)}, line {number}: '_id' is {json.dumps(value)}, not a string or a number.",
            hint="Give every line a string id.",
            path=path,
            line=number,
        )
    return str(value)


def _check_unique_ids(path: Path, hashes: np.ndarray, offsets: np.ndarray) -> None:
    """A repeated id is an error naming both lines (found by hash, confirmed on the text)."""
    order = np.argsort(hashes, kind="stable")
    same = np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]
    for at in same:
        first, second = sorted((int(order[at]), int(order[at + 1])))
        with path.open("rb") as handle:
            docs = [_read_line(handle, int(offsets[i])) for i in (first, second)]
        if docs[0][0] != docs[1][0]:
            continue  # a hash collision between two different ids
        lines = [_line_number(path, int(offsets[i])) for i in (first, second)]
        raise DataError(
            f"{short_path(path)}, line {lines[1]}: duplicate document id {docs[1][0]!r} (first at line {lines[0]}).",
            hint="Document ids must be unique: remove or rename the duplicate.",
            path=path,
            line=lines[1],
            doc_id=docs[1][0],
        )


def _line_number(path: Path, offset: int) -> int:
    lines, left = 1, offset
    with path.open("rb") as handle:
        while left > 0:
            chunk = handle.read(min(left, 2**24))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            left -= len(chunk)
    return lines


def _read_line(handle, offset: int) -> tuple[str, str, str]:
    handle.seek(offset)
    row = json.loads(handle.readline())
    if not isinstance(row, dict) or row.get("_id") is None:
        raise ValueError("not a corpus line")
    return str(row["_id"]), str(row.get("title") or ""), str(row.get("text") or "")


class LazyCorpus(Sequence):
    """Documents of a ``corpus.jsonl`` read on demand through byte offsets (in file order, or a selection of them).

    ``content_hash`` is the corpus hash when the selection is the whole file (None for a subset: the dataset
    computes it by reading).
    """

    def __init__(self, index: CorpusIndex, rows: np.ndarray | None = None) -> None:
        self.index = index
        self.rows = rows  # None: every document of the file
        self.content_hash = index.corpus_hash if rows is None else None

    def __len__(self) -> int:
        return len(self.index.offsets) if self.rows is None else len(self.rows)

    def _offsets(self) -> np.ndarray:
        return self.index.offsets if self.rows is None else self.index.offsets[self.rows]

    def _at(self, item: int | slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offsets, id hashes and text hashes of ``item`` (only those rows, not the whole selection)."""
        rows = item if self.rows is None else self.rows[item]
        return self.index.offsets[rows], self.index.id_hashes[rows], self.index.text_hashes[rows]

    @overload
    def __getitem__(self, item: int): ...

    @overload
    def __getitem__(self, item: slice): ...

    def __getitem__(self, item):
        if not isinstance(item, slice):
            item = item + len(self) if item < 0 else item
            if not 0 <= item < len(self):
                raise IndexError(item)
        offsets, hashes, texts = self._at(item)
        with self.index.path.open("rb") as handle:
            if isinstance(item, slice):
                return [self._read(handle, int(o), int(h), int(t)) for o, h, t in zip(offsets, hashes, texts)]
            return self._read(handle, int(offsets), int(hashes), int(texts))

    def _read(self, handle, offset: int, expected: int, expected_text: int) -> Document:
        """The document at ``offset``, which must still be the one indexed there (by its id and text hashes)."""
        try:
            doc = Document(*_read_line(handle, offset))
        except (ValueError, KeyError, TypeError):  # not a JSON object with an _id any more
            doc = None
        if doc is None or id_hash(doc.id) != expected or text_hash(doc.title, doc.text) != expected_text:
            path = self.index.path
            what = (
                "starts the document indexed there"
                if doc is None or id_hash(doc.id) != expected
                else f"holds the same text (document {doc.id!r})"
            )
            raise DataError(
                f"{short_path(path)} changed since it was indexed: byte {offset} no longer {what}.",
                hint="Leave a corpus unchanged while a run reads it, then run again (a changed file is indexed anew).",
                path=path,
                line=None,
            )
        return doc

    def __iter__(self) -> Iterator:
        step = 4096
        for start in range(0, len(self), step):
            yield from self[start : start + step]

    def __eq__(self, other: object) -> bool:
        """Same documents in the same order (compared by offsets within one file, else document by document)."""
        if isinstance(other, LazyCorpus) and other.index.path == self.index.path:
            return np.array_equal(self._offsets(), other._offsets())
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence, like list

    def has_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are documents of this corpus (by id hash)."""
        ids = list(ids)
        present = np.isin(_id_hashes(ids), self._hashes())
        return {i for i, ok in zip(ids, present) if ok}

    def select(self, ids: Iterable[str]) -> "LazyCorpus":
        """The documents whose id is in ``ids``, in corpus order."""
        keep = np.isin(self._hashes(), _id_hashes(ids))
        rows = np.nonzero(keep)[0] if self.rows is None else self.rows[keep]
        return LazyCorpus(self.index, rows.astype(np.int64))

    def _hashes(self) -> np.ndarray:
        return self.index.id_hashes if self.rows is None else self.index.id_hashes[self.rows]


def _default_folder() -> Path:
    return cache_dir("corpus-index")


def _read_cached(path: Path, corpus: Path) -> CorpusIndex | None:
    found = load_npz(path)
    if found is None:
        return None
    facts, data = found
    try:
        return CorpusIndex(
            corpus,
            data["offsets"],
            data["id_hashes"],
            data["text_hashes"],
            facts["corpus_hash"],
            facts["sha256"],
            int(facts["empty"]),
            tuple(facts["empty_examples"]),
        )
    except (KeyError, ValueError):
        return None


def _write_cached(path: Path, index: CorpusIndex) -> None:
    facts = {
        "corpus_hash": index.corpus_hash,
        "sha256": index.sha256,
        "empty": index.empty,
        "empty_examples": list(index.empty_examples),
    }
    save_npz(path, facts, {"offsets": index.offsets, "id_hashes": index.id_hashes, "text_hashes": index.text_hashes})


def save_npz(path: Path, facts: dict, arrays: dict[str, np.ndarray]) -> None:
    """``facts`` (JSON) and ``arrays`` as one ``.npz``, atomically; a cache that cannot be written (read-only home,
    full disk) is only rebuilt next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        facts_bytes = np.frombuffer(json.dumps(facts).encode(), dtype=np.uint8)
        write_atomic(path, lambda f: np.savez(f, facts=facts_bytes, **arrays))
    except OSError:
        return


def load_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """What `save_npz` wrote: ``(facts, arrays)``, or None when absent or unreadable (a damaged cache is rebuilt)."""
    import zipfile

    try:
        with np.load(path) as data:
            facts = json.loads(bytes(data["facts"]).decode())
            arrays = {k: data[k] for k in data.files if k != "facts"}
    # what numpy and zipfile raise for an empty, cut or corrupted file: EOFError, BadZipFile (a bad CRC too),
    # NotImplementedError and RuntimeError (a mangled compression or encryption flag)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError):
        return None
    return (facts, arrays) if isinstance(facts, dict) else None
