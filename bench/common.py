"""Shared benchmark tools: synthetic 7B-width checkpoints, cold-cache timing, and peak memory of a command.

Everything here measures; nothing here is imported by reforge itself.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(os.environ.get("REFORGE_BENCH_DIR", ROOT / ".cache" / "bench"))
REFORGE = [str(Path(sys.executable).parent / "reforge")]

# Llama-2-7B widths
HIDDEN, MLP, VOCAB = 4096, 11008, 32000


def llama_tensors(layers: int, *, causal: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama-2-7B-width checkpoint with ``layers`` layers (CausalLM or bare layout)."""
    prefix = "model." if causal else ""
    names = [(f"{prefix}embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        names += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        names += [(p + f"self_attn.{m}_proj.weight", (HIDDEN, HIDDEN)) for m in "qkvo"]
        names += [
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP)),
        ]
    names.append((f"{prefix}norm.weight", (HIDDEN,)))
    if causal:
        names.append(("lm_head.weight", (VOCAB, HIDDEN)))
    return names


def llama_config(layers: int, *, causal: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM" if causal else "LlamaModel"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def make_checkpoint(
    folder: Path,
    layers: int,
    *,
    causal: bool,
    seed: int,
    like: Path | None = None,
    noise: float = 0.01,
    shard_size: int = 2 * 10**9,
) -> Path:
    """Write a synthetic bf16 checkpoint (random weights; with ``like``, those weights plus small noise)."""
    import torch

    from reforge.io.checkpoint import open_model
    from reforge.io.writer import CheckpointWriter, TensorSpec

    if (folder / "config.json").is_file():
        return folder
    names = llama_tensors(layers, causal=causal)
    specs = [TensorSpec(n, "BF16", s) for n, s in names]
    generator = torch.Generator().manual_seed(seed)
    source = open_model(like) if like else None
    with CheckpointWriter(folder, specs, plan_id=f"synthetic-{layers}-{causal}-{seed}", max_shard_size=shard_size) as w:
        reader = source.reader() if source else None
        for name, shape in names:
            if reader is not None:
                key = source.layout.stored(name.removeprefix("model."))
                value = reader.get(key).float() + noise * torch.randn(shape, generator=generator)
            else:
                value = torch.randn(shape, generator=generator) * 0.02
            w.write(name, value.to(torch.bfloat16))
        w.add_file("config.json", json.dumps(llama_config(layers, causal=causal), indent=2))
    return folder


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (clean pages; dirty ones are written back first)."""
    for path in paths:
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def cold_cat_seconds(files: list[Path]) -> float:
    evict(files)
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


@dataclass
class Run:
    seconds: float
    max_rss_gib: float
    peak_anon_gib: float
    returncode: int
    stderr: str


def measure(command: list[str], env: dict | None = None) -> Run:
    """Run ``command`` under /usr/bin/time -v; also sample its anonymous memory (RssAnon) every 20 ms."""
    started = time.perf_counter()
    process = subprocess.Popen(
        ["/usr/bin/time", "-v", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    peak_anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for child in _children(process.pid):
                try:
                    for line in Path(f"/proc/{child}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
                except OSError:
                    pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    rss_kib = next((int(line.split()[-1]) for line in stderr.splitlines() if "Maximum resident set size" in line), 0)
    return Run(seconds, rss_kib / 2**20, peak_anon[0] / 2**20, process.returncode, stderr[-3000:])


def _children(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            queue += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            pass
    return found


def cpu_seconds(run: Run) -> float:
    """User + system CPU time of the command (from /usr/bin/time -v): unlike wall time, it hardly depends on what
    else the shared machine runs or on the disk."""
    total = 0.0
    for line in run.stderr.splitlines():
        if "User time (seconds)" in line or "System time (seconds)" in line:
            total += float(line.split()[-1])
    return total


def median(values: list[float]) -> float:
    return statistics.median(values)
