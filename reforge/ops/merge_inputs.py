"""The inputs of a merge, opened and checked: base, the retriever (full or peft LoRA) or a delta, and the knowledge
adapters, with how each output tensor (canonical name) maps onto them. Nothing is read but headers and records;
every check runs before the first tensor is read or written. Used by `reforge.ops.merge`, `reforge.ops.verify`
and `reforge.tune`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reforge.errors import InvalidOptionError, LayoutMismatchError, short_path
from reforge.io.adapter import LoraAdapter, open_adapter
from reforge.io.checkpoint import AdapterCheckpoint, Checkpoint, open_checkpoint, open_model
from reforge.io.keymap import extra_rows
from reforge.ops.chat import apply_head_rule
from reforge.ops.delta import DeltaCheckpoint
from reforge.ops.job import Access, check_source


@dataclass(frozen=True)
class MergeInputs:
    """The opened inputs of a merge and how output keys (canonical names) map onto them."""

    base: Checkpoint
    base_keys: dict[str, str]
    retriever: Checkpoint | None
    retriever_adapter: LoraAdapter | None
    delta: DeltaCheckpoint | None
    adapters: list[tuple[LoraAdapter, float]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    stored_names: dict[str, str]

    def has_delta(self, key: str) -> bool:
        """Whether Delta may be non-zero at output tensor ``key``: a LoRA retriever changes only its modules, a
        delta only the tensors it does not record as zero, a full retriever any tensor."""
        if self.delta is not None:
            return key not in self.delta.zero
        return self.retriever_adapter is None or key in self.retriever_adapter.modules

    def adapted(self, key: str) -> list[tuple[LoraAdapter, float]]:
        """The knowledge adapters that change output tensor ``key`` (alpha not 0), with their alphas."""
        return [(adapter, alpha) for adapter, alpha in self.adapters if alpha != 0 and key in adapter.modules]

    def fingerprints(self) -> dict[str, Any]:
        """What identifies each input: the sampled content fingerprint of the base, the retriever (full or LoRA)
        and each adapter (``adapters``, in order), a delta by its plan id. A merge's plan id and tune's record of
        its inputs are made of these."""
        adapter = self.retriever_adapter
        return {
            "base": self.base.provenance.get("fingerprint"),
            "retriever": self.retriever.provenance.get("fingerprint") if self.retriever else None,
            "retriever_adapter": adapter.checkpoint.provenance.get("fingerprint") if adapter else None,
            "delta": self.delta.manifest.get("plan_id") if self.delta else None,
            "adapters": [a.checkpoint.provenance.get("fingerprint") for a, _ in self.adapters],
        }

    def paths(self) -> list[Path]:
        """The folders a merge reads, which its output must stay apart from."""
        adapters = [self.retriever_adapter, *(adapter for adapter, _ in self.adapters)]
        return [c.path for c in (self.base, self.retriever, self.delta) if c is not None] + [
            a.checkpoint.path for a in adapters if a is not None
        ]


def check_options(retriever, delta, adapters, beta: float) -> None:
    """Exactly one of ``retriever`` and ``delta``, and finite weights.

    Raises:
        InvalidOptionError: naming the option at fault.
    """
    check_source(retriever, delta)
    for ref, alpha in adapters:
        if not math.isfinite(alpha):
            raise InvalidOptionError(
                f"alpha for adapter {ref} is {alpha}; it must be a finite number.", option="--alpha"
            )
    if not math.isfinite(beta):
        raise InvalidOptionError(f"--beta is {beta}; it must be a finite number.", option="--beta")


def open_inputs(
    base_ref, retriever_ref, delta_ref, adapter_refs, *, access: Access = Access(), keep_lm_head: bool = False
) -> MergeInputs:
    """Open and check every input of a merge (nothing read but headers); used by `merge`, `verify` and `tune`.

    Args:
        base_ref, retriever_ref, delta_ref: the base, and exactly one of the retriever and a delta folder.
        adapter_refs: ``[(adapter, alpha), ...]``.
        access: how the inputs are opened (Hub token, pickle allowed).
        keep_lm_head: RE-Adapt of a chat model (see `reforge.ops.chat`).

    Raises:
        the errors `reforge.ops.merge.merge` lists, before any tensor is read.
    """
    token, allow_pickle = access.token, access.allow_pickle
    base = open_model(base_ref, token=token, allow_pickle=allow_pickle)
    if delta_ref is None:
        opened = open_checkpoint(retriever_ref, token=token, allow_pickle=allow_pickle)
        apply_head_rule(base, opened, keep_lm_head)
    elif keep_lm_head:
        base.layout = replace(base.layout, keep_head=True)
    base_keys = base.canonical_keys()
    base_shapes = {k: base.index.tensors[v].shape for k, v in base_keys.items()}
    retriever = retriever_adapter = delta = None
    if delta_ref is not None:
        delta = DeltaCheckpoint.open(delta_ref)
        delta.check_base(base.provenance)
        _check_delta_head(delta, keep_lm_head)
        shapes = delta.shapes
        dtypes = {k: delta.manifest.get("retriever_dtypes", {}).get(k, delta.manifest["dtype"]) for k in shapes}
        _check_delta_files(delta)
        # the retriever's own names: its key prefix, or (a chat model's delta) the CausalLM layout the base has
        prefix = delta.manifest.get("retriever_prefix") or ""
        stored = {k: base.layout.stored(k) if keep_lm_head else prefix + k for k in shapes}
    else:
        if isinstance(opened, AdapterCheckpoint):
            retriever_adapter = LoraAdapter(opened)
            retriever_adapter.check_shapes(base_shapes)
            shapes = dict(base_shapes)
            dtypes = {k: base.index.tensors[v].dtype for k, v in base_keys.items()}
            stored = {k: k for k in shapes}
        else:
            retriever = opened
            retriever_keys = retriever.canonical_keys()
            shapes = {k: retriever.index.tensors[v].shape for k, v in retriever_keys.items()}
            dtypes = {k: retriever.index.tensors[v].dtype for k, v in retriever_keys.items()}
            stored = dict(retriever_keys)
            _check_retriever_against_base(base, retriever, retriever_keys, base_shapes)
    adapters = [
        (
            open_adapter(
                ref, base, base_shapes, into_shapes=shapes, into="the retriever", token=token, allow_pickle=allow_pickle
            ),
            alpha,
        )
        for ref, alpha in adapter_refs
    ]
    return MergeInputs(base, base_keys, retriever, retriever_adapter, delta, adapters, shapes, dtypes, stored)


def _check_delta_head(delta: DeltaCheckpoint, keep_lm_head: bool) -> None:
    """A delta made with --keep-lm-head is merged with it, and only such a delta (explicit either way)."""
    made_with = bool(delta.manifest.get("keep_lm_head"))
    if made_with != keep_lm_head:
        raise InvalidOptionError(
            f"{short_path(delta.path)} was made {'with' if made_with else 'without'} --keep-lm-head "
            f"(RE-Adapt of a chat model); merge it {'with' if made_with else 'without'} it too.",
            option="--keep-lm-head",
        )


def _check_delta_files(delta: DeltaCheckpoint) -> None:
    """Every tensor the manifest promises must be in the files (dense, or both factors), checked up front."""
    from reforge.ops.delta import factor_keys

    stored = set(delta.index.tensors)
    for key in delta.shapes:
        names = factor_keys(key) if key in delta.factored else () if key in delta.zero else (key,)
        missing = [n for n in names if n not in stored]
        if missing:
            raise LayoutMismatchError(
                f"{short_path(delta.path)} lists {key!r} but holds no tensor {missing[0]!r}.",
                hint="The delta folder is damaged; run `reforge diff` again.",
                left=str(delta.path),
                right=None,
                tensor=key,
                details={},
            )


def _check_retriever_against_base(
    base: Checkpoint, retriever: Checkpoint, retriever_keys: dict[str, str], base_shapes: dict[str, tuple]
) -> None:
    for key, stored in retriever_keys.items():
        shape = retriever.index.tensors[stored].shape
        if key in base_shapes and extra_rows(key, base_shapes[key], shape) is None:
            raise LayoutMismatchError(
                f"tensor {key!r} is {list(base_shapes[key])} in base {base.ref} but "
                f"{list(shape)} in retriever {retriever.ref}.",
                hint="Is this retriever trained from this base?",
                left=base.ref,
                right=retriever.ref,
                tensor=key,
                details={},
            )


def check_base_values(source: MergeInputs, beta: float) -> None:
    """The missing-key rule: every value the formula needs from the base must be there.

    Where the base has no value (a tensor only the retriever has, such as a BERT pooler, or embedding rows of
    tokens added to the retriever), Delta is the retriever's own value (the base is taken as zero; see `diff`).
    That reproduces the retriever at beta = 1. At any other beta it would write beta times a trained tensor, a
    number no formula of the method asks for, so it is refused rather than written silently.

    Raises:
        LayoutMismatchError: naming the first such tensor.
    """
    retriever_only = set(source.delta.manifest.get("retriever_only") or []) if source.delta else None
    for key, shape in source.shapes.items():
        stored = source.base_keys.get(key)
        base_shape = source.base.index.tensors[stored].shape if stored is not None else None
        if base_shape is None:
            if beta == 1 and (retriever_only is None or key in retriever_only):
                continue
            lacks = "the base has no such tensor"
        elif beta != 1 and base_shape[0] < shape[0]:
            lacks = f"the base has only {base_shape[0]} of its {shape[0]} rows (tokens added to the retriever)"
        else:
            continue
        raise LayoutMismatchError(
            f"tensor {key!r}: {lacks}, so base + {beta:g} * Delta has no base value there.",
            hint="Use --beta 1 (the retriever's values are kept there), or a base with the same tensors and "
            "vocabulary.",
            left=source.base.ref,
            right=None,
            tensor=key,
            details={"beta": beta},
        )
