"""`merge`: base + sum_i alpha_i * Psi_i + beta * Delta, tensor by tensor, in the retriever's layout.

Each output tensor is computed in fp32 from the stored inputs and rounded once to the output dtype:
- with ``retriever`` and beta = 1 the formula is retriever + sum alpha_i * Psi_i (no stored-Delta rounding), and a
  tensor no adapter touches is the retriever's tensor copied bit for bit (alpha = 0 reproduces the retriever);
- with ``retriever`` and beta != 1: base + beta * (retriever - base) + sum alpha_i * Psi_i;
- with ``delta``: base + beta * Delta + sum alpha_i * Psi_i, inheriting the Delta's recorded rounding;
- a peft LoRA retriever (RepLLaMA form) is folded on the fly: Delta = its dense update, zero elsewhere.
Psi_i is folded from adapter i against the *base* weight (DoRA's row norm uses it), exactly as in `ops.fold`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.card import render_chat_card
from reforge.errors import InvalidOptionError, LayoutMismatchError, short_path
from reforge.io.buffers import ALIGNMENT, BufferPool
from reforge.io.checkpoint import AdapterCheckpoint, Checkpoint, open_checkpoint, open_model
from reforge.io.companions import companion_files, output_companions
from reforge.io.format import torch_dtype
from reforge.io.keymap import extra_rows
from reforge.io.manifest import read_training_record
from reforge.io.progress import ProgressFn
from reforge.io.writer import CheckpointWriter, ShardPlan, TensorSpec, plan_id_for
from reforge.ops.chat import apply_head_rule
from reforge.ops.delta import RETRIEVER_FILES, DeltaCheckpoint
from reforge.ops.device import resolve_device
from reforge.ops.diff import overlap
from reforge.ops.fold import Factors, LoraAdapter, open_adapter
from reforge.ops.job import (
    Access,
    PieceWriter,
    WriteOptions,
    check_source,
    check_target,
    dominant_dtype,
    max_rounding,
    streamed,
    writing,
)
from reforge.ops.stream import (
    Accumulator,
    Scratch,
    all_finite,
    check_finite,
    clipped,
    empty,
    import_torch_in_background,
    piece_shape,
    pieces,
    row_blocks,
    shifted,
)

if TYPE_CHECKING:
    import torch

    from reforge.profiles import EncodingProfile

PAPER_ALPHA = 0.5  # RE-AdaptIR's weight of a knowledge adapter (base + 0.5 Psi + Delta): each --adapter's default


@dataclass
class MergeReport:
    """What `merge` did (or, with ``dry_run``, would do). ``plan`` maps each output tensor to its terms."""

    output: Path
    tensors: int
    total_size: int
    shards: list[int]
    dtype: str
    changed: int
    dry_run: bool = False
    already_complete: bool = False
    resumed_shards: int = 0
    max_abs_rounding: float = 0.0
    seconds: float = 0.0
    plan: dict[str, list[str]] = field(default_factory=dict)


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


def merge(
    base: str | Path,
    output: str | Path,
    *,
    retriever: str | Path | None = None,
    delta: str | Path | None = None,
    adapters: list[tuple[str | Path, float]] = (),
    beta: float = 1.0,
    corpus: str | None = None,
    keep_lm_head: bool = False,
    write: WriteOptions = WriteOptions(),
    access: Access = Access(),
    progress: ProgressFn | None = None,
    device: str | None = "cpu",
) -> MergeReport:
    """Write the readapted retriever into ``output``.

    Args:
        base: the pretrained LM both the retriever and the adapters start from.
        retriever / delta: exactly one: the retriever (full or peft LoRA), or a delta folder from `diff`.
        adapters: ``[(adapter folder, alpha), ...]`` knowledge adapters (peft LoRA/DoRA trained on ``base``).
        beta: weight of Delta.
        corpus: what the adapters were trained on, for the card (default: from their training records).
        write: dtype (``auto`` keeps each tensor's dtype as the retriever stores it), shard size, overwrite, dry
            run, the command.
        access: Hub token and pickle permission for the inputs.
        keep_lm_head: RE-Adapt of a chat model: the "retriever" (or the delta's) is an instruction-tuned CausalLM
            and the output is a CausalLM with its lm_head (see `reforge.ops.chat`).
        device: where the arithmetic runs: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``;
            see `reforge.ops.device`.

    Raises:
        InvalidOptionError, AdapterError, LayoutMismatchError, ProvenanceMismatchError: checked before any tensor
            is read or written.
    """
    started = time.perf_counter()
    import_torch_in_background()
    _check_options(retriever, delta, adapters, beta)
    write.check()
    check_target(output, [base, retriever, delta, *(ref for ref, _ in adapters)], write)
    source = open_inputs(base, retriever, delta, adapters, access.token, access.allow_pickle, keep_lm_head)
    check_base_values(source, beta)
    plan = {key: _terms(source, key, beta) for key in source.shapes}
    specs = [
        TensorSpec(source.stored_names[k], write.stored(source.dtypes[k]), source.shapes[k]) for k in source.shapes
    ]
    shard_plan = ShardPlan.build(specs, write.max_shard_size)
    report = MergeReport(
        Path(output),
        len(specs),
        shard_plan.total_size,
        shard_plan.shard_sizes(),
        write.stored(dominant_dtype(source.dtypes.values())),
        sum(1 for t in plan.values() if t != ["retriever"]),
        dry_run=write.dry_run,
        plan=plan,
    )
    if write.dry_run:
        return report
    manifest = _manifest(source, beta, write.dtype, write.command, corpus)
    if keep_lm_head:
        manifest["keep_lm_head"] = True
    plan_id = _plan_id(source, beta, specs, write.max_shard_size)
    inputs = _input_paths(source)
    where = resolve_device(device)
    with writing(
        output, specs, plan_id=plan_id, manifest=manifest, options=write, inputs=inputs, progress=progress
    ) as writer:
        report.already_complete, report.resumed_shards = writer.already_complete, writer.resumed_shards
        _add_companions(writer, source, manifest, keep_lm_head)
        if not writer.already_complete:
            _write_tensors(writer, source, beta, specs, where)
    report.max_abs_rounding = max_rounding(writer.records)
    report.seconds = time.perf_counter() - started
    return report


def _plan_id(source: "MergeInputs", beta: float, specs: list[TensorSpec], max_shard_size: int) -> str:
    """What the output depends on: a rerun with the same plan id resumes or is a no-op."""
    adapter = source.retriever_adapter
    return plan_id_for(
        {
            "op": "merge",
            "base": source.base.provenance["fingerprint"],
            "retriever": source.retriever.provenance["fingerprint"] if source.retriever else None,
            "retriever_adapter": adapter.checkpoint.provenance["fingerprint"] if adapter else None,
            "delta": source.delta.manifest.get("plan_id") if source.delta else None,
            "adapters": [(a.checkpoint.provenance["fingerprint"], alpha) for a, alpha in source.adapters],
            "beta": beta,
            "specs": [(s.name, s.dtype, s.shape) for s in specs],
            "shard": max_shard_size,
        }
    )


def _input_paths(source: "MergeInputs") -> list[Path]:
    """The folders a merge reads, which its output must stay apart from."""
    adapters = [source.retriever_adapter, *(adapter for adapter, _ in source.adapters)]
    return [c.path for c in (source.base, source.retriever, source.delta) if c is not None] + [
        a.checkpoint.path for a in adapters if a is not None
    ]


def _check_options(retriever, delta, adapters, beta: float) -> None:
    check_source(retriever, delta)
    for ref, alpha in adapters:
        if not math.isfinite(alpha):
            raise InvalidOptionError(
                f"alpha for adapter {ref} is {alpha}; it must be a finite number.", option="--alpha"
            )
    if not math.isfinite(beta):
        raise InvalidOptionError(f"--beta is {beta}; it must be a finite number.", option="--beta")


def open_inputs(
    base_ref, retriever_ref, delta_ref, adapter_refs, token=None, allow_pickle=False, keep_lm_head=False
) -> MergeInputs:
    """Open and check every input of a merge (nothing read but headers); used by `merge`, `verify` and `tune`.

    Raises:
        the errors `merge` lists, before any tensor is read.
    """
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


def _terms(source: MergeInputs, key: str, beta: float) -> list[str]:
    """Human-readable terms of one output tensor, for --dry-run and the manifest."""
    adapters = [
        f"{alpha:g}*psi[{Path(str(a.checkpoint.ref)).name}]"
        for a, alpha in source.adapters
        if alpha != 0 and key in a.modules
    ]
    if source.retriever is not None and beta == 1:
        return ["retriever", *adapters]
    delta_changes = source.retriever_adapter is None or key in source.retriever_adapter.modules
    if source.delta is not None:
        delta_changes = key not in source.delta.zero
    terms = ["base"] + ([f"{beta:g}*delta"] if delta_changes and beta != 0 else [])
    return terms + adapters


def _write_tensors(
    writer: CheckpointWriter, source: MergeInputs, beta: float, specs: list[TensorSpec], device: "torch.device"
) -> None:
    """Stream every pending tensor piece by piece (`reforge.ops.stream.pieces`) from the inputs to the output,
    computed on ``device`` (a tensor only copied stays on the CPU)."""
    todo = [key for spec, key in zip(specs, source.shapes) if writer.pending(spec.name)]
    spec_of = {key: spec for spec, key in zip(specs, source.shapes)}
    items = [(key, rows) for key in todo for rows in _pieces(source, key)]
    loader = InputLoader(source, beta)

    def compute(item, loaded, scratch):
        (key, rows), spec = item, spec_of[item[0]]
        dtype, skew = torch_dtype(spec.dtype), writer.alignment(spec.name, rows)
        if copied(loaded, beta, dtype):
            return compute_output(source, loaded, key, beta, dtype, loader.pool, skew, rows)
        return scratch.compute(
            lambda here: compute_output(source, here, key, beta, dtype, loader.pool, skew, rows, scratch),
            loaded,
            lambda shape: empty(shape, dtype, loader.pool, skew),
        )

    pieces_out = PieceWriter(writer)
    with streamed(items, loader, compute, device) as results:
        for (key, rows), (stored, error) in results:
            pieces_out.write(spec_of[key].name, stored, rows, error, source.shapes[key][0])


def _pieces(source: MergeInputs, key: str) -> list[slice | None]:
    """A tensor made from a factored Delta (B @ A, computed whole) is streamed whole; any other in pieces."""
    if source.delta is not None and key in source.delta.factored:
        return [None]
    return pieces(source.shapes[key])


@dataclass
class Loaded:
    """The stored inputs of one output tensor, read ahead by the loader thread."""

    retriever: "torch.Tensor | None" = None
    base: "torch.Tensor | None" = None
    delta: "torch.Tensor | None" = None
    retriever_factors: Factors | None = None
    adapters: list[tuple[Factors, float]] = field(default_factory=list)


class InputLoader:
    """Reads what each output tensor needs; one reader per input, used only by the thread calling `load`. Its
    ``pool`` lends the memory of large inputs and outputs, reused from tensor to tensor."""

    def __init__(self, source: MergeInputs, beta: float) -> None:
        self.source, self.beta = source, beta
        self.pool = BufferPool()
        self._factors: tuple[str | None, list, Factors | None] = (None, [], None)  # the last key's, for its pieces

    def __enter__(self) -> "InputLoader":
        source, pool = self.source, self.pool
        self.base = source.base.reader(pool)
        self.retriever = source.retriever.reader(pool) if source.retriever else None
        self.retriever_adapter = source.retriever_adapter.checkpoint.reader(pool) if source.retriever_adapter else None
        self.delta = source.delta.reader(pool) if source.delta else None
        self.adapters = [a.checkpoint.reader(pool) for a, _ in source.adapters]
        return self

    def __exit__(self, *exc: object) -> None:
        for reader in [self.base, self.retriever, self.retriever_adapter, self.delta, *self.adapters]:
            if reader is not None:
                reader.close()

    def load(self, key: str, rows: slice | None = None) -> Loaded:
        """The inputs of output tensor ``key``, or of its rows ``rows`` (a piece; the adapters' factors are read
        once per tensor and shared by its pieces)."""
        source, loaded = self.source, Loaded()
        loaded.adapters, loaded.retriever_factors = self._factors_of(key)
        if source.retriever is not None:
            loaded.retriever = self.retriever.get(source.retriever.layout.stored(key), rows)
        elif source.delta is not None:
            loaded.delta = (
                None
                if key in source.delta.zero
                else source.delta.get(self.delta, key)
                if key in source.delta.factored
                else self.delta.get(key, rows)
            )
        if self._needs_base(loaded) and key in source.base_keys:
            stored = source.base_keys[key]
            loaded.base = self.base.get(stored, clipped(rows, source.base.index.tensors[stored].shape[0]))
        return loaded

    def _factors_of(self, key: str) -> tuple[list[tuple[Factors, float]], Factors | None]:
        source = self.source
        if self._factors[0] != key:
            adapters = [
                (adapter.factors(key, reader.get), alpha)
                for (adapter, alpha), reader in zip(source.adapters, self.adapters)
                if alpha != 0 and key in adapter.modules
            ]
            retriever_factors = None
            if source.retriever is None and source.delta is None and key in source.retriever_adapter.modules:
                retriever_factors = source.retriever_adapter.factors(key, self.retriever_adapter.get)
            self._factors = (key, adapters, retriever_factors)
        return self._factors[1], self._factors[2]

    def _needs_base(self, loaded: Loaded) -> bool:
        dora = any(f.magnitude is not None for f, _ in loaded.adapters)
        return dora or not (self.source.retriever is not None and self.beta == 1)


def compute_output(
    source: MergeInputs,
    loaded: Loaded,
    key: str,
    beta: float,
    dtype: "torch.dtype",
    pool: BufferPool | None = None,
    skew: int = 0,
    piece: slice | None = None,
    scratch: Scratch | None = None,
) -> tuple["torch.Tensor", float]:
    """One output tensor (in ``dtype``), or its rows ``piece`` (``loaded`` then holds the inputs' same rows), and
    its largest rounding |stored - exact fp32|. With ``pool`` and ``skew`` its memory is placed for an O_DIRECT
    write (see `Accumulator`). ``scratch``: the calling thread's fp32 buffers.

    A tensor nothing changes (retriever, beta = 1, no adapter) is the retriever's tensor itself, bit for bit."""
    if copied(loaded, beta, dtype):
        check_finite(all_finite(loaded.retriever), key, "the retriever's tensor holds")
        return _placed(loaded.retriever, pool, skew), 0.0
    shape = piece_shape(source.shapes[key], piece)
    base_rows = loaded.base.shape[0] if loaded.base is not None and loaded.base.dim() else None
    accumulator = Accumulator(shape, dtype, pool, skew, scratch)
    for rows in row_blocks(shape):
        block = accumulator.block(rows)
        covered = overlap(rows, base_rows) if base_rows is not None and base_rows != shape[0] else None
        base = _rows(loaded.base, rows, covered)
        if loaded.retriever is not None:
            block.copy_(loaded.retriever[rows])
            if beta != 1:  # base + beta * (retriever - base); no base beyond its vocabulary
                _sub(block, base, covered)
                block.mul_(beta)
                _add(block, base, covered)
        else:
            _delta_rows_into(block, rows, shifted(rows, piece), loaded, base, scratch)
            if beta != 1:
                block.mul_(beta)
            _add(block, base, covered)
        for factors, alpha in loaded.adapters:
            factors.add_to(block, shifted(rows, piece), base, alpha, scratch)
        accumulator.commit(rows)
    check_finite(accumulator.finite, key, "base + alpha * Psi + beta * Delta is")
    return accumulator.output, accumulator.max_abs_rounding


def copied(loaded: Loaded, beta: float, dtype: "torch.dtype") -> bool:
    """Whether an output (piece) is the retriever's own bytes: beta 1, no adapter, the same dtype. It costs no
    arithmetic but one NaN/Inf check (`all_finite`: one pass at memory speed) and, for an O_DIRECT write, a copy
    to the output's place in a page."""
    return loaded.retriever is not None and beta == 1 and not loaded.adapters and loaded.retriever.dtype == dtype


def _placed(tensor: "torch.Tensor", pool: BufferPool | None, skew: int) -> "torch.Tensor":
    """``tensor``, or a copy of it that starts ``skew`` bytes into a page: a copy in memory costs far less than
    writing it through the page cache (see `reforge.io.writer`)."""
    if pool is None or (tensor.data_ptr() - skew) % ALIGNMENT == 0:
        return tensor
    placed = empty(tuple(tensor.shape), tensor.dtype, pool, skew)
    return placed.copy_(tensor) if placed.data_ptr() % ALIGNMENT == skew else tensor


def _delta_rows_into(block: "torch.Tensor", rows: slice, whole_rows: slice, loaded: Loaded, base, scratch) -> None:
    """Delta's rows into ``block``: ``rows`` of the loaded piece, ``whole_rows`` the same rows of the tensor."""
    if loaded.delta is not None:
        block.copy_(loaded.delta[rows])
    else:
        block.zero_()
        if loaded.retriever_factors is not None:
            loaded.retriever_factors.add_to(block, whole_rows, base, 1.0, scratch)


def _rows(tensor: "torch.Tensor | None", rows: slice, covered: int | None) -> "torch.Tensor | None":
    if tensor is None:
        return None
    if covered is None:
        return tensor[rows]
    return tensor[rows.start : rows.start + covered]


def _sub(block: "torch.Tensor", base: "torch.Tensor | None", covered: int | None) -> None:
    if base is not None:
        (block if covered is None else block[:covered]).sub_(base)


def _add(block: "torch.Tensor", base: "torch.Tensor | None", covered: int | None) -> None:
    if base is not None:
        (block if covered is None else block[:covered]).add_(base)


def _manifest(source: MergeInputs, beta: float, dtype: str, command: str | None, corpus: str | None) -> dict:
    retriever = (
        source.retriever.provenance
        if source.retriever
        else source.retriever_adapter.checkpoint.provenance
        if source.retriever_adapter
        else source.delta.manifest.get("retriever")
    )
    return {
        "kind": "merge",
        "base": source.base.provenance,
        "retriever": retriever,
        "delta": {
            "path": str(source.delta.path.resolve()),
            "plan_id": source.delta.manifest.get("plan_id"),
            "max_abs_rounding": source.delta.manifest.get("max_abs_rounding"),
        }
        if source.delta
        else None,
        "adapters": [
            {**a.checkpoint.provenance, "alpha": alpha, "dora": a.is_dora, "corpus": corpus or _adapter_corpus(a)}
            for a, alpha in source.adapters
        ],
        "beta": beta,
        "dtype": dtype,
        "command": command,
    }


def _adapter_corpus(adapter: LoraAdapter) -> str | None:
    """What the adapter was trained on (its training record's corpus), local paths absolute again: a record names
    them relative to the adapter's folder (`reforge.io.paths.recorded_inputs`), this manifest relative to its own."""
    import os

    from reforge.io.paths import RECORDED_RELATIVE_TO

    record = read_training_record(adapter.checkpoint.path)
    if record is None or record.corpus is None:
        return None
    if record.data.get("paths_relative_to") != RECORDED_RELATIVE_TO:
        return record.corpus
    root = Path(adapter.checkpoint.path).absolute()
    paths = record.corpus.split(", ")
    return ", ".join(p if Path(p).is_absolute() else os.path.normpath(root / p) for p in paths)


def _add_companions(writer: CheckpointWriter, source: MergeInputs, manifest: dict, keep_head: bool = False) -> None:
    if source.delta is not None:
        folder, base_dir = source.delta.path / RETRIEVER_FILES, None
        files = companion_files(folder)
    elif source.retriever_adapter is not None:
        folder, base_dir = source.retriever_adapter.checkpoint.path, source.base.path
        files = output_companions(folder, None, from_base=source.base.path, base_config=source.base.config)
    else:
        folder, base_dir = source.retriever.path, None
        files = output_companions(folder, source.retriever.config, keep_head=keep_head)
    if keep_head:  # a chat model, not a retriever: no encoding profile, a card that says what it is
        for name, content in files.items():
            writer.add_file(name, content)
        writer.add_file("README.md", render_chat_card(manifest))
        return
    from reforge.profiles import PROFILE_FILE, profile_bytes

    profile = _encoding_profile(folder, str((manifest.get("retriever") or {}).get("ref") or folder), base_dir)
    encoding = profile.to_dict() if profile is not None else None
    if profile is not None and PROFILE_FILE not in files:  # read first by `reforge eval`
        files[PROFILE_FILE] = profile_bytes(profile)
    if profile is not None:  # a complete sentence-transformers folder that encodes like `reforge eval`
        files.update(_sentence_transformers_files(files, profile))
    for name, content in files.items():
        writer.add_file(name, content)
    prompts = json.loads(files.get("config_sentence_transformers.json", b"{}")).get("prompts") or {}
    writer.add_file(
        "README.md",
        _model_card({**manifest, "encoding": encoding, "prompt_names": sorted(prompts)}, "modules.json" in files),
    )


def _sentence_transformers_files(files: dict[str, bytes], profile: EncodingProfile) -> dict[str, bytes]:
    from reforge.io.st_folder import sentence_transformers_files
    from reforge.profiles import st_encoding

    return sentence_transformers_files(files, st_encoding(profile)).files


def _encoding_profile(folder: Path, name: str, base_dir: Path | None) -> EncodingProfile | None:
    """How the retriever encodes (prefixes, pooling, EOS), so the merged model is evaluated the same way: a merged
    RepLLaMA is a bare Llama whose name no longer says "repllama". None when it cannot be told."""
    from reforge.errors import ReforgeError
    from reforge.profiles import detect_profile

    try:
        return detect_profile(folder, name=name, base_dir=base_dir)
    except ReforgeError:
        return None


def _model_card(manifest: dict, sentence_transformers: bool) -> str:
    from reforge import __version__

    info = {
        **manifest,
        "reforge_version": __version__,
        "library_name": "sentence-transformers" if sentence_transformers else "transformers",
    }
    try:
        from reforge.card import render_model_card
    except ImportError:  # the card module is optional for merging
        return f"# Readapted retriever\n\nMade with reforge {__version__}.\n"
    return render_model_card(info)
