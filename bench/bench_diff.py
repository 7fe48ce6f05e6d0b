"""Benchmark `reforge diff` on synthetic Llama-2-7B-width bf16 checkpoints (issues 4 and 16).

For 2 and 8 layers: wall time as a ratio to a cold `cat` of the same input files (page cache evicted before
each run), CPU time (user + sys), max RSS as /usr/bin/time reports it, and peak anonymous memory. Every run is
printed; the table gives medians. Targets (issue 16): <= 1.25x cold cat at 8 layers, max RSS <= 2 GiB and flat.

    .venv/bin/python bench/bench_diff.py [--layers 2 8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from common import (
    BENCH_DIR,
    REFORGE,
    cold_cat_seconds,
    cpu_seconds,
    evict,
    make_checkpoint,
    measure,
    median,
    weight_files,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="passed to reforge diff --device (default: its own, auto)")
    args = parser.parse_args()
    import reforge

    print(f"{time.strftime('%Y-%m-%d %H:%M')} reforge from {reforge.__file__}", flush=True)
    results = []
    for layers in args.layers:
        base = make_checkpoint(BENCH_DIR / f"base-{layers}", layers, causal=True, seed=0)
        retriever = make_checkpoint(BENCH_DIR / f"retriever-{layers}", layers, causal=False, seed=1, like=base)
        inputs = weight_files(base) + weight_files(retriever)
        out = BENCH_DIR / f"delta-{layers}"
        device = ["--device", args.device] if args.device else []
        cats, runs = [], []
        for repeat in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            cats.append(cold_cat_seconds(inputs))
            evict(inputs)
            run = measure([*REFORGE, "diff", str(base), str(retriever), "-o", str(out), "-q", *device])
            if run.returncode != 0:
                raise SystemExit(run.stderr)
            runs.append(run)
            print(
                f"  {layers} layers, run {repeat + 1}: cold cat {cats[-1]:.2f} s; diff {run.seconds:.2f} s "
                f"(CPU {cpu_seconds(run):.2f} s), max RSS {run.max_rss_gib:.2f} GiB",
                flush=True,
            )
        gigabytes = sum(f.stat().st_size for f in inputs) / 1e9
        row = {
            "layers": layers,
            "input_gb": round(gigabytes, 2),
            "cold_cat_s": median(cats),
            "cold_cat_runs_s": cats,
            "diff_s": median([r.seconds for r in runs]),
            "diff_runs_s": [r.seconds for r in runs],
            "diff_cpu_s": median([cpu_seconds(r) for r in runs]),
            "diff_cpu_runs_s": [cpu_seconds(r) for r in runs],
            "max_rss_gib": max(r.max_rss_gib for r in runs),
            "peak_anon_gib": max(r.peak_anon_gib for r in runs),
        }
        row["ratio_to_cat"] = row["diff_s"] / row["cold_cat_s"]
        results.append(row)
        shutil.rmtree(out, ignore_errors=True)
        print(
            f"{layers} layers, {gigabytes:.2f} GB in: cold cat {row['cold_cat_s']:.2f} s, diff {row['diff_s']:.2f} s "
            f"({row['ratio_to_cat']:.2f}x cat), CPU {row['diff_cpu_s']:.2f} s, max RSS {row['max_rss_gib']:.2f} GiB, "
            f"peak anon {row['peak_anon_gib']:.2f} GiB (median of {args.repeats})",
            flush=True,
        )
    print(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
