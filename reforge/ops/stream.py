"""Streaming helpers shared by diff and merge: row blocks, rounding with measured error, and read-ahead.

Arithmetic runs on row blocks of about a million elements in reused fp32 buffers: every pass over the data
stays in cache, nothing of the size of a tensor is allocated in fp32, and the result is identical to computing
the whole tensor at once (every operation is elementwise or per row).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from reforge.errors import NonFiniteError
from reforge.io.buffers import BufferPool

if TYPE_CHECKING:
    import torch

    from reforge.ops.device import Transfer

# Row blocks of 256K fp32 elements (1 MiB) stay in a core's L2 cache through the dozen passes of a DoRA merge: on
# 7B-width tensors 1.9 ns per element against 2.5 ns with blocks of 1M (measured, one thread).
CHUNK_ELEMENTS = 1 << 18
PIECE_BLOCKS = 16  # a piece, the unit streamed from disk through the arithmetic to disk, is this many row blocks
# MKL's AVX2 kernels multiply fewer than 8 rows (B[rows] @ A) by another kernel whose roundings differ from those of
# the whole product (measured: 1, 2, 3 and 5 rows differ, 8 to 256 rows are bit-identical to it), so a block never has
# fewer rows than this unless the tensor has. MKL's AVX-512 kernels round blocks of any size differently from the
# whole product (2026-12-07): there the bytes depend on the blocking, which is fixed by the shape, and every block is
# still one fp32 rounding of the formula (tests/test_streaming.py).
MIN_BLOCK_ROWS = 8
POOLED_MIN_BYTES = 1 << 20  # smaller outputs come and go cheaply from the heap
K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")


def row_blocks(shape: tuple[int, ...]) -> Iterator[slice]:
    """Slices over the first dimension, each covering about CHUNK_ELEMENTS elements (at least one row); a short
    last block of fewer than MIN_BLOCK_ROWS rows joins the one before it (see MIN_BLOCK_ROWS). A 0-d shape gets
    one block, ``...``."""
    if len(shape) == 0:
        yield ...  # type: ignore[misc]
        return
    yield from _split(shape[0], _block_rows(shape))


def pieces(shape: tuple[int, ...]) -> list[slice | None]:
    """How a tensor of ``shape`` is streamed: row slices of PIECE_BLOCKS row blocks (`row_blocks`) each, or
    ``[None]`` (whole) for one of a piece or less.

    Why pieces: read, computed and written whole, a tensor needs memory for itself, its inputs and its output;
    on the 7B-width benchmark the reused buffers for that came to 1.1 GB, and faulting them in (the kernel zeroes
    every new page) took about 2 s of CPU, a third of an 8-layer merge. Pieces keep that memory to a few pieces.
    A piece is a whole number of row blocks (the last one also takes a short tail, as `row_blocks` does), so its
    blocks are exactly the blocks of the whole tensor and every block is computed by the same operations on the
    same values: the result does not depend on the piece size.
    """
    if not shape:
        return [None]
    split = _split(shape[0], _block_rows(shape) * PIECE_BLOCKS)
    return [None] if len(split) <= 1 else split


def _block_rows(shape: tuple[int, ...]) -> int:
    return max(1, CHUNK_ELEMENTS // max(_row_size(shape), 1))


def _split(rows: int, step: int) -> list[slice]:
    """``[0, rows)`` in slices of ``step`` rows; a short last one of fewer than min(step, MIN_BLOCK_ROWS) rows
    joins the one before it."""
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < min(step, MIN_BLOCK_ROWS):
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, [*starts[1:], rows])]


def piece_shape(shape: tuple[int, ...], rows: slice | None) -> tuple[int, ...]:
    """The shape of rows ``rows`` of a tensor of ``shape`` (``shape`` itself for None)."""
    if rows is None or not shape:
        return tuple(shape)
    start, stop, _ = rows.indices(shape[0])
    return (max(stop - start, 0), *shape[1:])


def shifted(rows: slice, by: slice | None) -> slice:
    """Block ``rows`` of a piece as rows of the whole tensor (the piece starts at ``by.start``)."""
    if by is None or rows is Ellipsis:
        return rows
    return slice(rows.start + by.start, rows.stop + by.start)


def clipped(rows: slice | None, limit: int) -> slice | None:
    """Rows ``rows`` of a tensor that has only ``limit`` rows (an input with fewer rows than the output)."""
    if rows is None:
        return None
    return slice(min(rows.start, limit), min(rows.stop, limit))


class Scratch:
    """fp32 buffers for the row blocks one thread computes, reused from block to block and piece to piece.

    Fresh buffers per piece cost page faults and, with one malloc arena per thread, heap growth (measured:
    14,000 mprotect calls and max RSS 0.65 -> 1.4 GiB on a 2-layer merge). One per computing thread.
    """

    def __init__(self, device: "torch.device | None" = None, transfer: "Transfer | None" = None) -> None:
        self.device = device
        self.transfer = transfer  # how pieces reach the device and come back (None: computed where they are)
        self._buffers: dict[str, "torch.Tensor"] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> "torch.Tensor":
        """The buffer ``name`` viewed as ``shape`` (contents undefined), grown when too small."""
        import torch

        count = _numel(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < count:
            size = max(count, CHUNK_ELEMENTS)
            buffer = self._buffers[name] = torch.empty(size, dtype=torch.float32, device=self.device)
        return buffer[:count].view(shape)

    def compute(self, compute, loaded, host_output):
        """``compute(loaded)`` here, or on the device through `transfer` with the result copied back into
        ``host_output(shape)`` (see `reforge.ops.device.Transfer.run`)."""
        if self.transfer is None or not self.transfer.active:
            return compute(loaded)
        return self.transfer.run(compute, loaded, host_output)


def scratch_for(device: "torch.device | None", staged: bool = False) -> Callable[[], Scratch]:
    """A maker of one `Scratch` per computing thread for ``device`` (None or cpu: plain CPU buffers)."""
    from reforge.ops.device import Transfer

    def make() -> Scratch:
        if device is None or (device.type == "cpu" and not staged):
            return Scratch()
        return Scratch(device, Transfer(device, staged))

    return make


class Accumulator:
    """A reusable fp32 buffer for one row block, and the output tensor it is rounded into.

    Use: ``for rows in row_blocks(shape): x = acc.block(rows); ...fill x...; acc.commit(rows)``; then
    ``acc.output`` is the tensor in the output dtype, ``acc.max_abs_rounding`` the largest |stored - exact| and
    ``acc.finite`` False when a NaN or Inf was computed or produced by rounding (the caller names the tensor).
    With a ``pool`` (`reforge.io.buffers.BufferPool`) a large output takes its memory from it, starting ``skew``
    bytes into a page: `CheckpointWriter.alignment` of its name, so that the writer can write it with O_DIRECT.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: "torch.dtype",
        pool: BufferPool | None = None,
        skew: int = 0,
        scratch: Scratch | None = None,
    ) -> None:
        import torch

        scratch = scratch or Scratch()
        self.output = empty(shape, dtype, pool, skew, device=scratch.device)
        self.max_abs_rounding = 0.0
        self.finite = True
        self._exact = dtype == torch.float32
        size = min(_numel(shape), (_block_rows(shape) + MIN_BLOCK_ROWS) * _row_size(shape))  # a joined tail too
        self._buffer = scratch.get("block", (size,))
        self._scratch = None if self._exact else scratch.get("error", (size,))

    def block(self, rows: slice) -> "torch.Tensor":
        """The fp32 buffer viewed as the rows ``rows`` of the output (contents undefined: fill it)."""
        shape = self.output[rows].shape
        return self._buffer[: _numel(tuple(shape))].view(shape)

    def commit(self, rows: slice) -> None:
        """Round the filled block into the output and measure the rounding."""
        import torch

        exact = self.block(rows)
        target = self.output[rows]
        target.copy_(exact)
        if exact.numel() == 0:
            return
        if self._exact:  # no rounding to measure; one pass over the block (in cache) still sees NaN and Inf
            low, high = torch.aminmax(exact)
            self.finite = self.finite and math.isfinite(float(low)) and math.isfinite(float(high))
            return
        error = self._scratch[: exact.numel()].view(exact.shape)
        error.copy_(target)
        error.sub_(exact)
        # max |error| as max(-min, max): one pass instead of abs_ then max. A NaN or Inf in the exact value, or
        # one produced by rounding (overflow to fp16's Inf), makes the error NaN or Inf: no extra pass needed.
        low, high = torch.aminmax(error)
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):
            self.finite = False
            return
        self.max_abs_rounding = max(self.max_abs_rounding, -low, high)


def empty(
    shape: tuple[int, ...], dtype: "torch.dtype", pool: BufferPool | None = None, skew: int = 0, device=None
) -> "torch.Tensor":
    """An uninitialized tensor (on ``device``; default the CPU); with ``pool``, a large one in reused memory (no
    page faults) that starts ``skew`` bytes into a page (see `Accumulator`)."""
    import torch

    nbytes = _numel(shape) * dtype.itemsize
    if device is not None and torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    if pool is None or nbytes < POOLED_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    skew = skew if skew % dtype.itemsize == 0 else 0  # keep elements aligned; the writer then copies it
    loan = pool.take(skew + nbytes)
    return torch.frombuffer(loan, dtype=dtype, count=_numel(shape), offset=skew).view(shape)


@contextmanager
def prefetch(items: Iterable[K], load: Callable[[K], V], depth: int = 2) -> Iterator[Iterator[tuple[K, V]]]:
    """A background thread that loads up to ``depth`` items ahead; the context yields ``(item, load(item))`` in
    order. Use: ``with prefetch(items, load) as stream: for item, value in stream: ...``.

    Reads release the GIL, so reading the next tensors overlaps with computing on the current ones. The thread
    starts on entering, so the first reads also overlap with whatever the caller does next (importing torch: see
    `import_torch_in_background`). An exception in ``load`` is raised at the item that failed. On leaving, the
    thread is stopped and joined.
    """
    pending: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                pending.put((item, load(item), None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            pending.put((None, None, e))
        pending.put((done, None, None))

    def in_order() -> Iterator[tuple[K, V]]:
        while True:
            item, value, error = pending.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item, value

    thread = threading.Thread(target=worker, name="reforge-prefetch", daemon=True)
    thread.start()
    try:
        yield in_order()
    finally:
        stop.set()
        while thread.is_alive():  # drain so the worker can finish its put and exit
            try:
                pending.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def in_parallel(
    pairs: Iterable[tuple[K, V]],
    compute: Callable[[K, V, Scratch], R],
    workers: int = 2,
    make_scratch: Callable[[], Scratch] = Scratch,
) -> Iterator[tuple[K, R]]:
    """``(item, compute(item, value, scratch))`` for each ``(item, value)`` of ``pairs``, in order, computed by up
    to ``workers`` threads at once (each on a different piece: the pieces of a tensor are independent), each
    thread with its own `Scratch`.

    torch releases the GIL inside its kernels, so two threads keep two cores busy; each runs torch's kernels on
    one thread (`torch_threads`): torch's own intra-op threads spin-wait at every barrier and were 20x slower on
    a busy 2-core machine. At most ``workers`` pieces are computed at once, so memory stays a few pieces. An
    exception in ``compute`` is raised here, at its item.
    """
    if workers <= 1:
        scratch = make_scratch()
        for item, value in pairs:
            yield item, compute(item, value, scratch)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    own = threading.local()

    def run(item: K, value: V) -> R:
        if not hasattr(own, "scratch"):
            own.scratch = make_scratch()
        return compute(item, value, own.scratch)

    with ThreadPoolExecutor(workers, thread_name_prefix="reforge-compute") as pool:
        pending: deque = deque()
        for item, value in pairs:
            pending.append((item, pool.submit(run, item, value)))
            del value  # the future holds it until computed, not this frame until the next piece arrives
            if len(pending) >= workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def compute_workers() -> int:
    """Threads for the arithmetic of a streaming command: one per core, at most 4 (reading and writing need
    little CPU: O_DIRECT)."""
    import os

    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def import_torch_in_background() -> None:
    """Start importing torch on another thread, for the streaming commands.

    The import takes about a second of one core; meanwhile the caller opens its inputs and the prefetch thread
    starts reading (large tensors are read before torch is needed; see `reforge.io.format.read_tensor`). Whoever
    needs torch first waits for this import to finish. The garbage collector is off during the import and torch's
    objects are frozen after it (``gc.freeze``): they are never garbage, and otherwise the interpreter walks all of
    them at every full collection and once more at exit (measured: 0.35-0.45 s per command).
    """
    import sys

    if "torch" not in sys.modules:
        threading.Thread(target=_import_torch, name="reforge-import-torch", daemon=True).start()


def _import_torch() -> None:
    import gc

    gc.disable()
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001 - the caller's own import raises it where it can be reported
        pass
    finally:
        gc.freeze()
        gc.enable()


def tune_allocator() -> None:
    """Make short-lived allocations cheap for the streaming commands (called by the CLI before torch loads).

    glibc's thresholds keep freed heap memory for reuse instead of mapping fresh pages (each of which faults and is
    zeroed on first touch). torch's THP_MEM_ALLOC_ENABLE, set here before the streaming commands moved to pieces
    and reused buffers, is no longer set: with them there are no large short-lived tensors left, and the 2 MiB
    alignment it imposes on every allocation of 2 MiB or more doubled the max RSS of an 8-layer diff (0.57 ->
    1.2 GiB) and added 1.4 s of system time. Only the CLI does this; library users keep their settings.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the reusable heap
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap instead of returning it
    except (OSError, AttributeError):
        pass


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run torch's elementwise kernels on ``count`` threads for a while.

    Streaming keeps three threads busy (read-ahead, arithmetic, writing). torch's own intra-op threads
    spin-wait at every barrier; with more busy threads than cores, blocks of a million elements ran 20x slower
    (measured on 2 cores: 12 vs 209 million elements/s). One arithmetic thread is the fast choice here.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _row_size(shape: tuple[int, ...]) -> int:
    return _numel(shape[1:]) if shape else 1


def check_finite(ok: bool, key: str, what: str) -> None:
    """Raise `NonFiniteError` for output tensor ``key`` unless ``ok``; ``what`` says where the NaN/Inf came from."""
    if not ok:
        raise NonFiniteError(
            f"tensor {key!r}: {what} NaN or Inf.",
            hint="An input holds NaN/Inf (find it with `reforge verify` or `reforge inspect`), or the result "
            "overflows the output dtype (try --dtype float32). Nothing was written under the final name.",
            tensor=key,
        )
