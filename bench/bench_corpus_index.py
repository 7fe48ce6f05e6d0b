"""Building the lazy corpus indexes on a large synthetic corpus: eval's byte-offset index and train's pass.

    python bench/bench_corpus_index.py                         # 1M short documents, 3 runs each
    python bench/bench_corpus_index.py --code /tmp/before --code .   # two checkouts, runs alternating

Writes the same BEIR-style ``corpus.jsonl`` as ``bench/bench_train_corpus.py`` (``--words`` random words a document,
seeded), then, each in a fresh process with an empty ``REFORGE_HOME``, times ``reforge.data.lazy.corpus_index``
(eval: one pass, nothing cached) and ``reforge.data.corpus.load_corpus`` (train: one pass, nothing cached), and
reports the wall and CPU time of the call (CPU time is what a loaded machine disturbs least), the process's peak RSS
and what was built (corpus hash, document count), so two checkouts are compared on the same output. With several
``--code``, their runs alternate (A B A B ...), so a change in machine load falls on both. Printed as JSON per
checkout: median, min, max and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_corpus import write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
from pathlib import Path
path, which = Path(sys.argv[1]), sys.argv[2]
start, cpu = time.perf_counter(), time.process_time()
if which == "eval":
    from reforge.data.lazy import corpus_index
    index = corpus_index(path)
    facts = {"documents": len(index.offsets), "hash": index.corpus_hash, "sha256": index.sha256}
else:
    from reforge.data.corpus import load_corpus
    corpus = load_corpus(path)
    facts = {"documents": len(corpus.docs), "hash": corpus.sha256}
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_gib": round(rss, 3), **facts}))
"""


def one_run(code: Path, corpus: Path, which: str) -> dict:
    """One fresh process building the ``which`` index (``eval`` or ``train``) with the checkout ``code``."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "REFORGE_HOME": home, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(corpus), which], env=env, capture_output=True, text=True, check=True
        )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/reforge-bench-train-corpus"))
    parser.add_argument(
        "--code", type=Path, action="append", help="A reforge checkout to run; repeat to compare (default: this one)."
    )
    args = parser.parse_args()
    codes = args.code or [ROOT]
    args.folder.mkdir(parents=True, exist_ok=True)
    corpus = args.folder / f"corpus-{args.documents}-{args.words}.jsonl"
    if not corpus.is_file():
        write_corpus(corpus, args.documents, args.words)
    report: dict = {"documents": args.documents, "corpus_bytes": corpus.stat().st_size, "checkouts": {}}
    for which in ("eval", "train"):
        runs: dict[str, list[dict]] = {str(code): [] for code in codes}
        for _ in range(args.runs):
            for code in codes:
                runs[str(code)].append(one_run(code, corpus, which))
        for code, done in runs.items():
            report["checkouts"].setdefault(code, {})[which] = _summary(done)
    print(json.dumps(report, indent=1))


def _summary(runs: list[dict]) -> dict:
    outputs = [{k: v for k, v in r.items() if k not in ("wall_s", "cpu_s", "peak_rss_gib")} for r in runs]
    spread = {}
    for name in ("wall_s", "cpu_s"):
        values = [r[name] for r in runs]
        spread[name] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
    return {
        **spread,
        "peak_rss_gib": [r["peak_rss_gib"] for r in runs],
        "output": outputs[0],
        "same_output_every_run": all(o == outputs[0] for o in outputs),
    }


if __name__ == "__main__":
    main()
