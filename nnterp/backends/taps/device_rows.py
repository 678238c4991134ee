"""Prompts' rows written by the device that captured them: a GPU's kernels into host memory the driver maps into
the device's addresses, or the CPU itself.

On a GPU with unified addressing, the host blocks holding prompts' rows are registered with the driver (page
locked, mapped), and each engine step's captured rows are gathered and scattered into them by two indexing
kernels per block on a side stream: the rows cross the bus once, from the captured buffer to the prompt's region, with no staging
buffer and no copier thread. Copier threads share the interpreter with the engine's thread, and at 256 prompts
per decode step their handovers cost that thread more than their writes. The host only computes where rows go
(a few numpy calls per block and step).

A prompt's rows are ready once the kernels of the last step holding them ran (an event, waited for by the
engine's thread). Host memory stays registered while a block or a user's tensor refers to it, or while
:class:`~.host_memory.BlockMemory` keeps it for reuse: registering memory holds a lock of the driver (the engine's
kernel launches waited behind it) for as long as its pages take to be faulted in and pinned, so memory is
registered once and reused, its pages faulted in ahead on another thread when fresh.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Optional

import numpy as np
import torch

from .host_memory import KEEP_BYTES, PREFAULT_BYTES, WORKING_SET_SHARE, BlockMemory, machine_share
from .rows import BlockPlacement, PromptRows, RowBlock, scatter_indices

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
    """:class:`BlockMemory` registered with CUDA: memory stays registered while a block or a user's tensor refers
    to it or it is kept for reuse, and is unregistered once let go (after the writes queued on ``stream`` ran).
    Fresh memory has its pages faulted in ahead."""

    def __init__(self, stream: Optional[torch.cuda.Stream] = None, keep: int = KEEP_BYTES,
                 working_set: Optional[int] = None) -> None:
        # registering fresh memory would fault it in here; letting memory go and registering anew cost about 25 ms
        # per 256 MB block (H200 machine)
        working_set = machine_share(WORKING_SET_SHARE) if working_set is None else working_set
        super().__init__(keep, prefault=PREFAULT_BYTES, working_set=working_set)
        self._stream = stream
        self._registered: dict[int, weakref.finalize] = {}  # address -> unregisters it (once)

    def _new(self, size: int) -> np.ndarray:
        array = super()._new(size)
        register(array)
        address = array.ctypes.data
        # memory freed while registered stays pinned: memory left behind by an engine dropped without closing
        # is unregistered as it is freed
        finalizer = self._registered[address] = weakref.finalize(array, _unregister_at_free, address)
        finalizer.atexit = False
        return array

    def _forget(self, owner: np.ndarray) -> None:
        finalizer = self._registered.pop(owner.ctypes.data, None)
        if finalizer is not None:
            if self._stream is not None:
                self._stream.synchronize()  # writes of an abandoned prompt may still be queued
            finalizer()


class DeviceRows:
    """Writes prompts' rows out of captured buffers into host blocks with the buffers' device: a GPU that maps
    host memory (see :func:`mapped_rows_supported`), or the CPU, on the engine's thread. The role of
    :class:`~.rows.RowCopier` and :class:`~.transfer.HostTransfer` together."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        memory = MappedMemory(self._stream) if device.type == "cuda" else BlockMemory()
        self.placement = BlockPlacement(1, memory, placed=self._placed)
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
        future: Future = Future()
        try:
            future.set_result(prompt._result())
        except Exception as error:
            future.set_exception(error)
        return future

    def _placed(self, block: RowBlock) -> None:
        if block.device is None:
            block.device = block.tensor if self._stream is None else device_view(block.bytes, self.device)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._events.clear()
        self.placement.clear()
        self.placement.memory.clear()

    def _wait(self, until: int) -> None:
        last = None
        while self._events and (self._events[0][0] <= until or self._events[0][1].query()):
            last = self._events.popleft()[1]
        if last is not None:
            last.synchronize()


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
        except Exception as error:
            for prompt, *_ in items:
                prompt.fail(error)
        offset += 2 * count
