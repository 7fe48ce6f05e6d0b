"""The arithmetic of a merge: each output tensor (or piece of rows) is base + sum_i alpha_i * Psi_i + beta * Delta,
computed in fp32 from the stored inputs and rounded once to the output dtype (see `reforge.ops.merge` for the
cases). `InputLoader` reads what one output tensor needs; `compute_output` computes it. The one formula of
``reforge merge``, ``reforge verify``'s recompute check and ``reforge tune``'s in-memory points."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from reforge.io.adapter import Factors
from reforge.io.buffers import ALIGNMENT, BufferPool
from reforge.io.tensors import all_finite
from reforge.ops.diff import overlap
from reforge.ops.merge_inputs import MergeInputs
from reforge.ops.stream import (
    Accumulator,
    Scratch,
    check_finite,
    clipped,
    empty,
    piece_shape,
    pieces,
    row_blocks,
    shifted,
)

if TYPE_CHECKING:
    import torch


def pieces_of(source: MergeInputs, key: str) -> list[slice | None]:
    """The pieces output tensor ``key`` is streamed in: a tensor made from a factored Delta (B @ A, computed whole)
    is streamed whole; any other in pieces (`reforge.ops.stream.pieces`)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# In memory: one grid point after another into tensors held elsewhere (`reforge.tune`'s loaded model)

Point = tuple[float, float]  # (alpha of every knowledge adapter, beta)


def point_keys(source: MergeInputs, old: Point | None, new: Point) -> list[str]:
    """The output tensors whose value differs between point ``old`` and point ``new``, in ``source``'s order: those
    with a Delta (`MergeInputs.has_delta`) when beta changes, the adapters' modules when alpha changes; every tensor
    when ``old`` is None (not known)."""
    if old is None:
        return list(source.shapes)
    changed: set[str] = set()
    if old[1] != new[1]:
        changed |= {key for key in source.shapes if source.has_delta(key)}
    if old[0] != new[0]:
        changed |= {key for adapter, _ in source.adapters for key in adapter.modules}
    return [key for key in source.shapes if key in changed]


def merge_into(params: dict[str, torch.Tensor], source: MergeInputs, keys: list[str], point: Point) -> None:
    """Set ``params[key]`` (a loaded model's tensors, by canonical key) for each of ``keys`` to its value at
    ``point``: `compute_output` itself, rounded to the retriever's dtype on one torch thread, so a point in memory
    holds exactly what ``reforge merge`` writes for it."""
    import torch

    from reforge.io.format import torch_dtype
    from reforge.ops.stream import torch_threads

    alpha, beta = point
    merged = replace(source, adapters=[(adapter, alpha) for adapter, _ in source.adapters])
    with InputLoader(merged, beta) as loader, torch_threads(1), torch.no_grad():
        for key in keys:
            stored, _ = compute_output(merged, loader.load(key), key, beta, torch_dtype(merged.dtypes[key]))
            params[key].copy_(stored)
