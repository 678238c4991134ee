"""Prompts' rows written by the device that captured them: a GPU's kernels into host memory the driver maps into
the device's addresses, or the CPU itself.

On a GPU with unified addressing, the host blocks holding prompts' rows are registered with the driver (page
locked, mapped), and each engine step's captured rows are gathered and scattered into them by two indexing
kernels per block on a side stream: the rows cross the bus once, from the captured buffer to the prompt's region, with no staging
buffer and no copier thread. Copier threads share the interpreter with the engine's thread, and at 256 prompts
per decode step their handovers cost that thread more than their writes. The host only computes where rows go
(a few numpy calls per block and step).

A prompt's rows are ready once the kernels of the last step holding them ran (an event, waited for by the
engine's thread). What stays registered is what :class:`~.rows.BlockMemory` keeps for reuse plus the blocks of
prompts still running; memory it lets go is unregistered, so tensors a user keeps do not keep pages locked.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterable

import numpy as np
import torch

from .rows import KEEP_BYTES, BlockMemory, BlockPlacement, PromptRows, RowBlock, scatter_indices

logger = logging.getLogger(__name__)

REGISTER_PORTABLE, REGISTER_MAPPED = 0x01, 0x02  # cudaHostRegister's flags
_SUPPORTED: dict[torch.device, bool] = {}


class _HostArray:
    """Registered host memory described as a CUDA array (under unified addressing its device address is its
    host address)."""

    def __init__(self, pointer: int, shape: tuple[int, ...]) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3}


class RegistrationError(RuntimeError):
    """Host memory could not be registered with CUDA, or not mapped into the device's addresses."""


def device_view(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` (uint8, registered) as a tensor on ``device`` whose kernels write the host memory itself."""
    try:
        view = torch.as_tensor(_HostArray(array.ctypes.data, array.shape), device=device)
    except (RuntimeError, AssertionError) as error:  # torch without CUDA asserts
        raise RegistrationError(f"host memory could not be mapped onto {device}: {error}") from error
    if view.data_ptr() != array.ctypes.data:
        raise RegistrationError("host memory registered with CUDA was copied to the device instead of being mapped")
    return view


def register(array: np.ndarray) -> None:
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(array.ctypes.data, array.nbytes, REGISTER_PORTABLE | REGISTER_MAPPED)
    if error != cudart.cudaError.success:
        raise RegistrationError(f"could not register {array.nbytes} bytes of host memory with CUDA "
                                f"({cudart.cudaGetErrorString(error)})")


def unregister(address: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(address)
    except Exception:  # CUDA already torn down: the process is ending
        pass


def _unregister_at_free(address: int) -> None:
    """:func:`unregister`, looked up when the memory is freed."""
    unregister(address)


def mapped_rows_supported(device: torch.device) -> bool:
    """Whether a kernel on ``device`` writes registered host memory in place (tried once per device)."""
    if device.type != "cuda":
        return False
    if device not in _SUPPORTED:
        try:
            array = np.zeros(1 << 16, dtype=np.uint8)
            register(array)
            try:
                rows = array.reshape(16, 4096)
                device_view(rows, device)[3].fill_(7)
                torch.cuda.synchronize(device)
                _SUPPORTED[device] = bool((rows[3] == 7).all() and rows[:3].max() == 0 and rows[4:].max() == 0)
            finally:
                unregister(array.ctypes.data)
        except Exception as error:  # the copier threads serve instead
            logger.info("GPU writes into host memory unavailable on %s: %s", device, error)
            _SUPPORTED[device] = False
    return _SUPPORTED[device]


class MappedMemory(BlockMemory):
    """:class:`BlockMemory` whose arrays are registered with CUDA while it keeps them. An array backing a block
    still written (``busy``) is kept past the limit, and the limit is at least twice what is busy: registering
    memory pins its pages on the engine's thread, so memory that comes back must be kept for the next blocks
    rather than registered anew (4,096 prompts of every layer flow 28 GB through the blocks)."""

    def __init__(self, busy: Callable[[np.ndarray], bool], keep: int = KEEP_BYTES) -> None:
        super().__init__(keep)
        self._busy = busy
        self._registered: dict[int, weakref.finalize] = {}  # address -> unregisters it (once)

    def take(self, size: int) -> np.ndarray:
        array = super().take(size)
        address = array.ctypes.data
        if address not in self._registered:
            register(array)
            # memory freed while registered stays pinned: an engine dropped without closing unregisters its
            # arrays as they are freed
            finalizer = self._registered[address] = weakref.finalize(array, _unregister_at_free, address)
            finalizer.atexit = False
        return array

    def _limit(self) -> int:
        return max(self.keep, 2 * sum(array.nbytes for array in self._arrays if self._busy(array)))

    def _evictable(self, array: np.ndarray) -> bool:
        return not self._busy(array)

    def _forget(self, array: np.ndarray) -> None:
        finalizer = self._registered.pop(array.ctypes.data, None)
        if finalizer is not None:
            finalizer()


class DeviceRows:
    """Writes prompts' rows out of captured buffers into host blocks with the buffers' device: a GPU that maps
    host memory (see :func:`mapped_rows_supported`), or the CPU, on the engine's thread. The role of
    :class:`~.rows.RowCopier` and :class:`~.transfer.HostTransfer` together."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._running: dict[RowBlock, int] = {}  # blocks with prompts still written: how many
        memory = MappedMemory(self._written) if device.type == "cuda" else BlockMemory()
        self.placement = BlockPlacement(1, memory, placed=self._placed)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._numbered = 0  # buffers given to copy so far
        self._events: deque = deque()  # (number, event): writes not yet waited for, in order

    def copy(self, buffer: torch.Tensor, items: list[tuple[PromptRows, int, int, int]]) -> None:
        """Write each item's rows ``(prompt, start, count, position)`` (from :meth:`PromptRows.add`) out of
        ``buffer`` (``[taps, rows, width]``, on the device) into the prompts' regions."""
        number, self._numbered = self._numbered, self._numbered + 1
        by_block = self.placement.group(items, buffer.shape, buffer.dtype, number)
        taps, rows = buffer.shape[0], buffer.shape[1]
        plans = [(block, group, *scatter_indices(group, taps, rows)) for block, group in by_block.items()]
        indices = torch.from_numpy(np.concatenate([part for *_, destination, source in plans
                                                   for part in (destination, source)] or [np.zeros(0, np.int64)]))
        source = buffer.reshape(taps * rows, -1).view(torch.uint8)
        if self._stream is None:
            _scatter(plans, source, indices)
            return
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            # from page-locked memory: a copy from pageable memory would hold this thread until the stream got
            # to it, i.e. until this step's forward pass and the earlier writes had run
            _scatter(plans, source, indices.pin_memory().to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self._stream)
        source.record_stream(self._stream)  # the allocator must not hand the buffer out before the kernels read it
        self._events.append((number, event))

    def finish(self, prompt: PromptRows) -> Future:
        """The prompt's rows ``[taps, tokens, width]`` once every write asked for so far has run (a future, done:
        the writes holding the prompt's rows are waited for here)."""
        self._wait(prompt.last_buffer)
        self.abandon([prompt])
        future: Future = Future()
        try:
            future.set_result(prompt._result())
        except Exception as error:
            future.set_exception(error)
        return future

    def _placed(self, block: RowBlock) -> None:
        self._running[block] = self._running.get(block, 0) + 1
        if block.device is None:
            block.device = block.tensor if self._stream is None else device_view(block.bytes, self.device)

    def abandon(self, prompts: Iterable[PromptRows]) -> None:
        """No more rows come for these prompts (finished, or their extraction ended)."""
        for prompt in prompts:
            block = prompt.block
            if block is not None and block in self._running:
                self._running[block] -= 1
                if not self._running[block]:
                    del self._running[block]

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._events.clear()
        self._running = {}
        self.placement.clear()

    def _wait(self, until: int) -> None:
        last = None
        while self._events and (self._events[0][0] <= until or self._events[0][1].query()):
            last = self._events.popleft()[1]
        if last is not None:
            last.synchronize()

    def _written(self, array: np.ndarray) -> bool:
        """Whether a block in ``array`` may still be written (a prompt of it running, or it takes new ones)."""
        blocks = [*self._running, *self.placement.open.values()]
        return any(block.bytes.base is array for block in blocks)


def _scatter(plans: list, source: torch.Tensor, indices: torch.Tensor) -> None:
    """Each block's rows out of ``source`` (``[taps * rows, row bytes]``): ``indices`` holds, block after block,
    the destination rows then the source rows (from :func:`~.rows.scatter_indices`)."""
    offset = 0
    for block, items, destination, origin in plans:
        count = len(destination)
        if not count:
            continue
        try:
            where, whence = indices[offset:offset + count], indices[offset + count:offset + 2 * count]
            block.device.index_copy_(0, where, source.index_select(0, whence))
        except Exception as error:  # raised where the prompts' rows are asked for
            for prompt, *_ in items:
                prompt._error = prompt._error or error
        offset += 2 * count
