"""Will it fit, and how long: the GPU memory of a training step and the hours of a run, before renting a GPU.

`plan_memory` counts, from the base's config alone (the model is built on the ``meta`` device: no weight is read):

- ``weights``: every parameter of the base, in the training dtype (bf16 with ``--precision bf16``/``auto`` on a GPU,
  else fp32); tied embeddings count once.
- ``adapter``, ``gradients``, ``optimizer``: the adapter's trainable tensors (per adapted Linear of ``in`` x
  ``out``: ``r (in + out)``, plus ``out`` for DoRA's magnitude), float32 as peft keeps them; their gradients; AdamW's
  two moments (its step counters are one scalar per tensor on the host, not counted).
- ``activations``: what the forward pass saves for backward, per layer and token, plus the loss's. Counted from the
  tensors autograd saves in a decoder layer with the paper's adapter (DoRA with dropout on q, k, v, up, down;
  tests/test_train_plan.py measures them with saved-tensor hooks). Per token and layer, with b the compute dtype's
  bytes (2 under bf16 autocast): ``b (h + 4 m + 4 q)`` for the frozen layer's tensors (the MLP's products, the
  attention's q, k, v and output), ``4 (5 h + heads + 2)`` for what stays float32 whatever b is (the two norms'
  upcast inputs and products, the attention's log-sum-exp), ``b h`` more under bf16 (the norms' casts back); and, per
  adapted Linear, ``b (in + r + 2 out)``: the dropped-out input (none without dropout), A's output, DoRA's base and
  adapter products (none for LoRA). Here h is the hidden size, m the MLP width, q the heads x head dim. q/k norms
  (Qwen3) add ``4 (q + kv + 2 (heads + kv heads))``; Gemma2's two extra norms another norm term. A path that
  computes attention scores saves them too, per document and layer: Gemma2's softcap on ``split`` its capped
  scores (compute dtype), their float32 softmax and the mask, ``heads n^2 (b + 4) + n^2`` bytes; Gemma2's eager
  attention on ``padded`` ``heads n^2 (2 b + 4)``. Outside the layers: RoPE's cos and sin, the final norm's input,
  the float32 log-softmax of the loss, ``4 V`` bytes a token (Gemma2's final logit softcap one logit-sized tensor
  more).
- ``activations_checkpointed`` (``--gradient-checkpointing``): each layer keeps only its input (``h`` a token),
  and one layer's activations exist again while its backward runs.
- ``logits``: the loss's transient tensors beside what is saved: the LM head's output in the compute dtype, its
  float32 copy and the float32 gradient of the log-softmax.

The tokens of one forward pass are the worst case: ``batch_size`` documents of ``max_length`` tokens (the
whole micro-batch goes at once on a GPU). Peak = weights + adapter + gradients + optimizer + activations + logits.
The CUDA caching allocator needs room beyond that (fragmentation, cuBLAS workspaces): `MemoryPlan.fits` asks for
`HEADROOM` of the device's memory spare. ``make gpu-check`` measures the peak of a real step against this plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# share of the device's memory left for the allocator's fragmentation, cuBLAS/cuDNN workspaces and the CUDA context
HEADROOM = 0.10
ADAPTER_BYTES = 4  # peft keeps adapter tensors in float32 (autocast_adapter_dtype) over a bf16 base


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of GPU memory of one training step (module docstring: what each field counts). ``layer_activations``
    is one decoder layer's share of ``activations``; ``tokens`` the tokens of the largest forward pass planned;
    ``dtype_bytes`` the compute dtype's size."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    layer_activations: int
    logits: int
    tokens: int
    dtype_bytes: int

    @property
    def fixed(self) -> int:
        """What does not depend on the tokens: weights, adapter, its gradients and AdamW's moments."""
        return self.weights + self.adapter + self.gradients + self.optimizer

    def peak(self, checkpointing: bool = False) -> int:
        """Predicted peak allocated bytes of a training step."""
        return self.fixed + self.logits + (self.activations_checkpointed if checkpointing else self.activations)

    def fits(self, memory: int, checkpointing: bool = False) -> bool:
        """Whether the peak, with `HEADROOM` of ``memory`` spare, fits a device of ``memory`` bytes."""
        return fits_in(self.peak(checkpointing), memory)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, and both peaks."""
        return {**asdict(self), "peak": self.peak(False), "peak_checkpointed": self.peak(True)}


def meta_model(model_config):
    """The causal LM of ``model_config`` on the ``meta`` device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def plan_memory(
    model_config,
    *,
    target_modules: Sequence[str],
    r: int,
    use_dora: bool = True,
    lora_dropout: float = 0.05,
    batch_size: int = 4,
    max_length: int = 1024,
    bf16: bool = True,
    attention: str = "split",
    model=None,
) -> MemoryPlan:
    """The memory of one training step of ``model_config`` (a transformers config) with these options.

    Args:
        model_config: the base's config.
        target_modules, r, use_dora, lora_dropout: the adapter (`reforge.train.config.TrainConfig`'s fields).
        batch_size, max_length: a forward pass holds ``batch_size`` documents of at most ``max_length`` tokens.
        bf16: weights and activations in bfloat16 (float32 otherwise).
        attention: the attention path (`reforge.train.attention.AttentionPlan.path`); ``padded`` and Gemma2's
            softcap on ``split`` count the attention scores.
        model: the model already built on ``meta`` (`meta_model`), to skip building it again.

    Returns:
        A `MemoryPlan`.
    """
    model = model if model is not None else meta_model(model_config)
    b = 2 if bf16 else 4
    weights = sum(p.numel() for p in model.parameters()) * b
    adapted = _adapted_linears(model, target_modules)
    adapter_numel = sum(r * (i + o) + (o if use_dora else 0) for i, o in adapted)
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    h, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    q, kv, m = heads * head_dim, kv_heads * head_dim, text.intermediate_size
    vocab = text.vocab_size
    # bytes a token, per layer: the norms work in float32 whatever the compute dtype (HF's RMSNorm upcasts), and
    # under bf16 also keep their output's bf16 cast
    norm = 4 * (5 * h + 2) + (h * b if b < 4 else 0)
    per_layer = b * (h + 4 * m + 4 * q) + 4 * heads + norm
    per_layer += b * sum((i if lora_dropout > 0 else 0) + r + (2 * o if use_dora else 0) for i, o in adapted) // layers
    model_type = getattr(text, "model_type", "")
    if model_type.startswith("qwen3"):
        per_layer += 4 * (q + kv + 2 * (heads + kv_heads))
    if model_type.startswith("gemma2") or model_type.startswith("gemma3"):
        per_layer += norm  # two more norms
    tokens = batch_size * max_length
    scores = 0
    if attention == "padded" and model_type == "gemma2":  # its eager attention: capped scores, softmax, its cast
        scores = heads * max_length**2 * batch_size * (2 * b + 4)
    elif getattr(text, "attn_logit_softcapping", None):  # split's softcap: capped scores, float32 softmax, mask
        scores = heads * max_length**2 * batch_size * (b + 4) + max_length**2 * batch_size
    layer_bytes = per_layer * tokens + scores
    loss_saved = 4 * vocab * tokens + 8 * tokens  # float32 log-softmax and the targets
    if getattr(text, "final_logit_softcapping", None):  # Gemma2 caps the logits: tanh's output is saved
        loss_saved += vocab * tokens * b
    rotary = 2 * head_dim * tokens * b  # cos and sin, shared by every layer (inside the recomputed layer with GC)
    final = (h + 1) * tokens * b  # the final norm's input and its rsqrt (the frozen LM head saves no input)
    activations = layers * layer_bytes + loss_saved + rotary + final
    checkpointed = layers * h * tokens * b + layer_bytes + rotary + loss_saved + final
    logits = vocab * tokens * (b + 4 + 4)
    return MemoryPlan(
        weights=weights,
        adapter=adapter_numel * ADAPTER_BYTES,
        gradients=adapter_numel * ADAPTER_BYTES,
        optimizer=2 * adapter_numel * ADAPTER_BYTES,
        activations=activations,
        activations_checkpointed=checkpointed,
        layer_activations=layer_bytes,
        logits=logits,
        tokens=tokens,
        dtype_bytes=b,
    )


def _adapted_linears(model, target_modules: Sequence[str]) -> list[tuple[int, int]]:
    """``(in, out)`` of every Linear the adapter wraps (the rule of `reforge.train.dora._check_targets`)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lm_head" in name:
            continue
        if any(name == t or name.endswith("." + t) for t in target_modules):
            found.append((module.in_features, module.out_features))
    return found


def fits_in(peak: int, memory: int) -> bool:
    """Whether ``peak`` bytes, with `HEADROOM` of ``memory`` spare, fit a device of ``memory`` bytes."""
    return peak <= memory * (1 - HEADROOM)


def plan_hours(tokens: int, tokens_per_s: float | None) -> float | None:
    """Hours to train ``tokens`` input tokens at ``tokens_per_s`` (None when no throughput is given)."""
    if not tokens_per_s:
        return None
    return tokens / tokens_per_s / 3600
