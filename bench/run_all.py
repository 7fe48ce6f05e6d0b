"""Run every benchmark in turn (`make bench`). Each script prints its own table and ratios.

    .venv/bin/python bench/run_all.py [--quick]

--quick runs each benchmark once on its smallest setting (for a smoke test); the numbers in docs/benchmarks.md
come from the full runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "bench_diff.py": (["--layers", "2", "8", "--repeats", "3"], ["--layers", "2", "--repeats", "1"]),
    "bench_merge.py": (["--layers", "2", "8", "--repeats", "3"], ["--layers", "2", "--repeats", "1"]),
    "bench_train.py": ([], []),
    "bench_attention.py": (
        [],
        ["--repeats", "1", "--steps", "1", "--docs", "40", "--shape", "smoke", "--max-length", "128"],
    ),
    "bench_eval.py": ([], []),
    "bench_dora_steps.py": (["--repeats", "9"], ["--repeats", "1", "--loops", "2"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("only", nargs="*", help="run only these scripts (e.g. bench_diff.py)")
    args = parser.parse_args()
    failed = []
    for script, (full, quick) in BENCHMARKS.items():
        if args.only and script not in args.only:
            continue
        if not (HERE / script).is_file():
            print(f"== {script}: not present, skipped", flush=True)
            continue
        print(f"== {script}", flush=True)
        result = subprocess.run([sys.executable, str(HERE / script), *(quick if args.quick else full)], cwd=HERE)
        if result.returncode != 0:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
