"""DoRA's weight norm once per optimizer step (reforge.train.weight_norm): the same training as peft's own layers."""

from __future__ import annotations

import pytest
import torch

from reforge.train.weight_norm import step_cached_weight_norm

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def dora_model(lighten: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.05, use_dora=True, target_modules=TARGETS, init_lora_weights="gaussian"
        ),
    )
    changed = step_cached_weight_norm(model) if lighten else 0
    return model, changed


def train(model, steps: int = 3, passes: int = 2):
    """``steps`` AdamW steps of ``passes`` forward/backward passes each (gradient accumulation); the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    data = torch.randint(0, 64, (steps, passes, 2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks for both models
    model.train()
    losses, norms = [], []
    for step in data:
        for ids in step:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(float(loss.detach()))
            norms.append(first_dora(model).__dict__.get("_reforge_norm"))
        optimizer.step()
        optimizer.zero_grad()
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def first_dora(model):
    from peft.tuners.lora.dora import DoraLinearLayer

    return next(m for m in model.modules() if type(m) is DoraLinearLayer)


def test_cached_norm_trains_exactly_like_peft():
    plain, _ = dora_model(lighten=False)
    light, changed = dora_model(lighten=True)
    assert changed == 2 * len(TARGETS)
    losses, _, weights = train(plain)
    light_losses, norms, light_weights = train(light)
    assert light_losses == pytest.approx(losses, rel=1e-6)
    assert losses[-1] != losses[0]
    for name, value in weights.items():
        torch.testing.assert_close(light_weights[name], value, rtol=1e-5, atol=1e-7, msg=name)
    # computed once per step: the second pass of a step reuses the first's norm; the next step recomputes it
    assert norms[0][3] is norms[1][3] and norms[2][3] is not norms[1][3] and norms[2][3] is norms[3][3]


def test_merge_time_norm_is_peft_s_own():
    light, _ = dora_model(lighten=True)
    layer = first_dora(light)
    weight, lora = torch.randn(8, 32), torch.randn(8, 32)
    expected = torch.linalg.norm(weight + 2.0 * lora, dim=1)
    torch.testing.assert_close(layer.get_weight_norm(weight, lora, 2.0), expected)  # no adapter name: uncached
