"""What LoRE-Adapt's SVD (`reforge diff --rank` / `--energy`) costs per matrix of a Llama-2-7B layer on a CPU:
`torch.linalg.svd(full_matrices=False)` in fp32, as reforge.ops.diff calls it, on one thread, for the two shapes of
such a layer (q, k, v, o: 4096 x 4096; gate, up, down: 11008 x 4096), the shapes alternating.

    python bench/bench_svd.py                  # 2 repeats of each shape
    python bench/bench_svd.py --repeats 3 --threads 2

Reported per run: wall and process CPU seconds (CPU is the figure to read on a shared machine).
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(args.repeats):
        for shape in [(4096, 4096), (11008, 4096)]:
            x = torch.randn(*shape, generator=g) * 0.01
            wall, cpu = time.perf_counter(), time.process_time()
            torch.linalg.svd(x, full_matrices=False)
            run = {"shape": shape, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
            print(f"{shape}: wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s", flush=True)
            runs.append(run)
    return runs


if __name__ == "__main__":
    main()
