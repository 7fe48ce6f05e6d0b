"""CPU cost per element of each step of merge's DoRA block (docs/benchmarks.md, "What changed"), in cache, on one
thread: the block size merge uses (256K fp32 elements, 1 MiB, `reforge.ops.stream`) against 1M, plus the NaN/Inf
scans and a mixed-dtype add. Thread CPU time, so other jobs on the cores disturb it least.

    python bench/bench_dora_steps.py                 # 7B width (4096 columns), r 32, 5 interleaved repeats
    python bench/bench_dora_steps.py --repeats 9 --json steps.json

Each step runs ``--loops`` times on the same block (so the block stays in cache) per repeat; the two block sizes
alternate within a repeat. Reported: median (min-max) nanoseconds per element over the repeats. The steps are the
operations of `reforge.io.adapter.Factors.add_to` and `reforge.ops.stream`'s rounding measurement, in their order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = 4096
RANK = 32


def _steps(rows: int):
    """``{name: zero-argument function}`` for one block of ``rows`` x COLUMNS, all buffers made once."""
    import torch

    from reforge.io.adapter import torch_addmm, torch_norm_rows

    g = torch.Generator().manual_seed(0)
    r_bf = (torch.randn(rows, COLUMNS, generator=g) * 0.02).bfloat16()
    w_bf = (torch.randn(rows, COLUMNS, generator=g) * 0.02).bfloat16()
    b = torch.randn(rows, RANK, generator=g) * 0.02
    a = torch.randn(RANK, COLUMNS, generator=g) * 0.02
    m = torch.rand(rows, generator=g) + 0.5
    r32, w32, upd, out, back = (torch.empty(rows, COLUMNS) for _ in range(5))
    out_bf = torch.empty(rows, COLUMNS, dtype=torch.bfloat16)
    r32.copy_(r_bf)
    w32.copy_(w_bf)
    torch_addmm(w32, b, a, 2.0, out=upd)
    factor = m / torch_norm_rows(upd)

    def sequence() -> None:
        r32.copy_(r_bf)
        w32.copy_(w_bf)
        torch_addmm(w32, b, a, 2.0, out=upd)
        upd.mul_((m / torch_norm_rows(upd))[:, None]).sub_(w32)
        r32.add_(upd, alpha=0.5)
        out_bf.copy_(r32)
        back.copy_(out_bf)
        back.sub_(r32)
        torch.aminmax(back)

    return {
        "read R into fp32": lambda: r32.copy_(r_bf),
        "read W into fp32": lambda: w32.copy_(w_bf),
        "B @ A (addmm, with W)": lambda: torch_addmm(w32, b, a, 2.0, out=upd),
        "row norm": lambda: torch_norm_rows(upd),
        "scale": lambda: torch.mul(upd, factor[:, None], out=out),
        "- W": lambda: torch.sub(upd, w32, out=out),
        "R + alpha Psi": lambda: torch.add(r32, out, alpha=0.5, out=back),
        "rounding to bf16": lambda: out_bf.copy_(r32),
        "error: copy back": lambda: back.copy_(out_bf),
        "error: subtract": lambda: back.sub_(r32),
        "error: aminmax fp32": lambda: torch.aminmax(back),
        "whole DoRA sequence": sequence,
        "bf16 aminmax (copied tensors' NaN/Inf scan)": lambda: torch.aminmax(r_bf),
        "bf16 isfinite().all()": lambda: bool(torch.isfinite(r_bf).all()),
        "fp32 add (fp32 += fp32)": lambda: r32.add_(w32),
        "mixed add (fp32 += bf16)": lambda: r32.add_(w_bf),
    }


def _ns_per_element(run, elements: int, loops: int) -> float:
    run()  # warm: the block in cache, the kernels chosen
    start = time.thread_time_ns()
    for _ in range(loops):
        run()
    return (time.thread_time_ns() - start) / loops / elements


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loops", type=int, default=20, help="runs of each step per repeat (timed together)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    sizes = {"256K": 64, "1M": 256}  # rows of 4096 columns
    steps = {label: _steps(rows) for label, rows in sizes.items()}
    times: dict[str, dict[str, list[float]]] = {label: {name: [] for name in steps[label]} for label in sizes}
    for _ in range(args.repeats):
        for name in steps["256K"]:
            for label, rows in sizes.items():
                times[label][name].append(_ns_per_element(steps[label][name], rows * COLUMNS, args.loops))
    result = {
        "torch": torch.__version__,
        "repeats": args.repeats,
        "loops": args.loops,
        "ns_per_element": {
            label: {
                name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                for name, v in by_step.items()
            }
            for label, by_step in times.items()
        },
    }
    print(f"{'step':46} {'256K elements (1 MiB)':>24} {'1M elements':>24}   ns per element, median (min-max)")
    for name in steps["256K"]:
        cells = [result["ns_per_element"][label][name] for label in sizes]
        print(f"{name:46} " + " ".join(f"{c['median']:>9.3f} ({c['min']:.3f}-{c['max']:.3f})" for c in cells))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
