"""The skeleton diff and merge share: option groups, the one dtype rule, the write, and the streamed loop.

A streaming job opens its inputs (`Access`), plans its output tensors, then writes them in file order through one
`CheckpointWriter` (`WriteOptions`), each tensor read ahead on another thread and computed on one arithmetic thread
(`streamed`). What differs between diff and merge is only which tensors they plan and how each one is computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reforge.errors import InvalidOptionError
from reforge.io.paths import recorded_inputs
from reforge.io.progress import ProgressFn
from reforge.io.target import check_output
from reforge.io.writer import CheckpointWriter, TensorSpec
from reforge.ops.device import exact_matmul
from reforge.ops.stream import compute_workers, in_parallel, prefetch, scratch_for, torch_threads

DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


@dataclass(frozen=True)
class Access:
    """How inputs are opened: a Hub token (never printed) and whether pickle weights may be loaded (weights-only)."""

    token: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class WriteOptions:
    """How a job writes its output folder.

    Attributes:
        dtype: ``auto`` keeps the dtype the retriever stores; or ``float32``, ``bfloat16``, ``float16``.
        max_shard_size: bytes per shard file.
        overwrite: replace an output that holds something else (see `CheckpointWriter`).
        durable: fsync every shard before the rename.
        dry_run: plan only; nothing is written.
        command: the command line recorded in ``reforge.json`` (already free of secrets).
    """

    dtype: str = "auto"
    max_shard_size: int = 5 * 10**9
    overwrite: bool = False
    durable: bool = False
    dry_run: bool = False
    command: str | None = None

    def check(self) -> None:
        """Raises: InvalidOptionError for an unknown dtype or a shard size below one byte."""
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise InvalidOptionError(
                f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.", option="--dtype"
            )
        if self.max_shard_size < 1:
            raise InvalidOptionError(
                f"--max-shard-size must be positive, got {self.max_shard_size}.", option="--max-shard-size"
            )

    def stored(self, retriever_dtype: str) -> str:
        """The one dtype rule: the dtype named by ``--dtype``, else (``auto``) the retriever's own."""
        return DTYPE_NAMES.get(self.dtype, retriever_dtype)


def dominant_dtype(dtypes: Iterable[str]) -> str:
    """The most common floating dtype among ``dtypes`` (F32 when there is none): a checkpoint's dtype in one word."""
    floats = [d for d in dtypes if d in FLOAT_DTYPES]
    return max(set(floats), key=floats.count) if floats else "F32"


def check_source(retriever: Any, delta: Any) -> None:
    """Exactly one of a retriever and a delta: where Delta comes from (merge, tune).

    Raises:
        InvalidOptionError: both or neither.
    """
    if (retriever is None) == (delta is None):
        raise InvalidOptionError(
            "give exactly one of --retriever (Delta computed on the fly) and --delta (a folder from `reforge diff`).",
            option="--retriever",
        )


@contextmanager
def writing(
    output: str | Path,
    specs: list[TensorSpec],
    *,
    plan_id: str,
    manifest: dict,
    options: WriteOptions,
    inputs: list[Path],
    progress: ProgressFn | None = None,
) -> Iterator[CheckpointWriter]:
    """The output writer of a job (``inputs``: the folders it reads, which the output must stay apart from); on a
    clean exit the manifest gets the largest rounding of any tensor. The manifest names local inputs relative to
    ``output`` (`reforge.io.paths.recorded_inputs`): it is published with the folder."""
    recorded_inputs(manifest, output)
    with CheckpointWriter(
        output,
        specs,
        plan_id=plan_id,
        max_shard_size=options.max_shard_size,
        manifest=manifest,
        overwrite=options.overwrite,
        progress=progress,
        durable=options.durable,
        inputs=inputs,
    ) as writer:
        yield writer
        writer.manifest["max_abs_rounding"] = max_rounding(writer.records)


def check_target(output: str | Path, inputs: list, options: WriteOptions) -> None:
    """The output rule (`reforge.io.target.check_output`), checked before any input is opened; not for a dry run."""
    if not options.dry_run:
        check_output(output, inputs=[ref for ref in inputs if ref is not None], overwrite=options.overwrite)


def max_rounding(records: dict[str, dict]) -> float:
    """The largest ``max_abs_rounding`` among per-tensor records."""
    return max((r.get("max_abs_rounding", 0.0) for r in records.values()), default=0.0)


@contextmanager
def streamed(items: list, loader: Any, compute: Any, device: Any) -> Iterator[Iterator[tuple[Any, Any]]]:
    """``(item, compute(item, loader.load(*item), scratch))`` in order, for diff and merge: read ahead on another
    thread, computed by `reforge.ops.stream.compute_workers` threads over different pieces, each running torch on
    one thread (see `reforge.ops.stream.torch_threads` for why one), with a `Scratch` for ``device``. ``loader`` is
    a context manager that owns its readers; an item is ``(tensor, rows)``."""
    exact_matmul()
    with loader, prefetch(items, lambda item: loader.load(*item)) as stream, torch_threads(1):
        yield in_parallel(stream, compute, compute_workers(), scratch_for(device))


class PieceWriter:
    """Writes the pieces of each output tensor and records its largest rounding once its last piece is in."""

    def __init__(self, writer: CheckpointWriter) -> None:
        self.writer = writer
        self._rounding: dict[str, float] = {}

    def write(self, name: str, stored: Any, rows: slice | None, rounding: float, height: int) -> None:
        """Write rows ``rows`` (None: all) of tensor ``name``, ``height`` rows in all, rounded by ``rounding``."""
        self.writer.write(name, stored, rows)
        self._rounding[name] = max(self._rounding.get(name, 0.0), rounding)
        if rows is None or rows.stop >= height:  # the last piece
            self.writer.record(name, {"max_abs_rounding": self._rounding.pop(name)})
