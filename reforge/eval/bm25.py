"""BM25 over a BEIR corpus with bm25s, set up the way MTEB's own baseline (``mteb/baseline-bm25s``) is for English.

Settings (`BM25Settings`, the defaults are MTEB's for an English task, read from mteb's
``mteb/models/model_implementations/bm25.py`` and bm25s 0.3's ``BM25()`` defaults):

- a passage is the title and the text joined (MTEB: ``"\\n".join([title, text])``; the separator does not change the
  tokens);
- tokens: bm25s's tokenizer, lowercased, the pattern ``(?u)\\b\\w\\w+\\b`` (words of two or more word characters),
  bm25s's English stop words (Lucene's list of 33) removed, then the Snowball English stemmer (PyStemmer);
- scoring: ``method="lucene"``, ``k1=1.5``, ``b=0.75``: a document scores, summed over the query's terms (a
  repeated query term counts once per occurrence), idf * tf / (tf + k1 * (1 - b + b * dl / avgdl)) with
  idf = ln(1 + (N - df + 0.5) / (df + 0.5)) (Lucene's BM25, without the constant factor k1 + 1);
- queries are tokenized the same way (the stop-word list is fixed, so no state is learned from the corpus).

One difference from MTEB, on purpose: a document that shares no term with the query (score 0) is not part of the
run. bm25s always returns ``k`` documents; the zero-score ones are unranked leftovers whose order is arbitrary, and
Lucene/Elasticsearch (BEIR's BM25) never return them. It changes nothing when a query matches ``k`` documents or more.

    >>> from reforge.data.lazy import Document
    >>> index = build_index([Document("d1", "Cats", "cats purr"), Document("d2", "", "dogs bark loudly")])
    >>> run = index.search({"q": "a purring cat"}, k=10)
    >>> list(run["q"])
    ['d1']
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from reforge.errors import InvalidOptionError

if TYPE_CHECKING:
    from reforge.data.beir import BeirDataset
    from reforge.eval.report import EvalReport, Result

NAME = "BM25"  # the row's name in tables and result files
KIND = "bm25"  # its ModelInfo.profile["kind"], which tells the row from the models'
METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


class _Doc(Protocol):
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class BM25Settings:
    """How BM25 tokenizes and scores (defaults: MTEB's English ``mteb/baseline-bm25s``, see the module docstring).

    ``stopwords`` is a bm25s list name (``en``) or None for none; ``stemmer`` a PyStemmer language or None.
    """

    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str | None = "en"
    stemmer: str | None = "english"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptionError(f"BM25 method {self.method!r} is not one of {', '.join(METHODS)}.")
        if not (self.k1 >= 0 and 0 <= self.b <= 1):
            raise InvalidOptionError(f"BM25 needs k1 >= 0 and 0 <= b <= 1 (got k1={self.k1}, b={self.b}).")

    def describe(self) -> str:
        """The settings in one line, for tables and result files."""
        stop = f"bm25s {self.stopwords} stop words" if self.stopwords else "no stop words"
        stem = f"Snowball {self.stemmer} stemmer" if self.stemmer else "no stemmer"
        return (
            f"bm25s {_bm25s_version()} {self.method}, k1 {self.k1:g}, b {self.b:g}; title + text, lowercased "
            f"\\w\\w+ tokens, {stop}, {stem}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON, with the bm25s version."""
        return {**asdict(self), "library": "bm25s", "library_version": _bm25s_version()}


class BM25Index:
    """A corpus indexed for BM25: `search` ranks its documents for queries. Build one with `build_index`."""

    def __init__(self, retriever: Any, doc_ids: list[str], settings: BM25Settings, stemmer: Any) -> None:
        self._retriever = retriever
        self._stemmer = stemmer
        self.doc_ids = doc_ids
        self.settings = settings

    def __len__(self) -> int:
        return len(self.doc_ids)

    def search(self, queries: Mapping[str, str], k: int = 1000) -> dict[str, dict[str, float]]:
        """The top ``k`` documents of each query: ``{query_id: {doc_id: score}}``, best first.

        Documents with score 0 (no term in common with the query) are left out, so a query can get fewer than
        ``k`` hits, or none (e.g. a query made only of stop words). Every query id is a key of the result.

        Raises:
            InvalidOptionError: ``k`` is below 1.
        """
        if k < 1:
            raise InvalidOptionError(f"BM25 search needs k >= 1 (got {k}).")
        query_ids = list(queries)
        if not query_ids:
            return {}
        tokens = _tokenize([queries[q] for q in query_ids], self.settings, self._stemmer, ids=False)
        found, scores = self._retriever.retrieve(
            tokens, k=min(k, len(self.doc_ids)), show_progress=False, n_threads=1, sorted=True
        )
        run: dict[str, dict[str, float]] = {}
        for row, query_id in enumerate(query_ids):
            run[query_id] = {
                self.doc_ids[int(i)]: float(s) for i, s in zip(found[row], scores[row], strict=True) if s > 0
            }
        return run


def build_index(corpus: Iterable[_Doc], settings: BM25Settings | None = None) -> BM25Index:
    """Index ``corpus`` (objects with ``id``, ``title`` and ``text``, e.g. `reforge.data.lazy.Document` or a
    `BeirDataset`'s ``corpus``) for BM25.

    Raises:
        InvalidOptionError: bm25s (or PyStemmer, when a stemmer is set) is not installed, or the corpus is empty.
    """
    settings = settings or BM25Settings()
    bm25s = _import_bm25s()
    stemmer = _stemmer(settings)
    doc_ids: list[str] = []
    texts: list[str] = []
    for doc in corpus:
        doc_ids.append(doc.id)
        texts.append(f"{doc.title} {doc.text}" if doc.title else doc.text)
    if not doc_ids:
        raise InvalidOptionError("BM25 needs at least one document; the corpus is empty.")
    retriever = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
    retriever.index(_tokenize(texts, settings, stemmer, ids=True), show_progress=False)
    return BM25Index(retriever, doc_ids, settings, stemmer)


def bm25_run(
    corpus: Iterable[_Doc], queries: Mapping[str, str], k: int = 1000, settings: BM25Settings | None = None
) -> dict[str, dict[str, float]]:
    """`build_index` then `BM25Index.search`: the BM25 run ``{query_id: {doc_id: score}}`` of ``queries``."""
    return build_index(corpus, settings).search(queries, k)


def add_bm25(report: EvalReport, datasets: Sequence[BeirDataset], settings: BM25Settings | None = None) -> EvalReport:
    """``report`` with a BM25 row added on each of its datasets, scored and tested like the models.

    BM25 runs on exactly the queries and documents the models were scored on (the same ``--max-queries`` /
    ``--corpus-sample`` draw, checked by content hash), keeps the report's top-k and its rule for identical query
    and document ids, and is scored with the report's measures and averaging. BM25 is added as the last model, so
    the table shows it against the first model like any other row; the report also gains every other model's
    paired test against BM25 (``report.comparison(model, dataset, baseline="BM25")``). ``report.settings["bm25"]``
    records the settings.

    Args:
        report: from `reforge.eval.evaluate`.
        datasets: the datasets as passed to ``evaluate`` (full splits; they are sampled here as evaluate did).

    Raises:
        InvalidOptionError: a model is already called BM25, a dataset of the report is missing from ``datasets``,
            or a sample drawn here differs from the one the models saw.
    """
    from reforge.data.beir import sample_dataset
    from reforge.eval.metrics import parse_measures
    from reforge.eval.report import ModelInfo, compare

    settings = settings or BM25Settings()
    if any(m.name == NAME for m in report.models):
        raise InvalidOptionError(f"A model is already named {NAME!r}; rename it to add the BM25 row.", option="--bm25")
    options = report.settings
    by_name = {d.name: d for d in datasets}
    measures = parse_measures(report.measures)
    first = report.models[0].name
    results, comparisons = [], []
    for info in report.datasets:
        if info.name not in by_name:
            raise InvalidOptionError(f"Dataset {info.name!r} of the report was not passed to add_bm25.")
        dataset = sample_dataset(
            by_name[info.name],
            max_queries=options.get("max_queries"),
            corpus_sample=options.get("corpus_sample"),
            seed=options.get("seed", 0),
        )
        if dataset.content_hash != info.content_hash:
            raise InvalidOptionError(
                f"The BM25 sample of {info.name} differs from the one the models were scored on.", option="--bm25"
            )
        bm25 = _bm25_result(dataset, settings, measures, report.averaging, options)
        results.append(bm25)
        pairs = [(report.result(first, info.name), bm25)]  # the table's row: BM25 against the first model
        pairs += [(bm25, report.result(m.name, info.name)) for m in report.models]  # each model against BM25
        comparisons += [
            compare(
                baseline,
                other,
                dataset.qrels,
                averaging=report.averaging,
                measure=measure,
                permutations=int(options.get("permutations", 10_000)),
                seed=int(options.get("seed", 0)),
            )
            for baseline, other in pairs
            for measure in report.measures
        ]
    fingerprint = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode()).hexdigest()
    row = ModelInfo(NAME, None, None, fingerprint, {"kind": KIND, **settings.to_dict()})
    return replace(
        report,
        models=(*report.models, row),
        results=(*report.results, *results),
        comparisons=(*report.comparisons, *comparisons),
        settings={**options, "bm25": {**settings.to_dict(), "description": settings.describe()}},
    )


def _bm25_result(
    dataset: BeirDataset, settings: BM25Settings, measures: list[Any], averaging: str, options: Mapping[str, Any]
) -> Result:
    """BM25's run and scores on ``dataset``, with the report's top-k and identical-id rule."""
    from reforge.eval.metrics import score_run
    from reforge.eval.report import Result

    top_k = int(options.get("top_k", 1000))
    keep = bool(options.get("keep_identical_ids", False))
    start = time.perf_counter()
    index = build_index(dataset.corpus, settings)
    index_seconds = time.perf_counter() - start
    start = time.perf_counter()
    found = index.search(dataset.queries, k=top_k + int(not keep))
    run = {q: dict([(d, s) for d, s in hits.items() if keep or d != q][:top_k]) for q, hits in found.items()}
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_run(dataset.qrels, run, measures, averaging)
    timings = {
        "load": 0.0,
        "encode_corpus": round(index_seconds, 3),  # building the index
        "documents": float(len(dataset.corpus)),
        "encode_queries": 0.0,
        "search": round(search_seconds, 3),
        "score": round(time.perf_counter() - start, 3),
    }
    counted = len(scores.query_ids)
    return Result(NAME, dataset.name, scores.aggregate, scores.per_query, counted, run, timings, False, "")


def _tokenize(texts: list[str], settings: BM25Settings, stemmer: Any, *, ids: bool) -> Any:
    import bm25s

    return bm25s.tokenize(
        texts, lower=True, stopwords=settings.stopwords or [], stemmer=stemmer, return_ids=ids, show_progress=False
    )


def _stemmer(settings: BM25Settings) -> Any:
    if not settings.stemmer:
        return None
    try:
        import Stemmer
    except ImportError as e:
        raise InvalidOptionError(
            "BM25 with a stemmer needs PyStemmer.", hint='pip install "reforge[bm25]"', option="--bm25"
        ) from e
    try:
        stemmer = Stemmer.Stemmer(settings.stemmer)
    except KeyError as e:
        raise InvalidOptionError(
            f"PyStemmer has no {settings.stemmer!r} stemmer (it has: {', '.join(Stemmer.algorithms())})."
        ) from e
    return stemmer.stemWords


def _import_bm25s() -> Any:
    try:
        import bm25s
    except ImportError as e:
        raise InvalidOptionError(
            "BM25 needs the bm25s package.", hint='pip install "reforge[bm25]"', option="--bm25"
        ) from e
    return bm25s


def _bm25s_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bm25s")
    except PackageNotFoundError:
        return "(not installed)"
