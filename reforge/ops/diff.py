"""`diff`: Delta = retriever - base, tensor by tensor, in fp32, streamed into a delta folder.

What is exact: the difference is computed in fp32 from the stored inputs. Stored as float32 (and with inputs in
bf16/fp16, whose difference fp32 holds exactly unless their exponents differ by more than 16), base + Delta
reproduces the retriever bit for bit. Stored in bf16/fp16 it rounds; the rounding of every tensor is measured
(max |stored - exact|) and recorded in ``reforge.json``, together with the reconstruction error it causes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.errors import InvalidOptionError, LayoutMismatchError
from reforge.io.adapter import Factors, LoraAdapter
from reforge.io.buffers import BufferPool
from reforge.io.checkpoint import AdapterCheckpoint, Checkpoint, open_checkpoint, open_model
from reforge.io.companions import output_companions
from reforge.io.format import torch_dtype
from reforge.io.keymap import extra_rows, is_embedding, match_keys
from reforge.io.progress import ProgressFn
from reforge.io.writer import CheckpointWriter, ShardPlan, TensorSpec, plan_id_for
from reforge.ops.chat import apply_head_rule
from reforge.ops.delta import RETRIEVER_FILES, factor_keys
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
from reforge.ops.stream import (
    Accumulator,
    check_finite,
    clipped,
    empty,
    import_torch_in_background,
    piece_shape,
    pieces,
    prefetch,
    row_blocks,
    shifted,
)

if TYPE_CHECKING:
    import torch


@dataclass
class DiffReport:
    """What `diff` did (or, with ``dry_run``, would do)."""

    output: Path
    tensors: int
    total_size: int
    shards: list[int]
    dtype: str
    dry_run: bool = False
    already_complete: bool = False
    resumed_shards: int = 0
    max_abs_rounding: float = 0.0
    extra_vocab_rows: dict[str, int] = field(default_factory=dict)
    factored: int = 0
    low_rank_relative_error: float | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def swapped_roles(base: Checkpoint, retriever: Checkpoint | AdapterCheckpoint) -> list[str]:
    """A warning when BASE looks like the retriever and RETRIEVER like the base LM: a bare model given as the base
    and a causal LM (with its LM head) given as the retriever. The diff still runs; its sign would be flipped."""
    if isinstance(retriever, AdapterCheckpoint) or not base.layout.is_bare or retriever.layout.is_bare:
        return []
    return [
        f"BASE {base.ref} is a bare model and RETRIEVER {retriever.ref} is a causal LM with an LM head: the "
        f"two look swapped, and Delta would then be base - retriever. The order is `reforge diff BASE "
        f"RETRIEVER`."
    ]


@dataclass(frozen=True)
class _Entry:
    """How to produce the Delta for one canonical tensor."""

    key: str
    shape: tuple[int, ...]
    source: str  # "dense": retriever - base; "adapter": folded adapter module; "zero"; "retriever-only"
    base_rows: int | None = None


def diff(
    base: str | Path,
    retriever: str | Path,
    output: str | Path,
    *,
    low_rank: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    allow_missing: bool = False,
    keep_lm_head: bool = False,
    write: WriteOptions = WriteOptions(),
    access: Access = Access(),
    progress: ProgressFn | None = None,
    device: str | None = "cpu",
) -> DiffReport:
    """Write Delta = retriever - base into ``output``.

    Args:
        base: the pretrained LM (folder or Hub id); its ``lm_head`` is ignored.
        retriever: a full retriever checkpoint, or a peft LoRA/DoRA adapter over ``base`` (RepLLaMA form).
        low_rank: keep an adapter retriever's LoRA Delta as factors (exact up to fp32 rounding, far smaller).
        rank / energy: compress each dense 2-D layer Delta by SVD to ``rank`` or to the smallest rank holding
            ``energy`` of its squared singular values (LoRE-Adapt); 1-D tensors and embeddings stay dense.
        allow_missing: store tensors only the retriever has whole, and skip those only the base has, instead
            of failing.
        keep_lm_head: RE-Adapt of a chat model: ``retriever`` is the instruction-tuned CausalLM and Delta keeps
            ``lm_head`` (see `reforge.ops.chat`). Without it a CausalLM with an lm_head is refused.
        write: dtype (``auto``: the retriever's dominant dtype), shard size, overwrite, dry run, the command.
        access: Hub token and pickle permission for the inputs.
        device: where the arithmetic runs: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``;
            see `reforge.ops.device`. SVD factoring (--rank, --energy) runs on the CPU.

    Raises:
        LayoutMismatchError: the two do not line up (names or shapes). InvalidOptionError: options that conflict.
    """
    started = time.perf_counter()
    import_torch_in_background()
    _check_options(low_rank, rank, energy)
    write.check()
    check_target(output, [base, retriever], write)
    job = _open(base, retriever, access, low_rank, allow_missing, write, keep_lm_head)
    factor = _factor_rule(low_rank, rank, energy)
    if energy is not None and not write.dry_run:
        factor["ranks"] = _energy_ranks(job.entries, job.base, job.retriever, job.adapter, energy)
    specs, factored = _specs(job.entries, job.dtype, factor, job.adapter)
    plan = ShardPlan.build(specs, write.max_shard_size)
    report = DiffReport(
        Path(output),
        len(job.entries),
        plan.total_size,
        plan.shard_sizes(),
        job.dtype,
        write.dry_run,
        factored=len(factored),
        extra_vocab_rows={e.key: e.shape[0] - e.base_rows for e in job.entries if e.base_rows},
        warnings=swapped_roles(job.base, job.retriever),
    )
    if write.dry_run:
        return report
    manifest = _manifest(job, factored, factor, write.command)
    if keep_lm_head:
        manifest["keep_lm_head"] = True
    plan_id = plan_id_for(
        {
            "op": "diff",
            "base": job.base.provenance["fingerprint"],
            "retriever": job.retriever.provenance["fingerprint"],
            "dtype": job.dtype,
            "specs": [(s.name, s.dtype, s.shape) for s in specs],
            "rank": rank,
            "energy": energy,
            "shard": write.max_shard_size,
        }
    )
    inputs = [job.base.path, job.retriever.path]
    where = resolve_device(device)
    with writing(
        output, specs, plan_id=plan_id, manifest=manifest, options=write, inputs=inputs, progress=progress
    ) as writer:
        report.already_complete, report.resumed_shards = writer.already_complete, writer.resumed_shards
        for name, content in _retriever_companions(job.base, job.retriever, keep_lm_head).items():
            writer.add_file(f"{RETRIEVER_FILES}/{name}", content)
        if not writer.already_complete:
            todo = [e for e in job.entries if any(writer.pending(n) for n in _stored_names(e, factored))]
            loader = _EntryLoader(job.base, job.retriever, job.adapter, low_rank)
            _write_entries(writer, todo, loader, job.dtype, factored, where)
    report.max_abs_rounding = max_rounding(writer.records)
    relative = [e["relative_error"] for e in writer.records.values() if "relative_error" in e]
    report.low_rank_relative_error = max(relative) if relative else None
    report.seconds = time.perf_counter() - started
    return report


def _write_entries(
    writer: CheckpointWriter, todo: list[_Entry], loader: "_EntryLoader", dtype: str, factored, device
) -> None:
    """Stream the entries piece by piece (`reforge.ops.stream.pieces`; a factored one whole: its SVD needs it all),
    computed on ``device``."""
    items = [(e, rows) for e in todo for rows in ([None] if e.key in factored else pieces(e.shape))]

    def compute(item, loaded, scratch):
        entry, rows = item
        if entry.key in factored:
            return loaded, 0.0  # factored below, in order, on the CPU: it writes two tensors
        skew = writer.alignment(entry.key, rows)
        return scratch.compute(
            lambda here: _delta_tensor(entry, here, dtype, loader.pool, skew, rows, scratch),
            loaded,
            lambda shape: empty(shape, torch_dtype(dtype), loader.pool, skew),
        )

    pieces_out = PieceWriter(writer)
    with streamed(items, loader, compute, device) as results:
        for (entry, rows), (stored, error) in results:
            if entry.key in factored:
                writer.record(entry.key, _store_factored(writer, entry, stored, dtype, factored))
            else:
                pieces_out.write(entry.key, stored, rows, error, entry.shape[0])


@dataclass(frozen=True)
class _Job:
    """The opened inputs of a diff, what to compute for each tensor, and the stored dtype."""

    base: Checkpoint
    retriever: Checkpoint | AdapterCheckpoint
    adapter: LoraAdapter | None
    entries: list[_Entry]
    dtype: str


def _open(
    base, retriever, access: Access, low_rank: bool, allow_missing: bool, write: WriteOptions, keep_lm_head: bool
) -> _Job:
    """Open both inputs and plan every entry; nothing but headers is read."""
    base_ckpt = open_model(base, token=access.token, allow_pickle=access.allow_pickle)
    retriever_ckpt = open_checkpoint(retriever, token=access.token, allow_pickle=access.allow_pickle)
    apply_head_rule(base_ckpt, retriever_ckpt, keep_lm_head)
    if isinstance(retriever_ckpt, AdapterCheckpoint):
        adapter = LoraAdapter(retriever_ckpt)
        if low_rank and adapter.is_dora:
            raise InvalidOptionError(
                "a DoRA retriever's Delta is not exactly low rank; use --rank/--energy for an "
                "SVD approximation, or store it dense.",
                option="--low-rank",
            )
        entries, dtypes = _adapter_entries(base_ckpt, adapter), base_ckpt.index.tensors.values()
        return _Job(base_ckpt, retriever_ckpt, adapter, entries, write.stored(dominant_dtype(i.dtype for i in dtypes)))
    if low_rank:
        raise InvalidOptionError(
            "--low-rank needs a peft LoRA retriever; for a full retriever use --rank or --energy (SVD).",
            option="--low-rank",
        )
    entries = _dense_entries(base_ckpt, retriever_ckpt, allow_missing)
    dtype = write.stored(dominant_dtype(i.dtype for i in retriever_ckpt.index.tensors.values()))
    return _Job(base_ckpt, retriever_ckpt, None, entries, dtype)


def _retriever_companions(base: Checkpoint, retriever, keep_head: bool = False) -> dict[str, bytes]:
    if isinstance(retriever, AdapterCheckpoint):
        return output_companions(retriever.path, None, from_base=base.path, base_config=base.config)
    return output_companions(retriever.path, retriever.config, keep_head=keep_head)


def _retriever_dtypes(base: Checkpoint, retriever, entries: list[_Entry]) -> dict[str, str]:
    """The dtype the retriever stores each tensor in, so `merge --delta` writes the retriever's dtypes."""
    source = base if isinstance(retriever, AdapterCheckpoint) else retriever
    return {e.key: source.index.tensors[source.layout.stored(e.key)].dtype for e in entries}


def _check_options(low_rank: bool, rank: int | None, energy: float | None) -> None:
    if sum(bool(x) for x in (low_rank, rank is not None, energy is not None)) > 1:
        raise InvalidOptionError("--low-rank, --rank and --energy are alternatives; pass one of them.", option="--rank")
    if rank is not None and rank < 1:
        raise InvalidOptionError(f"--rank must be at least 1, got {rank}.", option="--rank")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidOptionError(f"--energy must be in (0, 1], got {energy}.", option="--energy")


def _dense_entries(base: Checkpoint, retriever: Checkpoint, allow_missing: bool) -> list[_Entry]:
    base_keys, retriever_keys = base.canonical_keys(), retriever.canonical_keys()
    if not allow_missing:
        match_keys(
            base_keys,
            retriever_keys,
            left_name=f"base {base.ref}",
            right_name=f"retriever {retriever.ref}",
            hint="If the architectures are the same and only a few tensors differ (e.g. a BERT pooler), "
            "--allow-missing stores tensors only the retriever has whole and skips the rest.",
        )
    entries = []
    for key in _file_order(retriever, retriever_keys):
        r_info = retriever.index.tensors[retriever_keys[key]]
        if key not in base_keys:
            entries.append(_Entry(key, r_info.shape, "retriever-only"))
            continue
        b_info = base.index.tensors[base_keys[key]]
        entries.append(_entry_for_shapes(key, b_info.shape, r_info.shape, base.ref, retriever.ref))
    return entries


def _entry_for_shapes(key: str, base_shape: tuple, retriever_shape: tuple, base_ref: str, retriever_ref: str) -> _Entry:
    added = extra_rows(key, base_shape, retriever_shape)
    if added == 0:
        return _Entry(key, retriever_shape, "dense")
    if added:  # added tokens: the extra rows have no base value; Delta holds the retriever's rows there
        return _Entry(key, retriever_shape, "dense", base_rows=base_shape[0])
    raise LayoutMismatchError(
        f"tensor {key!r} is {list(base_shape)} in base {base_ref} but {list(retriever_shape)} in retriever "
        f"{retriever_ref}.",
        hint="The two checkpoints are different architectures or sizes.",
        left=base_ref,
        right=retriever_ref,
        tensor=key,
        details={"base": base_shape, "retriever": retriever_shape},
    )


def _adapter_entries(base: Checkpoint, adapter: LoraAdapter) -> list[_Entry]:
    base_keys = base.canonical_keys()
    adapter.check_shapes({key: base.index.tensors[stored].shape for key, stored in base_keys.items()})
    return [
        _Entry(key, base.index.tensors[base_keys[key]].shape, "adapter" if key in adapter.modules else "zero")
        for key in _file_order(base, base_keys)
    ]


def _file_order(checkpoint: Checkpoint, keys: dict[str, str]) -> list[str]:
    tensors = checkpoint.index.tensors
    return sorted(keys, key=lambda k: (str(tensors[keys[k]].file), tensors[keys[k]].start))


def _factor_rule(low_rank: bool, rank: int | None, energy: float | None):
    if not (low_rank or rank or energy):
        return None
    return {"low_rank": low_rank, "rank": rank, "energy": energy}


def _specs(
    entries: list[_Entry], dtype: str, factor, adapter: LoraAdapter | None
) -> tuple[list[TensorSpec], dict[str, int]]:
    """Tensor specs to write, and the rank of each factored tensor. Ranks must be known before writing: for
    --low-rank they come from the adapter, for --rank they are fixed, and --energy is resolved by a first SVD
    pass in `_energy_ranks`."""
    specs, factored = [], {}
    for entry in entries:
        if entry.source == "zero" and factor is not None:
            continue
        rank = _factor_rank(entry, factor, adapter)
        if rank is None:
            specs.append(TensorSpec(entry.key, dtype, entry.shape))
            continue
        factored[entry.key] = rank
        a_key, b_key = factor_keys(entry.key)
        specs.append(TensorSpec(a_key, "F32" if factor["low_rank"] else dtype, (rank, entry.shape[1])))
        specs.append(TensorSpec(b_key, "F32" if factor["low_rank"] else dtype, (entry.shape[0], rank)))
    return specs, factored


def _factor_rank(entry: _Entry, factor, adapter: LoraAdapter | None) -> int | None:
    """The stored rank of a factored tensor, or None to store it dense."""
    if factor is None or len(entry.shape) != 2 or is_embedding(entry.key) or entry.source == "retriever-only":
        return None
    if factor["low_rank"]:
        if entry.source != "adapter" or adapter is None or adapter.modules[entry.key].embedding:
            return None
        return adapter.checkpoint.index.tensors[adapter.modules[entry.key].a_key].shape[0]
    full = min(entry.shape)
    if factor["rank"] is not None:
        return min(factor["rank"], full)
    return factor.get("ranks", {}).get(entry.key, full)


def _energy_ranks(entries: list[_Entry], base: Checkpoint, retriever, adapter, energy: float) -> dict[str, int]:
    """For --energy: the smallest rank of each layer Delta whose squared singular values reach ``energy``.

    Shard headers are written before any data, so ranks must be known first: this pass computes only singular
    values (cheaper than the full SVD that the writing pass does)."""
    import torch

    ranks = {}
    todo = [e for e in entries if _factor_rank(e, {"low_rank": False, "rank": None}, adapter) is not None]
    with _EntryLoader(base, retriever, adapter, False) as loader, prefetch(todo, loader.load) as stream:
        for entry, loaded in stream:
            exact, _ = _delta_tensor(entry, loaded, "F32")
            ranks[entry.key] = _rank_for_energy(torch.linalg.svdvals(exact), energy)
    return ranks


def _rank_for_energy(singular_values: "torch.Tensor", energy: float) -> int:
    import torch

    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64))) + 1, len(singular_values))


def _stored_names(entry: _Entry, factored: dict[str, int]) -> list[str]:
    return list(factor_keys(entry.key)) if entry.key in factored else [entry.key]


@dataclass
class _Loaded:
    """The stored inputs of one entry, read ahead by the loader thread."""

    retriever: "torch.Tensor | None" = None
    base: "torch.Tensor | None" = None
    factors: Factors | None = None
    given: tuple | None = None  # an adapter's own (A, B) for --low-rank


class _EntryLoader:
    """Reads what each entry needs. Its readers are used only by the prefetch thread; its ``pool`` lends the memory
    of large inputs and outputs, reused from tensor to tensor."""

    def __init__(self, base: Checkpoint, retriever, adapter: LoraAdapter | None, low_rank: bool) -> None:
        self.base, self.retriever, self.adapter, self.low_rank = base, retriever, adapter, low_rank
        self.pool = BufferPool()
        self._factors: tuple[str | None, Factors | None, tuple | None] = (None, None, None)  # the last entry's

    def __enter__(self) -> "_EntryLoader":
        self.base_reader, self.retriever_reader = self.base.reader(self.pool), self.retriever.reader(self.pool)
        return self

    def __exit__(self, *exc: object) -> None:
        self.base_reader.close()
        self.retriever_reader.close()

    def load(self, entry: _Entry, rows: slice | None = None) -> _Loaded:
        """The inputs of ``entry``, or of its rows ``rows`` (a piece; an adapter's factors are read once per entry)."""
        loaded = _Loaded()
        if entry.source in ("dense", "retriever-only"):
            loaded.retriever = self.retriever_reader.get(self.retriever.layout.stored(entry.key), rows)
        if entry.source == "dense" or (entry.source == "adapter" and self.adapter.modules[entry.key].magnitude_key):
            base_rows = rows if entry.base_rows is None else clipped(rows, entry.base_rows)
            loaded.base = self.base_reader.get(self.base.layout.stored(entry.key), base_rows)
        if entry.source == "adapter":
            if self._factors[0] != entry.key:
                given = _adapter_factors(self.adapter, entry.key, self.retriever_reader.get) if self.low_rank else None
                self._factors = (entry.key, self.adapter.factors(entry.key, self.retriever_reader.get), given)
            loaded.factors, loaded.given = self._factors[1], self._factors[2]
        return loaded


def _delta_tensor(
    entry: _Entry,
    loaded: _Loaded,
    dtype: str,
    pool: BufferPool | None = None,
    skew: int = 0,
    piece=None,
    scratch=None,
) -> tuple["torch.Tensor", float]:
    """Delta of one entry (or of its rows ``piece``, ``loaded`` holding the inputs' same rows) computed in fp32
    block by block, rounded to ``dtype``; and the largest rounding."""
    shape = piece_shape(entry.shape, piece)
    # the base's rows end at entry.base_rows (tokens added to the retriever): counted from the piece's start
    base_rows = None if entry.base_rows is None else entry.base_rows - (piece.start if piece is not None else 0)
    accumulator = Accumulator(shape, torch_dtype(dtype), pool, skew, scratch)
    for rows in row_blocks(shape):
        block = accumulator.block(rows)
        _delta_rows(block, rows, shifted(rows, piece), entry, loaded, base_rows, scratch)
        accumulator.commit(rows)
    check_finite(accumulator.finite, entry.key, "retriever - base is")
    return accumulator.output, accumulator.max_abs_rounding


def _delta_rows(
    block: "torch.Tensor",
    rows: slice,
    whole_rows: slice,
    entry: _Entry,
    loaded: _Loaded,
    base_rows: int | None,
    scratch=None,
) -> None:
    """Delta's rows ``rows`` of the loaded piece (``whole_rows`` of the tensor); the base has ``base_rows`` rows
    of the piece (None: all of them)."""
    if entry.source == "zero":
        block.zero_()
    elif entry.source == "adapter":
        block.zero_()
        base = loaded.base[rows] if loaded.base is not None else None
        loaded.factors.add_to(block, whole_rows, base, 1.0, scratch)
    else:
        block.copy_(loaded.retriever[rows])
        if entry.source == "dense":
            covered = overlap(rows, base_rows)
            if covered is None:
                block.sub_(loaded.base[rows])
            elif covered > 0:
                block[:covered].sub_(loaded.base[rows.start : rows.start + covered])


def overlap(rows: slice, limit: int | None) -> int | None:
    """How many rows of a block lie below ``limit`` (None when there is no limit: all of them)."""
    if limit is None:
        return None
    return max(0, min(rows.stop, limit) - rows.start)


def _adapter_factors(adapter: LoraAdapter, key: str, read) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The adapter's own factors of ``key`` as (A, B) with B @ A = Delta: the scale is folded into B."""
    module = adapter.modules[key]
    a, b = read(module.a_key).float(), read(module.b_key).float() * module.scale
    return (b.T.contiguous(), a.T.contiguous()) if module.fan_in_fan_out else (a, b)


def _store_factored(
    writer: CheckpointWriter, entry: _Entry, loaded: _Loaded, dtype: str, factored: dict[str, int]
) -> dict:
    """Write one factored entry and return its measured errors."""
    exact, _ = _delta_tensor(entry, loaded, "F32")
    if loaded.given is not None:
        (a, b), rank_used = loaded.given, factored[entry.key]
    else:
        a, b, rank_used = _factors(exact, factored[entry.key])
    a_key, b_key = factor_keys(entry.key)
    factor_dtype = torch_dtype("F32" if loaded.given is not None else dtype)
    a, b = a.to(factor_dtype), b.to(factor_dtype)
    writer.write(a_key, a)
    writer.write(b_key, b)
    approx = b.float() @ a.float()
    norm = float(exact.norm())
    return {
        "max_abs_rounding": float((approx - exact).abs().max()),
        "rank": rank_used,
        "relative_error": float((approx - exact).norm()) / norm if norm else 0.0,
    }


def _factors(exact: "torch.Tensor", rank: int) -> tuple["torch.Tensor", "torch.Tensor", int]:
    """A (rank, in) and B (out, rank) with B @ A ~ exact. SVD: A = sqrt(S) Vh, B = U sqrt(S) (as mergekit does)."""
    import torch

    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :], rank


def _manifest(job: _Job, factored: dict[str, int], factor, command: str | None) -> dict:
    entries, retriever = job.entries, job.retriever
    return {
        "kind": "delta",
        "base": job.base.provenance,
        "retriever": {
            **retriever.provenance,
            "kind": retriever.kind,
            "architecture": getattr(retriever, "architecture", None),
        },
        # the retriever's own key prefix ("model." for a body saved through a *ForCausalLM class), so that
        # `merge --delta` writes the names the retriever has
        "retriever_prefix": retriever.layout.prefix if isinstance(retriever, Checkpoint) else "",
        "dtype": job.dtype,
        "shapes": {e.key: list(e.shape) for e in entries},
        "retriever_dtypes": _retriever_dtypes(job.base, retriever, entries),
        "zero": [e.key for e in entries if e.source == "zero" and factor is not None],
        "factored": sorted(factored),
        "retriever_only": [e.key for e in entries if e.source == "retriever-only"],
        "extra_vocab_rows": {e.key: e.shape[0] - e.base_rows for e in entries if e.base_rows},
        "compression": factor,
        "command": command,
    }
