"""`evaluate`: models x datasets -> `EvalReport`. Reads top to bottom: resolve, encode (or read the cache), search,
score, compare."""

from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from reforge import __version__
from reforge.data.beir import BeirDataset, load_beir, sample_dataset, sample_record
from reforge.data.lazy import id_hashes_of
from reforge.dist import Ranks, join, shutdown
from reforge.errors import InvalidOptionError
from reforge.eval.cache import (
    DEFAULT_SHARD_DOCS,
    EMBEDDING_DTYPES,
    EmbeddingCache,
    Entry,
    embedding_key,
    stored_dtype,
    texts_hash,
    to_stored,
)
from reforge.eval.encode import encode, passages
from reforge.eval.metrics import AVERAGING, parse_measures, score_run
from reforge.eval.model import ModelSource, Retriever, resolve_model
from reforge.eval.report import Comparison, DatasetInfo, EvalReport, ModelInfo, Result, compare
from reforge.eval.search import search_shards, to_run
from reforge.io.paths import cache_root
from reforge.io.progress import ProgressFn, StageFn
from reforge.profiles import EncodingProfile, apply_overrides

ENCODE_PIECE = 8192  # documents encoded at a time: a shard is held in its stored dtype, one piece in float32


@dataclass(frozen=True)
class EvalSettings:
    """Every option of an evaluation; None means "the model's profile decides" or "pick for this machine".

    Profile overrides (``profile``, ``pooling``, ``query_prefix``, ``passage_prefix``, ``task``, ``max_length``,
    ``normalize``) apply to every model. ``batch_size`` None = 32 on CPU, 64 on GPU. ``dtype`` None = float32 on
    CPU, bfloat16 on a GPU that supports it (else float16). ``cache_dir`` None = ``$REFORGE_HOME/cache/embeddings``.
    ``embedding_dtype`` is how corpus vectors are stored and searched (None = float16 from 1024 dimensions up, else
    float32, `reforge.eval.cache.default_embedding_dtype`); ``shard_docs`` documents per cache shard.
    ``max_queries`` / ``corpus_sample``: score a sample of each dataset drawn with ``seed``
    (`reforge.data.beir.sample_dataset`); the report's datasets record it.
    """

    split: str = "test"
    measures: tuple[str, ...] = ("nDCG@10",)
    averaging: str = "beir"
    top_k: int = 1000
    keep_identical_ids: bool = False
    profile: str | None = None
    pooling: str | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    task: str | None = None
    max_length: int | None = None
    normalize: bool | None = None
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    base: str | None = None
    cache: bool = True
    cache_dir: str | None = None
    embedding_dtype: str | None = None
    shard_docs: int = DEFAULT_SHARD_DOCS
    max_queries: int | None = None
    corpus_sample: int | None = None
    query_chunk_size: int = 1024
    permutations: int = 10_000
    seed: int = 0
    token: str | None = field(default=None, repr=False)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = None

    @property
    def sampled(self) -> bool:
        """Whether each dataset is scored on a sample (``max_queries`` or ``corpus_sample``), not the whole split."""
        return self.max_queries is not None or self.corpus_sample is not None

    def overrides(self) -> dict[str, Any]:
        """The profile fields the user set."""
        return {
            "pooling": self.pooling,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "task": self.task,
            "max_length": self.max_length,
            "normalize": self.normalize,
        }

    def check(self) -> None:
        """Raise `InvalidOptionError` for values out of range (before anything is loaded)."""
        if self.averaging not in AVERAGING:
            raise InvalidOptionError(
                f"Averaging {self.averaging!r} is not one of {', '.join(AVERAGING)}.", option="--averaging"
            )
        for option, value in (
            ("--top-k", self.top_k),
            ("--batch-size", self.batch_size or 1),
            ("--permutations", self.permutations),
            ("--shard-docs", self.shard_docs),
            ("--max-queries", self.max_queries or 1),
            ("--corpus-sample", self.corpus_sample or 1),
        ):
            if value < 1:
                raise InvalidOptionError(f"{option} must be at least 1, got {value}.", option=option)
        if self.embedding_dtype not in (None, "auto", *EMBEDDING_DTYPES):
            raise InvalidOptionError(
                f"--embedding-dtype {self.embedding_dtype!r} is not one of {', '.join(EMBEDDING_DTYPES)}.",
                option="--embedding-dtype",
            )
        if not self.measures:
            raise InvalidOptionError("No metric given.", hint="Pass --metric nDCG@10.", option="--metric")


def evaluate(
    models: Sequence[Any],
    datasets: Sequence[Any],
    settings: EvalSettings | None = None,
    *,
    progress: ProgressFn | None = None,
    stage: StageFn | None = None,
) -> EvalReport | None:
    """Score each model on each dataset, and compare every model with the first.

    Args:
        models: folders or Hub ids, `ModelSource` (from `resolve_model`), or in-memory `Retriever` objects.
        datasets: BEIR folders, or `BeirDataset` objects (e.g. ``load_beir(...).subset(query_ids=...)``).
        settings: options (default `EvalSettings()`).
        progress: ``progress(done, total)`` while encoding, reset at each ``stage``.
        stage: called with a short description whenever a new step starts ("Encoding scifact corpus ...").

    Returns:
        An `EvalReport`; None on ranks other than 0 of a distributed run (they encode and search their shards).

    Raises:
        DataError, CheckpointNotFoundError, AdapterError, PoolingUndeterminedError, InvalidOptionError: before any
            encoding starts, for bad data, models or options (and when ranks read different corpora).

    Example:
        >>> report = evaluate(["all-MiniLM-L6-v2"], ["scifact"])  # doctest: +SKIP
        >>> round(report.score("all-MiniLM-L6-v2", "scifact"), 3)  # doctest: +SKIP
        0.645
    """
    settings = settings or EvalSettings()
    settings.check()
    device = Ranks.from_env().device(settings.device)
    ranks = join(device)
    try:
        return _evaluate(models, datasets, settings, device, ranks, progress, stage)
    finally:
        # Leaving the group explicitly: a gloo rank that exits with it still open can abort in the group's
        # destructor ("terminate called without an active exception", exit -6) after its work is done.
        shutdown(ranks)


def _evaluate(
    models: Sequence[Any],
    datasets: Sequence[Any],
    settings: EvalSettings,
    device: str,
    ranks: Ranks,
    progress: ProgressFn | None,
    stage: StageFn | None,
) -> EvalReport | None:
    measures = parse_measures(settings.measures)
    full = [d if isinstance(d, BeirDataset) else load_beir(d, settings.split) for d in datasets]
    data = [_sample(d, settings) for d in full]
    _check_unique([d.name for d in data], "dataset")
    for dataset in data:  # every rank must read the same corpus: shard s means the same rows everywhere
        ranks.agree(f"the corpus of {dataset.name}", (len(dataset.corpus), dataset.corpus_hash))
    sources = _distinct_names([model_source(m, settings) for m in models])
    profiles = [apply_overrides(_profile(s), **settings.overrides()) for s in sources]
    for profile in profiles:
        for dataset in data:
            profile.query_prefix_for(dataset.name)  # fail now, not after an hour of encoding
    dtype = _dtype(settings.dtype, device)
    batch_size = settings.batch_size or (32 if device == "cpu" else 64)
    results = []
    cache = EmbeddingCache(settings.cache_dir) if settings.cache else None
    with _scratch(settings) as scratch:
        for source, profile in zip(sources, profiles):
            loader = _Loader(source, device=device, dtype=dtype, allow_pickle=settings.allow_pickle)
            contexts = [
                _Context(
                    loader, profile, d, cache, scratch, settings, batch_size, device, str(dtype), ranks, progress, stage
                )
                for d in data
            ]
            encoded = [(ctx, *_corpus_entry(ctx), *_query_vectors(ctx)) for ctx in contexts]
            _free(loader)  # the search needs no model: the GPU holds one or the other
            for ctx, entry, encode_seconds, cached, query_ids, query_vectors, query_seconds in encoded:
                result = _search_and_score(
                    ctx, entry, query_ids, query_vectors, (encode_seconds, query_seconds), cached, measures
                )
                if result is not None:
                    results.append(result)
    if not ranks.main:
        return None
    names = tuple(str(m) for m in measures)
    return EvalReport(
        models=tuple(_model_info(s, p) for s, p in zip(sources, profiles)),
        datasets=tuple(_dataset_info(d, f, settings) for d, f in zip(data, full)),
        measures=names,
        averaging=settings.averaging,
        settings={
            **{k: v for k, v in asdict(settings).items() if k != "token"},
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "world_size": ranks.world,
        },
        results=tuple(results),
        comparisons=tuple(_compare(results, data, sources, names, settings)),
        version=__version__,
    )


@contextlib.contextmanager
def _scratch(settings: EvalSettings) -> Iterator[EmbeddingCache]:
    """A temporary embedding cache for vectors that are not cached (``--no-cache``, in-memory models), removed when
    the evaluation ends: beside the cache folder (a disk, not memory), else in the system's temporary folder."""
    root = Path(settings.cache_dir) if settings.cache_dir else cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=".reforge-eval-", dir=root)
    except OSError:
        folder = tempfile.mkdtemp(prefix="reforge-eval-")
    try:
        yield EmbeddingCache(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _free(loader: "_Loader") -> None:
    import torch

    loader.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Loader:
    """Loads a source's weights on first use, so fully cached evaluations never load a model."""

    source: Any
    device: str
    dtype: Any
    allow_pickle: bool
    retriever: Retriever | None = None
    seconds: float = 0.0

    def get(self) -> Retriever:
        if self.retriever is None:
            start = time.perf_counter()
            if isinstance(self.source, Retriever):
                self.retriever = self.source
            else:
                self.retriever = self.source.load(device=self.device, dtype=self.dtype, allow_pickle=self.allow_pickle)
            self.seconds += time.perf_counter() - start
        return self.retriever

    def release(self) -> None:
        self.retriever = None

    @property
    def fingerprint(self) -> str | None:
        if isinstance(self.source, Retriever):
            return self.source.fingerprint
        return self.source.cache_identity


@dataclass(frozen=True)
class _Context:
    loader: _Loader
    profile: EncodingProfile
    dataset: BeirDataset
    cache: EmbeddingCache | None
    scratch: EmbeddingCache
    settings: EvalSettings
    batch_size: int
    device: str
    dtype: str
    ranks: Ranks
    progress: ProgressFn | None
    stage: StageFn | None

    def say(self, message: str) -> None:
        if self.stage:
            self.stage(message)

    def vector_settings(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, "dtype": self.dtype, **self.profile.passage_settings()}

    def key(self, kind: str, texts_digest: str) -> str | None:
        if self.cache is None or self.loader.fingerprint is None:
            return None
        settings = self.vector_settings(kind)
        if kind == "corpus":
            settings["embedding_dtype"] = self.settings.embedding_dtype or "auto"
        return embedding_key(model_fingerprint=self.loader.fingerprint, texts_hash=texts_digest, settings=settings)


def _corpus_entry(ctx: _Context) -> tuple[Entry, float, bool]:
    """This rank's corpus shards, encoded where missing or unsound. Returns ``(entry, encode seconds, all from
    cache)``. Without the cache (``--no-cache``, or an in-memory model without a fingerprint) the shards go to a
    temporary folder removed when the evaluation ends, so memory does not grow with the corpus."""
    dataset, ranks = ctx.dataset, ctx.ranks
    key = ctx.key("corpus", dataset.corpus_hash)
    cache = ctx.cache if key is not None else ctx.scratch
    rows = len(dataset.corpus)
    meta = {
        "key": key,
        "model": ctx.loader.source.name,
        "dataset": dataset.name,
        "documents": rows,
        "profile": ctx.profile.to_dict(),
        "dtype": ctx.dtype,
    }
    corpus = dataset.corpus
    entry = Entry(
        cache.folder / (key or uuid.uuid4().hex),
        rows,
        max(1, ctx.settings.shard_docs),
        _requested_dtype(ctx),
        expected_ids=lambda start, stop: id_hashes_of(corpus, start, stop),
    )
    entry = cache.claim(entry, meta)
    mine = ranks.owned_shards(entry.shard_count)
    missing = entry.missing(mine)
    if not missing:
        return entry, 0.0, True
    if entry.rejected:
        first = min(entry.rejected)
        ctx.say(
            f"Encoding again {len(entry.rejected)} cached {dataset.name} shard(s) that failed their check "
            f"({entry.shard_path(first).name}: {entry.rejected[first]})"
        )
    start = time.perf_counter()
    legacy = _legacy_key(ctx) if key is not None else None
    if legacy is not None and cache.legacy(legacy, rows) is None:
        legacy = None
    if legacy is not None:
        ctx.say(f"Converting cached {dataset.name} vectors from the old single-file cache format to shards")
    else:
        ctx.say(f"Encoding {dataset.name} corpus with {ctx.loader.get().name}")
    total, done = sum(entry.bounds(i)[1] for i in missing), 0

    def count(documents: int) -> None:
        nonlocal done
        done += documents
        if ctx.progress:
            ctx.progress(done, total)

    count(0)
    if legacy is not None:
        ids_of = lambda first, stop: [d.id for d in corpus[first:stop]]  # noqa: E731  # each read checked
        converted = cache.convert_legacy(entry, legacy, missing, meta, ids_of, count)
        assert converted is not None  # found just above
        return converted, time.perf_counter() - start, False
    for index in missing:
        entry = _encode_shard(ctx, cache, entry, index, meta, count)
    return entry, time.perf_counter() - start, False


def _encode_shard(
    ctx: _Context, cache: EmbeddingCache, entry: Entry, index: int, meta: dict, count: Callable[[int], None]
) -> Entry:
    """Encode and store shard ``index``, `ENCODE_PIECE` documents at a time: the shard is held in its stored dtype,
    only one piece in float32. Returns the entry, its dtype settled; ``count(documents)`` after each piece."""
    first, size = entry.bounds(index)
    stored: np.ndarray | None = None
    ids: list[str] = []
    for at in range(first, first + size, ENCODE_PIECE):
        docs = ctx.dataset.corpus[at : min(at + ENCODE_PIECE, first + size)]  # each read checked by the index
        vectors = encode(ctx.loader.get(), passages(docs, ctx.profile), ctx.profile, batch_size=ctx.batch_size)
        entry = cache.settle_dtype(entry, vectors.shape[1], meta)
        if stored is None:
            stored = np.empty((size, vectors.shape[1]), dtype=stored_dtype(entry.dtype))
        stored[at - first : at - first + len(docs)] = to_stored(vectors, entry.dtype)
        ids += [d.id for d in docs]
        count(len(docs))
        del docs, vectors
    assert stored is not None
    entry.write_shard(index, stored, ids)
    return entry


def _requested_dtype(ctx: _Context) -> str:
    """The stored dtype asked for; ``auto`` is settled by the first shard's width (`EmbeddingCache.settle_dtype`)."""
    requested = ctx.settings.embedding_dtype
    return requested if requested not in (None, "auto") else "auto"


def _legacy_key(ctx: _Context) -> str:
    """The key this corpus had in the first cache format (one float32 ``.npy``), which the cache converts."""
    return embedding_key(
        model_fingerprint=ctx.loader.fingerprint,
        texts_hash=ctx.dataset.corpus_hash,
        settings=ctx.vector_settings("corpus"),
        version=1,
    )


def _query_vectors(ctx: _Context) -> tuple[list[str], np.ndarray, float]:
    """The dataset's query ids and float32 vectors (every rank needs them all), from the cache or encoded."""
    dataset = ctx.dataset
    prefix = ctx.profile.query_prefix_for(dataset.name)
    query_ids = list(dataset.queries)
    texts = [prefix + dataset.queries[q] for q in query_ids]
    start = time.perf_counter()
    cache, key = ctx.cache, ctx.key("queries", texts_hash(texts))
    entry = cache.entry(key, len(texts), shard_docs=max(1, len(texts))) if cache and key else None
    vectors = cache.load(entry) if cache and entry else None
    if vectors is None:
        retriever = ctx.loader.get()
        ctx.say(f"Encoding {dataset.name} queries with {retriever.name}")
        vectors = encode(retriever, texts, ctx.profile, batch_size=ctx.batch_size, progress=ctx.progress)
        if cache and entry:
            meta = {
                "model": ctx.loader.source.name,
                "dataset": dataset.name,
                "queries": len(texts),
                "query_prefix": prefix,
            }
            cache.save(entry, vectors, query_ids, meta)
    return query_ids, vectors, time.perf_counter() - start


def _search_and_score(
    ctx: _Context,
    entry: Entry,
    query_ids: list[str],
    query_vectors: np.ndarray,
    seconds: tuple[float, float],
    cached: bool,
    measures: list[Any],
) -> Result | None:
    """Search this rank's shards, merge every rank's top-k, and (rank 0) score. None on other ranks."""
    dataset, settings, ranks = ctx.dataset, ctx.settings, ctx.ranks
    ctx.say(f"Searching {dataset.name}")
    start = time.perf_counter()
    k = min(settings.top_k + int(not settings.keep_identical_ids), len(dataset.corpus))
    shards = entry.shards(ranks.owned_shards(entry.shard_count))
    devices = _search_devices(ctx.device, ranks)
    table = search_shards(query_vectors, shards, k, devices=devices, chunk_size=settings.query_chunk_size)
    gathered = ranks.all_gather_topk(table.scores, table.rows, ctx.device)  # k ids + scores per query and rank
    if not ranks.main:
        return None
    for scores, rows in gathered[1:]:
        table = table.merge(scores, rows)
    run = to_run(
        table,
        query_ids,
        lambda rows: _ids_of(rows, entry, dataset),
        top_k=settings.top_k,
        drop_identical_ids=not settings.keep_identical_ids,
    )
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_run(dataset.qrels, run, measures, settings.averaging)
    timings = {
        "load": round(ctx.loader.seconds, 3),
        "encode_corpus": round(seconds[0], 3),
        "documents": float(len(dataset.corpus)),
        "encode_queries": round(seconds[1], 3),
        "search": round(search_seconds, 3),
        "score": round(time.perf_counter() - start, 3),
    }
    return Result(
        ctx.loader.source.name,
        dataset.name,
        scores.aggregate,
        scores.per_query,
        len(scores.query_ids),
        run,
        timings,
        cached,
        ctx.profile.query_prefix_for(dataset.name),
    )


def _search_devices(device: str, ranks: Ranks) -> list[str]:
    """Where this process searches: its one device under torchrun or when one was named (``cuda:1``), every GPU
    it sees for a plain ``cuda`` in a single process, else the CPU."""
    if not device.startswith("cuda"):
        return ["cpu"]
    if ranks.world > 1 or ":" in device:
        return [device]
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or [device]


def _ids_of(rows: np.ndarray, entry: Entry, dataset: BeirDataset) -> list[str]:
    """Document ids of ``rows`` (sorted, distinct), in that order, shard by shard: from the ids stored beside each
    shard (another machine's shard: from the corpus)."""
    names: list[str] = []
    shard_of = rows // entry.shard_docs
    for index in np.unique(shard_of).tolist():
        first, count = entry.bounds(index)
        ids = entry.shard_ids(index)
        if ids is None:
            ids = [d.id for d in dataset.corpus[first : first + count]]
        names += [ids[row - first] for row in rows[shard_of == index].tolist()]
        del ids
    return names


def _compare(
    results: list[Result],
    data: list[BeirDataset],
    sources: list[Any],
    measures: tuple[str, ...],
    settings: EvalSettings,
) -> list[Comparison]:
    comparisons = []
    by_key = {(r.model, r.dataset): r for r in results}
    baseline_name = sources[0].name
    for dataset in data:
        baseline = by_key[(baseline_name, dataset.name)]
        for source in sources[1:]:
            other = by_key[(source.name, dataset.name)]
            comparisons += [
                compare(
                    baseline,
                    other,
                    dataset.qrels,
                    averaging=settings.averaging,
                    measure=measure,
                    permutations=settings.permutations,
                    seed=settings.seed,
                )
                for measure in measures
            ]
    return comparisons


def model_source(model: Any, settings: EvalSettings, *, name: str | None = None) -> ModelSource | Retriever:
    """``model`` (a reference, or a source already resolved) as `evaluate` resolves it under ``settings``: base,
    access, profile, pooling and tokenizer; ``name`` labels it in tables (default: from the reference)."""
    if isinstance(model, (ModelSource, Retriever)):
        return model
    return resolve_model(
        model,
        name=name,
        base=settings.base,
        token=settings.token,
        allow_pickle=settings.allow_pickle,
        profile=settings.profile,
        pooling=settings.pooling,
        trust_remote_code=settings.trust_remote_code,
        tokenizer=settings.tokenizer,
    )


def _profile(source: ModelSource | Retriever) -> EncodingProfile:
    return source.resolved_profile() if isinstance(source, Retriever) else source.profile


def _dtype(name: str | None, device: str) -> Any:
    import torch

    if name and name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _distinct_names(sources: list[Any]) -> list[Any]:
    """Models that share a name are told apart by more of their path (``a/merged``, ``b/merged``), else by ``#2``."""
    names = [s.name for s in sources]
    for name in {n for n in names if names.count(n) > 1}:
        clashing = [i for i, n in enumerate(names) if n == name]
        for depth in range(2, 6):
            tails = [_tail(sources[i], depth) for i in clashing]
            if len(set(tails)) == len(tails):
                for i, tail in zip(clashing, tails):
                    names[i] = tail
                break
        else:
            for count, i in enumerate(clashing[1:], start=2):
                names[i] = f"{name}#{count}"
    return [s if s.name == n else replace(s, name=n) for s, n in zip(sources, names)]


def _tail(source: Any, depth: int) -> str:
    ref = getattr(source, "ref", None)
    if ref is None:
        return source.name
    parts = [p for p in str(ref).replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts[-depth:]) or source.name


def _check_unique(names: list[str], what: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidOptionError(
            f"Two {what}s are both named {repeated[0]!r}; results would be ambiguous.",
            hint=f"Give each {what} a distinct folder name (or name= in the API).",
            option=what,
        )


def _model_info(source: ModelSource | Retriever, profile: EncodingProfile) -> ModelInfo:
    if isinstance(source, Retriever):
        return ModelInfo(source.name, None, None, source.fingerprint, profile.to_dict())
    return ModelInfo(source.name, source.ref, str(source.path), source.fingerprint, profile.to_dict(), source.base_ref)


def _sample(dataset: BeirDataset, settings: EvalSettings) -> BeirDataset:
    return sample_dataset(
        dataset, max_queries=settings.max_queries, corpus_sample=settings.corpus_sample, seed=settings.seed
    )


def _dataset_info(dataset: BeirDataset, full: BeirDataset, settings: EvalSettings) -> DatasetInfo:
    sample = sample_record(
        full, dataset, max_queries=settings.max_queries, corpus_sample=settings.corpus_sample, seed=settings.seed
    )
    return DatasetInfo(
        dataset.name,
        str(dataset.path) if dataset.path else None,
        dataset.split,
        len(dataset.corpus),
        len(dataset.queries),
        sum(len(j) for j in dataset.qrels.values()),
        dataset.content_hash,
        dict(dataset.files_sha256),
        dataset.warnings,
        sample if settings.sampled else None,
    )
