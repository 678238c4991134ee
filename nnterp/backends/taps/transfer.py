"""Device-to-host copies of captured buffers that overlap the next forward pass.

On a GPU the copy runs on a side stream into pinned memory as soon as the forward pass that filled the
buffer is queued; :meth:`InFlight.host` waits for it (usually long done). Prompts' rows are then copied out of
it into tensors of their own, and once no prompt refers to it the pinned block returns to PyTorch's host cache
for a later copy. On CPU the buffer already is host memory.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class InFlight:
    """One buffer on its way to host memory."""

    def __init__(self, buffer: torch.Tensor, streams: dict) -> None:
        self._host: Optional[torch.Tensor] = None
        self._pinned: Optional[torch.Tensor] = None
        self._bytes: Optional[np.ndarray] = None
        self._event = None
        if buffer.device.type == "cpu":
            self._host = buffer
            return
        device = buffer.device
        stream = streams.get(device)
        if stream is None:
            stream = streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._pinned = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=True)
            self._pinned.copy_(buffer, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)
        buffer.record_stream(stream)  # the allocator must not hand the buffer out before the copy has read it

    def host(self) -> torch.Tensor:
        """The buffer's contents in host memory (safe to call from several threads)."""
        event = self._event
        if event is not None:
            event.synchronize()
            self._host, self._event = self._pinned, None
        return self._host

    def host_bytes(self) -> np.ndarray:
        """:meth:`host` as a numpy array of its bytes, ``[..., width * item size]`` (made once; numpy has no
        bfloat16, and slicing numpy arrays costs a fraction of slicing tensors)."""
        array = self._bytes
        if array is None:
            array = self._bytes = self.host().view(torch.uint8).numpy()
        return array


class HostTransfer:
    """Starts copies of captured buffers to host memory (one side stream per device)."""

    def __init__(self) -> None:
        self._streams: dict = {}

    def start(self, buffer: torch.Tensor) -> InFlight:
        return InFlight(buffer, self._streams)
