"""What `reforge.io.checkpoint.content_key` costs: the first key of a model folder (every byte read and hashed), the
next ones (one stat per file: the memo), a folder reforge wrote itself (the writer's record: nothing read), and the
sampled `fingerprint` it replaces as the embedding cache's key.

    python bench/bench_content_key.py --gb 4          # a 4 GB folder of random bytes in two shards, under --dir
    python bench/bench_content_key.py --gb 4 --rounds 3

The first key is timed with the file's pages dropped from the page cache (fsync, then posix_fadvise DONTNEED), so it
reads from the disk as a model downloaded or copied a while ago would; and again with them cached. Prints JSON: the
date, the machine's load, the size and each timing (median, min, max over ``--rounds``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write_folder(folder: Path, total: int, shards: int = 2) -> list[Path]:
    """``shards`` safetensors-named files of random bytes (content_key reads bytes, not tensors) and a config."""
    import numpy as np

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rng = np.random.default_rng(0)
    files = []
    for i in range(shards):
        path = folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with path.open("wb") as f:
            left = total // shards
            while left:
                block = rng.integers(0, 256, size=min(left, 64 << 20), dtype=np.uint8)
                f.write(block.tobytes())
                left -= block.size
            f.flush()
            os.fsync(f.fileno())
        files.append(path)
    return files


def _drop(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stats(values: list[float]) -> dict:
    return {
        "median_s": round(statistics.median(values), 4),
        "min_s": round(min(values), 4),
        "max_s": round(max(values), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="folder size in GB (10^9 bytes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write it (default: the system temporary folder)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        os.environ["REFORGE_HOME"] = str(Path(tmp) / "home")
        from reforge.io.checkpoint import content_key, fingerprint, memo_dir

        folder = Path(tmp) / "model"
        files = _write_folder(folder, int(args.gb * 1e9))
        size = sum(p.stat().st_size for p in files)
        cold, warm, memo, sampled = [], [], [], []
        for _ in range(args.rounds):
            shutil.rmtree(memo_dir(), ignore_errors=True)
            _drop(files)
            cold.append(_timed(lambda: content_key(folder)))
            shutil.rmtree(memo_dir(), ignore_errors=True)
            warm.append(_timed(lambda: content_key(folder)))  # pages cached now: the hashing alone
            memo.append(_timed(lambda: content_key(folder)))
            _drop(files)
            sampled.append(_timed(lambda: fingerprint(folder)))
        remembered = len(list(memo_dir().iterdir()))
        written = _writer_output(Path(tmp) / "written")
        recorded = [_timed(lambda: content_key(written)) for _ in range(args.rounds)]
        assert len(list(memo_dir().iterdir())) == remembered  # nothing was read: the record was used
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before_after": [round(load, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(),
        "bytes": size,
        "first_key_cold": {**_stats(cold), "gb_per_s": round(size / 1e9 / statistics.median(cold), 2)},
        "first_key_page_cached": {**_stats(warm), "gb_per_s": round(size / 1e9 / statistics.median(warm), 2)},
        "later_keys_memo": _stats(memo),
        "sampled_fingerprint_cold": _stats(sampled),
        "writer_recorded_256MB_output": _stats(recorded),
    }
    print(json.dumps(result, indent=2))


def _writer_output(out: Path) -> Path:
    """A 256 MB folder written by `CheckpointWriter`: its reforge.json records each shard's SHA-256."""
    import torch

    from reforge.io.writer import CheckpointWriter, TensorSpec

    specs = [TensorSpec(f"w{i}", "F32", (4096, 4096)) for i in range(4)]
    with CheckpointWriter(out, specs, plan_id="bench", max_shard_size=2 * 4096 * 4096 * 4) as writer:
        for spec in specs:
            writer.write(spec.name, torch.randn(spec.shape))
    return out


if __name__ == "__main__":
    main()
