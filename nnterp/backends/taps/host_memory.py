"""Host memory for the blocks that hold extracted rows: reused once nothing refers to it, and, where fresh memory
must be registered with CUDA, its pages faulted in ahead on threads of their own.

The kernel zeroes a page at its first touch: copies into fresh memory ran at half the speed of copies into memory
already touched (7.7 against 16 GB/s on a 2-core CPU machine), and registering fresh memory with CUDA, which
touches every page, took 42 ms per 256 MB block against 5.5 ms once the pages were in (H200 machine,
``scratch/bench_host_memory.py``): extracting every layer of 4,096 prompts fills about 100 such blocks. Memory
that copier threads write is left to them to fault in as they write, in parallel with the thread that drives the
model (waiting for it there cost that thread 1.6 s in the first extraction of ``scratch/bench_row_copier.py
--taps 16 --prompts 64 --new 1``, on the 2-core CPU machine).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

KEEP_BYTES = 2 << 30  # free memory kept for reuse
WORKING_SET_SHARE = 16  # free memory kept up to what was in use at once, at most this share of the machine's memory
PREFAULT_BYTES = 32 << 20  # fresh memory of at least this size to be registered is faulted in ahead
PREFAULT_AHEAD = 4  # arrays faulted in ahead of the blocks that ask for them
PREFAULT_THREADS = 2  # a thread faulted in 8 GB/s (H200 machine); every layer of 4,096 prompts asked for 9
MADV_POPULATE_WRITE = 23  # Linux 5.14+


class BlockMemory:
    """Flat uint8 arrays for blocks. Each array given out is a view of memory kept here; once the view and every
    view of it are gone (a block's prompts' tensors all dropped, wherever that happens), the memory comes back
    and serves a later block. Free memory past ``keep`` bytes goes back to the system, the oldest first; memory
    still referred to is never taken back. With ``working_set`` set, the free memory kept goes up to the most that
    was in use at once, up to ``working_set`` bytes: an extraction that needs a little more than ``keep`` would
    otherwise let a block go at its end and take a fresh one at its next start, every time. With ``prefault`` set, a
    fresh array of at least that many bytes comes with the next ones of its size faulted in ahead on other threads
    (see :class:`Prefaulter`)."""

    def __init__(self, keep: int = KEEP_BYTES, prefault: Optional[int] = None, working_set: int = 0) -> None:
        self.keep = keep
        self.prefault = prefault
        self.working_set = working_set
        self._in_use = 0  # bytes given out and not yet sorted back
        self._most_in_use = 0
        self._free: list[np.ndarray] = []  # memory nothing refers to, the oldest first
        self._returned: deque = deque()  # memory whose view was freed (on any thread), not yet sorted
        self._lock = threading.Lock()
        self._closed = False
        self._prefaulter: Optional[Prefaulter] = None

    def take(self, size: int) -> np.ndarray:
        """A flat uint8 array of at least ``size`` bytes (on the driving thread)."""
        with self._lock:
            self._settle()
            position = next((at for at, owner in enumerate(self._free) if owner.nbytes >= size), None)
            owner = None if position is None else self._free.pop(position)
        if owner is None:
            owner = self._new(size)
        with self._lock:
            self._in_use += owner.nbytes
            self._most_in_use = max(self._most_in_use, self._in_use)
        view = np.frombuffer(memoryview(owner), dtype=np.uint8)  # the base of every view taken of it
        weakref.finalize(view, self._give_back, owner).atexit = False
        return view

    def _new(self, size: int) -> np.ndarray:
        """Fresh memory of ``size`` bytes."""
        if self.prefault is None or size < self.prefault:
            return np.empty(size, dtype=np.uint8)
        if self._prefaulter is None:
            self._prefaulter = Prefaulter()
        return self._prefaulter.take(size)

    def _give_back(self, owner: np.ndarray) -> None:
        """``owner``'s view is gone (called on whatever thread dropped it, or by the garbage collector)."""
        self._returned.append(owner)
        if self._lock.acquire(blocking=False):  # else its holder sorts it
            try:
                self._settle()
            finally:
                self._lock.release()

    def _settle(self) -> None:
        """Sorts the memory given back since, and lets go of free memory past the limit (holding the lock)."""
        while self._returned:
            owner = self._returned.popleft()
            self._in_use -= owner.nbytes
            if self._closed:
                self._forget(owner)
            else:
                self._free.append(owner)
        free = sum(owner.nbytes for owner in self._free)
        limit = max(self.keep, min(self._most_in_use, self.working_set))
        while free > limit:
            owner = self._free.pop(0)
            free -= owner.nbytes
            self._forget(owner)

    def _forget(self, owner: np.ndarray) -> None:
        """``owner`` is no longer kept (freed once nothing else refers to it)."""

    def clear(self) -> None:
        """Lets go of the free memory, and of the rest as it comes back."""
        with self._lock:
            self._closed = True
            self._settle()
            for owner in self._free:
                self._forget(owner)
            self._free = []
        if self._prefaulter is not None:
            self._prefaulter.close()
            self._prefaulter = None


class Prefaulter:
    """Fresh memory whose pages are faulted in on threads of their own: each array taken brings ``ahead`` more of
    its size under way (the blocks of an extraction come in about one size), so the thread that takes them finds the
    next ones ready, or waits for the one under way the longest (less than faulting a new one in itself). The
    threads let the interpreter go while they fault pages in."""

    def __init__(self, ahead: int = PREFAULT_AHEAD, threads: int = PREFAULT_THREADS) -> None:
        self.ahead = ahead
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="nnterp-prefault")
        self._coming: deque = deque()  # (size, future of the array), in the order asked for

    def take(self, size: int) -> np.ndarray:
        """An array of ``size`` to twice ``size`` bytes, its pages in memory."""
        while self._coming and not size <= self._coming[0][0] <= 2 * size:  # not used
            self._coming.popleft()[1].cancel()
        if not self._coming:
            self._coming.append((size, self._threads.submit(faulted_in, size)))
        array = self._coming.popleft()[1].result()
        while len(self._coming) < self.ahead:
            self._coming.append((size, self._threads.submit(faulted_in, size)))
        return array

    def close(self) -> None:
        for _, future in self._coming:
            future.cancel()
        self._coming.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)


def machine_share(share: int) -> int:
    """``1 / share`` of the machine's memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // share
    except (AttributeError, ValueError, OSError):
        return 0


def faulted_in(size: int) -> np.ndarray:
    """``size`` bytes whose pages are all in memory (zeroed by the kernel)."""
    array = np.empty(size, dtype=np.uint8)
    start = array.ctypes.data & ~(mmap.PAGESIZE - 1)
    if not _populate(start, array.ctypes.data + size - start):
        array[::mmap.PAGESIZE] = 0  # one write per page (numpy lets the interpreter go)
    return array


def _populate(start: int, length: int) -> bool:
    """Faults in the pages of ``[start, start + length)`` through ``madvise`` (Linux 5.14+); False where the
    system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    return madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_POPULATE_WRITE) == 0
