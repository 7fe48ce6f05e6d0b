"""MTEB v2 result files from a `reforge.eval.report.EvalReport`: ``DIR/{org__name}/{revision}/{TaskName}.json`` plus
``model_meta.json``, the layout of MTEB's results repository and of ``mteb.ResultCache`` (whose ``cache_path``
is ``DIR``'s parent when ``DIR`` is named ``results``).

What a file holds (MTEB's ``TaskResult``): ``task_name``, ``dataset_revision``, ``mteb_version``,
``evaluation_time``, ``date`` and ``scores = {split: [{main_score, hf_subset, languages, ndcg_at_k, map_at_k,
recall_at_k, precision_at_k, mrr_at_k, hit_rate_at_k for k in 1, 3, 5, 10, 20, 100, 1000}]}``. Where the ``mteb``
package is installed (``pip install "reforge[mteb]"``), the file is built and written by its own ``TaskResult``
and ``ModelMeta`` classes; otherwise the same fields are written as plain JSON (a test with mteb installed checks
the two agree, so the fallback cannot drift unseen).

Choices, each said in the output (`MtebFile.notes`):

- **Task names.** A BEIR folder whose name is a BEIR dataset (``scifact``, ``nfcorpus``, ``arguana``, ...) is
  written under MTEB's task name (``SciFact``, ``NFCorpus``, ``ArguAna``, ...). Any other folder is no MTEB task:
  it gets the custom name ``reforge-<folder>`` and empty ``languages``.
- **Identical query and document ids.** MTEB drops a hit whose document id equals the query id only for the tasks
  that set ``ignore_identical_ids`` (ArguAna, Quora, FEVER, FiQA2018, MS MARCO, TREC-DL, ...; read from mteb's task
  metadata where installed, else from `BEIR_TASKS`), and keeps it everywhere else; BEIR drops it everywhere. MTEB
  files follow MTEB's rule per task. Custom datasets follow the report's rule. When the report's rule differs from
  the task's and some evaluated query shares its id with a document, the run cannot be converted exactly and
  `check_mteb_export` refuses, naming the flag to rerun with.
- **dataset_revision** is ``reforge-sha256:<first 16 hex of the evaluated content hash>``: reforge scored a local
  folder and cannot tell whether it equals the HF dataset revision mteb pins (e.g. SciFact's corpus in
  ``../shared/data`` was rebuilt), so it never claims that revision.
- Only whole splits with top-k >= 1000 are written (MTEB scores up to @1000; a sample is not the task's score).
- **Model names.** A Hub id (``org/name``) keeps its name; a local folder becomes ``local/<name in the table>``; the
  revision is the first 16 hex of reforge's fingerprint of the weights.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reforge.errors import InvalidOptionError
from reforge.io.atomic import write_atomic

if TYPE_CHECKING:
    from reforge.data.beir import BeirDataset
    from reforge.eval.report import EvalReport, ModelInfo

K_VALUES = (1, 3, 5, 10, 20, 100, 1000)
MAIN_SCORE = "ndcg_at_10"  # every BEIR task's main score in MTEB

# BEIR folder name -> (MTEB task name, MTEB's ignore_identical_ids, eval split), from mteb 2.26's task metadata.
# Used where mteb is not installed; where it is, mteb's own metadata decides (and a test checks this table).
BEIR_TASKS: dict[str, tuple[str, bool, str]] = {
    "arguana": ("ArguAna", True, "test"),
    "climate-fever": ("ClimateFEVER", False, "test"),
    "dbpedia-entity": ("DBPedia", False, "test"),
    "fever": ("FEVER", True, "test"),
    "fiqa": ("FiQA2018", True, "test"),
    "hotpotqa": ("HotpotQA", False, "test"),
    "msmarco": ("MSMARCO", True, "dev"),
    "nfcorpus": ("NFCorpus", False, "test"),
    "nq": ("NQ", False, "test"),
    "quora": ("QuoraRetrieval", True, "test"),
    "scidocs": ("SCIDOCS", False, "test"),
    "scifact": ("SciFact", False, "test"),
    "trec-covid": ("TRECCOVID", False, "test"),
    "webis-touche2020": ("Touche2020", False, "test"),
    **{
        f"cqadupstack-{sub}": (f"CQADupstack{sub.capitalize()}Retrieval", False, "test")
        for sub in ("android", "english", "gaming", "gis", "mathematica", "physics", "programmers", "stats", "tex")
    },
    "cqadupstack-unix": ("CQADupstackUnixRetrieval", False, "test"),
    "cqadupstack-webmasters": ("CQADupstackWebmastersRetrieval", False, "test"),
    "cqadupstack-wordpress": ("CQADupstackWordpressRetrieval", False, "test"),
}
# the fields of a model_meta.json written without mteb (mteb's ModelMeta.to_dict() writes these and more)
_META_FIELDS = (
    "name",
    "revision",
    "release_date",
    "languages",
    "n_parameters",
    "memory_usage_mb",
    "max_tokens",
    "embed_dim",
    "license",
    "open_weights",
    "public_training_code",
    "public_training_data",
    "framework",
    "similarity_fn_name",
    "use_instructions",
    "training_datasets",
    "modalities",
    "model_type",
    "loader",
)


@dataclass(frozen=True)
class MtebTask:
    """Where a dataset's results go: MTEB ``name``, whether it is an MTEB task (``known``), MTEB's identical-id
    rule for it (None for a custom dataset: the report's rule applies), its languages and eval split."""

    name: str
    known: bool
    ignore_identical_ids: bool | None
    languages: tuple[str, ...] = ()
    split: str | None = None


@dataclass(frozen=True)
class MtebFile:
    """One written result file: its path, the model and task, the main score, and what was chosen (``notes``)."""

    path: Path
    model: str
    task: str
    main_score: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def mteb_task(dataset_name: str) -> MtebTask:
    """The MTEB task a BEIR folder's results belong to (see the module docstring)."""
    key = dataset_name.lower()
    if key not in BEIR_TASKS:
        return MtebTask(f"reforge-{_slug(dataset_name)}", False, None)
    name, ignore, split = BEIR_TASKS[key]
    task = _installed_task(name)
    if task is None:
        return MtebTask(name, True, ignore, ("eng-Latn",), split)
    langs = task.metadata.eval_langs
    languages = tuple(langs) if isinstance(langs, list) else ()
    return MtebTask(name, True, bool(task.ignore_identical_ids), languages, task.metadata.eval_splits[0])


def check_mteb_export(
    datasets: Sequence[BeirDataset], *, keep_identical_ids: bool, top_k: int, sampled: bool
) -> list[MtebTask]:
    """Raise `InvalidOptionError` now, before any encoding, when MTEB files could not be written exactly.

    Refused: a sample (``--max-queries`` / ``--corpus-sample``), ``--top-k`` below 1000, and a dataset whose MTEB
    identical-id rule differs from ``keep_identical_ids`` while some evaluated query id is also a document id
    (converting would need hits the run does not hold). Returns each dataset's `MtebTask`.
    """
    if sampled:
        raise InvalidOptionError(
            "MTEB result files hold whole-split scores; a --max-queries / --corpus-sample sample is not one.",
            hint="Drop the sample options, or drop --mteb-results.",
            option="--mteb-results",
        )
    if top_k < max(K_VALUES):
        raise InvalidOptionError(
            f"MTEB result files score up to @1000; --top-k {top_k} is too small.",
            hint="Use --top-k 1000 (the default).",
            option="--mteb-results",
        )
    tasks = []
    for dataset in datasets:
        task = mteb_task(dataset.name)
        tasks.append(task)
        if task.ignore_identical_ids is None or task.ignore_identical_ids != keep_identical_ids:
            continue  # custom dataset, or the rules agree (ignore = drop = not keep)
        shared = _shared_ids(dataset)
        if shared:
            flag = "without --keep-identical-ids" if task.ignore_identical_ids else "with --keep-identical-ids"
            rule = "drops" if task.ignore_identical_ids else "keeps"
            raise InvalidOptionError(
                f"MTEB {rule} hits whose document id equals the query id for {task.name}, and {len(shared)} "
                f"evaluated queries of {dataset.name} share an id with a document (e.g. {', '.join(shared[:3])}).",
                hint=f"Rerun {flag} to write its MTEB file.",
                option="--mteb-results",
            )
    return tasks


def mteb_scores(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], *, drop_identical_ids: bool
) -> dict[str, float]:
    """MTEB's retrieval scores of ``run``: ``{ndcg,map,recall,precision,mrr,hit_rate}_at_k`` for `K_VALUES`.

    As MTEB computes them: pytrec_eval's ``ndcg_cut``, ``map_cut``, ``recall``, ``P`` and ``success`` (through
    ir-measures) averaged over the judged queries with at least one hit; ``mrr`` over every judged query of the
    run (no hit: 0), ties broken by document id descending as pytrec_eval does.
    """
    import ir_measures

    clean = {q: _without_self(q, hits, drop_identical_ids) for q, hits in run.items() if q in qrels}
    answered = {q: hits for q, hits in clean.items() if hits}
    names = {"ndcg": "nDCG@{}", "map": "AP@{}", "recall": "R@{}", "precision": "P@{}", "hit_rate": "Success@{}"}
    measures = {
        f"{key}_at_{k}": ir_measures.parse_measure(pattern.format(k))
        for key, pattern in names.items()
        for k in K_VALUES
    }
    sums = dict.fromkeys(measures, 0.0)
    by_measure = {str(m): key for key, m in measures.items()}
    if answered:
        for metric in ir_measures.iter_calc(list(measures.values()), dict(qrels), answered):
            sums[by_measure[str(metric.measure)]] += float(metric.value)
    scores = {key: (value / len(answered) if answered else 0.0) for key, value in sums.items()}
    for k in K_VALUES:
        ranks = [_reciprocal_rank(qrels[q], hits, k) for q, hits in clean.items()]
        scores[f"mrr_at_{k}"] = sum(ranks) / len(ranks) if ranks else 0.0
    return scores


def write_mteb_results(report: EvalReport, folder: str | Path, datasets: Sequence[BeirDataset]) -> list[MtebFile]:
    """Write every model's result on every dataset of ``report`` as MTEB files under ``folder``.

    Args:
        report: from `reforge.eval.evaluate` (optionally with `reforge.eval.bm25.add_bm25`).
        folder: the results folder (``DIR`` of ``DIR/{org__name}/{revision}/{TaskName}.json``).
        datasets: the datasets evaluated (for the identical-id check and the corpus ids).

    Raises:
        InvalidOptionError: what `check_mteb_export` refuses.
    """
    folder = Path(folder)
    settings = report.settings
    keep = bool(settings.get("keep_identical_ids", False))
    sampled = any(d.sample for d in report.datasets)
    by_name = {d.name: d for d in datasets}
    tasks = dict(
        zip(
            [d.name for d in report.datasets],
            check_mteb_export(
                [by_name[d.name] for d in report.datasets],
                keep_identical_ids=keep,
                top_k=int(settings.get("top_k", 1000)),
                sampled=sampled,
            ),
        )
    )
    written = []
    for model in report.models:
        name, revision = _model_name(model)
        model_dir = folder / name.replace("/", "__").replace(" ", "_") / revision
        model_dir.mkdir(parents=True, exist_ok=True)
        _write_json(model_dir / "model_meta.json", _model_meta(name, revision, model))
        for info in report.datasets:
            task = tasks[info.name]
            result = report.result(model.name, info.name)
            drop = (not keep) if task.ignore_identical_ids is None else task.ignore_identical_ids
            scores = mteb_scores(by_name[info.name].qrels, result.run, drop_identical_ids=drop)
            seconds = sum(v for k, v in result.timings.items() if k in ("encode_corpus", "encode_queries", "search"))
            payload = _task_result(task, info, scores, seconds)
            path = model_dir / f"{task.name}.json"
            _write_task_result(path, payload)
            written.append(MtebFile(path, model.name, task.name, scores[MAIN_SCORE], _notes(task, info, drop, keep)))
    return written


def _notes(task: MtebTask, info: Any, drop: bool, keep: bool) -> tuple[str, ...]:
    notes = []
    if task.known:
        rule = "dropped" if drop else "kept"
        notes.append(f"identical query/document ids {rule} (MTEB's rule for {task.name})")
        if task.split and info.split != task.split:
            notes.append(f"split {info.split} is not MTEB's evaluation split {task.split}")
    else:
        notes.append(f"{info.name} is no MTEB task: custom name {task.name}")
        notes.append(f"identical query/document ids {'kept' if keep else 'dropped'} (reforge eval's setting)")
    notes.append("dataset_revision = content hash of the folder evaluated, not an HF revision")
    return tuple(notes)


def _task_result(task: MtebTask, info: Any, scores: dict[str, float], seconds: float) -> dict[str, Any]:
    entry = {
        **scores,
        "main_score": scores[MAIN_SCORE],
        "hf_subset": "default",
        "languages": list(task.languages),
    }
    return {
        "dataset_revision": f"reforge-sha256:{info.content_hash[:16]}",
        "task_name": task.name,
        "mteb_version": _mteb_version(),
        "scores": {info.split: [entry]},
        "evaluation_time": round(seconds, 3),
        "kg_co2_emissions": None,
        "date": datetime.datetime.now(datetime.timezone.utc),
    }


def _write_task_result(path: Path, payload: dict[str, Any]) -> None:
    """With mteb installed: validated and serialized by ``mteb.TaskResult`` (its ``to_disk`` format, written
    atomically); without: the same fields as JSON."""
    try:
        from mteb import TaskResult
    except ImportError:
        data = {**payload, "date": payload["date"].timestamp()}
        data["scores"] = {split: [_rounded(e) for e in entries] for split, entries in data["scores"].items()}
        _write_json(path, data)
        return
    partial = path.with_name(f".{path.name}.partial")
    TaskResult.model_validate(payload).to_disk(partial)
    partial.replace(path)


def _model_meta(name: str, revision: str, model: ModelInfo) -> dict[str, Any]:
    profile = model.profile or {}
    bm25 = profile.get("kind") == "bm25"
    fields: dict[str, Any] = {
        "name": name,
        "revision": revision,
        "max_tokens": None if bm25 else profile.get("max_length"),
        "similarity_fn_name": None if bm25 else ("cosine" if profile.get("normalize") else "dot"),
        "framework": [] if bm25 else ["PyTorch"],
        "model_type": ["sparse"] if bm25 else ["dense"],
        "modalities": ["text"],
        "use_instructions": None if bm25 else bool(profile.get("query_prefix") or profile.get("task")),
        "reference": f"https://huggingface.co/{name}" if model.ref == name and "/" in name else None,
        "adapted_from": model.base_ref,
    }
    try:
        from mteb.models.model_meta import ModelMeta
    except ImportError:
        return {key: fields.get(key) for key in _META_FIELDS} | {
            "reference": fields["reference"],
            "adapted_from": fields["adapted_from"],
        }
    meta = ModelMeta.model_validate({**ModelMeta.create_empty().model_dump(), **fields})
    return json.loads(json.dumps(meta.to_dict(), default=str))


def _model_name(model: ModelInfo) -> tuple[str, str]:
    ref = model.ref or ""
    hub = bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref)) and not Path(ref).exists()
    name = ref if hub else f"local/{_slug(model.name)}"
    revision = (model.fingerprint or "")[:16] or "no_revision_available"
    return name, revision


def _shared_ids(dataset: BeirDataset) -> list[str]:
    queries = set(dataset.queries)
    return sorted(d.id for d in dataset.corpus if d.id in queries)


def _without_self(query_id: str, hits: Mapping[str, float], drop: bool) -> dict[str, float]:
    return {d: s for d, s in hits.items() if not (drop and d == query_id)}


def _reciprocal_rank(relevant: Mapping[str, int], hits: Mapping[str, float], k: int) -> float:
    ranked = sorted(hits.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]
    for rank, (doc_id, _) in enumerate(ranked, start=1):
        if relevant.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def _installed_task(name: str) -> Any:
    try:
        import mteb
    except ImportError:
        return None
    return mteb.get_task(name)


def _mteb_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mteb")
    except PackageNotFoundError:
        return None


def _rounded(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in entry.items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _write_json(path: Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, default=str) + "\n"
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))
