"""GPU throughput: reforge train's inner loop and reforge eval's encoder against HF Trainer + peft and
sentence-transformers, on Llama-shaped models with random weights (nothing to download).

    python bench/bench_gpu.py                      # every shape, on the GPU
    python bench/bench_gpu.py --shape 1b --steps 30 --json gpu.json
    python bench/bench_gpu.py --smoke              # tiny sizes on CPU, same code path, seconds (tests/ runs it)

Shapes: ``1b`` (Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256) and ``7b-cut``
(Llama-2-7B width: hidden 4096, 32 heads, MLP 11008, vocab 32000, cut to 4 of its 32 layers). The corpus is
synthetic: one word-level token per word, with SciFact's passage lengths (characters of title + text / 4.60, the
characters per token SmolLM2's tokenizer gives on SciFact, + 1 EOS, cut at max length), read from
../shared/data/scifact/corpus.jsonl, or, where that is absent (a GPU machine gets only the repository), from
bench/scifact_chars.json: the same characters per passage, committed (25 KB).

What is timed, after ``--warmup`` steps (compilation, allocator warm-up):
- ``reforge train``: `reforge.train.dora.train_loop` (tokenize each step's rows, forward, backward, clip, AdamW)
  with the model `setup_model` builds: DoRA r 32, alpha 64, dropout 0.05 on q,k,v,up,down, batch 4, max length
  1024, bf16 on a GPU, packed rows (--batching rows), or the paper's batching (4 documents a step) through each
  attention path of ``--attention`` (split and padded; flex too on a GPU).
- HF Trainer + peft DoRA: the same adapter, documents and batch size, `DataCollatorForLanguageModeling` (random
  batches padded to their longest), bf16, sdpa; steps timed inside `Trainer.training_step`.
- ``reforge eval``'s encoder (`reforge.eval.encode`) and sentence-transformers ``encode`` over the same bare model
  (mean pooling, batch 64 on a GPU), bf16 on a GPU.

Counted FLOPs (model FLOPs, useful tokens only; padding, recomputation and DoRA's weight norm are overhead):
- training, per document of n tokens: 4 N n (forward 2 N n, backward of the frozen base 2 N n: activation gradients
  only) + 6 A n (adapter forward 2 A n, backward 4 A n) + 3 x attention forward; attention forward =
  4 x layers x (heads x head dim) x n (n + 1) / 2 (QK^T and AV over the causal half).
  N = weights of every matmul (attention, MLP, LM head; not the embedding lookup), A = adapter weights (r (in + out)
  per adapted matrix).
- encoding: 2 N' n + attention forward, N' = N without the LM head.
MFU = counted FLOPs / seconds / peak dense bf16 FLOP/s of the device (table below, or ``--peak-tflops``); on a CPU
without ``--peak-tflops`` it is not reported. Peak memory is ``torch.cuda.max_memory_allocated`` per phase.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT_CANDIDATES = (ROOT.parent / "shared" / "data" / "scifact", ROOT / "shared" / "data" / "scifact")
SCIFACT_CHARS = ROOT / "bench" / "scifact_chars.json"  # characters of each SciFact passage, for machines without it
CHARS_PER_TOKEN = 4.60  # SmolLM2-135M's tokenizer on SciFact title + text (1.50M tokens, 6.90M characters)
PAPER = dict(
    r=32,
    lora_alpha=64.0,
    lora_dropout=0.05,
    batch_size=4,
    lr=2e-4,
    target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
)
# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tie: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matmul_weights(self, lm_head: bool = True) -> int:
        """N: weights that multiply every token (attention, MLP, and the LM head when ``lm_head``)."""
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.mlp
        return self.layers * per_layer + (self.hidden * self.vocab if lm_head else 0)

    def adapter_weights(self, r: int) -> int:
        """A: r (in + out) for each of q, k, v, up, down in every layer."""
        kv = self.kv_heads * self.head_dim
        pairs = [
            (self.hidden, self.hidden),
            (self.hidden, kv),
            (self.hidden, kv),
            (self.hidden, self.mlp),
            (self.mlp, self.hidden),
        ]
        return self.layers * sum(r * (i + o) for i, o in pairs)

    def attention_forward(self, n: int) -> int:
        """QK^T and AV over the causal half of one n-token document."""
        return 4 * self.layers * self.heads * self.head_dim * n * (n + 1) // 2

    def train_flops(self, lengths, r: int) -> int:
        dense, adapter = self.matmul_weights(), self.adapter_weights(r)
        return sum((4 * dense + 6 * adapter) * n + 3 * self.attention_forward(n) for n in lengths)

    def encode_flops(self, lengths) -> int:
        dense = self.matmul_weights(lm_head=False)
        return sum(2 * dense * n + self.attention_forward(n) for n in lengths)

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=4096,
            tie_word_embeddings=self.tie,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )


SHAPES = {
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192, vocab=128256, tie=True),
    "7b-cut": Shape(hidden=4096, layers=4, heads=32, kv_heads=32, mlp=11008, vocab=32000, tie=False),
    "cpu-small": Shape(hidden=512, layers=4, heads=8, kv_heads=2, mlp=2048, vocab=8192, tie=True),  # 1B's ratios
    "smoke": Shape(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=256, tie=False),
}


# ---- data -----------------------------------------------------------------------------------------------------------


def scifact_lengths(max_length: int, corpus: Path | None = None) -> list[int]:
    """Token length of every SciFact passage as reforge train cuts it (estimated from characters, + EOS): from
    ``corpus`` (a corpus.jsonl), else ../shared/data/scifact, else the committed `SCIFACT_CHARS`."""
    path = corpus or next((p / "corpus.jsonl" for p in SCIFACT_CANDIDATES if (p / "corpus.jsonl").is_file()), None)
    if corpus is not None and not corpus.is_file():
        sys.exit(f"--corpus {corpus} is not a file")
    if path is None:
        counts = json.loads(SCIFACT_CHARS.read_text())["chars"]
    else:
        counts = []
        for line in path.open(encoding="utf-8"):
            row = json.loads(line)
            counts.append(len(f"{row.get('title', '')} {row['text']}".strip()))
    return [min(max_length, math.ceil(chars / CHARS_PER_TOKEN) + 1) for chars in counts]


def synthetic_texts(lengths: list[int], vocab_words: int, seed: int = 0) -> list[str]:
    """Texts of random words ``w0 .. w{vocab_words-1}``, one token each; n - 1 words (EOS makes n)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab_words)}" for _ in range(n - 1)) for n in lengths]


def save_base(folder: Path, shape: Shape, dtype) -> Path:
    """A random-weight LlamaForCausalLM of ``shape`` and a word-level tokenizer (``<pad> <unk> <s> </s> w0 ...``)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(shape.config()).to(dtype)
    model.save_pretrained(folder)
    del model
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(shape.vocab - len(specials))])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    return folder


# ---- device ---------------------------------------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_flops(device, override_tflops: float | None) -> float | None:
    import torch

    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def result(name: str, seconds: float, tokens: int, docs: int, flops: int, peak: float | None, device, **extra):
    """One row of the report."""
    return {
        "name": name,
        "seconds": round(seconds, 4),
        "tokens": tokens,
        "documents": docs,
        "tokens_per_s": tokens / seconds,
        "docs_per_s": docs / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_gib": peak_gib(device),
        **extra,
    }


# ---- training -------------------------------------------------------------------------------------------------------


def bench_reforge_train(
    base: Path,
    corpus: Path,
    shape: Shape,
    args,
    device,
    peak,
    batching: str,
    before_timed=None,
    attention: str = "auto",
    gradient_checkpointing: bool = False,
    **overrides,
) -> dict:
    """`train_loop` as `reforge train` runs it, ``args.warmup`` steps untimed, then ``args.steps`` timed
    (``before_timed()`` is called in between; ``overrides`` replace the paper's adapter options; ``attention`` is
    ``--attention``)."""
    from transformers import AutoTokenizer

    from reforge.dist import Ranks
    from reforge.train.config import TrainConfig
    from reforge.train.dora import LoopState, setup_data, setup_model, train_loop

    config = TrainConfig(
        base=str(base),
        corpus=[str(corpus)],
        output=str(base.parent / "unused"),
        batching=batching,
        max_length=args.max_length,
        precision="bf16" if device.type == "cuda" else "fp32",
        device=str(device),
        save_every=0,
        attention=attention,
        gradient_checkpointing=gradient_checkpointing,
        **{**PAPER, **overrides},
    )
    data = setup_data(config, AutoTokenizer.from_pretrained(base))
    total = args.warmup + args.steps
    if data.plan.steps_per_epoch < total:
        sys.exit(f"{data.plan.steps_per_epoch} steps in the corpus, {total} wanted: pass more --docs")
    run = setup_model(config, base, Ranks(), device, total)
    reset_peak(device)
    data.total_steps = args.warmup
    state = train_loop(run, data, LoopState())
    sync(device)
    if before_timed:
        before_timed()
    started, cpu_started, before = time.perf_counter(), time.process_time(), state.real
    data.total_steps = total
    state = train_loop(run, data, state)
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    timed = [row for step in data.plan.epoch_steps(0)[args.warmup : total] for row in step]
    lengths = [int(data.plan.lengths[d]) for row in timed for d in row]
    assert sum(lengths) == state.real - before, "the plan and the loop disagree on the tokens trained"
    name = (
        f"reforge train ({'packed rows' if batching == 'rows' else 'paper batching'}, {run.attention.path} attention)"
    )
    if gradient_checkpointing:
        overrides = {**overrides, "gradient checkpointing": "on"}
    if overrides:
        name += " " + ", ".join(f"{k} {v}" for k, v in overrides.items())
    return result(
        name,
        seconds,
        sum(lengths),
        len(lengths),
        shape.train_flops(lengths, PAPER["r"]),
        peak,
        device,
        padding_share=(state.pad / max(state.pad + state.real, 1)),
        steps=args.steps,
        cpu_seconds=round(cpu_seconds, 4),
    )


def bench_hf_train(base: Path, texts: list[str], shape: Shape, args, device, peak) -> dict:
    """HF Trainer + peft DoRA over the same documents: random batches of 4 padded to their longest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(base)
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length - 1)["input_ids"]
    rows = [{"input_ids": ids + [tokenizer.eos_token_id]} for ids in encoded]
    bf16 = device.type == "cuda"
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=PAPER["r"],
            lora_alpha=PAPER["lora_alpha"],
            use_dora=True,
            lora_dropout=PAPER["lora_dropout"],
            target_modules=PAPER["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    marks: list[tuple[float, list[int]]] = []

    class Timed(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            sync(device)
            marks.append((time.perf_counter(), inputs["attention_mask"].sum(1).tolist()))
            return loss

    total = args.warmup + args.steps
    targs = TrainingArguments(
        output_dir=str(base.parent / "hf"),
        per_device_train_batch_size=PAPER["batch_size"],
        learning_rate=PAPER["lr"],
        max_steps=total,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=10**9,
        seed=42,
        dataloader_num_workers=0,
    )
    trainer = Timed(
        model=model, args=targs, train_dataset=rows, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)
    )
    reset_peak(device)
    trainer.train()
    timed = marks[args.warmup :]
    seconds = timed[-1][0] - marks[args.warmup - 1][0]
    lengths = [n for _, batch in timed for n in batch]
    padded = sum(len(batch) * max(batch) for _, batch in timed)
    return result(
        "HF Trainer + peft DoRA (padded batches, sdpa)",
        seconds,
        sum(lengths),
        len(lengths),
        shape.train_flops(lengths, PAPER["r"]),
        peak,
        device,
        padding_share=1 - sum(lengths) / padded,
        steps=args.steps,
    )


def bench_dora_overheads(base: Path, corpus: Path, shape: Shape, args, device, peak) -> list[dict]:
    """What DoRA's weight norm costs a training step with peft's own layers (CPU: the timers need no device sync),
    the same run with reforge's norm once per step (`reforge.train.weight_norm`), and what peft's recomputation of
    the base product under LoRA dropout costs (that run with dropout 0)."""
    import functools

    from peft.tuners.lora.dora import DoraLinearLayer

    import reforge.train.dora as recipe

    spent = [0.0, 0.0]  # wall, CPU (process) seconds inside the two functions
    originals = {name: getattr(DoraLinearLayer, name) for name in ("get_lora_weight", "get_weight_norm")}

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - started
                spent[1] += time.process_time() - cpu_started

        return wrapper

    for name, fn in originals.items():
        setattr(DoraLinearLayer, name, timed(fn))
    lighten = recipe.step_cached_weight_norm
    recipe.step_cached_weight_norm = lambda model: 0  # peft's own layers, a norm per forward pass
    try:
        peft_own = bench_reforge_train(
            base,
            corpus,
            shape,
            args,
            device,
            peak,
            batching="rows",
            before_timed=lambda: spent.__setitem__(slice(None), [0.0, 0.0]),
        )
    finally:
        recipe.step_cached_weight_norm = lighten
        for name, fn in originals.items():
            setattr(DoraLinearLayer, name, fn)
    peft_own["name"] += " (peft's DoRA norm per forward)"
    peft_own["dora_norm_s"], peft_own["dora_norm_share"] = spent[0], spent[0] / peft_own["seconds"]
    peft_own["dora_norm_cpu_share"] = spent[1] / peft_own["cpu_seconds"]
    cached = bench_reforge_train(base, corpus, shape, args, device, peak, batching="rows")
    no_dropout = bench_reforge_train(base, corpus, shape, args, device, peak, batching="rows", lora_dropout=0.0)
    return [peft_own, cached, no_dropout]


# ---- encoding -------------------------------------------------------------------------------------------------------


def save_st_folder(base: Path, folder: Path, max_length: int) -> Path:
    """A sentence-transformers folder over the bare model of ``base``: mean pooling (what both sides read)."""
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(base), max_seq_length=max_length)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(folder))
    return folder


def bench_reforge_encode(folder: Path, texts: list[str], lengths: list[int], shape: Shape, args, device, peak) -> dict:
    """`reforge.eval.encode` as `reforge eval` calls it on this folder (its profile, dtype and batch size)."""
    import torch

    from reforge.eval.encode import encode
    from reforge.eval.model import resolve_model

    source = resolve_model(folder, pooling="mean")  # sentence-transformers 6 writes pooling_mode, read by name
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    retriever = source.load(device=str(device), dtype=dtype)
    run = lambda batch: encode(retriever, batch, source.profile, batch_size=args.encode_batch)  # noqa: E731
    return timed_encode("reforge eval encode", run, texts, lengths, shape, args, device, peak)


def bench_st_encode(folder: Path, texts: list[str], lengths: list[int], shape: Shape, args, device, peak) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = SentenceTransformer(str(folder), device=str(device), model_kwargs={"dtype": dtype})
    run = lambda batch: model.encode(batch, batch_size=args.encode_batch, convert_to_numpy=True)  # noqa: E731
    return timed_encode("sentence-transformers encode", run, texts, lengths, shape, args, device, peak)


def timed_encode(name: str, run, texts: list[str], lengths: list[int], shape: Shape, args, device, peak) -> dict:
    """``run(texts)`` timed after a one-batch warm-up; the row carries the vectors for the comparison."""
    run(texts[: args.encode_batch])
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    vectors = run(texts)
    sync(device)
    seconds = time.perf_counter() - started
    assert vectors.shape == (len(texts), shape.hidden)
    flops = shape.encode_flops(lengths)
    return result(
        name, seconds, sum(lengths), len(lengths), flops, peak, device, batch_size=args.encode_batch, vectors=vectors
    )


# ---- report ---------------------------------------------------------------------------------------------------------


def run_shape(name: str, shape: Shape, args, device) -> list[dict]:
    """Every measurement for one shape, in a fresh temporary folder."""
    import numpy as np
    import torch

    peak = peak_flops(device, args.peak_tflops)
    every = scifact_lengths(args.max_length, args.corpus)
    lengths = random.Random(0).sample(every, min(args.docs, len(every)))
    texts = synthetic_texts(lengths, shape.vocab - 4)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        base = save_base(tmp / "base", shape, torch.bfloat16 if device.type == "cuda" else torch.float32)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
        for measure in args.measure:
            if measure == "train":
                rows.append(bench_reforge_train(base, corpus, shape, args, device, peak, batching="rows"))
                for attention in args.attention or default_attentions(device):
                    rows.append(
                        bench_reforge_train(
                            base, corpus, shape, args, device, peak, batching="documents", attention=attention
                        )
                    )
                rows.append(bench_hf_train(base, texts, shape, args, device, peak))
            elif measure == "dora":
                rows += bench_dora_overheads(base, corpus, shape, args, device, peak)
            elif measure == "encode":
                folder = save_st_folder(base, tmp / "st", args.max_length)
                n = min(args.encode_docs, len(texts))
                mine = bench_reforge_encode(folder, texts[:n], lengths[:n], shape, args, device, peak)
                theirs = bench_st_encode(folder, texts[:n], lengths[:n], shape, args, device, peak)
                a, b = mine.pop("vectors"), theirs.pop("vectors")
                mine["max_diff_vs_st"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))  # same vectors?
                rows += [mine, theirs]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        row["shape"] = name
    return rows


def default_attentions(device) -> list[str]:
    """The attention paths timed with the paper's batching: flex only where it has a backward (CUDA)."""
    return ["split", "padded", "flex"] if device.type == "cuda" else ["split", "padded"]


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'shape':7} {'run':58} {'tokens/s':>10} {'docs/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} "
        f"{'padding':>7}"
    )
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        memory = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        padding = f"{row['padding_share']:.1%}" if "padding_share" in row else "-"
        print(
            f"{row['shape']:7} {row['name']:58} {row['tokens_per_s']:10,.0f} {row['docs_per_s']:8,.1f} "
            f"{row['tflops']:8.2f} {mfu:>6} {memory:>8} {padding:>7}"
        )
        if "dora_norm_share" in row:
            print(
                f"{'':8}DoRA weight norm (peft's get_lora_weight + get_weight_norm): {row['dora_norm_s']:.2f} s, "
                f"{row['dora_norm_share']:.1%} of the timed loop ({row['dora_norm_cpu_share']:.1%} of its CPU time)"
            )
        if "cpu_seconds" in row and row["tokens"]:
            print(
                f"{'':8}CPU time: {row['cpu_seconds']:.2f} s, {row['tokens'] / row['cpu_seconds']:,.0f} tokens per "
                "CPU-second"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and corpus on CPU: seconds, same code")
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["1b", "7b-cut"])
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=["train", "encode", "dora"],
        default=["train", "encode"],
        help="dora: the share of a step DoRA's weight norm takes, and LoRA dropout's cost (CPU)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=["split", "padded", "flex"],
        help="attention paths timed with the paper's batching (default: split padded, and flex on a GPU)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per training run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--docs", type=int, default=1200, help="SciFact-length documents sampled (seed 0)")
    parser.add_argument("--encode-docs", type=int, default=2000, help="documents encoded (of --docs... or fewer)")
    parser.add_argument("--encode-batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (for MFU), if not in the table")
    parser.add_argument("--corpus", type=Path, help="SciFact corpus.jsonl (default: ../shared/data/scifact)")
    parser.add_argument("--tmp", type=Path, help="where the random checkpoints are written (default: system tmp)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.max_length, args.threads = ["smoke"], args.device or "cpu", 64, 1
        args.steps, args.warmup, args.docs, args.encode_docs, args.encode_batch = 2, 1, 32, 16, 8
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the measurements; print a table and return (and with --json write) the rows."""
    sys.path.insert(0, str(ROOT))
    import platform

    import torch
    import transformers

    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        rows = [row for name in args.shape for row in run_shape(name, SHAPES[name], args, device)]
    finally:
        torch.set_num_threads(threads)
    print_table(rows)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python bench/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shapes": {name: asdict(SHAPES[name]) for name in args.shape},
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
