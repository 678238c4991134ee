"""Device-to-host copies of captured buffers that overlap the next forward pass.

On a GPU the copy runs on a side stream into a pinned block as soon as the forward pass that filled the buffer
is queued. Only the thread that drives the model touches CUDA: it asks whether a copy is done
(:meth:`InFlight.done`, at its next step) before handing the block to the threads that copy prompts' rows out of
it, and takes the block back for a later copy once they are through (:meth:`InFlight.release`). Blocks are kept
by :class:`HostTransfer` rather than freed: freeing pinned memory records CUDA events, which a copier thread
must not do while the driving thread issues the engine's own copies. On CPU the buffer already is host memory.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class InFlight:
    """One buffer on its way to host memory."""

    def __init__(self, buffer: torch.Tensor, transfer: Optional["HostTransfer"] = None) -> None:
        self._host = buffer
        self._block: Optional[torch.Tensor] = None
        self._transfer = transfer
        self._bytes: Optional[np.ndarray] = None
        self._event = None
        if buffer.device.type == "cpu":
            return
        stream = transfer.stream(buffer.device)
        stream.wait_stream(torch.cuda.current_stream(buffer.device))
        size = buffer.numel() * buffer.element_size()
        self._block = transfer.block(size)
        with torch.cuda.stream(stream):
            self._host = self._block[:size].view(buffer.dtype).view(buffer.shape)
            self._host.copy_(buffer, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)
        buffer.record_stream(stream)  # the allocator must not hand the buffer out before the copy has read it

    @property
    def shape(self) -> torch.Size:
        return self._host.shape

    @property
    def dtype(self) -> torch.dtype:
        return self._host.dtype

    def done(self) -> bool:
        """Whether the contents are in host memory (on the driving thread)."""
        if self._event is not None and self._event.query():
            self._event = None
        return self._event is None

    def wait(self) -> None:
        """Blocks until the contents are in host memory (on the driving thread)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def host(self) -> torch.Tensor:
        """The buffer's contents in host memory (once :meth:`done`)."""
        if self._event is not None:
            raise RuntimeError("the copy to host memory is still running: wait() first.")
        return self._host

    def host_bytes(self) -> np.ndarray:
        """:meth:`host` as a numpy array of its bytes, ``[..., width * item size]`` (made once; numpy has no
        bfloat16, and slicing numpy arrays costs a fraction of slicing tensors)."""
        array = self._bytes
        if array is None:
            array = self._bytes = self.host().view(torch.uint8).numpy()
        return array

    def release(self) -> None:
        """Nobody reads the contents any more: the pinned block serves a later copy (on the driving thread)."""
        block, self._block = self._block, None
        if block is not None:
            self._transfer.give_back(block)


class HostTransfer:
    """Starts copies of captured buffers to host memory (one side stream per device), into pinned blocks it
    keeps for reuse."""

    def __init__(self) -> None:
        self._streams: dict = {}
        self._free: list[torch.Tensor] = []  # pinned uint8 blocks no copy uses

    def start(self, buffer: torch.Tensor) -> InFlight:
        return InFlight(buffer, self)

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def block(self, size: int) -> torch.Tensor:
        """A free pinned block of at least ``size`` bytes (the smallest that fits; a new one when none does, in
        place of the free ones too small to serve this size)."""
        fitting = [index for index, block in enumerate(self._free) if block.numel() >= size]
        if fitting:
            return self._free.pop(min(fitting, key=lambda index: self._free[index].numel()))
        self._free.clear()
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def give_back(self, block: torch.Tensor) -> None:
        self._free.append(block)
