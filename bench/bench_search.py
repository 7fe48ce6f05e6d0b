"""Streamed shard search against one in-RAM faiss IndexFlatIP, on synthetic corpora stored as float16 shards.

    python bench/bench_search.py                                  # 250k, 1M, 4M documents at d 768
    python bench/bench_search.py --sizes 100000 400000 --folder /tmp/bench-search

The vectors are random (uniform, variance 1/d), written once as float16 cache shards of 65,536 rows
(`reforge.eval.cache.Entry.write_shard`); smaller corpora hard-link the larger one's full shards. Each measurement
is a fresh process (`nice -n 10`) that reports its own peak RSS (``ru_maxrss``): the streamed search
(`reforge.eval.search.search_shards`, as `reforge eval` runs it) at every size, and at ``--flat-at`` documents the
reference: every shard widened to float32 in RAM, one `IndexFlatIP`, one search; then one more process alternates
the two searches 3 times (pairs under the same machine state: the fairer ratio on a shared machine). Printed as
JSON; docs/eval.md records the numbers. Shards are read through the page cache, so GB/s is memory bandwidth +
compute, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reforge.eval.cache import DEFAULT_SHARD_DOCS, EmbeddingCache  # noqa: E402

SEED = 0
PAIRS = 3


def _shard_vectors(index: int, rows: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, index])
    return (rng.random((rows, dim), dtype=np.float32) - 0.5) * np.float32(np.sqrt(12 / dim))  # unit variance / sqrt(d)


def write_corpora(folder: Path, sizes: list[int], dim: int) -> dict[int, Path]:
    """One float16 entry per size; full shards of the largest are shared by hard links."""
    cache = EmbeddingCache(folder)
    largest = max(sizes)
    entries = {}
    for size in sorted(sizes, reverse=True):
        entry = cache.entry(f"docs-{size}", size, shard_docs=DEFAULT_SHARD_DOCS, dtype="float16")
        big = cache.entry(f"docs-{largest}", largest, shard_docs=DEFAULT_SHARD_DOCS, dtype="float16")
        for index in entry.missing():
            first, rows = entry.bounds(index)
            source = big.shard_path(index)
            if size != largest and big.bounds(index)[1] == rows and source.is_file():
                entry.folder.mkdir(parents=True, exist_ok=True)
                for name in (f"{index:05d}.npy", f"{index:05d}.ids.json"):
                    os.link(big.folder / name, entry.folder / name)
                continue
            entry.write_shard(
                index, _shard_vectors(index, DEFAULT_SHARD_DOCS, dim)[:rows], [str(first + i) for i in range(rows)]
            )
        entries[size] = entry.folder
    return entries


def child(mode: str, folder: Path, rows: int, queries_path: Path, k: int, out: Path) -> dict:
    """Run one measurement in this process; returns timings and peak RSS."""
    import torch  # noqa: F401  (loaded before the clock starts, as in `reforge eval`: it widens float16 shards)

    from reforge.eval.cache import Entry
    from reforge.eval.search import search_shards

    queries = np.load(queries_path)
    entry = Entry(folder, rows, DEFAULT_SHARD_DOCS, "float16")
    shards = entry.shards()
    scanned = sum(s.path.stat().st_size for s in shards)
    start = time.perf_counter()
    if mode == "streamed":
        table = search_shards(queries, shards, k)
        scores, found = table.scores, table.rows
        seconds = {"search": time.perf_counter() - start}
    else:
        import faiss

        vectors = np.concatenate([np.asarray(s.array(), dtype=np.float32) for s in shards])
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        loaded = time.perf_counter()
        seconds = {"load_and_add": loaded - start}
        if mode == "paired":
            return _paired(queries, shards, vectors, index, k)
        scores, found = index.search(queries, k)
        seconds["search"] = time.perf_counter() - loaded
    np.save(out, found)
    np.save(out.with_name(out.stem + "-scores.npy"), scores)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "mode": mode,
        "documents": rows,
        "peak_rss_gib": round(peak, 3),
        "shard_bytes": scanned,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "gb_per_s": round(scanned / 1e9 / seconds["search"], 3) if mode == "streamed" else None,
    }


def _paired(queries: np.ndarray, shards: list, vectors: np.ndarray, index, k: int) -> dict:
    """Flat and streamed searches alternated in one process, so each pair shares the machine's state."""
    from reforge.eval.search import search_shards

    pairs = []
    for _ in range(PAIRS):
        start = time.perf_counter()
        scores, rows = index.search(queries, k)
        flat = time.perf_counter() - start
        start = time.perf_counter()
        table = search_shards(queries, shards, k)
        streamed = time.perf_counter() - start
        same = bool((table.scores == scores).all())
        pairs.append({"flat": round(flat, 2), "streamed": round(streamed, 2), "ratio": round(streamed / flat, 3)})
        pairs[-1]["same_scores"] = same
    ratios = sorted(p["ratio"] for p in pairs)
    return {"mode": "paired", "documents": len(vectors), "pairs": pairs, "median_ratio": ratios[len(ratios) // 2]}


def _run_child(args: argparse.Namespace, mode: str, folder: Path, rows: int, out: Path) -> dict:
    command = [
        "nice",
        "-n",
        "10",
        sys.executable,
        __file__,
        "--child",
        mode,
        "--entry",
        str(folder),
        "--rows",
        str(rows),
        "--queries-file",
        str(args.folder / "queries.npy"),
        "--top-k",
        str(args.top_k),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)  # partial results, for long runs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--flat-at", type=int, default=1_000_000, help="Size compared with one IndexFlatIP.")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/reforge-bench-search"))
    parser.add_argument("--child", choices=["streamed", "flat", "paired"], help=argparse.SUPPRESS)
    parser.add_argument("--entry", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.entry, args.rows, args.queries_file, args.top_k, args.out)))
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    entries = write_corpora(args.folder, args.sizes, args.dim)
    written = time.perf_counter() - start
    print(f"  shards written in {written:.0f} s", file=sys.stderr, flush=True)
    rng = np.random.default_rng([SEED, 10**6])
    np.save(args.folder / "queries.npy", rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    results = [_run_child(args, "streamed", entries[n], n, args.folder / f"streamed-{n}.npy") for n in args.sizes]
    report: dict = {
        "dim": args.dim,
        "queries": args.queries,
        "top_k": args.top_k,
        "cores": os.cpu_count(),
        "write_seconds": round(written, 1),
        "streamed": results,
    }
    if args.flat_at in entries:
        flat = _run_child(args, "flat", entries[args.flat_at], args.flat_at, args.folder / f"flat-{args.flat_at}.npy")
        mine = next(r for r in results if r["documents"] == args.flat_at)
        rows_a = np.load(args.folder / f"streamed-{args.flat_at}.npy")
        rows_b = np.load(args.folder / f"flat-{args.flat_at}.npy")
        scores_a = np.load(args.folder / f"streamed-{args.flat_at}-scores.npy")
        scores_b = np.load(args.folder / f"flat-{args.flat_at}-scores.npy")
        report["flat"] = flat
        report["same_topk_rows"] = float((rows_a == rows_b).mean())
        report["same_topk_sets"] = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(rows_a, rows_b)]))
        report["max_score_difference"] = float(np.abs(scores_a - scores_b).max())
        report["streamed_over_flat_search_time"] = round(mine["seconds"]["search"] / flat["seconds"]["search"], 3)
        report["paired"] = _run_child(args, "paired", entries[args.flat_at], args.flat_at, args.folder / "paired.npy")
    sizes = sorted(results, key=lambda r: r["documents"])
    report["rss_largest_over_smallest"] = round(sizes[-1]["peak_rss_gib"] / sizes[0]["peak_rss_gib"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
