"""BEIR-style datasets: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/<split>.tsv`` (header ``query-id corpus-id score``).

Readers raise `DataError` naming the file and line of anything malformed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from reforge.data.lazy import Document, LazyCorpus, corpus_index, jsonl_rows, row_id
from reforge.errors import DataError, short_path
from reforge.io.checkpoint import sha256_file


def iter_jsonl(
    path: str | Path, *, skip_bad_lines: bool = False, skip_option: str | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-empty line of a JSONL file (1-based line numbers).

    Args:
        skip_bad_lines: skip lines that are not UTF-8 or not a JSON object instead of failing.
        skip_option: the option that turns ``skip_bad_lines`` on, named in the error; None where the command has
            none (eval), so no error suggests an option that does not exist.

    Raises:
        DataError: the file is missing, or a line is not UTF-8 or not a JSON object (unless ``skip_bad_lines``).
    """
    for number, _, value in iter_jsonl_at(path, skip_bad_lines=skip_bad_lines, skip_option=skip_option):
        yield number, value


def iter_jsonl_at(
    path: str | Path, *, skip_bad_lines: bool = False, skip_option: str | None = None
) -> Iterator[tuple[int, int, dict]]:
    """`iter_jsonl` with each line's byte offset: ``(line_number, offset, object)`` (`reforge.data.lazy.jsonl_rows`)."""
    return jsonl_rows(Path(path), skip_bad_lines=skip_bad_lines, skip_option=skip_option)


def _utf8_line(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{short_path(path)}, line {number}: not UTF-8 text ({e.reason} at byte {e.start}).",
            hint="Convert the file to UTF-8.",
            path=path,
            line=number,
        ) from e


def iter_corpus(
    path: str | Path, *, skip_bad_lines: bool = False, skip_option: str | None = None
) -> Iterator[Document]:
    """Yield the documents of a BEIR ``corpus.jsonl`` (or of the folder holding it), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    for number, row in iter_jsonl(path, skip_bad_lines=skip_bad_lines, skip_option=skip_option):
        try:
            doc_id = row_id(row, path, number)
        except DataError:
            if skip_bad_lines:
                continue
            raise
        yield Document(doc_id, str(row.get("title") or ""), str(row.get("text") or ""))


def read_queries(path: str | Path) -> dict[str, str]:
    """``{query_id: text}`` from a BEIR ``queries.jsonl``."""
    path = Path(path)
    queries: dict[str, str] = {}
    for number, row in iter_jsonl(path):
        queries[row_id(row, path, number)] = str(row.get("text") or "")
    return queries


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``{query_id: {doc_id: grade}}`` from a BEIR qrels TSV (header line optional). Grade-0 rows are kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{short_path(path)} does not exist.", path=path, line=None)
    qrels: dict[str, dict[str, int]] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _utf8_line(path, number, raw)
            parts = line.rstrip("\n").split("\t")
            if not line.strip() or (number == 1 and parts[0] == "query-id"):
                continue
            if len(parts) == 4:  # TREC qrels: qid 0 docid grade
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DataError(
                    f"{short_path(path)}, line {number}: expected 3 tab-separated fields "
                    f"(query-id, corpus-id, score), got {len(parts)}.",
                    path=path,
                    line=number,
                )
            try:
                grade = int(float(parts[2]))
            except ValueError as e:
                raise DataError(
                    f"{short_path(path)}, line {number}: score {parts[2]!r} is not a number.", path=path, line=number
                ) from e
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    return qrels


def available_splits(folder: str | Path) -> list[str]:
    """The qrels splits a BEIR folder has (``test``, ``dev``, ``train``, ...)."""
    qrels_dir = Path(folder) / "qrels"
    return sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []


# ---------------------------------------------------------------------------------------------------------------------
# A whole dataset for evaluation: read, checked, hashed.

_EXAMPLES = 3  # ids quoted in messages


@dataclass(frozen=True)
class BeirDataset:
    """A BEIR folder read for one split, checked for the mistakes that silently skew scores.

    ``corpus`` is in file order (read from disk on demand, `reforge.data.lazy.LazyCorpus`, for datasets loaded by
    `load_beir`; any sequence of `Document` for datasets built in memory); ``queries`` holds only the queries
    judged in ``qrels`` (BEIR does the same); ``qrels`` is ``{query_id: {doc_id: grade}}`` with rows for unknown
    queries removed. ``warnings`` lists what was odd but usable (judged documents missing from the corpus, empty
    documents, ...), for the caller to show.
    ``files_sha256`` maps ``corpus``, ``queries`` and ``qrels`` to the SHA-256 of the files read (empty for
    datasets built in memory).
    """

    name: str
    split: str
    corpus: Sequence[Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    path: Path | None = None
    warnings: tuple[str, ...] = ()
    files_sha256: dict[str, str] = field(default_factory=dict)

    @cached_property
    def corpus_hash(self) -> str:
        """SHA-256 over the documents' ids, titles and texts in order: the corpus part of embedding cache keys."""
        known = getattr(self.corpus, "content_hash", None)  # a whole lazy corpus: hashed when it was indexed
        if known is not None:
            return known
        digest = hashlib.sha256()
        for doc in self.corpus:
            for part in (doc.id, doc.title, doc.text):
                encoded = part.encode("utf-8")
                digest.update(len(encoded).to_bytes(8, "little"))
                digest.update(encoded)
        return digest.hexdigest()

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 over corpus, evaluated queries and qrels: identifies exactly what was evaluated."""
        digest = hashlib.sha256(self.corpus_hash.encode())
        digest.update(
            json.dumps(
                [sorted(self.queries.items()), sorted((q, sorted(d.items())) for q, d in self.qrels.items())]
            ).encode()
        )
        return digest.hexdigest()

    def subset(
        self, *, query_ids: Iterable[str] | None = None, doc_ids: Iterable[str] | None = None, name: str | None = None
    ) -> "BeirDataset":
        """A smaller dataset: only ``query_ids`` (and their qrels) and/or only ``doc_ids`` (corpus order is kept).

        Judged documents left out of the corpus still count in the ideal ranking, exactly as in the full dataset.

        Example:
            >>> small = dataset.subset(query_ids=list(dataset.queries)[:30])  # doctest: +SKIP
        """
        queries, qrels = self.queries, self.qrels
        if query_ids is not None:
            wanted = [q for q in dict.fromkeys(query_ids)]
            unknown = [q for q in wanted if q not in queries]
            if unknown:
                raise DataError(
                    f"{len(unknown)} requested query ids are not evaluated queries of {self.name} "
                    f"(e.g. {', '.join(unknown[:_EXAMPLES])}).",
                    path=self.path,
                    line=None,
                )
            queries = {q: queries[q] for q in wanted}
            qrels = {q: qrels[q] for q in wanted}
        corpus = self.corpus
        if doc_ids is not None:
            keep = set(doc_ids)
            corpus = corpus.select(keep) if isinstance(corpus, LazyCorpus) else tuple(d for d in corpus if d.id in keep)
            if not corpus:
                raise DataError(
                    f"None of the requested document ids is in the corpus of {self.name}.", path=self.path, line=None
                )
        return BeirDataset(name or self.name, self.split, corpus, queries, qrels, self.path, self.warnings)


def sample_dataset(
    dataset: BeirDataset, *, max_queries: int | None = None, corpus_sample: int | None = None, seed: int = 0
) -> BeirDataset:
    """At most ``max_queries`` judged queries, and a corpus of about ``corpus_sample`` documents that keeps **every
    document judged** for those queries (so each query's relevant documents can still be found) plus a random
    sample of the rest. Both draws are seeded; the dataset's order is kept. Used by ``reforge eval`` and
    ``reforge tune`` (``--max-queries``, ``--corpus-sample``).

    With more judged documents than ``corpus_sample``, all judged documents are kept (the sample is then larger).
    Returns ``dataset`` itself when neither limit applies.
    """
    if max_queries is not None and max_queries < len(dataset.queries):
        chosen = set(random.Random(f"{seed}:queries").sample(list(dataset.queries), max_queries))
        dataset = dataset.subset(query_ids=[q for q in dataset.queries if q in chosen])
    if corpus_sample is not None and corpus_sample < len(dataset.corpus):
        judged = {doc for docs in dataset.qrels.values() for doc in docs}
        others = [d.id for d in dataset.corpus if d.id not in judged]
        room = max(0, corpus_sample - (len(dataset.corpus) - len(others)))
        drawn = random.Random(f"{seed}:corpus").sample(others, min(room, len(others)))
        dataset = dataset.subset(doc_ids=judged | set(drawn))
    return dataset


def sample_record(
    full: BeirDataset, sample: BeirDataset, *, max_queries: int | None, corpus_sample: int | None, seed: int
) -> dict:
    """What a result records about a sample: the options, the counts before and after, and the query ids drawn."""
    return {
        "max_queries": max_queries,
        "corpus_sample": corpus_sample,
        "seed": seed,
        "queries": len(sample.queries),
        "documents": len(sample.corpus),
        "split_queries": len(full.queries),
        "split_documents": len(full.corpus),
        "query_ids": list(sample.queries),
    }


def load_beir(folder: str | Path, split: str = "test", *, name: str | None = None) -> BeirDataset:
    """Read and check a BEIR folder for one qrels split.

    Args:
        folder: holds ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
        split: the qrels file to use.
        name: shown in tables and used to pick per-dataset instructions (default: the folder name).

    Returns:
        A `BeirDataset`; odd but usable input is described in its ``warnings``.

    Raises:
        DataError: a file is missing, the split does not exist (the message lists those that do), a document or
            query id repeats, a judged query is empty, or the qrels match no query or no document at all.

    Example:
        >>> ds = load_beir("../shared/data/scifact", "test")  # doctest: +SKIP
        >>> len(ds.queries), len(ds.corpus)  # doctest: +SKIP
        (300, 5183)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"Dataset folder {short_path(folder)} does not exist.",
            hint="Pass a BEIR folder holding corpus.jsonl, queries.jsonl and qrels/<split>.tsv.",
            path=folder,
            line=None,
        )
    paths = {
        "corpus": folder / "corpus.jsonl",
        "queries": folder / "queries.jsonl",
        "qrels": folder / "qrels" / f"{split}.tsv",
    }
    for kind in ("corpus", "queries"):
        if not paths[kind].is_file():
            raise DataError(
                f"{short_path(paths[kind])} does not exist.",
                hint=f"A BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv; "
                f"{short_path(folder)} has no {kind} file.",
                path=paths[kind],
                line=None,
            )
    if not paths["qrels"].is_file():
        splits = available_splits(folder)
        found = f"it has: {', '.join(splits)}" if splits else "it has no qrels/*.tsv file at all"
        raise DataError(
            f"Split '{split}' does not exist in {short_path(folder)} ({found}).",
            hint=f"Pass --split {splits[0]}." if splits else "Add qrels/<split>.tsv.",
            path=paths["qrels"],
            line=None,
            split=split,
            available=splits,
        )
    index = corpus_index(paths["corpus"])  # one pass, cached: documents are read when needed
    corpus = LazyCorpus(index)
    queries = _read_unique_queries(paths["queries"])
    qrels = read_qrels(paths["qrels"])
    warnings: list[str] = []
    queries, qrels = _match_qrels(paths, corpus, queries, qrels, warnings)
    if index.empty:
        warnings.append(
            f"{index.empty} documents in {short_path(paths['corpus'])} have no title and no text "
            f"(e.g. {', '.join(index.empty_examples)}); they are kept and encoded as empty passages."
        )
    hashes = {"corpus": index.sha256, **{kind: sha256_file(paths[kind]) for kind in ("queries", "qrels")}}
    return BeirDataset(name or folder.resolve().name, split, corpus, queries, qrels, folder, tuple(warnings), hashes)


def _read_unique_queries(path: Path) -> dict[str, str]:
    seen: dict[str, int] = {}
    queries: dict[str, str] = {}
    for number, row in iter_jsonl(path):
        query_id = row_id(row, path, number)
        if query_id in seen:
            raise DataError(
                f"{short_path(path)}, line {number}: duplicate query id {query_id!r} (first at line {seen[query_id]}).",
                hint="Query ids must be unique: remove or rename the duplicate.",
                path=path,
                line=number,
                query_id=query_id,
            )
        seen[query_id] = number
        queries[query_id] = str(row.get("text") or "")
    return queries


def _match_qrels(
    paths: dict[str, Path],
    corpus: LazyCorpus,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    warnings: list[str],
) -> tuple[dict, dict]:
    """Keep the judged queries; fail when the qrels match nothing, warn (with counts) when they match in part."""
    qrels_name = short_path(paths["qrels"])
    if not qrels:
        raise DataError(f"{qrels_name} holds no judgments.", path=paths["qrels"], line=None)
    unknown_queries = [q for q in qrels if q not in queries]
    if len(unknown_queries) == len(qrels):
        raise DataError(
            f"None of the {len(qrels)} query ids in {qrels_name} matches a query in "
            f"{short_path(paths['queries'])} (e.g. {', '.join(unknown_queries[:_EXAMPLES])}).",
            hint="Check that the qrels and queries files belong to the same dataset.",
            path=paths["qrels"],
            line=None,
            unmatched=len(unknown_queries),
        )
    if unknown_queries:
        warnings.append(
            f"{len(unknown_queries)} of {len(qrels)} query ids in {qrels_name} match no query in "
            f"{short_path(paths['queries'])} (e.g. {', '.join(unknown_queries[:_EXAMPLES])}); "
            f"they are left out."
        )
    qrels = {q: judged for q, judged in qrels.items() if q in queries}
    judged_docs = {d for judged in qrels.values() for d in judged}
    unknown_docs = sorted(judged_docs - corpus.has_ids(judged_docs))
    if len(unknown_docs) == len(judged_docs):
        raise DataError(
            f"None of the {len(judged_docs)} document ids in {qrels_name} matches a document in "
            f"{short_path(paths['corpus'])} (e.g. {', '.join(unknown_docs[:_EXAMPLES])}).",
            hint="Check that the qrels and corpus files belong to the same dataset.",
            path=paths["qrels"],
            line=None,
            unmatched=len(unknown_docs),
        )
    if unknown_docs:
        warnings.append(
            f"{len(unknown_docs)} of {len(judged_docs)} judged document ids in {qrels_name} match no "
            f"document in {short_path(paths['corpus'])} (e.g. {', '.join(unknown_docs[:_EXAMPLES])}); "
            f"they still count in the ideal ranking but can never be retrieved."
        )
    empty = [q for q in qrels if not queries[q].strip()]
    if empty:
        raise DataError(
            f"{len(empty)} judged queries in {short_path(paths['queries'])} have empty text "
            f"(e.g. {', '.join(empty[:_EXAMPLES])}).",
            hint="Fix or remove those queries (and their qrels rows).",
            path=paths["queries"],
            line=None,
            query_ids=empty,
        )
    return {q: queries[q] for q in qrels}, qrels
