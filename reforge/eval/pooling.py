"""Token vectors -> one vector per text: the pooling modes, and the modules a sentence-transformers folder applies
after pooling (Dense, Normalize), computed the way sentence-transformers computes them.

A profile's ``pooling`` is one mode or several joined by ``+`` (concatenated in that order, as sentence-transformers
concatenates a list of modes). Its ``modules`` are applied next, then ``normalize``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reforge.errors import UnsupportedModelError, short_path

# activation functions a Dense module may name (sentence-transformers stores the torch class path)
_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}


def pool(hidden: Any, mask: Any, pooling: str, normalize: bool) -> Any:
    """One float32 vector per row of ``hidden`` (batch, tokens, dim).

    Modes: ``mean`` (over tokens whose mask is 1), ``cls`` (first unmasked token), ``last`` (last unmasked token),
    ``max``, ``mean_sqrt_len`` (sum / sqrt(length)), ``weightedmean`` (token i weighted by its position i + 1);
    ``a+b`` concatenates. Every mode reads the mask, so left and right padding give the same vectors.
    """
    import torch

    hidden = hidden.float()
    vectors = torch.cat([_pool_one(hidden, mask, mode) for mode in pooling.split("+")], dim=-1)
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
    return vectors


def _pool_one(hidden: Any, mask: Any, mode: str) -> Any:
    import torch

    rows = torch.arange(hidden.shape[0], device=hidden.device)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode in ("mean", "mean_sqrt_len"):
        count = weights.sum(1).clamp(min=1e-9)
        return (hidden * weights).sum(1) / (count if mode == "mean" else count.sqrt())
    if mode == "cls":
        return hidden[rows, mask.to(torch.int64).argmax(1)]
    if mode == "last":
        return hidden[rows, mask.shape[1] - 1 - mask.flip(1).to(torch.int64).argmax(1)]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(1).values
    if mode == "weightedmean":
        first = mask.to(torch.int64).argmax(1, keepdim=True)  # left padding: the first real token has weight 1
        positions = torch.arange(1, mask.shape[1] + 1, device=hidden.device).unsqueeze(0) - first
        position_weights = weights * positions.unsqueeze(-1).to(hidden.dtype)
        return (hidden * position_weights).sum(1) / position_weights.sum(1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {mode!r}")


@dataclass
class Dense:
    """A sentence-transformers Dense module: ``activation(x @ weight.T + bias)``."""

    weight: Any
    bias: Any
    activation: str

    def __call__(self, vectors: Any) -> Any:
        import torch

        out = torch.nn.functional.linear(vectors, self.weight, self.bias)
        if self.activation == "tanh":
            return torch.tanh(out)
        if self.activation == "relu":
            return torch.relu(out)
        if self.activation == "gelu":
            return torch.nn.functional.gelu(out)
        if self.activation == "sigmoid":
            return torch.sigmoid(out)
        return out


def load_modules(model_dir: Path, steps: tuple[str, ...], device: Any = "cpu") -> list[Any]:
    """The post-pooling steps of a profile as callables (float32, on ``device``).

    Raises:
        UnsupportedModelError: a Dense folder that is missing, has no safetensors weights, or an option (residual,
            another input, an activation) reforge does not implement.
    """
    import torch

    loaded: list[Any] = []
    for step in steps:
        if step == "normalize":
            loaded.append(lambda v: torch.nn.functional.normalize(v, p=2, dim=-1))
        elif step.startswith("dense:"):
            loaded.append(_load_dense(model_dir / step[len("dense:") :], device))
        else:
            raise UnsupportedModelError(f"Unknown encoding step {step!r}.", path=model_dir, reason=step)
    return loaded


def _load_dense(folder: Path, device: Any) -> Dense:
    from reforge.io.paths import inside_checkpoint
    from reforge.io.tensors import load_tensors

    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UnsupportedModelError(
            f"The Dense module {short_path(folder)} has no config.json and model.safetensors; without it the "
            f"embeddings would be wrong.",
            hint="Copy the module folder from the original sentence-transformers model (a pickle "
            "pytorch_model.bin is not read).",
            path=folder,
            reason="dense weights missing",
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    activation = _ACTIVATIONS.get(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    odd = [k for k in ("use_residual",) if config.get(k)] + [
        k for k in ("module_input_name", "module_output_name") if config.get(k) not in (None, "sentence_embedding")
    ]
    if activation is None or odd:
        raise UnsupportedModelError(
            f"The Dense module {short_path(folder)} uses "
            f"{odd[0] if odd else 'activation ' + repr(config.get('activation_function'))}, which reforge does "
            f"not implement.",
            path=folder,
            reason="dense option",
        )
    inside_checkpoint(folder.parent, weights_file, what="Dense module weights")  # merge's rule for links
    state = load_tensors(weights_file)
    weight = state.get("linear.weight")
    if weight is None:
        raise UnsupportedModelError(
            f"{short_path(weights_file)} has no tensor 'linear.weight'.", path=folder, reason="dense weights"
        )
    bias = state.get("linear.bias")
    return Dense(weight.float().to(device), bias.float().to(device) if bias is not None else None, activation)
