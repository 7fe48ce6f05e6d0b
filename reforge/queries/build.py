"""`make_queries`: the whole of ``reforge queries``: sample, generate, filter, write the BEIR folder and its record.

The folder::

    OUT/corpus.jsonl          a symbolic link to DATA's corpus (absolute path), or a copy with ``copy_corpus``
    OUT/queries.jsonl         the kept queries: {"_id": "syn-0", "text": ..., "source": doc id}
    OUT/qrels/synthetic.tsv   each query -> the document it was written for (grade 1)
    OUT/reforge-queries.json  the record: generator, prompt, examples, seed, filters, counts kept and dropped
    OUT/dropped.jsonl         each dropped query with its document and the reason

It is built beside OUT under a temporary name and renamed into place when whole. Nothing here reads a qrels file
of DATA (a synthetic collection is for a user with no labels, and must not see the test split's).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reforge import __version__
from reforge.data.lazy import Document, LazyCorpus, corpus_index
from reforge.errors import DataError, InvalidOptionError, OutputExistsError, short_path
from reforge.io.atomic import write_atomic
from reforge.io.progress import ProgressFn
from reforge.queries.crop import crop_query
from reforge.queries.filters import Candidate, FilterSettings, apply_filters, count_reasons
from reforge.queries.generate import GenerationSettings, settings_dict
from reforge.queries.prompt import Prompt
from reforge.queries.sample import sample_documents

RECORD = "reforge-queries.json"
SPLIT = "synthetic"
CROP = "crop"


@dataclass(frozen=True)
class QueriesReport:
    """What `make_queries` wrote: the folder, the record (``record``, as saved) and the kept queries."""

    output: Path
    record: dict[str, Any]
    queries: dict[str, str] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary: the record and where it is."""
        return {"output": str(self.output), **self.record}


def corpus_file(data: str | Path) -> Path:
    """DATA's corpus: ``DATA/corpus.jsonl`` for a BEIR folder, DATA itself for a JSONL file.

    Raises:
        DataError: neither exists.
    """
    path = Path(data)
    candidate = path / "corpus.jsonl" if path.is_dir() else path
    if not candidate.is_file():
        raise DataError(
            f"{short_path(candidate)} does not exist.",
            hint="Pass a BEIR folder (with corpus.jsonl) or a corpus .jsonl file (_id, title, text).",
            path=candidate,
            line=None,
        )
    return candidate


def make_queries(
    data: str | Path,
    output: str | Path,
    *,
    generator: str = CROP,
    n: int = 100,
    seed: int = 0,
    min_words: int = 20,
    filters: FilterSettings | None = None,
    prompt: Prompt | None = None,
    generation: GenerationSettings | None = None,
    bm25_top: int | None = None,
    copy_corpus: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    progress: ProgressFn | None = None,
    stage=None,
) -> QueriesReport:
    """Write a synthetic BEIR folder for the corpus of ``data`` (see the module docstring for its files).

    Args:
        generator: ``"crop"`` (a span of the document) or a causal LM (local folder or Hub id).
        n: documents to draw (one query each, before filtering).
        min_words: documents with fewer words (title and text) are skipped when drawing.
        bm25_top: keep a query only if BM25 over the corpus ranks its document in the top ``bm25_top``.

    Raises:
        DataError: DATA has no corpus, or no document is long enough.
        InvalidOptionError: ``n`` or a limit is below 1.
        OutputExistsError: ``output`` exists and is not an earlier output (or is one, without ``overwrite``).
    """
    started = time.perf_counter()
    filters, prompt, generation = filters or FilterSettings(), prompt or Prompt(), generation or GenerationSettings()
    _check_options(n, min_words, filters, bm25_top)
    output = Path(os.path.abspath(output))
    _check_output(output, overwrite)
    source = corpus_file(data).resolve()
    index = corpus_index(source)
    corpus = LazyCorpus(index)
    sample = sample_documents(corpus, n, seed=seed, min_words=min_words)
    if not sample.documents:
        raise DataError(
            f"No document of {short_path(source)} has {min_words} words or more.",
            hint="Lower --min-words.",
            path=source,
            line=None,
        )
    if stage:
        stage(f"Writing queries for {len(sample.documents)} documents ({generator})")
    texts, generated, described = _generate(generator, sample.documents, seed, filters, prompt, generation, progress)
    documents = {d.id: d for d in sample.documents}
    candidates = [Candidate(d.id, texts[d.id]) for d in sample.documents]
    kept, dropped = apply_filters(candidates, documents, filters, copy_check=generator != CROP)
    bm25 = None
    if bm25_top is not None:
        from reforge.queries.bm25 import bm25_filter

        if stage:
            stage(f"BM25 filter: indexing {len(corpus):,} documents")
        kept, more, bm25 = bm25_filter(kept, corpus, bm25_top)
        dropped += more
    if not kept:
        raise DataError(
            f"Every one of the {len(candidates)} queries was dropped by the filters "
            f"({', '.join(f'{k} {v}' for k, v in count_reasons(dropped).items() if v)}).",
            hint="See the reasons above; loosen --max-words / --max-copy / --bm25-top, or try another generator.",
            path=source,
            line=None,
        )
    record = {
        "reforge_version": __version__,
        "command": command,
        "split": SPLIT,
        "corpus": {
            "source": str(source),
            "mode": "copy" if copy_corpus else "link",
            "sha256": index.sha256,
            "documents": len(corpus),
        },
        "generator": described,
        "seed": seed,
        "sample": {
            "requested": n,
            "min_words": min_words,
            "drawn": len(sample.documents),
            "too_short_skipped": sample.too_short,
            "strata_without_a_long_document": sample.empty_strata,
        },
        "filters": {**filters.to_dict(), "copy_check": generator != CROP, "bm25_top": bm25_top, "bm25": bm25},
        "counts": {
            "generated_now": generated,
            "from_cache": len(candidates) - generated,
            "kept": len(kept),
            "dropped": len(dropped),
            "dropped_by_reason": count_reasons(dropped),
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    queries = {f"syn-{i}": c.text for i, c in enumerate(kept)}
    _write_folder(output, source, copy_corpus, kept, dropped, record)
    return QueriesReport(output, record, queries)


def _check_options(n: int, min_words: int, filters: FilterSettings, bm25_top: int | None) -> None:
    for option, value in (
        ("-n", n),
        ("--min-words", min_words),
        ("--max-words", filters.max_words),
        ("--bm25-top", 1 if bm25_top is None else bm25_top),
    ):
        if value < 1:
            raise InvalidOptionError(f"{option} must be at least 1, got {value}.", option=option)
    if filters.max_copy < 0:
        raise InvalidOptionError(f"--max-copy must be 0 (off) or more, got {filters.max_copy}.", option="--max-copy")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"-o {short_path(output)} is a file, not a folder.", path=output)
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not (output / RECORD).is_file():
        raise OutputExistsError(
            f"-o {short_path(output)} holds files reforge queries did not write; they are never replaced.",
            hint="Choose an empty or new -o folder.",
            path=output,
        )
    if not overwrite:
        raise OutputExistsError(
            f"-o {short_path(output)} already holds synthetic queries.",
            hint="Pass --overwrite to replace them (generated queries are cached: a rerun is quick).",
            path=output,
        )


def _generate(
    generator: str,
    docs: tuple[Document, ...],
    seed: int,
    filters: FilterSettings,
    prompt: Prompt,
    generation: GenerationSettings,
    progress: ProgressFn | None,
) -> tuple[dict[str, str], int, dict[str, Any]]:
    """``({doc_id: query}, generated now, the generator as recorded)``."""
    if generator == CROP:
        texts = {d.id: crop_query(d, seed=seed, max_words=filters.max_words) for d in docs}
        return texts, len(docs), {"name": CROP, "kind": "crop", "ratio": [0.1, 0.5], "max_words": filters.max_words}
    from reforge.io.checkpoint import content_key, resolve_local
    from reforge.io.paths import cache_dir
    from reforge.queries.generate import Generator, QueryLog, generate, log_key

    path = resolve_local(generator)
    model = Generator(path, generation)
    template = model.render(prompt, Document("{id}", "{title}", "{text}"))
    generator_key = content_key(path)  # every weight byte: a sampled fingerprint misses edits between its samples
    key = log_key(generator_key, prompt, generation, seed, template)
    log = QueryLog(cache_dir("queries") / f"{key}.jsonl")
    texts, fresh = generate(model, prompt, docs, seed=seed, log=log, progress=progress)
    described = {
        "name": generator,
        "kind": "lm",
        "content_key": generator_key,
        "chat_template": model.chat,
        "device": model.device,
        "prompt": prompt.to_dict(),
        "settings": settings_dict(generation),
        "log": str(log.path),
    }
    return texts, fresh, described


def _write_folder(
    output: Path,
    source: Path,
    copy_corpus: bool,
    kept: list[Candidate],
    dropped: list[tuple[Candidate, str]],
    record: dict,
) -> None:
    from reforge.io.target import commit_staging, staging_path

    staging = staging_path(output)
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "qrels").mkdir(parents=True)
    if copy_corpus:
        shutil.copyfile(source, staging / "corpus.jsonl")
    else:
        (staging / "corpus.jsonl").symlink_to(source)
    queries = [{"_id": f"syn-{i}", "text": c.text, "source": c.doc_id} for i, c in enumerate(kept)]
    _jsonl(staging / "queries.jsonl", queries)
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"syn-{i}\t{c.doc_id}\t1\n" for i, c in enumerate(kept))
    write_atomic(staging / "qrels" / f"{SPLIT}.tsv", lambda f: f.write(qrels.encode()))
    _jsonl(staging / "dropped.jsonl", [{"source": c.doc_id, "text": c.text, "reason": r} for c, r in dropped])
    write_atomic(staging / RECORD, lambda f: f.write(json.dumps(record, indent=2, ensure_ascii=False).encode()))
    commit_staging(staging, output)  # what is there was checked before the work: empty, or --overwrite


def _jsonl(path: Path, rows: list[dict]) -> None:
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
    write_atomic(path, lambda f: f.write(data))
