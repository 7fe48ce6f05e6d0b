"""`verify`'s independent check: expected tensors recomputed from the input files by a plain formula.

Nothing here is shared with the merge path (`reforge.ops.merge`, `reforge.ops.fold`, `reforge.io.reader`,
`reforge.io.keymap`): inputs are read with the safetensors library (`reforge.io.plain`; an adapter's config with
`reforge.io.adapter_config`), names are matched by
suffix, and the formula is written out once, in float64, on whole tensors:

    expected = base + beta * (retriever - base) + sum_i alpha_i * Psi_i      (retriever given; = retriever at beta 1)
    expected = base + beta * Delta + sum_i alpha_i * Psi_i                   (a delta folder, or a LoRA retriever)
    Psi (LoRA) = s * B @ A;  Psi (DoRA) = m / ||W + s * B @ A||_row * (W + s * B @ A) - W;  s = lora_alpha / r

so that a bug in the merge path cannot verify itself. What cannot be recomputed this way (pickle inputs, DoRA on
``fan_in_fan_out`` layers) is reported by name, never counted as checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reforge.io.adapter_config import is_adapter, read_adapter_config
from reforge.io.manifest import Manifest, read_manifest
from reforge.io.plain import PlainReader

if TYPE_CHECKING:
    import torch

_MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


@dataclass
class Recheck:
    """Per tensor: ``checked[name] = (max |stored - expected|, tolerance)``; ``not_recomputed[name] = reason``."""

    checked: dict[str, tuple[float, float]] = field(default_factory=dict)
    not_recomputed: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [f"{n}: |stored - expected| = {e:.3g} > {t:.3g}" for n, (e, t) in self.checked.items() if not e <= t]


class PlainAdapter:
    """A peft adapter folder read plainly: its config and its factors by module-name suffix."""

    def __init__(self, folder: Path) -> None:
        self.reader = PlainReader(folder)
        self.config = read_adapter_config(folder)

    def psi(self, name: str, weight: "torch.Tensor | None") -> "torch.Tensor | str | None":
        """Psi for output tensor ``name`` (float64), None when the adapter does not touch it, or why it cannot."""
        stem = name.removesuffix(".weight")
        a_name = _match(self.reader.names, stem + ".lora_A.weight") or _match(
            self.reader.names, stem + ".lora_embedding_A"
        )
        if a_name is None:
            return None
        embedding = a_name.endswith("lora_embedding_A")
        module = a_name.removesuffix(".lora_embedding_A" if embedding else ".lora_A.weight")
        b_name = module + (".lora_embedding_B" if embedding else ".lora_B.weight")
        a, b = self.reader.get(a_name).double(), self.reader.get(b_name).double()
        rank = a.shape[0]
        alpha = _pattern(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        update = scale * (b @ a)
        if embedding or self.config.get("fan_in_fan_out"):
            update = update.T
        magnitude = next((module + s for s in _MAGNITUDE if module + s in self.reader.files), None)
        if magnitude is None:
            return update
        if self.config.get("fan_in_fan_out") or embedding or weight is None:
            return "DoRA on this layer is not recomputed independently"
        combined = weight + update
        m = self.reader.get(magnitude).double().reshape(-1)
        return (m / combined.norm(dim=1))[:, None] * combined - weight


def recheck_merge(folder: Path, names: list[str], inputs: Any, resolve) -> Recheck:
    """Recompute output tensors ``names`` of the merged ``folder`` from ``inputs`` (a completed
    `reforge.ops.verify.VerifyInputs`: base, retriever or delta, adapters, beta; refs turned into folders by
    ``resolve``) and compare them with what ``folder`` stores."""
    result = Recheck()
    output, base = PlainReader(folder), PlainReader(resolve(inputs.base))
    adapters = [(PlainAdapter(resolve(ref)), alpha) for ref, alpha in inputs.adapters]
    source = _Source(inputs, resolve)
    for reader, role in [(base, "base"), *[(a.reader, "adapter") for a, _ in adapters], *source.readers()]:
        if not reader.names:
            result.not_recomputed = dict.fromkeys(names, f"the {role} has no safetensors weights (pickle)")
            return result
    for name in names:
        expected = _expected(name, base, source, adapters, inputs.beta)
        if isinstance(expected, str):
            result.not_recomputed[name] = expected
            continue
        stored = output.get(name)
        if tuple(stored.shape) != tuple(expected.shape):
            result.checked[name] = (math.inf, 0.0)
            continue
        result.checked[name] = _compare(stored, expected)
    return result


def recheck_adapter_delta(folder: Path, names: list[str], base_dir: Path, adapter_dir: Path, manifest: dict) -> Recheck:
    """A delta folder computed from a LoRA retriever: each Delta against the adapter folded by the plain formula,
    within the rounding `diff` recorded for it."""
    import torch

    result = Recheck()
    adapter, base, stored = PlainAdapter(Path(adapter_dir)), PlainReader(base_dir), PlainReader(folder)
    if not (adapter.reader.names and base.names):
        result.not_recomputed = dict.fromkeys(names, "the base or the retriever has no safetensors weights (pickle)")
        return result
    factored, zero = set(manifest.get("factored") or []), set(manifest.get("zero") or [])
    for name in names:
        base_name = _match(base.names, name)
        weight = base.get(base_name).double() if base_name else None
        psi = adapter.psi(name, weight)
        if isinstance(psi, str):
            result.not_recomputed[name] = psi
            continue
        shape = tuple(manifest["shapes"][name])
        expected = torch.zeros(shape, dtype=torch.float64) if psi is None else psi
        if name in zero:
            value = torch.zeros(shape, dtype=torch.float32)
        elif name in factored:
            stem = name.removesuffix(".weight")
            value = stored.get(stem + ".lora_B.weight").float() @ stored.get(stem + ".lora_A.weight").float()
        else:
            value = stored.get(name)
        error, tolerance = _compare(value, expected)
        recorded = ((manifest.get("records") or {}).get(name) or {}).get("max_abs_rounding", 0.0)
        result.checked[name] = (error, max(tolerance, 1.01 * recorded + tolerance))
    return result


def _expected(name: str, base: PlainReader, source: "_Source", adapters, beta: float):
    base_name = _match(base.names, name)
    weight = base.get(base_name).double() if base_name else None
    if source.retriever is not None:
        value = source.retriever.get(name).double()
        if beta != 1:
            padded = _padded(weight, value.shape)
            value = padded + beta * (value - padded)
    else:
        delta = source.delta_value(name, weight)
        if isinstance(delta, str):
            return delta
        value = _padded(weight, delta.shape) + beta * delta
    for adapter, alpha in adapters:
        psi = adapter.psi(name, weight)
        if isinstance(psi, str):
            return psi
        if psi is not None and alpha != 0:
            value = value + alpha * psi
    return value


class _Source:
    """The retriever (full), or where Delta comes from: a delta folder or a LoRA retriever."""

    def __init__(self, inputs: Any, resolve) -> None:
        self.retriever = self.delta = self.adapter = None
        if inputs.delta:
            folder = resolve(inputs.delta)
            self.delta, self.manifest = PlainReader(folder), (read_manifest(folder) or Manifest(folder, {})).data
            return
        folder = resolve(inputs.retriever)
        if is_adapter(folder):
            self.adapter = PlainAdapter(folder)
        else:
            self.retriever = PlainReader(folder)

    def readers(self) -> list[tuple[PlainReader, str]]:
        if self.retriever is not None:
            return [(self.retriever, "retriever")]
        return [(self.delta, "delta")] if self.delta is not None else [(self.adapter.reader, "retriever")]

    def delta_value(self, name: str, weight: "torch.Tensor | None"):
        import torch

        if self.adapter is not None:
            psi = self.adapter.psi(name, weight)
            return torch.zeros_like(weight) if psi is None and weight is not None else psi
        stored = _match(self.delta.names, name)
        if stored is not None:
            return self.delta.get(stored).double()
        zero = [k for k in self.manifest.get("zero", []) if k == name or name.endswith("." + k)]
        if zero:
            return torch.zeros(self.manifest["shapes"][zero[0]], dtype=torch.float64)
        stem = name.removesuffix(".weight")
        a_name = _match(self.delta.names, stem + ".lora_A.weight")
        if a_name is None:
            return f"the delta holds no tensor for {name!r}"
        b_name = a_name.removesuffix(".lora_A.weight") + ".lora_B.weight"
        return self.delta.get(b_name).double() @ self.delta.get(a_name).double()


def _compare(stored: "torch.Tensor", expected: "torch.Tensor") -> tuple[float, float]:
    """Max |stored - expected| and the tolerance: one rounding to the stored dtype, plus fp32 arithmetic slack."""
    import torch

    if stored.numel() == 0:
        return 0.0, 0.0
    scale = float(expected.abs().max())
    eps = float(torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 0.0
    error = float((stored.double() - expected).abs().max())
    return error, (eps + 1e-6) * scale


def _padded(weight: "torch.Tensor | None", shape) -> "torch.Tensor":
    """The base weight with zero rows where the retriever has more (added tokens), or zeros without a base."""
    import torch

    padded = torch.zeros(tuple(shape), dtype=torch.float64)
    if weight is not None:
        padded[: weight.shape[0]] = weight
    return padded


def _match(names: list[str], name: str) -> str | None:
    """The stored name for ``name``: itself, or the shortest name that ends with it (or that it ends with) at a
    dot, which maps ``layers.0.x`` onto ``model.layers.0.x`` and back."""
    if name in names:
        return name
    found = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    return min(found, key=len) if found else None


def _pattern(patterns: dict, module: str, default: float) -> float:
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return float(value)
    return float(default)
