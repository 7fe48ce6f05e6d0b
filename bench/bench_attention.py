"""Which tested attention path trains the paper's batching faster: ``split`` (the step's documents packed into
rows, each document attended alone by sdpa) or ``padded`` (one document per row, right-padded, the model's own sdpa
with a padding mask, as HF Trainer feeds it). Same model, documents, steps and adapter; `train_loop` as
`reforge train` runs it (bench/bench_gpu.py's `bench_reforge_train`).

    python bench/bench_attention.py                         # CPU, shape cpu-small (1B's ratios), 1 thread
    python bench/bench_attention.py --repeats 5 --json attention.json
    python bench/bench_attention.py --device cuda --shape 1b --attention split padded flex

Each path runs ``--repeats`` times, interleaved (split, padded, split, ...), each run ``--warmup`` untimed steps
then ``--steps`` timed ones; reported: median, min and max useful (non-pad) tokens per second of the timed loop,
and each path's median over the first path's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(bench_gpu.SHAPES), default="cpu-small")
    parser.add_argument("--attention", nargs="+", default=["split", "padded"], choices=["split", "padded", "flex"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(bench_gpu.ROOT))
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = bench_gpu.SHAPES[args.shape]
    every = bench_gpu.scifact_lengths(args.max_length)
    lengths = random.Random(0).sample(every, min(args.docs, len(every)))
    texts = bench_gpu.synthetic_texts(lengths, shape.vocab - 4)
    runs: dict[str, list[dict]] = {a: [] for a in args.attention}
    timing = argparse.Namespace(warmup=args.warmup, steps=args.steps, max_length=args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        base = bench_gpu.save_base(tmp / "base", shape, dtype)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
        for _ in range(args.repeats):
            for attention in args.attention:
                row = bench_gpu.bench_reforge_train(
                    base, corpus, shape, timing, device, None, batching="documents", attention=attention
                )
                runs[attention].append(row)
                print(f"{attention:7} {row['tokens_per_s']:9,.0f} tokens/s  padding {row['padding_share']:.1%}")
    first = statistics.median(r["tokens_per_s"] for r in runs[args.attention[0]])
    summary = {}
    for attention, rows in runs.items():
        speeds = [r["tokens_per_s"] for r in rows]
        summary[attention] = {
            "median_tokens_per_s": statistics.median(speeds),
            "min": min(speeds),
            "max": max(speeds),
            "ratio_to_" + args.attention[0]: statistics.median(speeds) / first,
            "padding_share": rows[0]["padding_share"],
            "tokens_per_run": rows[0]["tokens"],
        }
        print(
            f"{attention:7} median {summary[attention]['median_tokens_per_s']:9,.0f} tokens/s (min {min(speeds):,.0f}"
            f", max {max(speeds):,.0f}, n {len(speeds)}) = {statistics.median(speeds) / first:.2f}x "
            f"{args.attention[0]}; padding {rows[0]['padding_share']:.1%}"
        )
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device), "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
