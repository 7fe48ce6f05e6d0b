"""`evaluate`: models x datasets -> `EvalReport`. Reads top to bottom: resolve, encode (or read the cache), search,
score, compare."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from reforge import __version__
from reforge.data.beir import BeirDataset, load_beir
from reforge.errors import InvalidOptionError
from reforge.eval.cache import EmbeddingCache, embedding_key, texts_hash
from reforge.eval.distributed import Ranks
from reforge.eval.encode import encode, passages, shard_indices
from reforge.eval.metrics import AVERAGING, paired_test, parse_measures, score_run
from reforge.eval.model import ModelSource, Retriever, resolve_model
from reforge.profiles import EncodingProfile, apply_overrides
from reforge.eval.report import Comparison, DatasetInfo, EvalReport, ModelInfo, Result
from reforge.eval.search import search

ProgressFn = Callable[[int, "int | None"], None]
StageFn = Callable[[str], None]


@dataclass(frozen=True)
class EvalSettings:
    """Every option of an evaluation; None means "the model's profile decides" or "pick for this machine".

    Profile overrides (``profile``, ``pooling``, ``query_prefix``, ``passage_prefix``, ``task``, ``max_length``,
    ``normalize``) apply to every model. ``batch_size`` None = 32 on CPU, 64 on GPU. ``dtype`` None = float32 on
    CPU, bfloat16 on a GPU that supports it (else float16). ``cache_dir`` None = ``$REFORGE_HOME/cache/embeddings``.
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
    query_chunk_size: int = 1024
    permutations: int = 10_000
    seed: int = 0
    token: str | None = field(default=None, repr=False)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = None

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
        ):
            if value < 1:
                raise InvalidOptionError(f"{option} must be at least 1, got {value}.", option=option)
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
        An `EvalReport`; None on ranks other than 0 of a distributed run (they only encode corpus shards).

    Raises:
        DataError, CheckpointNotFoundError, AdapterError, PoolingUndeterminedError, InvalidOptionError: before any
            encoding starts, for bad data, models or options.

    Example:
        >>> report = evaluate(["all-MiniLM-L6-v2"], ["scifact"])  # doctest: +SKIP
        >>> round(report.score("all-MiniLM-L6-v2", "scifact"), 3)  # doctest: +SKIP
        0.645
    """
    import torch

    settings = settings or EvalSettings()
    settings.check()
    ranks = Ranks.from_env()
    device = ranks.device(settings.device)
    ranks.start(device)
    measures = parse_measures(settings.measures)
    data = [d if isinstance(d, BeirDataset) else load_beir(d, settings.split) for d in datasets]
    _check_unique([d.name for d in data], "dataset")
    sources = _distinct_names([_source(m, settings) for m in models])
    profiles = [apply_overrides(_profile(s), **settings.overrides()) for s in sources]
    for profile in profiles:
        for dataset in data:
            profile.query_prefix_for(dataset.name)  # fail now, not after an hour of encoding
    dtype = _dtype(settings.dtype, device)
    batch_size = settings.batch_size or (32 if device == "cpu" else 64)
    cache = EmbeddingCache(settings.cache_dir) if settings.cache else None
    results = []
    for source, profile in zip(sources, profiles):
        loader = _Loader(source, device=device, dtype=dtype, allow_pickle=settings.allow_pickle)
        for dataset in data:
            run_context = _Context(
                loader, profile, dataset, cache, batch_size, device, str(dtype), ranks, progress, stage
            )
            doc_vectors, encode_seconds, cached = _corpus_vectors(run_context)
            if not ranks.is_main:
                continue
            results.append(_search_and_score(run_context, doc_vectors, encode_seconds, cached, measures, settings))
        loader.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not ranks.is_main:
        return None
    names = tuple(str(m) for m in measures)
    return EvalReport(
        models=tuple(_model_info(s, p) for s, p in zip(sources, profiles)),
        datasets=tuple(_dataset_info(d) for d in data),
        measures=names,
        averaging=settings.averaging,
        settings={
            **{k: v for k, v in asdict(settings).items() if k != "token"},
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "world_size": ranks.world_size,
        },
        results=tuple(results),
        comparisons=tuple(_compare(results, data, sources, names, settings)),
        version=__version__,
    )


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
            self.seconds = time.perf_counter() - start
        return self.retriever

    def release(self) -> None:
        if not isinstance(self.source, Retriever):
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
    batch_size: int
    device: str
    dtype: str
    ranks: Ranks
    progress: ProgressFn | None
    stage: StageFn | None

    def say(self, message: str) -> None:
        if self.stage:
            self.stage(message)

    def key(self, kind: str, texts_digest: str) -> str | None:
        if self.cache is None or self.loader.fingerprint is None:
            return None
        settings = {"kind": kind, "dtype": self.dtype, **self.profile.passage_settings()}
        return embedding_key(model_fingerprint=self.loader.fingerprint, texts_hash=texts_digest, settings=settings)


def _corpus_vectors(ctx: _Context) -> tuple[np.ndarray | None, float, bool]:
    """The corpus vectors from the cache, or encoded (this rank's shard, merged on rank 0). Returns
    ``(vectors or None on other ranks, encode seconds, came from cache)``."""
    dataset, ranks = ctx.dataset, ctx.ranks
    key = ctx.key("corpus", dataset.corpus_hash)
    if key is not None and ctx.cache is not None:
        cached = ctx.cache.load(key, len(dataset.corpus))  # memory-mapped: ranks other than 0 read nothing
        if cached is not None:
            return (cached if ranks.is_main else None), 0.0, True
    texts = passages(dataset.corpus, ctx.profile)
    meta = {
        "model": ctx.loader.source.name,
        "dataset": dataset.name,
        "documents": len(texts),
        "profile": ctx.profile.to_dict(),
        "dtype": ctx.dtype,
    }
    retriever = ctx.loader.get()
    ctx.say(f"Encoding {dataset.name} corpus with {retriever.name}")
    start = time.perf_counter()
    if ranks.world_size == 1:
        vectors = encode(retriever, texts, ctx.profile, batch_size=ctx.batch_size, progress=ctx.progress)
        seconds = time.perf_counter() - start
        if key is not None and ctx.cache is not None:
            ctx.cache.save(key, vectors, meta)
        return vectors, seconds, False
    if key is None or ctx.cache is None:
        raise InvalidOptionError(
            "A distributed encode passes its shards through the cache.",
            hint="Drop --no-cache (and give in-memory models a fingerprint).",
            option="--no-cache",
        )
    mine = shard_indices(texts, ranks.rank, ranks.world_size)
    shard = encode(retriever, [texts[i] for i in mine], ctx.profile, batch_size=ctx.batch_size, progress=ctx.progress)
    ctx.cache.save_shard(key, ranks.rank, ranks.world_size, mine, shard)
    ranks.barrier()
    vectors = ctx.cache.merge_shards(key, ranks.world_size, len(texts), meta) if ranks.is_main else None
    seconds = time.perf_counter() - start
    ranks.barrier()
    return vectors, seconds, False


def _search_and_score(
    ctx: _Context,
    doc_vectors: np.ndarray | None,
    encode_seconds: float,
    cached: bool,
    measures: list[Any],
    settings: EvalSettings,
) -> Result:
    dataset = ctx.dataset
    prefix = ctx.profile.query_prefix_for(dataset.name)
    query_ids = list(dataset.queries)
    texts = [prefix + dataset.queries[q] for q in query_ids]
    start = time.perf_counter()
    key = ctx.key("queries", texts_hash(texts))
    query_vectors = ctx.cache.load(key, len(texts)) if key is not None and ctx.cache is not None else None
    if query_vectors is None:
        retriever = ctx.loader.get()
        ctx.say(f"Encoding {dataset.name} queries with {retriever.name}")
        query_vectors = encode(retriever, texts, ctx.profile, batch_size=ctx.batch_size, progress=ctx.progress)
        if key is not None and ctx.cache is not None:
            ctx.cache.save(
                key,
                query_vectors,
                {
                    "model": ctx.loader.source.name,
                    "dataset": dataset.name,
                    "queries": len(texts),
                    "query_prefix": prefix,
                },
            )
    query_seconds = time.perf_counter() - start
    ctx.say(f"Searching {dataset.name}")
    start = time.perf_counter()
    assert doc_vectors is not None
    run = search(
        query_vectors,
        doc_vectors,
        query_ids,
        [d.id for d in dataset.corpus],
        top_k=settings.top_k,
        drop_identical_ids=not settings.keep_identical_ids,
        chunk_size=settings.query_chunk_size,
    )
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_run(dataset.qrels, run, measures, settings.averaging)
    timings = {
        "load": round(ctx.loader.seconds, 3),
        "encode_corpus": round(encode_seconds, 3),
        "documents": float(len(dataset.corpus)),
        "encode_queries": round(query_seconds, 3),
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
        prefix,
    )


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
            if settings.averaging == "all":
                query_ids = list(dataset.qrels)
            else:  # queries both runs answered
                query_ids = [q for q in dataset.qrels if baseline.run.get(q) and other.run.get(q)]
            for measure in measures:
                test = paired_test(
                    baseline.per_query[measure],
                    other.per_query[measure],
                    query_ids,
                    measure=measure,
                    permutations=settings.permutations,
                    seed=settings.seed,
                )
                comparisons.append(
                    Comparison(
                        dataset.name, source.name, baseline_name, baseline.scores[measure], other.scores[measure], test
                    )
                )
    return comparisons


def _source(model: Any, settings: EvalSettings) -> ModelSource | Retriever:
    if isinstance(model, (ModelSource, Retriever)):
        return model
    return resolve_model(
        model,
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


def _dataset_info(dataset: BeirDataset) -> DatasetInfo:
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
    )
