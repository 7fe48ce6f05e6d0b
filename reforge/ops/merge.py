"""`merge`: base + sum_i alpha_i * Psi_i + beta * Delta, tensor by tensor, in the retriever's layout.

Each output tensor is computed in fp32 from the stored inputs and rounded once to the output dtype:
- with ``retriever`` and beta = 1 the formula is retriever + sum alpha_i * Psi_i (no stored-Delta rounding), and a
  tensor no adapter touches is the retriever's tensor copied bit for bit (alpha = 0 reproduces the retriever);
- with ``retriever`` and beta != 1: base + beta * (retriever - base) + sum alpha_i * Psi_i;
- with ``delta``: base + beta * Delta + sum alpha_i * Psi_i, inheriting the Delta's recorded rounding;
- a peft LoRA retriever (RepLLaMA form) is folded on the fly: Delta = its dense update, zero elsewhere.
Psi_i is folded from adapter i against the *base* weight (DoRA's row norm uses it), exactly as in `ops.fold`.

This module is the job (check, plan, write); its rooms: `reforge.ops.merge_inputs` opens and checks the inputs,
`reforge.ops.merge_compute` holds the arithmetic, `reforge.ops.merge_folder` the folder's other contents (manifest,
companion files, encoding profile, card).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.io.format import torch_dtype
from reforge.io.progress import ProgressFn
from reforge.io.writer import CheckpointWriter, ShardPlan, TensorSpec, plan_id_for
from reforge.ops.defaults import PAPER_BETA
from reforge.ops.device import resolve_device
from reforge.ops.job import (
    Access,
    PieceWriter,
    WriteOptions,
    check_target,
    dominant_dtype,
    max_rounding,
    streamed,
    writing,
)
from reforge.ops.merge_compute import InputLoader, compute_output, copied, pieces_of
from reforge.ops.merge_folder import add_companions, merge_manifest
from reforge.ops.merge_inputs import MergeInputs, check_base_values, check_options, open_inputs
from reforge.ops.stream import empty, import_torch_in_background

if TYPE_CHECKING:
    import torch


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


def merge(
    base: str | Path,
    output: str | Path,
    *,
    retriever: str | Path | None = None,
    delta: str | Path | None = None,
    adapters: list[tuple[str | Path, float]] = (),
    beta: float = PAPER_BETA,
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
    check_options(retriever, delta, adapters, beta)
    write.check()
    check_target(output, [base, retriever, delta, *(ref for ref, _ in adapters)], write)
    source = open_inputs(base, retriever, delta, adapters, access=access, keep_lm_head=keep_lm_head)
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
    manifest = merge_manifest(source, beta, write.dtype, write.command, corpus, keep_lm_head)
    plan_id = _plan_id(source, beta, specs, write.max_shard_size)
    inputs = source.paths()
    where = resolve_device(device)
    with writing(
        output, specs, plan_id=plan_id, manifest=manifest, options=write, inputs=inputs, progress=progress
    ) as writer:
        report.already_complete, report.resumed_shards = writer.already_complete, writer.resumed_shards
        add_companions(writer, source, manifest, keep_lm_head)
        if not writer.already_complete:
            _write_tensors(writer, source, beta, specs, where)
    report.max_abs_rounding = max_rounding(writer.records)
    report.seconds = time.perf_counter() - started
    return report


def _plan_id(source: MergeInputs, beta: float, specs: list[TensorSpec], max_shard_size: int) -> str:
    """What the output depends on: a rerun with the same plan id resumes or is a no-op."""
    fingerprints = source.fingerprints()
    return plan_id_for(
        {
            **fingerprints,
            "op": "merge",
            "adapters": [(f, alpha) for f, (_, alpha) in zip(fingerprints["adapters"], source.adapters)],
            "beta": beta,
            "specs": [(s.name, s.dtype, s.shape) for s in specs],
            "shard": max_shard_size,
        }
    )


def _terms(source: MergeInputs, key: str, beta: float) -> list[str]:
    """Human-readable terms of one output tensor, for --dry-run and the manifest."""
    adapters = [f"{alpha:g}*psi[{Path(str(a.checkpoint.ref)).name}]" for a, alpha in source.adapted(key)]
    if source.retriever is not None and beta == 1:
        return ["retriever", *adapters]
    terms = ["base"] + ([f"{beta:g}*delta"] if source.has_delta(key) and beta != 0 else [])
    return terms + adapters


def _write_tensors(
    writer: CheckpointWriter, source: MergeInputs, beta: float, specs: list[TensorSpec], device: "torch.device"
) -> None:
    """Stream every pending tensor piece by piece (`reforge.ops.stream.pieces`) from the inputs to the output,
    computed on ``device`` (a tensor only copied stays on the CPU)."""
    todo = [key for spec, key in zip(specs, source.shapes) if writer.pending(spec.name)]
    spec_of = {key: spec for spec, key in zip(specs, source.shapes)}
    items = [(key, rows) for key in todo for rows in pieces_of(source, key)]
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
