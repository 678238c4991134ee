"""One prompt's extracted activations, and how they are put together from captured rows."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .plan import ExtractionPlan
from .transfer import InFlight


@dataclass
class Activations:
    """One prompt's activations. ``values[accessor]`` is ``[len(layers), tokens, width]`` in host memory, row
    ``t`` the stream at ``token_ids[t]``: the prompt's tokens, then every generated token but the last (the
    engine never runs the model on the last one)."""

    index: int  # position in the prompts given to extract
    token_ids: list[int]
    layers: tuple[int, ...]
    values: dict[str, torch.Tensor]
    generated: list[int] = field(default_factory=list)

    def __getitem__(self, accessor: str) -> torch.Tensor:
        return self.values[accessor]


class PromptRows:
    """One prompt's rows, written into a tensor of its own (``[taps, tokens, width]``) as the captured buffers
    holding them reach host memory, by a :class:`RowCopier` thread. ``expected``: how many rows the prompt runs,
    when known (its tensor is made that long at once; rows past it belong to a step an engine ran ahead and
    discards, and are dropped)."""

    __slots__ = ("expected", "length", "lane", "last_buffer", "_rows", "_bytes", "_filled", "_error")

    def __init__(self, expected: Optional[int] = None) -> None:
        self.expected = expected
        self.length = 0  # rows added so far (set by the thread that adds them)
        self.lane: Optional[int] = None  # the copier thread that writes this prompt
        self.last_buffer = -1  # the number of the last buffer holding rows of this prompt (see RowCopier.copy)
        self._rows: Optional[torch.Tensor] = None
        self._bytes: Optional[np.ndarray] = None  # _rows' bytes, [taps, capacity, width * item size]
        self._filled = 0  # rows written so far (on the copier's thread)
        self._error: Optional[BaseException] = None

    def add(self, start: int, count: int, position: int, where: str) -> tuple["PromptRows", int, int, int]:
        """Rows for tokens ``position .. position + count - 1`` (at ``start`` of a captured buffer), as an item of
        :meth:`RowCopier.copy`. An engine that recomputes a request (after preempting it) starts again from an
        earlier position: the rows from there on are replaced."""
        if position > self.length:
            raise RuntimeError(
                f"{where}: tokens {self.length}..{position - 1} were never run through the model (served from "
                "a prefix cache?), so their activations cannot be extracted. Disable prefix caching."
            )
        self.length = position + count
        return self, start, count, position

    def _write(self, host: torch.Tensor, host_bytes: np.ndarray, start: int, count: int, position: int) -> None:
        """Copy ``count`` rows from ``start`` of a buffer in host memory (on the copier's thread)."""
        if self.expected is not None:
            count = min(count, self.expected - position)
            if count <= 0:
                return
        end = position + count
        if self._rows is None or end > self._rows.shape[1]:
            self._reserve(host, end)
        self._bytes[:, position:end] = host_bytes[:, start:start + count]
        self._filled = max(self._filled, end)

    def _reserve(self, host: torch.Tensor, end: int) -> None:
        capacity = self.expected if self.expected is not None else max(end, 2 * self._filled)
        with torch.inference_mode(False):
            rows = torch.empty((host.shape[0], capacity, host.shape[2]), dtype=host.dtype)
        if self._rows is not None:
            rows[:, :self._filled] = self._rows[:, :self._filled]
        self._rows, self._bytes = rows, rows.view(torch.uint8).numpy()

    def _result(self) -> torch.Tensor:
        """The prompt's rows (on the copier's thread, after its writes): the tensor itself when it is as long as
        the rows added, else a copy of the rows that exist."""
        if self._error is not None:
            raise self._error
        length = min(self.length, self.expected) if self.expected is not None else self.length
        if self._rows is None or self._filled < length:
            raise RuntimeError(f"{self._filled} of {length} rows were written: the capture lost track of this prompt.")
        return self._rows if self._rows.shape[1] == length else self._rows[:, :length].clone()


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or ``taskset``'s limit), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class RowCopier:
    """Threads that copy prompts' rows out of captured buffers into the prompts' own tensors while the thread that
    drives the model goes on (one call per buffer; each prompt always on the same thread, so its writes keep
    their order). Copies are numpy's, which release the interpreter while they run: a torch copy on the CPU wakes
    a thread per core, which then spin and slow the thread that drives the model (on an H100, copies of one layer
    made on that thread cost 0.75x of the engine's throughput), and copying every layer's rows where the prompt
    finishes stalled the engine (0.44 s of a 1.26 s run for 256 prompts x 32 tokens on an H200).

    The copier threads never call CUDA: the driving thread hands a buffer over once its transfer is done (checked
    at each :meth:`copy`, waited for where a prompt's rows are asked for) and releases it once its copies ran."""

    def __init__(self, threads: Optional[int] = None) -> None:
        self.threads = threads or max(1, min(4, usable_cpus() // 4))
        self._lanes: list[ThreadPoolExecutor] = []
        self._next_lane = 0
        self._numbered = 0  # buffers given to copy so far
        self._waiting: deque = deque()  # (number, buffer, items): transfers not yet seen done, in order
        self._copying: deque = deque()  # (buffer, futures): handed over, to release once the futures are done

    def copy(self, buffer: InFlight, items: list[tuple[PromptRows, int, int, int]]) -> None:
        """Copy each item's rows ``(prompt, start, count, position)`` (from :meth:`PromptRows.add`) out of
        ``buffer`` once it is in host memory."""
        number, self._numbered = self._numbered, self._numbered + 1
        for prompt, *_ in items:
            prompt.last_buffer = number
            if prompt.lane is None:
                prompt.lane, self._next_lane = self._next_lane, (self._next_lane + 1) % self.threads
        self._waiting.append((number, buffer, items))
        self.hand_over()

    def finish(self, prompt: PromptRows) -> Future:
        """The prompt's rows ``[taps, tokens, width]`` once every copy asked for so far has run (a future; waits
        here for the transfers holding the prompt's rows)."""
        self.hand_over(until=prompt.last_buffer)
        if prompt.lane is None:
            prompt.lane = 0
        return self._lane(prompt.lane).submit(prompt._result)

    def hand_over(self, until: int = -1) -> None:
        """Gives the copier threads every buffer whose transfer is done, in order, waiting for those numbered up
        to ``until``; releases the buffers whose copies all ran."""
        while self._copying and all(future.done() for future in self._copying[0][1]):
            self._copying.popleft()[0].release()
        while self._waiting:
            number, buffer, items = self._waiting[0]
            try:
                if not buffer.done():
                    if number > until:
                        return
                    buffer.wait()
            except Exception as error:  # a failed transfer: raised where the prompts' rows are asked for
                for prompt, *_ in items:
                    prompt._error = prompt._error or error
                self._waiting.popleft()
                continue
            self._waiting.popleft()
            by_lane: dict[int, list] = {}
            for item in items:
                by_lane.setdefault(item[0].lane, []).append(item)
            futures = [self._lane(lane).submit(_write_rows, buffer, lane_items) for lane, lane_items in by_lane.items()]
            self._copying.append((buffer, futures))

    def _lane(self, lane: int) -> ThreadPoolExecutor:
        while len(self._lanes) <= lane:
            self._lanes.append(ThreadPoolExecutor(1, thread_name_prefix=f"nnterp-rows-{len(self._lanes)}"))
        return self._lanes[lane]

    def close(self) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=False, cancel_futures=True)
        self._lanes = []
        self._waiting.clear()
        self._copying.clear()


def _write_rows(buffer: InFlight, items: list[tuple[PromptRows, int, int, int]]) -> None:
    try:
        host, host_bytes = buffer.host(), buffer.host_bytes()
    except Exception as error:
        for prompt, *_ in items:
            prompt._error = prompt._error or error
        return
    for prompt, start, count, position in items:
        if prompt._error is None:
            try:
                prompt._write(host, host_bytes, start, count, position)
            except Exception as error:  # raised where the prompt's rows are asked for
                prompt._error = error


def activations(plan: ExtractionPlan, index: int, rows: torch.Tensor, token_ids: list[int],
                generated: list[int] | None = None) -> Activations:
    """Split ``[taps, tokens, width]`` rows into one ``[layers, tokens, width]`` tensor per accessor."""
    if rows.shape[1] != len(token_ids):
        raise RuntimeError(
            f"prompt {index}: {rows.shape[1]} activation rows for {len(token_ids)} tokens; the capture lost track "
            "of this prompt's tokens."
        )
    by_accessor = rows.view(len(plan.accessors), len(plan.layers), *rows.shape[1:])
    values = {name: by_accessor[position] for position, name in enumerate(plan.accessors)}
    return Activations(index, list(token_ids), plan.layers, values, list(generated or []))
