"""`tune`: choose alpha (and beta) of base + alpha*Psi + beta*Delta on held-out queries.

Each grid point is merged **in memory** into one loaded model and scored with `reforge.eval.evaluate`; nothing is
written per point. The merge is `reforge.ops.merge_compute.merge_into`: ``reforge merge``'s own `compute_output`
(fp32, rounded once to the retriever's dtype, one torch thread), so a point scores exactly what ``reforge merge``
would write for it. Between points only the tensors whose terms change are recomputed
(`reforge.ops.merge_compute.point_keys`): the adapted ones when alpha changes, those with a non-zero Delta when
beta changes. This module loads the model those tensors are written into, and runs the evaluation.

Every point is an on-disk-like model source (`MergePoint`) whose ``load`` does the merge, so the evaluation
pipeline merges only when some vectors are not in the embedding cache: the cache key of a point is a hash of the
inputs' content keys (`reforge.io.checkpoint.content_key`), alpha and beta, and a repeated point costs nothing. The
baseline (alpha = 0, beta = 1, the original retriever) is always scored first; every point is compared with it
(paired t-test and randomization test).

    >>> from reforge.tune import tune, write_best  # doctest: +SKIP
    >>> report = tune("base/", "psi/", "nfcorpus/", retriever="repllama/", split="dev")  # doctest: +SKIP
    >>> report.best.alpha, report.best.score, report.best.test.p_randomization  # doctest: +SKIP
    (0.75, 0.3121, 0.0132)
    >>> write_best(report, "repllama-nfcorpus/")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from reforge.data.beir import BeirDataset, load_beir, read_qrels, sample_dataset, sample_record
from reforge.errors import DataError, InvalidOptionError, LayoutMismatchError, short_path
from reforge.eval.metrics import PairedTest, parse_measures
from reforge.eval.model import ModelSource, Retriever
from reforge.eval.pipeline import EvalSettings, evaluate
from reforge.eval.report import DatasetInfo, EvalReport
from reforge.io.progress import ProgressFn, StageFn
from reforge.ops.defaults import DEFAULT_ALPHAS, PAPER_BETA
from reforge.ops.job import Access, WriteOptions

# ---------------------------------------------------------------------------------------------------------------------
# Grids and the tuning subset


def parse_grid(text: str, *, option: str = "--alpha") -> tuple[float, ...]:
    """Values from ``0,0.25,0.5`` or an inclusive range ``start:stop:step`` (``0:1:0.25``), in the order given.

    Raises:
        InvalidOptionError: not numbers, not finite, empty (or an empty item, ``0,,1``), a non-positive step, or
            a value given twice.

    Example:
        >>> parse_grid("0:1:0.25")
        (0.0, 0.25, 0.5, 0.75, 1.0)
    """
    parts = [p.strip() for p in str(text).split(",")]
    if any(parts) and not all(parts):
        raise InvalidOptionError(
            f"{option} {text!r} has an empty item.",
            hint=f"Write the values separated by single commas, e.g. {option} 0,0.5,1.",
            option=option,
        )
    parts = [p for p in parts if p]
    values: list[float] = []
    for part in parts:
        try:
            numbers = [float(x) for x in part.split(":")]
        except ValueError as e:
            raise InvalidOptionError(
                f"{option} {text!r} is not a list of numbers.",
                hint=f"Write e.g. {option} 0,0.25,0.5 or {option} 0:1:0.25.",
                option=option,
            ) from e
        if len(numbers) == 1:
            values.append(numbers[0])
            continue
        if len(numbers) != 3 or not numbers[2] > 0:
            raise InvalidOptionError(
                f"{option} range {part!r} must be start:stop:step with a step above 0.", option=option
            )
        start, stop, step = numbers
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        values += [round(start + i * step, 12) for i in range(max(count, 0))]
    return check_grid(values, option=option)


def check_grid(values: Sequence[float], *, option: str = "--alpha") -> tuple[float, ...]:
    """``values`` as a tuple of floats, checked: non-empty, finite, no repeats (``-0.0`` is ``0.0``)."""
    grid = tuple(float(v) + 0.0 for v in values)
    if not grid:
        raise InvalidOptionError(f"{option} gives no value.", hint=f"Write e.g. {option} 0,0.5,1.", option=option)
    bad = [v for v in grid if not math.isfinite(v)]
    if bad:
        raise InvalidOptionError(f"{option} holds {bad[0]}; every value must be a finite number.", option=option)
    repeated = sorted({v for v in grid if grid.count(v) > 1})
    if repeated:
        raise InvalidOptionError(f"{option} gives {repeated[0]:g} twice.", option=option)
    return grid


select_subset = sample_dataset  # the name tune has always used


# ---------------------------------------------------------------------------------------------------------------------
# In-memory merging


class InMemoryMerge:
    """One loaded model of the retriever's architecture whose weights are set to base + alpha*Psi + beta*Delta.

    ``source`` comes from `reforge.ops.merge_inputs.open_inputs` with exactly one adapter. `materialize` recomputes
    only the tensors whose value changes from the current (alpha, beta), by `reforge.ops.merge_compute.merge_into`.
    Counters: ``merges`` (points materialized), ``tensors_computed``.
    """

    def __init__(
        self,
        source: Any,
        *,
        retriever_source: ModelSource | None,
        tokenizer_dir: Path,
        config_dir: Path | None,
        allow_pickle: bool = False,
        stage: StageFn | None = None,
    ) -> None:
        self.source = source
        self.allow_pickle = allow_pickle
        self.retriever_source = retriever_source  # a full retriever: loaded as is (state alpha 0, beta 1)
        self.tokenizer_dir = tokenizer_dir
        self.config_dir = config_dir
        self.stage = stage
        self.model: Any = None
        self.tokenizer: Any = None
        self.params: dict[str, Any] = {}
        self.state: tuple[float, float] | None = None
        self.loaded_as: tuple[str, Any] | None = None
        self.merges = 0
        self.tensors_computed = 0

    def materialize(
        self, alpha: float, beta: float, *, device: str, dtype: Any, name: str, profile: Any, fingerprint: str
    ) -> Retriever:
        """The model with the weights of point (alpha, beta), as an eval `Retriever` (the same model object is
        reused: a Retriever is valid until the next call)."""
        from reforge.ops.merge_compute import merge_into, point_keys

        if self.model is None or self.loaded_as != (device, dtype):
            self._load(device, dtype)
        keys = point_keys(self.source, self.state, (alpha, beta))
        if self.stage:
            self.stage(f"Merging {name} in memory ({len(keys)} tensors)")
        self.state = None  # unknown until every tensor is written
        merge_into(self.params, self.source, keys, (alpha, beta))
        self.state = (alpha, beta)
        self.merges += 1
        self.tensors_computed += len(keys)
        return Retriever(self.model, self.tokenizer, name, profile, fingerprint)

    def release(self) -> None:
        """Drop the model (the next `materialize` loads it again)."""
        self.model, self.tokenizer, self.params, self.state, self.loaded_as = None, None, {}, None, None

    def _load(self, device: str, dtype: Any) -> None:
        """Load the skeleton: the full retriever itself (state (0, 1)), else the base as a bare model in the
        retriever's config (state (0, 0) for a LoRA retriever; unknown for a delta, so every tensor is merged)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.release()
        if self.stage:
            self.stage("Loading the model to merge into")
        if self.retriever_source is not None:
            loaded = self.retriever_source.load(device=device, dtype=dtype, allow_pickle=self.allow_pickle)
            model, tokenizer, state = loaded.model, loaded.tokenizer, (0.0, 1.0)
        else:
            config = AutoConfig.from_pretrained(self.config_dir) if self.config_dir else None
            kwargs = {"config": config, "ignore_mismatched_sizes": True} if config is not None else {}
            model = AutoModel.from_pretrained(self.source.base.path, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            model.to(device).eval()
            state = (0.0, 0.0) if self.source.retriever_adapter is not None else None
        self.model, self.tokenizer, self.state, self.loaded_as = model, tokenizer, state, (device, dtype)
        self.params = _parameters_by_key(model, self.source.shapes)


def _parameters_by_key(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``{canonical key: parameter}``; every key must be a parameter (or persistent buffer) of that shape."""
    named = dict(model.state_dict(keep_vars=True))
    found = {}
    for key, shape in shapes.items():
        tensor = next((named[k] for k in (key, f"model.{key}", key.removeprefix("model.")) if k in named), None)
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            got = "no such tensor" if tensor is None else f"shape {list(tensor.shape)}"
            raise LayoutMismatchError(
                f"The loaded {type(model).__name__} cannot hold merged tensor {key!r} {list(shape)} ({got}).",
                hint="Tune needs a retriever that transformers' AutoModel loads; use `reforge merge` and "
                "`reforge eval` per alpha instead.",
                left=type(model).__name__,
                right=None,
                tensor=key,
                details={},
            )
        found[key] = tensor
    return found


@dataclass(frozen=True)
class MergePoint(ModelSource):
    """A grid point as an evaluation source: `load` merges it in memory (only when something must be encoded)."""

    alpha: float = 0.0
    beta: float = 1.0
    in_grid: bool = True
    identity: str = ""
    merger: Any = field(default=None, compare=False, repr=False)
    loads: list = field(default_factory=list, compare=False, repr=False)

    @property
    def cache_identity(self) -> str:
        """The embedding-cache identity: the shared one of the retriever for its own point, else the point's."""
        return self.identity

    def load(self, *, device: str, dtype: Any, allow_pickle: bool = False) -> Retriever:
        """Merge this point into the shared model and return it."""
        self.loads.append((device, str(dtype)))
        return self.merger.materialize(
            self.alpha,
            self.beta,
            device=device,
            dtype=dtype,
            name=self.name,
            profile=self.profile,
            fingerprint=self.identity,
        )


# ---------------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class TunePoint:
    """One (alpha, beta): its score on the tuning split and the paired test against the baseline.

    ``merged`` is False when every vector came from the embedding cache (nothing was merged or encoded).
    ``test`` is None for the baseline itself. ``in_grid`` is False for a baseline scored only for reference.
    """

    alpha: float
    beta: float
    name: str
    score: float
    in_grid: bool
    merged: bool
    corpus_cached: bool
    test: PairedTest | None
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        data = asdict(self)
        data["test"] = asdict(self.test) if self.test else None
        return data


@dataclass(frozen=True)
class TuneReport:
    """What `tune` measured. ``points`` are in grid order (by beta, then alpha), the baseline first when it is not
    in the grid. ``dataset`` describes the subset actually scored; ``sample`` how it was drawn."""

    inputs: dict[str, Any]
    split: str
    test_split: str
    i_know: bool
    metric: str
    dataset: DatasetInfo
    sample: dict[str, Any]
    points: tuple[TunePoint, ...]
    baseline: TunePoint
    best: TunePoint
    warnings: tuple[str, ...]
    merges: int
    tensors_computed: int
    seconds: float
    eval: EvalReport

    @property
    def alphas(self) -> tuple[float, ...]:
        """The alphas of the grid, sorted."""
        return tuple(sorted({p.alpha for p in self.points if p.in_grid}))

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary (the split is recorded at the top level)."""
        return {
            "split": self.split,
            "test_split": self.test_split,
            "tuned_on_test_split": self.split == self.test_split,
            "i_know": self.i_know,
            "metric": self.metric,
            "averaging": self.eval.averaging,
            "best": {
                "alpha": self.best.alpha,
                "beta": self.best.beta,
                "score": self.best.score,
                "baseline_score": self.baseline.score,
                "test_against_baseline": asdict(self.best.test) if self.best.test else None,
            },
            "recommendation": asdict(recommend(self)),
            "points": [p.to_dict() for p in self.points],
            "inputs": self.inputs,
            "dataset": asdict(self.dataset),
            "sample": self.sample,
            "warnings": list(self.warnings),
            "in_memory_merges": self.merges,
            "tensors_computed": self.tensors_computed,
            "seconds": round(self.seconds, 3),
            "eval_settings": self.eval.settings,
            "models": [asdict(m) for m in self.eval.models],
            "reforge_version": self.eval.version,
        }


# ---------------------------------------------------------------------------------------------------------------------
# The decision, in words

LEVEL = 0.05  # the family-wise error rate of the recommendation


@dataclass(frozen=True)
class Recommendation:
    """What to do after a tune: ``action`` is ``merge`` (at ``alpha``, ``beta``), ``keep`` (the retriever: no point
    scores above it) or ``noise`` (a point scores above it, but not beyond what chance gives: keep the retriever).

    ``p`` is the best point's randomization-test p against alpha 0 and ``p_adjusted`` that p times the number of
    points compared (Bonferroni: picking the best of several points makes a small p likelier by chance); the gain
    counts only when ``p_adjusted < level``. ``text`` says it in a sentence.
    """

    action: str
    alpha: float
    beta: float
    gain: float
    p: float | None
    p_adjusted: float | None
    compared: int
    queries: int
    level: float
    text: str


def recommend(report: TuneReport, level: float = LEVEL) -> Recommendation:
    """The decision a user without a statistician wants: merge at the best point, or keep the retriever.

    Example:
        >>> recommend(report).text  # doctest: +SKIP
        'Keep the retriever (alpha 0): alpha 0.5 scores +0.0123 above it on 40 queries, p = 0.2100 ...'
    """
    best, baseline = report.best, report.baseline
    compared = sum(1 for p in report.points if p.test is not None)
    queries = report.dataset.queries
    gain = best.score - baseline.score
    synthetic = (
        f" These are {report.split} queries: they rank the points; the scores are not what real queries would give."
        if report.split == "synthetic"
        else ""
    )
    if best.test is None or gain <= 0:
        text = (
            f"Keep the retriever (alpha 0): no point of the grid scores above it on {queries} {report.split} queries "
            f"({report.metric} {baseline.score:.4f})."
        )
        return Recommendation("keep", 0.0, 1.0, 0.0, None, None, compared, queries, level, text + synthetic)
    p = best.test.p_randomization
    adjusted = min(1.0, p * max(compared, 1))
    where = f"alpha {best.alpha:g}" + (f", beta {best.beta:g}" if best.beta != 1.0 else "")
    tested = (
        f"{report.metric} {gain:+.4f} on {queries} {report.split} queries ({best.test.wins}/{best.test.ties}/"
        f"{best.test.losses} better/equal/worse), p = {p:.4f} (randomization test), {adjusted:.4f} after Bonferroni "
        f"over the {compared} points compared"
    )
    if adjusted < level:
        text = f"Merge at {where}: {tested} < {level:g}."
        return Recommendation(
            "merge", best.alpha, best.beta, gain, p, adjusted, compared, queries, level, text + synthetic
        )
    more = "reforge queries with a larger -n" if report.split == "synthetic" else "a larger split"
    text = (
        f"Keep the retriever (alpha 0): the gain of the best point, {where}, is within noise: {tested} >= {level:g}. "
        f"More queries ({more}) could tell."
    )
    return Recommendation("noise", 0.0, 1.0, gain, p, adjusted, compared, queries, level, text + synthetic)


# ---------------------------------------------------------------------------------------------------------------------
# tune


def tune(
    base: str | Path,
    adapter: str | Path,
    data: str | Path | BeirDataset,
    *,
    retriever: str | Path | None = None,
    delta: str | Path | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = (PAPER_BETA,),
    metric: str = "nDCG@10",
    split: str = "dev",
    test_split: str = "test",
    i_know: bool = False,
    max_queries: int | None = None,
    corpus_sample: int | None = None,
    seed: int = 0,
    settings: EvalSettings | None = None,
    progress: ProgressFn | None = None,
    stage: StageFn | None = None,
) -> TuneReport:
    """Score every (alpha, beta) of the grid on held-out queries and pick the best.

    Args:
        base: the pretrained LM the retriever and the adapter start from.
        adapter: the knowledge adapter (peft DoRA/LoRA folder from `reforge train`).
        data: a BEIR folder (read for ``split``) or a `BeirDataset`.
        retriever / delta: exactly one, as in `reforge.ops.merge.merge`.
        alphas, betas: the grid; every combination is scored.
        metric: an ir-measures name; the best point maximizes it.
        split: the tuning split. ``test_split`` is the one you will report: tuning on it needs ``i_know``.
        max_queries, corpus_sample, seed: the tuning subset (see `select_subset`); ``seed`` also seeds the
            randomization test.
        settings: encoding and scoring options as for `reforge.eval.evaluate` (its ``split`` and ``measures`` are
            replaced by ``split`` and ``metric``; ``token`` and ``allow_pickle`` open the checkpoints).

    Returns:
        A `TuneReport`. The best point has the highest score among grid points; ties go to the point nearest the
        original retriever (smallest |alpha|, then smallest |beta - 1|).

    Raises:
        InvalidOptionError: bad grid or subset sizes, both or neither of retriever/delta, or ``split`` equal to
            ``test_split`` without ``i_know`` (all before anything is loaded).
        DataError, AdapterError, LayoutMismatchError, ProvenanceMismatchError: from reading the data and inputs.
    """
    from reforge.ops.merge_inputs import check_base_values, open_inputs

    started = time.perf_counter()
    alphas, betas = check_grid(alphas, option="--alpha"), check_grid(betas, option="--beta")
    _check_options(retriever, delta, split, test_split, i_know, max_queries, corpus_sample)
    metric = str(parse_measures([metric])[0])
    settings = replace(settings or EvalSettings(), split=split, measures=(metric,), seed=seed)
    settings.check()
    full = data if isinstance(data, BeirDataset) else _load_split(data, split, test_split)
    if full.split != split:
        raise InvalidOptionError(
            f"The dataset given was read for split {full.split!r}, not {split!r}.", option="--split"
        )
    warnings = list(full.warnings) + _overlap_warnings(full, split, test_split)
    subset = select_subset(full, max_queries=max_queries, corpus_sample=corpus_sample, seed=seed)
    source = open_inputs(base, retriever, delta, [(adapter, 0.0)], access=Access(settings.token, settings.allow_pickle))
    for beta in betas:
        check_base_values(source, beta)
    merger, template = _merger_and_template(source, retriever, delta, base, settings, stage)
    points = _points(alphas, betas, template, merger, source)
    try:
        report = evaluate(points, [subset], settings, progress=progress, stage=stage)
    finally:
        merger.release()
    assert report is not None, "tune runs in one process"
    scored = _scored_points(report, points, subset.name, metric)  # evaluation order: the baseline first
    grid = sorted((p for p in scored if p.in_grid), key=lambda p: (p.beta, p.alpha))
    best = _best(grid)
    return TuneReport(
        inputs=_inputs(source, base, retriever, delta, adapter),
        split=split,
        test_split=test_split,
        i_know=i_know,
        metric=metric,
        dataset=report.datasets[0],
        sample=sample_record(full, subset, max_queries=max_queries, corpus_sample=corpus_sample, seed=seed),
        points=tuple(grid if scored[0].in_grid else [scored[0], *grid]),
        baseline=scored[0],
        best=best,
        warnings=tuple(warnings),
        merges=merger.merges,
        tensors_computed=merger.tensors_computed,
        seconds=time.perf_counter() - started,
        eval=report,
    )


def _best(points: Sequence[TunePoint]) -> TunePoint:
    """The highest score; ties go to the point nearest the original retriever (|alpha|, then |beta - 1|)."""
    return max(points, key=lambda p: (p.score, -abs(p.alpha), -abs(p.beta - 1.0)))


def _check_options(retriever, delta, split: str, test_split: str, i_know: bool, max_queries, corpus_sample) -> None:
    from reforge.ops.job import check_source

    check_source(retriever, delta)
    if split == test_split and not i_know:
        raise InvalidOptionError(
            f"Refusing to tune on split {split!r}: it is the split you report (--test-split {test_split}), so the "
            f"chosen alpha would be fitted to the test queries and its score would be optimistic.",
            hint="Tune on a held-out split (e.g. --split dev, or --split train for SciFact), or pass --i-know.",
            option="--split",
        )
    for option, value in (("--max-queries", max_queries), ("--corpus-sample", corpus_sample)):
        if value is not None and value < 1:
            raise InvalidOptionError(f"{option} must be at least 1, got {value}.", option=option)


def _load_split(folder, split: str, test_split: str) -> BeirDataset:
    """`load_beir`, with a missing split's hint naming a split tune accepts (not ``test_split``)."""
    try:
        return load_beir(folder, split)
    except DataError as e:
        available = getattr(e, "available", None)
        if getattr(e, "split", None) != split or available is None:
            raise
        held_out = [s for s in available if s != test_split]
        if not held_out:
            hint = (
                f"Its only split is --test-split {test_split}: hold out some of its queries in another "
                f"qrels/<split>.tsv, or pass --split {test_split} --i-know (the score will be optimistic)."
            )
        else:
            choice = "dev" if "dev" in held_out else held_out[0]
            hint = (
                f"Pass --split {choice} (held out from --test-split {test_split}). If the retriever was "
                f"trained on those queries (as SciFact's train queries usually are), any alpha > 0 looks "
                f"worse on them than it is: see docs/tune.md."
            )
        raise DataError(e.message, hint=hint, path=e.path, line=None, split=split, available=available) from e


def _overlap_warnings(dataset: BeirDataset, split: str, test_split: str) -> list[str]:
    """A warning when tuning queries are also judged in the test split (only for folders that have one)."""
    if split == test_split or dataset.path is None:
        return []
    test_file = Path(dataset.path) / "qrels" / f"{test_split}.tsv"
    if not test_file.is_file():
        return []
    shared = sorted(set(dataset.queries) & set(read_qrels(test_file)))
    if not shared:
        return []
    return [
        f"{len(shared)} of the {len(dataset.queries)} {split} queries are also judged in "
        f"{short_path(test_file)} (e.g. {', '.join(shared[:3])}); the tuned alpha has seen part of the test set."
    ]


def _merger_and_template(
    source, retriever, delta, base, settings: EvalSettings, stage: StageFn | None
) -> tuple[InMemoryMerge, ModelSource]:
    """The shared in-memory model and a `ModelSource` describing the retriever (profile, tokenizer, paths)."""
    from reforge.eval.model import _tokenizer_hash, resolve_model, transformer_dir
    from reforge.io.companions import has_tokenizer
    from reforge.ops.delta import RETRIEVER_FILES
    from reforge.profiles import detect_profile

    if delta is not None:
        files = source.delta.path / RETRIEVER_FILES
        recorded = (source.delta.manifest.get("retriever") or {}).get("ref") or str(delta)
        profile = detect_profile(files, name=str(recorded), profile=settings.profile, pooling=settings.pooling)
        template = ModelSource(
            Path(str(recorded)).name,
            str(delta),
            source.delta.path,
            "",
            profile,
            str(base),
            None,
            _tokenizer_hash(files),
        )
        loaded, tokenizer_dir, config_dir = None, files, files
    else:
        template = resolve_model(
            retriever,
            base=str(base),
            token=settings.token,
            allow_pickle=settings.allow_pickle,
            profile=settings.profile,
            pooling=settings.pooling,
        )
        if source.retriever_adapter is not None:  # the base, in memory, with the LoRA retriever's tokenizer
            loaded, tokenizer_dir, config_dir = None, template.path, None
        else:  # the full retriever itself, loaded as it is
            loaded, tokenizer_dir, config_dir = template, transformer_dir(template.path), None
    if loaded is None and not has_tokenizer(tokenizer_dir):
        tokenizer_dir = source.base.path
    merger = InMemoryMerge(
        source,
        retriever_source=loaded,
        tokenizer_dir=tokenizer_dir,
        config_dir=config_dir,
        allow_pickle=settings.allow_pickle,
        stage=stage,
    )
    return merger, template


def _points(alphas, betas, template: ModelSource, merger: InMemoryMerge, source) -> list[MergePoint]:
    """The baseline (alpha 0, beta 1) first, then the grid by beta and alpha (consecutive points share work)."""
    grid = [(a, b) for b in sorted(betas, key=lambda b: (b != 1.0, b)) for a in sorted(alphas)]
    if (0.0, 1.0) in grid:
        grid.remove((0.0, 1.0))
    ordered = [(0.0, 1.0, 0.0 in alphas and 1.0 in betas)] + [(a, b, True) for a, b in grid]
    inputs = _input_keys(source)
    points = []
    for alpha, beta, in_grid in ordered:
        name = f"alpha={alpha:g} beta={beta:g}"
        shared = merger.retriever_source is not None and (alpha, beta) == (0.0, 1.0)
        identity = (
            merger.retriever_source.cache_identity
            if shared
            else f"{_point_fingerprint(inputs, alpha, beta)}:{template.tokenizer_hash}"
        )
        points.append(
            MergePoint(
                name,
                f"{template.ref} + {alpha:g}*psi, beta {beta:g}",
                template.path,
                identity.split(":")[0],
                template.profile,
                template.base_ref,
                None,
                template.tokenizer_hash,
                alpha=alpha,
                beta=beta,
                in_grid=in_grid,
                identity=identity,
                merger=merger,
                loads=[],
            )
        )
    return points


def _input_fingerprints(source) -> dict[str, Any]:
    """`reforge.ops.merge_inputs.MergeInputs.fingerprints`, with tune's one adapter as ``adapter``."""
    fingerprints = source.fingerprints()
    fingerprints["adapter"] = fingerprints.pop("adapters")[0]
    return fingerprints


def _input_keys(source) -> dict[str, Any]:
    """The inputs' whole-content keys (`reforge.io.checkpoint.content_key`): what a point's cached vectors are
    reused on. The sampled fingerprints (`_input_fingerprints`) are recorded as provenance only: two bases that
    differ between their samples would otherwise share vectors (issue 26)."""
    from reforge.io.checkpoint import content_key

    def key(checkpoint) -> str | None:
        return content_key(checkpoint.path) if checkpoint is not None else None

    return {
        "base": key(source.base),
        "retriever": key(source.retriever),
        "retriever_adapter": key(source.retriever_adapter.checkpoint) if source.retriever_adapter else None,
        "delta": key(source.delta),
        "adapter": key(source.adapters[0][0].checkpoint),
    }


def _point_fingerprint(inputs: dict[str, Any], alpha: float, beta: float) -> str:
    """Identifies the merged weights of one point. At alpha 0 the adapter does not matter, so it is left out (the
    baseline is shared across adapters)."""
    payload = {"kind": "reforge-tune-point-v2", **inputs, "alpha": repr(float(alpha) + 0.0), "beta": repr(float(beta))}
    if alpha == 0:
        payload["adapter"] = None
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _scored_points(report: EvalReport, points: list[MergePoint], dataset: str, metric: str) -> list[TunePoint]:
    scored = []
    for i, point in enumerate(points):
        result = report.result(point.name, dataset)
        test = report.comparison(point.name, dataset, metric).test if i > 0 else None
        scored.append(
            TunePoint(
                point.alpha,
                point.beta,
                point.name,
                result.scores[metric],
                point.in_grid,
                bool(point.loads),
                result.corpus_cached,
                test,
                dict(result.timings),
            )
        )
    return scored


def _inputs(source, base, retriever, delta, adapter) -> dict[str, Any]:
    fingerprints = _input_fingerprints(source)
    return {
        "base": {"ref": str(base), "fingerprint": fingerprints["base"]},
        "retriever": (
            {
                "ref": str(retriever),
                "fingerprint": fingerprints["retriever"] or fingerprints["retriever_adapter"],
                "lora": source.retriever_adapter is not None,
            }
            if retriever is not None
            else None
        ),
        "delta": {"ref": str(delta), "plan_id": fingerprints["delta"]} if delta is not None else None,
        "adapter": {"ref": str(adapter), "fingerprint": fingerprints["adapter"], "dora": source.adapters[0][0].is_dora},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: the plot and the merged model of the best point


def plot_tuning(report: TuneReport, path: str | Path) -> Path:
    """Write a PNG of the metric against alpha (one line per beta), the baseline as a dotted line and the best
    point starred. Needs matplotlib (``pip install 'reforge[plot]'``).

    Raises:
        InvalidOptionError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise InvalidOptionError(
            "The plot needs matplotlib, which is not installed.",
            hint="pip install matplotlib (or 'reforge[plot]'), or pass --no-plot.",
            option="--plot",
        ) from e
    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    grid = [p for p in report.points if p.in_grid]
    for beta in sorted({p.beta for p in grid}):
        line = sorted((p for p in grid if p.beta == beta), key=lambda p: p.alpha)
        axes.plot([p.alpha for p in line], [p.score for p in line], marker="o", label=f"beta = {beta:g}")
    axes.axhline(
        report.baseline.score, color="grey", linestyle=":", label=f"retriever (alpha 0): {report.baseline.score:.4f}"
    )
    best = report.best
    axes.plot(
        [best.alpha],
        [best.score],
        marker="*",
        markersize=16,
        color="crimson",
        linestyle="none",
        label=f"best: alpha {best.alpha:g}, beta {best.beta:g} ({best.score:.4f})",
    )
    axes.set_xlabel("alpha (weight of the knowledge adapter)")
    axes.set_ylabel(report.metric)
    axes.set_title(
        f"{report.dataset.name}, split {report.split}: {report.sample['queries']} queries, "
        f"{report.sample['documents']} documents",
        fontsize=10,
    )
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def write_best(
    report: TuneReport,
    output: str | Path,
    *,
    write: WriteOptions = WriteOptions(),
    access: Access = Access(),
    progress: ProgressFn | None = None,
) -> Any:
    """Write the merged model of the best point with `reforge.ops.merge.merge` (what ``reforge merge`` runs).

    Args:
        write: shard size, overwrite, dry run, the command (its ``dtype`` is ``auto``: the point tune scored).
        access: Hub token and pickle permission for the inputs.

    Returns:
        The `MergeReport`.
    """
    from reforge.ops.merge import merge

    inputs = report.inputs
    return merge(
        inputs["base"]["ref"],
        output,
        retriever=inputs["retriever"]["ref"] if inputs["retriever"] else None,
        delta=inputs["delta"]["ref"] if inputs["delta"] else None,
        adapters=[(inputs["adapter"]["ref"], report.best.alpha)],
        beta=report.best.beta,
        write=replace(write, dtype="auto"),
        access=access,
        progress=progress,
    )
