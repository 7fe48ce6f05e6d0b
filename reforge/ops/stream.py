"""Streaming helpers shared by diff and merge: row blocks, rounding with measured error, and read-ahead.

Arithmetic runs on row blocks of about a million elements in reused fp32 buffers: every pass over the data
stays in cache, nothing of the size of a tensor is allocated in fp32, and the result is identical to computing
the whole tensor at once (every operation is elementwise or per row).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

CHUNK_ELEMENTS = 1 << 20
K = TypeVar("K")
V = TypeVar("V")


def row_blocks(shape: tuple[int, ...]) -> Iterator[slice]:
    """Slices over the first dimension, each covering about CHUNK_ELEMENTS elements (at least one row).
    A 0-d shape gets one block, ``...``."""
    if len(shape) == 0:
        yield ...  # type: ignore[misc]
        return
    row = 1
    for size in shape[1:]:
        row *= size
    step = max(1, CHUNK_ELEMENTS // max(row, 1))
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


class Accumulator:
    """A reusable fp32 buffer for one row block, and the output tensor it is rounded into.

    Use: ``for rows in row_blocks(shape): x = acc.block(rows); ...fill x...; acc.commit(rows)``; then
    ``acc.output`` is the tensor in the output dtype and ``acc.max_abs_rounding`` the largest |stored - exact|.
    """

    def __init__(self, shape: tuple[int, ...], dtype: "torch.dtype") -> None:
        import torch

        self.output = torch.empty(shape, dtype=dtype)
        self.max_abs_rounding = 0.0
        self._exact = dtype == torch.float32
        size = min(_numel(shape), max(CHUNK_ELEMENTS, _row_size(shape)))
        self._buffer = torch.empty(size, dtype=torch.float32)
        self._scratch = None if self._exact else torch.empty(size, dtype=torch.float32)

    def block(self, rows: slice) -> "torch.Tensor":
        """The fp32 buffer viewed as the rows ``rows`` of the output (contents undefined: fill it)."""
        shape = self.output[rows].shape
        return self._buffer[: _numel(tuple(shape))].view(shape)

    def commit(self, rows: slice) -> None:
        """Round the filled block into the output and measure the rounding."""
        exact = self.block(rows)
        target = self.output[rows]
        target.copy_(exact)
        if self._exact or exact.numel() == 0:
            return
        error = self._scratch[: exact.numel()].view(exact.shape)
        error.copy_(target)
        error.sub_(exact).abs_()
        self.max_abs_rounding = max(self.max_abs_rounding, float(error.max()))


def prefetch(items: Iterable[K], load: Callable[[K], V], depth: int = 2) -> Iterator[tuple[K, V]]:
    """Yield ``(item, load(item))`` in order while a background thread loads up to ``depth`` items ahead.

    Reads release the GIL, so reading the next tensors overlaps with computing on the current ones. An exception
    in ``load`` is raised here, at the item that failed.
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

    thread = threading.Thread(target=worker, name="reforge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, value, error = pending.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item, value
    finally:
        stop.set()
        while thread.is_alive():  # drain so the worker can finish its put and exit
            try:
                pending.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def tune_allocator() -> None:
    """Make large, short-lived allocations cheap for the streaming commands (called by the CLI before torch loads).

    A 7B merge allocates and frees thousands of tensors of 30-500 MB; by default each one is a fresh mmap whose
    every 4 KiB page faults on first touch. Measured on an 8-layer merge: 2.0M page faults and 15 s of system time.
    torch's THP_MEM_ALLOC_ENABLE backs large tensors with 2 MiB pages, and glibc's thresholds keep freed memory
    for reuse: faults fell to 0.13M with RSS unchanged. Only the CLI does this; library users keep their settings.
    """
    import ctypes
    import ctypes.util
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
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
