"""eval's in-memory merge of an adapter: reforge's own fold (`reforge.io.adapter`, since issue 23) against the peft
path it replaced (PeftModel + set_peft_model_state_dict + merge_and_unload), on a real small model.

Builds a DoRA adapter (random non-zero factors, r 16, the seven Llama projections) over SmolLM2-135M-Instruct,
loads it both ways in turn, and prints the median, min and max seconds of each and the largest weight difference.

    python bench/bench_eval_adapter.py [--base ~/.cache/reforge-models/SmolLM2-135M-Instruct] [--repeats 5]

2026-12-07, the shared 2-core CPU box at load average 13-14, OMP_NUM_THREADS=2, 5 runs each, interleaved:
peft median 28.07 s (min 23.81, max 44.95), reforge median 30.75 s (min 22.81, max 32.94): no difference the noise
lets through. Largest weight difference 4.66e-10 (fp32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def make_adapter(base: Path, folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, use_dora=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(folder)


def peft_path(adapter: Path, base: Path):
    """What eval did before issue 23."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base, dtype="float32")
    state = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model."
    state = {"base_model.model." + k[len(prefix) :]: v for k, v in state.items()}
    peft_model = PeftModel(model, PeftConfig.from_pretrained(adapter))
    set_peft_model_state_dict(peft_model, state)
    return peft_model.merge_and_unload()


def reforge_path(adapter: Path, base: Path):
    import torch

    from reforge.eval.model import _load_adapter_merged

    return _load_adapter_merged(adapter, base, dtype=torch.float32, allow_pickle=False, remote={})


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, default=Path("~/.cache/reforge-models/SmolLM2-135M-Instruct").expanduser())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "psi"
        make_adapter(args.base, adapter)
        times: dict[str, list[float]] = {"peft": [], "reforge": []}
        models = {}
        for _ in range(args.repeats):
            for name, load in (("peft", peft_path), ("reforge", reforge_path)):
                started = time.perf_counter()
                models[name] = load(adapter, args.base)
                times[name].append(time.perf_counter() - started)
    peft_weights = dict(models["peft"].named_parameters())
    with torch.no_grad():
        diff = max(float((p - peft_weights[n]).abs().max()) for n, p in models["reforge"].named_parameters())
    print(f"load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
    for name, values in times.items():
        print(f"{name:8s} median {statistics.median(values):.2f} s  min {min(values):.2f}  max {max(values):.2f}")
    print(f"largest |reforge - peft| weight difference: {diff:.3g}")


if __name__ == "__main__":
    main()
