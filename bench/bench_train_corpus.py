"""`reforge train --dry-run` on a large synthetic corpus: peak RSS and wall time of a cold run and a second one.

    python bench/bench_train_corpus.py                              # 1M documents, SmolLM2-135M's tokenizer
    python bench/bench_train_corpus.py --documents 200000 --base ~/.cache/reforge-models/SmolLM2-135M-Instruct

Writes a BEIR-style ``corpus.jsonl`` of short documents (``--words`` random words from a fixed 2,000-word list,
seeded; ~30 tokens each with SmolLM2's tokenizer), then runs ``reforge train BASE --corpus corpus.jsonl --dry-run
--json`` twice under ``/usr/bin/time -v`` with a fresh ``REFORGE_HOME``: the first run scans the corpus (byte
offsets, filters, hash) and counts every document's tokens, the second finds both in the cache. Printed as JSON;
docs/train.md records it. ``--code /work/main`` runs another checkout (before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def write_corpus(path: Path, documents: int, words: int) -> None:
    """``documents`` rows ``{"_id", "title", "text"}``; text is ``words`` words drawn from a fixed vocabulary."""
    rng = np.random.default_rng(SEED)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(2000)]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for start in range(0, documents, 10_000):
            picks = rng.integers(0, len(vocabulary), size=(min(10_000, documents - start), words))
            for offset, row in enumerate(picks):
                text = " ".join(vocabulary[i] for i in row)
                handle.write(json.dumps({"_id": f"d{start + offset}", "title": "", "text": text}) + "\n")
    tmp.rename(path)


def timed_dry_run(base: str, corpus: Path, home: Path, out: Path, code: Path) -> dict:
    """One ``reforge train --dry-run --json`` (of the checkout ``code``) under ``/usr/bin/time -v``: its peak RSS,
    wall time and plan."""
    env = {**os.environ, "REFORGE_HOME": str(home), "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "reforge", "train", base, "--corpus", str(corpus)]
    command += ["-o", str(out), "--dry-run", "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=code)  # -m: cwd first
    wall = time.perf_counter() - start
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    plan = json.loads(done.stdout)
    inside = round(plan["wall_time_s"], 1)  # from reading the corpus to the plan, without Python's start-up
    return {"peak_rss_gib": round(rss_kib / 2**20, 3), "wall_s": round(wall, 1), "in_train_s": inside, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=8)
    parser.add_argument("--base", default=str(Path.home() / ".cache" / "reforge-models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--folder", type=Path, default=Path("/tmp/reforge-bench-train-corpus"))
    parser.add_argument("--code", type=Path, default=ROOT, help="The reforge checkout to run (for before/after).")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    corpus = args.folder / f"corpus-{args.documents}-{args.words}.jsonl"
    if not corpus.is_file():
        write_corpus(corpus, args.documents, args.words)
    with tempfile.TemporaryDirectory(dir=args.folder) as home:
        runs = [timed_dry_run(args.base, corpus, Path(home), args.folder / "out", args.code) for _ in range(2)]
    plans = [(r["plan"]["steps"], r["plan"]["tokens"], r["plan"]["record"]["corpus"]["sha256"]) for r in runs]
    report = {
        "documents": args.documents,
        "words_per_document": args.words,
        "corpus_bytes": corpus.stat().st_size,
        "tokens": runs[0]["plan"]["record"]["corpus"]["tokens"],
        "code": str(args.code),
        "cores": os.cpu_count(),
        "first": {k: v for k, v in runs[0].items() if k != "plan"},
        "second": {k: v for k, v in runs[1].items() if k != "plan"},
        "same_plan": plans[0] == plans[1],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
