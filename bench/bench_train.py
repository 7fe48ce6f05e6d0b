"""Benchmark: `reforge train` vs a plain HF Trainer + peft DoRA run (the paper's setup: random order, per-batch
padding), same model, tokenizer, documents and hyperparameters, on SciFact passages. CPU, fp32.

    .venv/bin/python bench/bench_train.py                 # 150 random docs, tiny random Llama, BPE (~10 minutes)
    .venv/bin/python bench/bench_train.py --docs 100 --tokenizer smollm2   # SmolLM2's real tokenizer (GGUF)

The model is a random Llama with a real LM's proportions (hidden 256, 4 layers, head dim 64, MLP 4x): attention is
a small share of the work, as in a 7B model, so the gain measured is mostly the padding saved. Each configuration
runs ``--repeats`` times, interleaved, and the fastest run counts (other jobs on the machine only slow runs down).
Prints, for each run: padding share, training-loop wall and CPU seconds (the baseline's `trainer.train()`, reforge's
`train_loop`), useful (non-pad) tokens per loop second and per loop CPU second, with their ratios to the baseline,
then the end-to-end times. Both runs
feed the same documents, truncated at max length (reforge adds one EOS per document). torch runs on one thread by
default, so CPU seconds stay a fair measure when other jobs share the machine. Target: reforge >= 1.5x the
baseline's useful tokens per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
GGUF = Path.home() / ".cache" / "reforge-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PAPER = dict(
    r=32,
    lora_alpha=64,
    lora_dropout=0.05,
    batch_size=4,
    lr=2e-4,
    max_length=1024,
    target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
)


def build_tokenizer(kind: str, texts: list[str]):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "smollm2":
        if not GGUF.is_file():
            sys.exit(f"{GGUF} is missing: run ../shared/scripts/fetch-models.sh first")
        tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
        tokenizer.pad_token = tokenizer.pad_token or "<|endoftext|>"
        return tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_base(folder: Path, tokenizer, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_baseline(base: Path, tokenizer, texts: list[str], out: Path) -> dict:
    """HF Trainer + peft DoRA, DataCollatorForLanguageModeling (pads each random batch to its longest)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    started, cpu_started = time.perf_counter(), time.process_time()
    data = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=PAPER["max_length"]),
        batched=True,
        remove_columns=["text"],
    )
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=PAPER["r"],
            lora_alpha=PAPER["lora_alpha"],
            lora_dropout=PAPER["lora_dropout"],
            use_dora=True,
            target_modules=PAPER["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    counts = {"real": 0, "pad": 0}
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def counting_collator(features):
        batch = collator(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["pad"] += int((batch["attention_mask"] == 0).sum())
        return batch

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=PAPER["batch_size"],
        learning_rate=PAPER["lr"],
        lr_scheduler_type="linear",
        num_train_epochs=1,
        seed=42,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=10**9,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counting_collator)
    loop_wall, loop_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return {
        "name": "HF Trainer + peft DoRA (per-batch padding)",
        "train_s": time.perf_counter() - loop_wall,
        "train_cpu_s": time.process_time() - loop_cpu,
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "real": counts["real"],
        "pad": counts["pad"],
    }


def run_reforge(base: Path, corpus: Path, ids_file: Path, out: Path, batching: str) -> dict:
    import reforge.train.dora as recipe
    from reforge.train import TrainConfig, train_adapter

    config = TrainConfig(
        base=str(base),
        corpus=[str(corpus)],
        output=str(out),
        only_ids=str(ids_file),
        batching=batching,
        overwrite=True,
        **PAPER,
    )
    loop = {}
    train_loop = recipe.train_loop

    def timed_loop(*args, **kwargs):  # the same span as the baseline's trainer.train(): the loop, no setup
        wall, cpu = time.perf_counter(), time.process_time()
        state = train_loop(*args, **kwargs)
        loop.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
        return state

    recipe.train_loop = timed_loop
    try:
        cpu_started = time.process_time()
        result = train_adapter(config)
    finally:
        recipe.train_loop = train_loop
    tokens = result.record["tokens"]
    return {
        "name": f"reforge train (--batching {batching})",
        "train_s": loop["wall"],
        "train_cpu_s": loop["cpu"],
        "wall_s": result.wall_time_s,
        "cpu_s": time.process_time() - cpu_started,
        "real": tokens["input"],
        "pad": tokens["padding"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=150, help="SciFact passages, sampled at random (seed 0)")
    parser.add_argument("--tokenizer", choices=["bpe", "smollm2"], default="bpe")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the fastest counts")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 makes CPU seconds a fair measure on a busy machine"
    )
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import random

    import torch

    from reforge.data.corpus import DocSelection, load_corpus

    torch.set_num_threads(args.threads)
    everything = load_corpus(SCIFACT).docs
    chosen = set(random.Random(0).sample([d.id for d in everything], args.docs))
    texts = [d.text for d in everything if d.id in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids_file = tmp / "ids.txt"
        ids_file.write_text("\n".join(sorted(chosen)) + "\n")
        assert [
            d.text for d in load_corpus(SCIFACT, selection=DocSelection.from_files(only_ids=ids_file)).docs
        ] == texts
        tokenizer = build_tokenizer(args.tokenizer, [d.text for d in everything])
        base = build_base(tmp / "base", tokenizer, args.hidden, args.layers)
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=1024)["input_ids"]]
        print(
            f"{len(texts)} random SciFact passages, {sum(lengths):,} tokens (mean {sum(lengths) / len(lengths):.0f}, "
            f"max {max(lengths)}), vocab {len(tokenizer)}, Llama hidden {args.hidden} x {args.layers} layers, "
            f"DoRA r 32 on q,k,v,up,down, batch 4, max length 1024, fp32 CPU, {args.threads} thread(s)",
            flush=True,
        )
        attempts: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for run in (
                run_baseline(base, tokenizer, texts, tmp / "hf"),
                run_reforge(base, SCIFACT, ids_file, tmp / "documents", batching="documents"),
                run_reforge(base, SCIFACT, ids_file, tmp / "packed", batching="rows"),
                run_reforge(base, SCIFACT, ids_file, tmp / "grouped", batching="grouped"),
            ):
                attempts.setdefault(run["name"], []).append(run)
    runs = [min(tries, key=lambda r: r["train_s"]) for tries in attempts.values()]
    for run, tries in zip(runs, attempts.values()):
        run["train_cpu_s"] = min(r["train_cpu_s"] for r in tries)
        run["loop_s_all"] = [round(r["train_s"], 1) for r in tries]
    baseline = runs[0]
    print(
        f"\n{'run':44} {'padding':>8} {'loop s':>7} {'loop CPU s':>10} {'useful tok/s':>13} "
        f"{'per CPU-s':>10} {'x baseline (wall, CPU)':>23}"
    )
    for run in runs:
        run["padding_share"] = run["pad"] / (run["real"] + run["pad"])
        run["useful_tok_s"] = run["real"] / run["train_s"]  # non-pad tokens / training-loop seconds
        run["useful_tok_cpu_s"] = run["real"] / run["train_cpu_s"]  # non-pad tokens / training-loop CPU seconds
        run["ratio_wall"] = run["useful_tok_s"] / baseline["useful_tok_s"]
        run["ratio_cpu"] = run["useful_tok_cpu_s"] / baseline["useful_tok_cpu_s"]
        print(
            f"{run['name']:44} {run['padding_share']:8.1%} {run['train_s']:7.1f} {run['train_cpu_s']:10.1f} "
            f"{run['useful_tok_s']:13,.0f} {run['useful_tok_cpu_s']:10,.0f} "
            f"{run['ratio_wall']:11.2f}x {run['ratio_cpu']:9.2f}x"
        )
    print("\nloop seconds of every attempt: " + "; ".join(f"{r['name']}: {r['loop_s_all']}" for r in runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
