"""The one lazy reader of JSONL corpora: lines with their byte offsets, the id rule, the duplicate-id check and one
cache layout for the indexes built from them, used by eval (`corpus_index`, `LazyCorpus`) and train
(`reforge.data.corpus`).

`corpus_index` scans a BEIR ``corpus.jsonl`` once (checking every line, as `load_beir` always did) and keeps, per
document, the byte offset of its line, a 64-bit hash of its id and one of its title and text (24 bytes a document:
212 MB for MS MARCO's 8.8M passages, against ~10 GB as Python objects), plus the corpus hash, the file's SHA-256 and
the empty documents. `LazyCorpus` is a ``Sequence[Document]`` over those offsets: ``corpus[i]``, slices and
iteration read only the lines they need, and a line that no longer holds the id and the text indexed there (the
file was edited meanwhile, even keeping every id at its offset) is a `DataError`: what is read is always what the
corpus hash, and so a cache key, stands for.

Both readers go through `jsonl_rows` (line number, byte offset, object), `row_id` (what an id is, one error text)
and `check_unique_ids` (a repeated id names both lines), and cache what their pass learned with `save_index` /
`load_index`: one ``.npz`` per index under ``$REFORGE_HOME/cache/corpus-index/<kind>-<key>.npz`` (`index_path`),
keyed by `index_key` (the format version, the kind, each file's `file_stamp`: path, size, times, inode, and the
reader's options), holding JSON facts that name the format and the kind beside the per-document arrays, all checked
when read: an index written by an older version, for another kind, or damaged is rebuilt, never misread.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from reforge.errors import DataError, short_path
from reforge.io.atomic import write_atomic
from reforge.io.paths import cache_dir

# The version of every corpus index (eval's and train's). Before 4 each reader had its own: eval's ``<key>.npz``
# (version 3: a text hash per document), train's ``train-<key>.npz`` (layout 3: ids checked unique).
INDEX_FORMAT = 4
INDEX_KIND = "eval"  # `corpus_index`'s kind in the cache (train's is "train")
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
    return _hash64(doc_id.encode("utf-8"))


def text_hash(title: str, text: str) -> int:
    """A 64-bit hash of a document's title and text (what is encoded besides the prefixes)."""
    return _hash64(_framed(title.encode("utf-8")) + _framed(text.encode("utf-8")))


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _framed(encoded: bytes) -> bytes:
    """One part as the corpus hash and `text_hash` see it: its length (8 bytes, little-endian), then its bytes."""
    return len(encoded).to_bytes(8, "little") + encoded


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


_EVAL_ARRAYS = {"offsets": np.uint64, "id_hashes": np.uint64, "text_hashes": np.uint64}


def corpus_index(path: Path, cache_folder: Path | None = None) -> CorpusIndex:
    """The index of ``path``: from the cache when the file is unchanged, else built (one pass) and cached.

    Raises:
        DataError: a line is not a JSON object, has no ``_id``, repeats an id, or the file holds no document.
    """
    file = index_path(INDEX_KIND, index_key(INDEX_KIND, [path], []), cache_folder)
    cached = _read_cached(file, path)
    if cached is not None:
        return cached
    index = _build(path)
    _write_cached(file, index)
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
    for number, offset, row in jsonl_rows(path, file_digest=file_digest):
        doc_id, title, text = row_id(row, path, number), str(row.get("title") or ""), str(row.get("text") or "")
        encoded_id = doc_id.encode("utf-8")
        content = _framed(title.encode("utf-8")) + _framed(text.encode("utf-8"))  # each part encoded once
        offsets.append(offset)
        hashes.append(_hash64(encoded_id))
        texts.append(_hash64(content))  # = text_hash(title, text)
        corpus_digest.update(_framed(encoded_id))
        corpus_digest.update(content)
        if not title.strip() and not text.strip():
            empty.append(doc_id)
    if not offsets:
        raise DataError(f"{short_path(path)} holds no documents.", path=path, line=None)
    id_array = np.frombuffer(hashes, dtype=np.uint64)
    offset_array = np.frombuffer(offsets, dtype=np.uint64)
    check_unique_ids(path, id_array, lambda rows: _ids_at_offsets(path, {r: int(offset_array[r]) for r in rows}))
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


def jsonl_rows(
    path: Path,
    *,
    skip_bad_lines: bool = False,
    skip_option: str | None = None,
    file_digest: Any = None,
) -> Iterator[tuple[int, int, dict]]:
    """``(line_number, byte offset, object)`` for each non-empty line of a JSONL file, 1-based, in file order: the
    one loop every JSONL reader runs (eval's index, train's pass, `reforge.data.beir.iter_jsonl`).

    Args:
        skip_bad_lines: skip lines that are not UTF-8 or not a JSON object instead of failing.
        skip_option: the option that turns ``skip_bad_lines`` on, named in the error (see `json_object`).
        file_digest: a hashlib object fed every byte of the file (blank lines too), as read.

    Raises:
        DataError: the file is missing, or a line is not UTF-8 or not a JSON object (unless ``skip_bad_lines``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{short_path(path)} does not exist.", path=path, line=None)
    at = 0
    with path.open("rb") as handle:  # decoded per line, so one bad byte names its line instead of a traceback
        for number, raw in enumerate(handle, start=1):
            if file_digest is not None:
                file_digest.update(raw)
            start, at = at, at + len(raw)
            if not raw.strip():
                continue
            try:
                value = json_object(raw, path, number, skip_option)
            except DataError:
                if skip_bad_lines:
                    continue
                raise
            yield number, start, value


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


def row_id(row: dict, path: Path, number: int, *, keys: Sequence[str] = ("_id",), default: str | None = None) -> str:
    """The id of a corpus or queries line as a string (a number is written as JSON writes it): the first of ``keys``
    the line has. The one rule for ids, eval's and train's.

    Args:
        keys: the fields that may hold the id, in order (BEIR: ``_id``; train's other JSONL: ``_id``, then ``id``).
        default: the id of a line with none of ``keys`` (train: the line number); None makes that an error.

    Raises:
        DataError: the line has none of ``keys`` and there is no ``default``, or its id is null, a list, an object
            or a boolean (``str`` would have made ``"None"`` or ``"[1, 2]"`` an id that no qrels row can name).
    """
    for key in keys:  # a loop, not next(<generator>): this runs once per line of every corpus
        if key in row:
            break
    else:
        if default is not None:
            return default
        raise DataError(f"{short_path(path)}, line {number}: no {keys[0]!r} field.", path=path, line=number)
    value = row[key]
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return str(value)
    what = json.dumps(value) if value is None or isinstance(value, bool) else f"a JSON {_JSON_TYPE[type(value)]}"
    raise DataError(
        f"{short_path(path)}, line {number}: {key!r} is {what}, not a string or a number.",
        hint=f"Give every line a string or number {key!r}, or remove the line.",
        path=path,
        line=number,
    )


_JSON_TYPE = {list: "array", dict: "object"}


def check_unique_ids(
    path: Path,
    hashes: np.ndarray,
    ids_at: Callable[[list[int]], Mapping[int, tuple[str, int]]],
    *,
    where: str = "line",
) -> None:
    """Refuse documents that repeat an id, naming the file, both places and the id: the one rule of eval and train.

    Args:
        hashes: `id_hash` of each document, in order.
        ids_at: ``ids_at(rows)`` gives ``{row: (id, line or document number)}`` for the rows asked (only rows whose
            hash repeats: a repeated hash is confirmed on the ids, a 64-bit collision is not a duplicate).
        where: what the numbers count, ``"line"`` or ``"document"``.

    Raises:
        DataError: two documents have the same id (fields ``path``, ``line``: the second one's, ``doc_id``).
    """
    order = np.argsort(hashes, kind="stable")
    pairs = [(int(order[at]), int(order[at + 1])) for at in np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]]
    if not pairs:
        return
    found = ids_at(sorted({row for pair in pairs for row in pair}))
    # the duplicate met first when reading top-down: the pair whose later document comes first
    for second, first in sorted((max(pair), min(pair)) for pair in pairs):
        (first_id, first_at), (doc_id, at) = found[first], found[second]
        if first_id == doc_id:
            raise DataError(
                f"{short_path(path)}, {where} {at}: duplicate document id {doc_id!r} (first at {where} {first_at}).",
                hint="Document ids must be unique: remove or rename the duplicate.",
                path=path,
                line=at,
                doc_id=doc_id,
            )


def _ids_at_offsets(path: Path, offsets: Mapping[int, int]) -> dict[int, tuple[str, int]]:
    """`check_unique_ids`' ``ids_at`` for an indexed file: ``{row: (id, line number)}`` of the lines at
    ``offsets`` (``{row: byte offset}``)."""
    with path.open("rb") as handle:
        return {row: (_read_line(handle, at)[0], _line_number(path, at)) for row, at in offsets.items()}


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


# ---- the cache: one layout for every corpus index -------------------------------------------------------------------
def index_key(kind: str, files: Sequence[Path], options: Sequence[Any]) -> str:
    """The cache key of an index of ``kind`` over ``files`` built with ``options`` (JSON values): SHA-256 of
    `INDEX_FORMAT`, the kind, each file's `file_stamp` and the options."""
    stamps = [file_stamp(Path(file)) for file in files]
    return hashlib.sha256(json.dumps([INDEX_FORMAT, kind, stamps, list(options)]).encode()).hexdigest()


def index_path(kind: str, key: str, folder: Path | None = None) -> Path:
    """Where the index ``key`` of ``kind`` is cached: ``<folder>/<kind>-<key>.npz``, the folder defaulting to
    ``$REFORGE_HOME/cache/corpus-index``."""
    return (folder if folder is not None else cache_dir("corpus-index")) / f"{kind}-{key}.npz"


def save_index(path: Path, kind: str, facts: dict, arrays: Mapping[str, np.ndarray]) -> None:
    """Cache an index of ``kind`` at ``path`` (`index_path`): ``facts`` (JSON), with the format and the kind added,
    and one array per document field (all of one length)."""
    save_npz(path, {**facts, "format": INDEX_FORMAT, "kind": kind}, dict(arrays))


def load_index(path: Path, kind: str, fields: Mapping[str, type]) -> tuple[dict, dict[str, np.ndarray]] | None:
    """What `save_index` cached at ``path``, or None (rebuild it) unless it is whole and of this format: its facts
    name `INDEX_FORMAT` and ``kind``, and it holds exactly the arrays ``fields`` names, each of that dtype, one
    dimension, all of one length."""
    found = load_npz(path)
    if found is None:
        return None
    facts, arrays = found
    if facts.get("format") != INDEX_FORMAT or facts.get("kind") != kind or set(arrays) != set(fields):
        return None
    if any(arrays[name].dtype != np.dtype(dtype) or arrays[name].ndim != 1 for name, dtype in fields.items()):
        return None
    if len({len(array) for array in arrays.values()}) > 1:
        return None
    return facts, arrays


def _read_cached(path: Path, corpus: Path) -> CorpusIndex | None:
    found = load_index(path, INDEX_KIND, _EVAL_ARRAYS)
    if found is None:
        return None
    facts, data = found
    try:
        return CorpusIndex(
            corpus,
            data["offsets"],
            data["id_hashes"],
            data["text_hashes"],
            str(facts["corpus_hash"]),
            str(facts["sha256"]),
            int(facts["empty"]),
            tuple(facts["empty_examples"]),
        )
    except (KeyError, ValueError, TypeError):
        return None


def _write_cached(path: Path, index: CorpusIndex) -> None:
    facts = {
        "corpus_hash": index.corpus_hash,
        "sha256": index.sha256,
        "empty": index.empty,
        "empty_examples": list(index.empty_examples),
    }
    arrays = {"offsets": index.offsets, "id_hashes": index.id_hashes, "text_hashes": index.text_hashes}
    save_index(path, INDEX_KIND, facts, arrays)


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
