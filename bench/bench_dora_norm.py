"""DoRA's weight norm per forward pass (peft) against once per optimizer step (reforge.train.weight_norm): CPU
seconds of the same training steps, interleaved repeats, medians.

    python bench/bench_dora_norm.py          # hidden 512, 4 layers (Llama-3.2-1B's ratios), 4 passes of 400 tokens
                                             # per step (reforge's CPU forward groups), 2 steps, 4 repeats, 1 thread
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make(lighten: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from reforge.train.weight_norm import step_cached_weight_norm

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
        tie_word_embeddings=True,
    )
    adapter = LoraConfig(
        r=32,
        lora_alpha=64,
        lora_dropout=0.05,
        use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(LlamaForCausalLM(config), adapter)
    if lighten:
        step_cached_weight_norm(model)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    runs = {"peft (norm per forward)": make(False), "reforge (norm per step)": make(True)}
    rows = torch.randint(0, 8192, (4, 1, 400), generator=torch.Generator().manual_seed(1))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(4):
        for name, (model, optimizer) in runs.items():
            started = time.process_time()
            for _step in range(2):
                for ids in rows:
                    model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            seconds[name].append(time.process_time() - started)
    for name, values in seconds.items():
        every = [round(v, 2) for v in values]
        print(f"{name:26} CPU s per 2 steps: median {statistics.median(values):.2f}  all {every}")


if __name__ == "__main__":
    main()
