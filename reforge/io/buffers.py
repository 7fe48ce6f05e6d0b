"""Page-aligned memory for whole tensors, reused while streaming.

Why reuse: a streamed diff or merge reads, computes and writes hundreds of tensors of 30-500 MB each. Fresh memory
for each one costs a page fault per page, and the kernel zeroes every new page: on an 8-layer 7B-width diff that
zeroing (``clear_page_erms`` in perf) was 35% of all CPU time, more than the arithmetic. A pooled buffer is faulted
in once and then reused for the rest of the run.

Why page-aligned: reads that bypass the page cache (O_DIRECT, see `reforge.io.format.read_tensor`) need memory
aligned to the disk's blocks.

When a buffer is free again: every loan is a fresh ``memoryview`` of the buffer. ``torch.frombuffer`` keeps the
view alive for as long as any tensor, view or numpy array made from it exists, so once the weak reference to the
loan is dead, nothing can touch the buffer and it can be lent again. No explicit release, so no use-after-release.
"""

from __future__ import annotations

import mmap
import threading
import weakref

ALIGNMENT = 4096  # O_DIRECT offsets, lengths and memory: a multiple of every common logical block size
HUGE_PAGE = 2 * 2**20


def allocate(nbytes: int) -> mmap.mmap:
    """Fresh page-aligned anonymous memory of ``nbytes`` (at least 1), backed by 2 MiB pages where the kernel
    allows (fewer page faults and TLB misses on buffers of hundreds of MB)."""
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled or unsupported: 4 KiB pages work the same
            pass
    return buffer


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class BufferPool:
    """Lends page-aligned buffers and takes them back once nothing uses them (see the module docstring).

    The pool holds at most as many buffers as were ever in use at once (a few tensors' worth while streaming);
    they are freed with the pool. Safe to use from several threads.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[mmap.mmap, list]] = []  # (buffer, [weak reference to its current loan])
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> memoryview:
        """A writable, page-aligned view of at least ``nbytes`` bytes. Keep it, or a tensor made from it with
        ``torch.frombuffer``, for as long as the memory is in use; the buffer returns to the pool after that."""
        with self._lock:
            entry = self._smallest_free(nbytes)
            if entry is None:
                entry = (allocate(round_up(nbytes, HUGE_PAGE)), [None])
                self._entries.append(entry)
            buffer, loan_ref = entry
            loan = memoryview(buffer)
            loan_ref[0] = weakref.ref(loan)
            return loan

    def _smallest_free(self, nbytes: int) -> tuple[mmap.mmap, list] | None:
        free = [e for e in self._entries if len(e[0]) >= nbytes and (e[1][0] is None or e[1][0]() is None)]
        return min(free, key=lambda e: len(e[0]), default=None)
