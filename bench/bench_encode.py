"""Per-document costs of `reforge.eval.encode` outside the model: tokenizing and padding SciFact passages.

    python bench/bench_encode.py [--docs 4096] [--rounds 3] [--max-length 16]

Times `_token_ids` (the tokenizer call, clipping included) and `_pad` (one batch of ``--batch-size`` rows) with
all-MiniLM-L6-v2's tokenizer on the first ``--docs`` SciFact passages (title + text cut to 120 characters, as
`bench_eval.py --scale --chars 120` feeds them), in this process, one thread; prints milliseconds per 1,000
documents, median and range over ``--rounds``. Run it at an older commit (``git stash; git checkout <commit>``) for
the before numbers docs/eval.md gives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scifact"
MODEL = Path(os.environ.get("REFORGE_MODELS", Path.home() / ".cache" / "reforge-models")) / "all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if not (MODEL / "tokenizer.json").is_file() or not DATA.is_dir():
        sys.exit(f"needs {MODEL} and {DATA}")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from reforge.eval.encode import _pad, _token_ids
    from reforge.profiles import builtin_profile

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModel.from_config(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    profile = replace(builtin_profile("last-token", max_length=args.max_length), pooling="mean", append_eos=False)
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as lines:
        docs = [json.loads(line) for _, line in zip(range(args.docs), lines)]
    texts = [(d.get("title", "") + " " + d["text"][:120]).strip() for d in docs]
    per_thousand = 1000 / len(texts)
    timings: dict[str, list[float]] = {"tokenize": [], "pad": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        ids, token_types = _token_ids(tokenizer, texts, profile, model)
        timings["tokenize"].append((time.perf_counter() - start) * 1e3 * per_thousand)
        start = time.perf_counter()
        for at in range(0, len(ids), args.batch_size):
            _pad(ids[at : at + args.batch_size], tokenizer, profile, token_types)
        timings["pad"].append((time.perf_counter() - start) * 1e3 * per_thousand)
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_average": round(os.getloadavg()[0], 1),
                "documents": len(texts),
                "ms_per_1000_documents": {
                    k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                    for k, v in timings.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
