"""The device check: every CUDA-only path of reforge against its tested counterpart, and the GPU numbers the docs
wait for, in one command (``make gpu-check``) on one GPU, with nothing to download.

    python bench/gpu_check.py --json gpu_check.json           # on a GPU: at most about 8 minutes on one H100
    python bench/gpu_check.py --smoke --json smoke.json       # all of it on the CPU at tiny sizes (the tests run it)

Parts, in this order (a part that would start after ``--budget-s`` is skipped, and says so):

1. ``tests``: ``pytest -m gpu tests/test_gpu_paths.py`` on the device: flex against the tested split path (logits
   and gradients; Llama, Mistral with a window shorter than the document, Qwen3, Gemma2 with softcap and
   alternating windows; bf16 and fp32), padded against split, merge and diff with ``--device cuda`` against the
   CPU's bytes, DoRA's norms on cuBLAS against the CPU's.
2. ``memory``: the peak GPU memory (``torch.cuda.max_memory_allocated``) of one training step of 4 documents of
   1,024 tokens on the 1B shape, with and without gradient checkpointing, against `reforge.train.plan`.
3. ``search``: 1M x 768 float16 documents, 256 queries, top 100: the GPU search against an exact float32 search on
   the CPU (faiss's flat index where faiss is installed, else a torch matmul): same top-k, and both speeds. Where
   faiss is absent (the lent machines have none) the GPU side is `reforge.eval.search`'s torch kernel per block,
   merged by top-k on the host, since `search_blocks` itself needs faiss for its heap.
4. ``bench``: bench/bench_gpu.py at the 1B and 7B-width shapes: train tokens/s and MFU per attention path (packed
   rows; the paper's batching through split, padded and flex) against HF Trainer + peft, encode documents/s and
   MFU against sentence-transformers.

Writes one JSON file (``--json``) and prints one screen of summary. Exit status 1 when any check failed, 0 when
every part passed or was skipped with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PARTS = ("tests", "memory", "search", "bench")
# sizes: (GPU, smoke)
SEARCH = {"full": dict(docs=1_000_000, dim=768, queries=256, k=100), "smoke": dict(docs=3000, dim=32, queries=16, k=10)}
MEMORY = {"full": dict(shape="1b", max_length=1024), "smoke": dict(shape="smoke", max_length=64)}
BENCH = {
    "full": ["--shape", "1b", "7b-cut", "--steps", "10", "--warmup", "3", "--docs", "2000", "--encode-docs", "2000"],
    "smoke": ["--smoke"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="everything on the CPU at tiny sizes (seconds)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where the report goes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no part after this many seconds")
    parser.add_argument("--tmp", type=Path, help="scratch folder (default: system tmp)")
    args = parser.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; `--smoke` runs the same checks on the CPU at tiny sizes")
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    size = "smoke" if args.smoke else "full"
    started = time.perf_counter()
    report = {"meta": _meta(device, args), "parts": {}, "skipped": []}
    runners = {"tests": _tests, "memory": _memory, "search": _search, "bench": _bench}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for part in args.parts:
            spent = time.perf_counter() - started
            if spent > args.budget_s:
                report["skipped"].append({"part": part, "why": f"time budget: {spent:.0f} s spent of {args.budget_s}"})
                continue
            begun = time.perf_counter()
            try:
                result = runners[part](device, size, Path(tmp))
            except Exception as e:  # a broken part is a failed check, reported; the other parts still run
                result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            result["seconds"] = round(time.perf_counter() - begun, 1)
            report["parts"][part] = result
    report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    failed = [p for p, r in report["parts"].items() if r["status"] not in ("passed", "skipped")]
    report["status"] = "failed" if failed else "passed"
    _write(args.json, report)
    print(summary(report))
    return 1 if failed else 0


def _meta(device, args) -> dict:
    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "smoke": args.smoke,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
    }


def _write(path: Path, report: dict) -> None:
    """Atomically: a temporary name, renamed when whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
    partial.replace(path)


# ---- 1. gpu-marked tests -------------------------------------------------------------------------------------------


def _tests(device, size: str, tmp: Path) -> dict:
    """``pytest -m gpu`` in a child process on ``device``; each test's outcome and, for a skip or failure, why."""
    xml = tmp / "tests.xml"
    env = {**os.environ, "REFORGE_TEST_DEVICE": device.type, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    command += ["--timeout=600", str(ROOT / "tests" / "test_gpu_paths.py")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not xml.is_file():
        return {
            "status": "error",
            "error": "pytest wrote no report",
            "output": done.stdout[-4000:] + done.stderr[-4000:],
        }
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, why = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                why = (found.get("message") or found.text or "")[:500]
        cases.append({"test": case.get("name"), "outcome": outcome, "why": why, "seconds": float(case.get("time", 0))})
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
    status = "failed" if counts["failed"] or counts["error"] or done.returncode not in (0, 5) else "passed"
    return {"status": status, "counts": counts, "cases": cases, "exit_code": done.returncode}


# ---- 2. peak memory against the plan --------------------------------------------------------------------------------


def _memory(device, size: str, tmp: Path) -> dict:
    """One training step of 4 documents of ``max_length`` tokens (the plan's worst case), without and with
    gradient checkpointing: measured peak against `reforge.train.plan.plan_memory`."""
    import bench_gpu
    import torch
    from transformers import AutoConfig

    from reforge.train.plan import plan_memory

    sizes = MEMORY[size]
    shape, max_length = bench_gpu.SHAPES[sizes["shape"]], sizes["max_length"]
    base = bench_gpu.save_base(tmp / "memory-base", shape, torch.bfloat16 if device.type == "cuda" else torch.float32)
    corpus = tmp / "memory-corpus.jsonl"
    texts = bench_gpu.synthetic_texts([max_length] * 8, shape.vocab - 4)
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    timing = argparse.Namespace(warmup=1, steps=1, max_length=max_length)
    rows = []
    for checkpointing in (False, True):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = bench_gpu.bench_reforge_train(
            base, corpus, shape, timing, device, None, batching="documents", gradient_checkpointing=checkpointing
        )
        plan = plan_memory(
            AutoConfig.from_pretrained(base),
            target_modules=bench_gpu.PAPER["target_modules"],
            r=bench_gpu.PAPER["r"],
            lora_dropout=bench_gpu.PAPER["lora_dropout"],
            batch_size=bench_gpu.PAPER["batch_size"],
            max_length=max_length,
            bf16=device.type == "cuda",
        )
        measured = row["peak_gib"] * 2**30 if row["peak_gib"] is not None else None
        planned = plan.peak(checkpointing)
        rows.append(
            {
                "gradient_checkpointing": checkpointing,
                "tokens_per_step": row["tokens"],
                "measured_peak_bytes": measured,
                "planned_peak_bytes": planned,
                "planned_over_measured": planned / measured if measured else None,
                "plan": plan.to_dict(),
            }
        )
    if device.type != "cuda":
        return {
            "status": "skipped",
            "why": "no CUDA allocator statistics on the CPU: the steps ran and the plan was computed; "
            "tests/test_train_plan.py checks the plan's parts on the CPU",
            "shape": sizes["shape"],
            "rows": rows,
        }
    # the plan should not under-promise: within 25% of the measured peak, either way
    off = [r for r in rows if not 0.75 <= r["planned_over_measured"] <= 1.25]
    return {"status": "failed" if off else "passed", "shape": sizes["shape"], "rows": rows}


# ---- 3. search ------------------------------------------------------------------------------------------------------


def _search(device, size: str, tmp: Path) -> dict:
    """The GPU search (or, in smoke, the same kernel on the CPU) against an exact float32 CPU search."""
    import numpy as np

    sizes = SEARCH[size]
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((sizes["docs"], sizes["dim"]), dtype=np.float32).astype(np.float16)
    queries = rng.standard_normal((sizes["queries"], sizes["dim"]), dtype=np.float32)
    k = sizes["k"]
    try:
        import faiss  # noqa: F401

        has_faiss = True
    except ImportError:
        has_faiss = False
    began = time.perf_counter()
    want_scores, want_rows = _cpu_exact(queries, docs, k, has_faiss)
    cpu_s = time.perf_counter() - began
    where = str(device)
    runs = {"torch kernel": lambda: _torch_kernel_search(queries, docs, k, where)}
    if has_faiss:  # the path `reforge eval` takes: the kernel inside search_blocks' faiss heap
        runs["search_blocks"] = lambda: _search_blocks(queries, docs, k, where)
    results = {}
    for name, run in runs.items():
        began = time.perf_counter()
        got_scores, got_rows = run()
        seconds = time.perf_counter() - began
        overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got_rows, want_rows)]))
        score_diff = float(np.abs(got_scores - want_scores).max())
        results[name] = {
            "passed": overlap >= 0.999 and score_diff <= 1e-3 * float(np.abs(want_scores).max()),
            "top_k_overlap": overlap,
            "queries_with_same_top_k_order": float((got_rows == want_rows).all(axis=1).mean()),
            "max_score_diff": score_diff,
            "seconds": round(seconds, 3),
            "speedup_over_cpu": cpu_s / seconds if seconds else None,
        }
    main = results["torch kernel"]
    return {
        "status": "passed" if all(r["passed"] for r in results.values()) else "failed",
        "device": where,
        "reference": "faiss IndexFlatIP (CPU)" if has_faiss else "torch float32 matmul + topk (CPU)",
        "faiss": has_faiss,
        "note": None
        if has_faiss
        else "no faiss here: search_blocks (which needs faiss's heap) cannot run; "
        "its torch kernel ran per block, merged by torch.topk",
        **sizes,
        "dtype": "float16 stored, float32 scores",
        "cpu_seconds": round(cpu_s, 3),
        "runs": results,
        "top_k_overlap": main["top_k_overlap"],
        "queries_with_same_top_k_order": main["queries_with_same_top_k_order"],
        "device_seconds": main["seconds"],
    }


def _search_blocks(queries, docs, k: int, device: str):
    from reforge.eval.search import block_rows_for, search_blocks

    step = block_rows_for(docs.shape[1])
    table = search_blocks(queries, ((at, docs[at : at + step]) for at in range(0, len(docs), step)), k, device=device)
    return table.scores, table.rows


def _cpu_exact(queries, docs, k: int, has_faiss: bool):
    import numpy as np

    if has_faiss:
        import faiss

        index = faiss.IndexFlatIP(docs.shape[1])
        for at in range(0, len(docs), 65536):
            index.add(np.ascontiguousarray(docs[at : at + 65536], dtype=np.float32))
        return index.search(queries, k)
    return _merged_topk(queries, docs, k, "cpu", lambda q, block, kk: _topk(q @ block.T, kk))


def _torch_kernel_search(queries, docs, k: int, device: str):
    from reforge.eval.search import _torch_kernel, block_rows_for

    kernel = _torch_kernel(queries, device, 1024)
    step = block_rows_for(docs.shape[1])

    def search(_, block, kk):
        import torch

        scores, rows = kernel(block.numpy(), kk)
        return torch.from_numpy(scores), torch.from_numpy(rows)

    return _merged_topk(queries, docs, k, "cpu", search, step)


def _topk(scores, k: int):
    import torch

    top = torch.topk(scores, k, dim=1)
    return top.values, top.indices


def _merged_topk(queries, docs, k: int, device: str, search, step: int = 65536):
    """The top ``k`` over blocks of ``step`` rows: each block's top ``k`` by ``search``, merged by top-k."""
    import torch

    q = torch.from_numpy(queries).to(device)
    best_scores = best_rows = None
    for at in range(0, len(docs), step):
        block = torch.from_numpy(docs[at : at + step].astype("float32"))
        scores, rows = search(q, block, min(k, len(block)))
        rows = rows + at
        if best_scores is not None:
            scores, rows = torch.cat([best_scores, scores], 1), torch.cat([best_rows, rows], 1)
        order = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices
        best_scores, best_rows = scores.gather(1, order), rows.gather(1, order)
    return best_scores.numpy(), best_rows.numpy()


# ---- 4. throughput -------------------------------------------------------------------------------------------------


def _bench(device, size: str, tmp: Path) -> dict:
    import bench_gpu

    rows = bench_gpu.main([*BENCH[size], "--tmp", str(tmp), "--device", device.type])
    return {"status": "passed", "rows": rows}


# ---- summary -------------------------------------------------------------------------------------------------------


def summary(report: dict) -> str:
    """One screen: the device, each part's verdict and its main numbers, what was skipped and why."""
    meta = report["meta"]
    lines = [
        f"gpu-check {'(smoke, CPU) ' if meta['smoke'] else ''}on {meta['device']}, torch {meta['torch']}, "
        f"{meta['date']}: {report['status'].upper()} in {meta['seconds']:.0f} s"
    ]
    parts = report["parts"]
    if "tests" in parts:
        t = parts["tests"]
        if "counts" in t:
            c = t["counts"]
            lines.append(
                f"  tests   {t['status']}: {c['passed']} passed, {c['failed'] + c['error']} failed, "
                f"{c['skipped']} skipped"
            )
            for case in t["cases"]:
                if case["outcome"] != "passed":
                    lines.append(f"          {case['outcome']} {case['test']}: {(case['why'] or '')[:110]}")
        else:
            lines.append(f"  tests   {t['status']}: {t.get('error', '')[:150]}")
    if "memory" in parts:
        m = parts["memory"]
        lines.append(f"  memory  {m['status']}" + (f": {m['why'][:120]}" if m.get("why") else ""))
        for row in m.get("rows", []):
            measured = row["measured_peak_bytes"]
            lines.append(
                f"          checkpointing {'on ' if row['gradient_checkpointing'] else 'off'}: planned "
                f"{row['planned_peak_bytes'] / 2**30:.2f} GiB, measured "
                + (f"{measured / 2**30:.2f} GiB ({row['planned_over_measured']:.2f}x)" if measured else "-")
            )
        if m.get("error"):
            lines.append(f"          {m['error'][:150]}")
    if "search" in parts:
        s = parts["search"]
        if "top_k_overlap" in s:
            lines.append(
                f"  search  {s['status']}: {s['docs']:,} x {s['dim']} fp16, {s['queries']} queries, top {s['k']}: "
                f"overlap {s['top_k_overlap']:.4f}, same order {s['queries_with_same_top_k_order']:.3f}; "
                f"torch kernel {s['device_seconds']:.2f} s vs CPU {s['cpu_seconds']:.2f} s"
                + ("" if s["faiss"] else " (no faiss: search_blocks not run)")
            )
        else:
            lines.append(f"  search  {s['status']}: {s.get('error', '')[:150]}")
    if "bench" in parts:
        b = parts["bench"]
        lines.append(f"  bench   {b['status']}" + (f": {b.get('error', '')[:150]}" if b.get("error") else ""))
        for row in b.get("rows", []):
            mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
            lines.append(
                f"          {row['shape']:7} {row['name'][:56]:56} {row['tokens_per_s']:10,.0f} tok/s "
                f"{row['docs_per_s']:8,.1f} docs/s MFU {mfu}"
                + (f" (vectors vs ST: {row['max_diff_vs_st']:.1e})" if "max_diff_vs_st" in row else "")
            )
    for skipped in report["skipped"]:
        lines.append(f"  skipped {skipped['part']}: {skipped['why']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
