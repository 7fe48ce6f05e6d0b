"""Did a cleanup change what reforge writes, or how fast? The same pipeline under two commits, compared.

    python bench/bench_same.py --baseline e492a21 [--rounds 3] [--work .cache/bench/same]
    python bench/bench_same.py --baseline e492a21 --rounds 7 --only diff,merge,merge-delta,verify

Checks out ``--baseline`` into a temporary git worktree and runs one small RE-AdaptIR pipeline on the example
(SmolLM2-135M-Instruct and examples/assets/repllama-smol over a 60-document SciFact subset): diff --low-rank,
train, merge by retriever and by delta, verify, inspect, queries --generator crop, eval and tune; each command with
that tree's code (PYTHONPATH) in this environment. Both trees run in one folder path (so recorded paths compare)
with an empty REFORGE_HOME (cold caches on both sides), alternating round by round. It prints every output file's
SHA-256 match and each command's median time with min-max and the ratio current / baseline, and writes the same as
JSON (``--work``/same.json).

What may differ and is not a change of result: fields that record a time, a duration, a rate or a file's
identity (device, inode, mtime), and a safetensors header's metadata (a plan id made from the inputs' keys) when
every tensor is the same to the byte. Every other difference is listed (for JSON, the keys that differ) and makes
the script exit 1: weights (tensor bytes), run files and per-query scores must be identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RETRIEVER = ROOT / "examples" / "assets" / "repllama-smol"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
VOLATILE_KEYS = (
    "seconds",
    "time",
    "timing",
    "started",
    "finished",
    "created",
    "date",
    "wall",
    "elapsed",
    "duration",
    "per_s",
    "identity",
)


def pipeline(base: Path, data: Path, out: Path) -> list[tuple[str, list[str]]]:
    """(name, reforge arguments) in order; outputs under ``out``."""
    common_eval = ["--max-length", "32", "--dtype", "float32", "--profile", "repllama", "--pooling", "mean"]
    return [
        ("diff", ["diff", str(base), str(RETRIEVER), "-o", str(out / "delta"), "--low-rank"]),
        (
            "train",
            ["train", str(base), "--corpus", str(data), "-o", str(out / "psi"), "--max-docs", "8"]
            + ["--max-length", "64", "--save-every", "0", "--seed", "0"],
        ),
        (
            "merge",
            ["merge", "--base", str(base), "--retriever", str(RETRIEVER), "--adapter", str(out / "psi")]
            + ["--alpha", "0.5", "-o", str(out / "readapted")],
        ),
        (
            "merge-delta",
            ["merge", "--base", str(base), "--delta", str(out / "delta"), "--adapter", str(out / "psi")]
            + ["--alpha", "0.5", "-o", str(out / "readapted-delta")],
        ),
        ("verify", ["verify", str(out / "readapted")]),
        ("inspect", ["inspect", str(out / "psi"), "--base", str(base), "--json"]),
        (
            "queries",
            ["queries", str(data), "-o", str(out / "synthetic"), "-n", "10", "--generator", "crop", "--seed", "0"],
        ),
        (
            "eval",
            ["eval", str(RETRIEVER), str(out / "readapted"), "--base", str(base), "-d", str(data)]
            + ["-o", str(out / "eval"), "--json", *common_eval],
        ),
        (
            "tune",
            ["tune", "--base", str(base), "--retriever", str(RETRIEVER), "--adapter", str(out / "psi")]
            + ["-d", str(data), "--split", "test", "--i-know", "--alpha", "0:1:0.5", "--json", *common_eval],
        ),
    ]


def subset(target: Path, queries: int = 12, documents: int = 60) -> Path:
    """SciFact's first ``queries`` judged test queries, their judged documents and seeded others."""
    if (target / "corpus.jsonl").is_file():
        return target
    qrels = [line.split("\t") for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    chosen = list(dict.fromkeys(q for q, _, _ in qrels))[:queries]
    judged = {d for q, d, _ in qrels if q in chosen}
    lines = (SCIFACT / "corpus.jsonl").read_text().splitlines()
    ids = [json.loads(line)["_id"] for line in lines]
    others = [i for i, doc in enumerate(ids) if doc not in judged]
    keep = {i for i, doc in enumerate(ids) if doc in judged}
    keep |= set(random.Random(0).sample(others, max(0, documents - len(keep))))
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    (target / "corpus.jsonl").write_text("".join(lines[i] + "\n" for i in sorted(keep)))
    wanted = set(chosen)
    query_lines = [q for q in (SCIFACT / "queries.jsonl").read_text().splitlines() if json.loads(q)["_id"] in wanted]
    (target / "queries.jsonl").write_text("".join(q + "\n" for q in query_lines))
    rows = ["query-id\tcorpus-id\tscore"] + ["\t".join(r) for r in qrels if r[0] in wanted]
    (target / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return target


def run_tree(
    tree: Path, base: Path, data: Path, work: Path, keep: Path, only: set[str] | None = None
) -> dict[str, float]:
    """Run the pipeline with ``tree``'s code in ``work/run`` (one path for both trees, so recorded paths match),
    then move its outputs to ``keep``; seconds per command. A failing command stops the benchmark. With ``only``
    and no ``train`` in it, the adapter is `shared_adapter`'s, copied in (trained once, by the current tree)."""
    out = work / "run"
    for folder in (out, keep):
        if folder.exists():
            shutil.rmtree(folder)
    out.mkdir(parents=True)
    if only is not None and "train" not in only:
        shutil.copytree(work / "shared-psi", out / "psi")
    env = dict(os.environ, PYTHONPATH=str(tree), REFORGE_HOME=str(out / "home"), HF_HUB_OFFLINE="1")
    seconds = {}
    for name, arguments in pipeline(base, data, out):
        if only is not None and name not in only:
            continue
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from reforge.cli import main; sys.exit(main())", *arguments],
            env=env,
            cwd=out,
            capture_output=True,
            text=True,
        )
        seconds[name] = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"{tree.name}: reforge {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        if "--json" in arguments:
            (out / f"{name}.stdout.json").write_text(done.stdout)
    out.rename(keep)
    return seconds


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(out: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(out)): p
        for p in sorted(out.rglob("*"))
        if p.is_file() and "home" not in p.relative_to(out).parts[:1] and not p.name.endswith(".lock")
    }


def differing_keys(left: object, right: object, prefix: str = "") -> list[str]:
    if isinstance(left, dict) and isinstance(right, dict):
        keys = sorted(set(left) | set(right))
        return [k for key in keys for k in differing_keys(left.get(key), right.get(key), f"{prefix}.{key}")]
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        return [k for i, (a, b) in enumerate(zip(left, right)) for k in differing_keys(a, b, f"{prefix}[{i}]")]
    return [] if left == right else [prefix or "."]


def compare(baseline: Path, current: Path) -> tuple[list[dict], bool]:
    left, right = outputs(baseline), outputs(current)
    rows, same = [], True
    for name in sorted(set(left) | set(right)):
        row = {"file": name}
        if name not in left or name not in right:
            row["status"] = "only in " + ("current" if name in right else "baseline")
        elif sha256(left[name]) == sha256(right[name]):
            row["status"] = "identical"
        elif name.endswith(".safetensors"):
            row.update(_tensors_compared(left[name], right[name]))
        else:
            row["status"] = "differs"
            if name.endswith(".json"):
                try:
                    keys = differing_keys(json.loads(left[name].read_text()), json.loads(right[name].read_text()))
                except json.JSONDecodeError:
                    keys = ["(not JSON)"]
                row["keys"] = keys
                volatile = all(any(v in key.lower() for v in VOLATILE_KEYS) for key in keys)
                row["status"] = "differs (timing fields only)" if volatile else "differs"
        explained = row["status"].startswith("differs (")  # timing fields, or a header's metadata only
        if row["status"] != "identical" and not explained:
            same = False
        if name.endswith((".trec", ".tsv")) and row["status"] != "identical":
            same = False
        rows.append(row)
    return rows, same


def _tensors_compared(left: Path, right: Path) -> dict:
    """Two safetensors files whose bytes differ: the same tensors (names, dtypes, shapes, bytes) with other header
    metadata, or not."""
    from safetensors import safe_open

    with safe_open(left, "pt") as a, safe_open(right, "pt") as b:
        if sorted(a.keys()) != sorted(b.keys()):
            return {"status": "differs", "keys": ["(tensor names)"]}
        changed = [k for k in a.keys() if not _same_tensor(a.get_tensor(k), b.get_tensor(k))]
        meta_a, meta_b = a.metadata() or {}, b.metadata() or {}
    if changed:
        return {"status": "differs", "keys": changed[:20]}
    keys = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
    return {"status": "differs (header metadata only)", "keys": keys}


def _same_tensor(a, b) -> bool:
    """Same dtype, shape and bytes (stricter than torch.equal: a NaN equals itself, -0.0 differs from 0.0)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit before the cleanup")
    parser.add_argument("--rounds", type=int, default=3, help="pipeline runs per tree, alternating (median kept)")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench" / "same")
    parser.add_argument(
        "--only",
        help="time only these commands, comma-separated (e.g. diff,merge,merge-delta,verify: the weight-level ones, "
        "cheap enough for many rounds; name what a command reads too: eval reads merge); without train, one adapter "
        "trained by the current tree serves both",
    )
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    sys.path.insert(0, str(ROOT))
    from examples.prepare_base import prepare_base

    base = prepare_base()
    args.work.mkdir(parents=True, exist_ok=True)
    data = subset(args.work / "data")
    tree = args.work / "baseline-tree"
    if tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True)
    try:
        if only is not None and "train" not in only:
            run_tree(ROOT, base, data, args.work, args.work / "shared", only={"train"})
            shutil.rmtree(args.work / "shared-psi", ignore_errors=True)
            (args.work / "shared" / "psi").rename(args.work / "shared-psi")
        sides = {"baseline": tree, "current": ROOT}
        times: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else reversed(list(sides)):
                for name, value in run_tree(sides[side], base, data, args.work, args.work / side, only).items():
                    times[side].setdefault(name, []).append(value)
                print(f"round {round_ + 1}: {side} done", flush=True)
        rows, same = compare(args.work / "baseline", args.work / "current")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    report = {"baseline": args.baseline, "rounds": args.rounds, "only": args.only, "load": os.getloadavg()}
    report |= {"files": rows, "times": {}}
    print(f"\n{'command':<12} {'baseline s (min-max)':>24} {'current s (min-max)':>24} {'ratio':>6}")
    for name in times["baseline"]:
        old, new = times["baseline"][name], times["current"][name]
        ratio = statistics.median(new) / statistics.median(old)
        report["times"][name] = {"baseline": old, "current": new, "ratio": ratio}
        print(
            f"{name:<12} {_spread(old):>24} {_spread(new):>24} {ratio:>6.2f}",
        )
    print()
    for row in rows:
        if row["status"] != "identical":
            print(f"{row['status']:<30} {row['file']}  {', '.join(row.get('keys', []))[:200]}")
    identical = sum(row["status"] == "identical" for row in rows)
    print(f"\n{identical} of {len(rows)} files identical; weights, runs and scores {'same' if same else 'DIFFER'}")
    (args.work / "same.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if same else 1


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    sys.exit(main())
