"""A peft LoRA/DoRA adapter: opened and checked against the base it changes, and folded into dense per-tensor
updates, exactly, in fp32, one module at a time.

For a module with base weight W (out, in), LoRA factors A (r, in), B (out, r) and scale s (lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA):
- LoRA:  Psi = s * B @ A                         (transposed for ``fan_in_fan_out`` layers such as GPT-2's Conv1D)
- DoRA:  V = W + s * B @ A;  W' = (m / ||V||_row)[:, None] * V;  Psi = W' - W
  where ||V||_row is the L2 norm over the input dimension (one value per output row) and m is
  ``lora_magnitude_vector``. This is peft's merge, computed in fp32 instead of the weight's dtype.
Embedding LoRA (``lora_embedding_A/B``): Psi = s * (B @ A)^T.

The one home of both (issue 23): merge and inspect (`reforge.ops`), and eval's in-memory merge of an adapter over
its base (`reforge.eval.model`), open an adapter with `open_adapter` and fold it with `LoraAdapter.psi` /
`Factors.add_to`; `reforge.ops.fold` re-exports them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reforge.errors import AdapterError, ProvenanceMismatchError, short_path
from reforge.io.checkpoint import AdapterCheckpoint, Checkpoint, open_checkpoint
from reforge.io.keymap import PEFT_PREFIX, detect_layout
from reforge.io.manifest import read_training_record

if TYPE_CHECKING:
    import torch

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
    ".lora_embedding_A": "EA",
    ".lora_embedding_B": "EB",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: which base tensor it changes (canonical key) and where its factors are stored."""

    target: str
    a_key: str
    b_key: str
    magnitude_key: str | None
    scale: float
    fan_in_fan_out: bool = False
    embedding: bool = False


class LoraAdapter:
    """The modules of a peft LoRA/DoRA adapter, keyed by the canonical name of the base tensor each one changes.

    Raises:
        AdapterError: unsupported adapter type or options, missing factors, a DoRA module without its magnitude
            vector, or trained tensors that are not LoRA factors.
    """

    def __init__(self, checkpoint: AdapterCheckpoint) -> None:
        self.checkpoint = checkpoint
        config = checkpoint.adapter_config
        where = short_path(checkpoint.path)
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(
                f"{where} is a {config.get('peft_type')} adapter; only LoRA and DoRA are supported.",
                path=checkpoint.path,
                tensor=None,
            )
        if config.get("lora_bias"):
            raise AdapterError(
                f"{where} trains LoRA biases (lora_bias), which reforge does not fold yet.",
                path=checkpoint.path,
                tensor=None,
            )
        self.is_dora = bool(config.get("use_dora"))
        groups = self._group_keys(list(checkpoint.index.tensors))
        module_layout = detect_layout([m + ".weight" for m in groups])
        self.modules: dict[str, LoraModule] = {}
        for module, parts in groups.items():
            target = module_layout.canonical(module + ".weight")
            self.modules[target] = self._module(module, parts, target)

    def _group_keys(self, keys: list[str]) -> dict[str, dict[str, str]]:
        groups: dict[str, dict[str, str]] = {}
        for key in keys:
            for suffix, role in _SUFFIXES.items():
                if key.endswith(suffix):
                    module = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
                    groups.setdefault(module, {})[role] = key
                    break
            else:
                raise AdapterError(
                    f"{short_path(self.checkpoint.path)}: tensor {key!r} is not a LoRA factor (modules_to_save and "
                    "trainable tokens are not supported).",
                    path=self.checkpoint.path,
                    tensor=key,
                )
        if not groups:
            raise AdapterError(
                f"{short_path(self.checkpoint.path)} holds no LoRA tensors.", path=self.checkpoint.path, tensor=None
            )
        return groups

    def _module(self, module: str, parts: dict[str, str], target: str) -> LoraModule:
        config = self.checkpoint.adapter_config
        embedding = "EA" in parts or "EB" in parts
        a_key, b_key = (parts.get("EA"), parts.get("EB")) if embedding else (parts.get("A"), parts.get("B"))
        if a_key is None or b_key is None:
            missing = "lora_A" if a_key is None else "lora_B"
            raise AdapterError(
                f"{short_path(self.checkpoint.path)}: module {module!r} has no {missing} tensor.",
                path=self.checkpoint.path,
                tensor=module,
            )
        magnitude = parts.get("m")
        if self.is_dora and magnitude is None and not embedding:
            raise AdapterError(
                f"{short_path(self.checkpoint.path)}: DoRA module {module!r} has no lora_magnitude_vector.",
                hint="The adapter file is incomplete; save it again.",
                path=self.checkpoint.path,
                tensor=module,
            )
        rank = self._rank(module, a_key, b_key)
        alpha = self._number(module, "lora_alpha", config.get("alpha_pattern"), rank)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return LoraModule(target, a_key, b_key, magnitude, scale, bool(config.get("fan_in_fan_out")), embedding)

    def _rank(self, module: str, a_key: str, b_key: str) -> int:
        """The rank the factors have, checked against each other and against the rank the config declares."""
        tensors = self.checkpoint.index.tensors
        a_shape, b_shape = tensors[a_key].shape, tensors[b_key].shape
        rank = a_shape[0] if a_shape else 0
        declared = self._number(module, "r", self.checkpoint.adapter_config.get("rank_pattern"), rank)
        if len(a_shape) != 2 or len(b_shape) != 2 or rank < 1 or b_shape[1] != rank or declared != rank:
            raise AdapterError(
                f"{short_path(self.checkpoint.path)}: module {module!r} has lora_A {list(a_shape)} and lora_B "
                f"{list(b_shape)}, but adapter_config.json declares rank {declared:g}.",
                hint="The adapter's config and tensors disagree; save the adapter again.",
                path=self.checkpoint.path,
                tensor=module,
            )
        return rank

    def _number(self, module: str, field: str, patterns, default: float) -> float:
        """A finite number from adapter_config.json (``r`` or ``lora_alpha``, per-module pattern first)."""
        value = self.checkpoint.adapter_config.get(field, default)
        if isinstance(patterns, dict):
            value = _pattern_value(patterns, module, value)
        elif patterns is not None:  # a pattern table that is not a table: report it as the value
            value = patterns
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise AdapterError(
                f"{short_path(self.checkpoint.path)}/adapter_config.json: {field} for module {module!r} is "
                f"{value!r}, not a finite number.",
                hint="Fix adapter_config.json, or save the adapter again.",
                path=self.checkpoint.path,
                tensor=module,
            )
        return float(value)

    def factors(self, target: str, read: Callable[[str], "torch.Tensor"]) -> "Factors":
        """Read the factors of the module that changes ``target`` (fp32), ready to add Psi block by block."""
        module = self.modules[target]
        magnitude = read(module.magnitude_key).float().reshape(-1) if module.magnitude_key else None
        return Factors(module, read(module.a_key).float(), read(module.b_key).float(), magnitude)

    def psi(
        self, target: str, read: Callable[[str], "torch.Tensor"], base_weight: "torch.Tensor | None"
    ) -> "torch.Tensor":
        """The whole dense fp32 update Psi for canonical tensor ``target``.

        Args:
            read: reads a tensor of this adapter by stored key (a `ShardReader.get`).
            base_weight: the base tensor (DoRA needs it; it is also checked against the factors' shapes).
        """
        import torch

        factors = self.factors(target, read)
        if base_weight is not None:
            self._check_shapes(factors.module, tuple(factors.a.shape), tuple(factors.b.shape), tuple(base_weight.shape))
        shape = tuple(base_weight.shape) if base_weight is not None else factors.shape()
        psi = torch.zeros(shape, dtype=torch.float32)
        factors.add_to(psi, slice(None), base_weight, 1.0)
        return psi

    def check_shapes(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Check every module against the base tensor shapes (from headers, nothing read), before any work.

        Raises:
            AdapterError: a module whose base tensor is missing or whose factors do not fit it.
        """
        tensors = self.checkpoint.index.tensors
        for target, module in self.modules.items():
            if target not in base_shapes:
                raise AdapterError(
                    f"{short_path(self.checkpoint.path)} adapts {target!r}, which the model it is "
                    "applied to does not have.",
                    hint="Is it an adapter for this base?",
                    path=self.checkpoint.path,
                    tensor=target,
                )
            self._check_shapes(module, tensors[module.a_key].shape, tensors[module.b_key].shape, base_shapes[target])
            if module.magnitude_key is not None:
                size = tensors[module.magnitude_key].numel
                rows = base_shapes[target][1 if module.fan_in_fan_out else 0]
                if size != rows:
                    raise AdapterError(
                        f"{short_path(self.checkpoint.path)}: DoRA magnitude of {target!r} has {size} values, but the "
                        f"base tensor has {rows} output rows.",
                        hint="Was the adapter trained on a different base model?",
                        path=self.checkpoint.path,
                        tensor=target,
                    )

    def _check_shapes(self, module: LoraModule, a: tuple, b: tuple, shape: tuple) -> None:
        if module.embedding:
            expected = len(shape) == 2 and (shape[0], shape[1]) == (a[1], b[0])
        else:
            out_dim, in_dim = (shape[1], shape[0]) if module.fan_in_fan_out else shape
            expected = len(shape) == 2 and (b[0], a[1]) == (out_dim, in_dim)
        if not expected:
            raise AdapterError(
                f"{short_path(self.checkpoint.path)}: adapter for {module.target!r} has lora_A {a} and "
                f"lora_B {b}, which do not fit the base tensor of shape {shape}.",
                hint="Was the adapter trained on a different base model?",
                path=self.checkpoint.path,
                tensor=module.target,
            )


@dataclass
class Factors:
    """One module's factors in fp32. `add_to` adds ``alpha * Psi[rows]`` to a block of rows, so that merge can
    work block by block; DoRA's norm is per output row, so a block of rows needs only its own rows."""

    module: LoraModule
    a: "torch.Tensor"
    b: "torch.Tensor"
    magnitude: "torch.Tensor | None"
    _whole: "torch.Tensor | None" = None
    _buffers: tuple | None = None

    def shape(self) -> tuple[int, int]:
        out_dim, in_dim = self.b.shape[0], self.a.shape[1]
        if self.module.embedding:
            return (in_dim, out_dim)
        return (in_dim, out_dim) if self.module.fan_in_fan_out else (out_dim, in_dim)

    def add_to(
        self, out: "torch.Tensor", rows: slice, base_rows: "torch.Tensor | None", alpha: float, scratch=None
    ) -> None:
        """``out += alpha * Psi[rows]``; ``out`` is the fp32 block for ``rows``, ``base_rows`` the base weight's
        same rows (any dtype; needed for DoRA). ``scratch``: the calling thread's buffers (see `_scratch`)."""
        if self.module.embedding or self.module.fan_in_fan_out:
            out += alpha * self._transposed_psi()[rows]
            return
        scale = self.module.scale
        if self.magnitude is None:
            out.addmm_(self.b[rows], self.a, alpha=alpha * scale)
            return
        assert base_rows is not None, "DoRA needs the base weight"
        weight, updated = self._scratch(base_rows.shape, scratch)
        weight.copy_(base_rows)
        torch_addmm(weight, self.b[rows], self.a, scale, out=updated)
        factor = self.magnitude[rows] / torch_norm_rows(updated)
        updated.mul_(factor[:, None]).sub_(weight)
        out.add_(updated, alpha=alpha)

    def _scratch(self, shape, scratch) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Two fp32 buffers for a block: the caller's (``scratch``, a `reforge.ops.stream.Scratch` of the thread
        computing it), or this object's own, reused across blocks (fresh memory per block costs page faults)."""
        import torch

        if scratch is not None:
            return scratch.get("weight", tuple(shape)), scratch.get("updated", tuple(shape))
        count = shape[0] * shape[1]
        if self._buffers is None or self._buffers[0].numel() < count:
            self._buffers = (torch.empty(count), torch.empty(count))
        return self._buffers[0][:count].view(shape), self._buffers[1][:count].view(shape)

    def _transposed_psi(self) -> "torch.Tensor":
        """Psi of an embedding or fan_in_fan_out module, whole (its rows are the product's columns)."""
        if self._whole is None:
            lora = self.module.scale * (self.b @ self.a)
            if self.magnitude is not None:
                raise NotImplementedError("DoRA on fan_in_fan_out layers needs the base weight; use psi()")
            self._whole = lora.T.contiguous()
        return self._whole


def open_adapter(
    ref,
    base: Checkpoint,
    base_shapes: dict[str, tuple],
    *,
    into_shapes: dict[str, tuple] | None = None,
    into: str = "the base",
    token=None,
    allow_pickle: bool = False,
) -> LoraAdapter:
    """Open a knowledge adapter for ``base`` (headers only) and check it against the tensors it will change.

    Args:
        base_shapes: ``{canonical key: shape}`` of ``base``, which the factors must fit.
        into_shapes: the same for what the adapter is added to (``into``, named in errors); default the base.

    Raises:
        AdapterError: not an adapter folder, or it adapts tensors ``shapes`` lacks, or its factors do not fit.
        ProvenanceMismatchError: its training record names a base with another fingerprint.
    """
    checkpoint = open_checkpoint(ref, token=token, allow_pickle=allow_pickle)
    if not isinstance(checkpoint, AdapterCheckpoint):
        raise AdapterError(
            f"{ref} is not a peft adapter folder (no adapter_config.json).",
            hint="Pass the folder `reforge train` wrote.",
            path=checkpoint.path,
            tensor=None,
        )
    adapter = LoraAdapter(checkpoint)
    _check_adapter_base(checkpoint, base)
    lacking = sorted(set(adapter.modules) - set(base_shapes if into_shapes is None else into_shapes))
    if lacking:
        raise AdapterError(
            f"{short_path(checkpoint.path)} adapts {len(lacking)} tensor(s) {into} does not "
            f"have (e.g. {lacking[0]!r}).",
            hint="Was it trained on this base model?",
            path=checkpoint.path,
            tensor=lacking[0],
        )
    adapter.check_shapes(base_shapes)
    return adapter


def _check_adapter_base(checkpoint: AdapterCheckpoint, base: Checkpoint) -> None:
    """Refuse an adapter whose training record names a different base (by content fingerprint)."""
    record = read_training_record(checkpoint.path)
    recorded = record.base_fingerprint if record is not None else None
    found = base.provenance.get("fingerprint")
    if recorded and found and recorded != found:
        raise ProvenanceMismatchError(
            f"{short_path(checkpoint.path)} was trained on base fingerprint {recorded}, but the base given "
            f"({base.ref}) has fingerprint {found}.",
            hint="Pass the base the adapter was trained on.",
            path=checkpoint.path,
            expected=recorded,
            found=found,
        )


def torch_addmm(
    base: "torch.Tensor", b: "torch.Tensor", a: "torch.Tensor", scale: float, out: "torch.Tensor | None" = None
) -> "torch.Tensor":
    """``base + scale * (b @ a)`` in fp32 (into ``out`` when given)."""
    import torch

    return torch.addmm(base, b, a, alpha=scale, out=out)


def torch_norm_rows(matrix: "torch.Tensor") -> "torch.Tensor":
    """L2 norm of each row (over the input dimension), as peft's DoRA ``get_weight_norm`` computes it."""
    import torch

    return torch.linalg.norm(matrix, dim=1)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern lookup: a key matches a module name that ends with it at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
