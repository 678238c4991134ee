"""One prompt's extracted activations, and how they are put together from captured rows."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .host_memory import BlockMemory
from .plan import ExtractionPlan
from .transfer import HostTransfer, InFlight


@dataclass
class Activations:
    """One prompt's activations. ``values[accessor]`` is ``[len(layers), tokens, width]`` in host memory, row
    ``t`` the stream at ``token_ids[t]``: the prompt's tokens, then every generated token but the last (the
    engine never runs the model on the last one). The tensors are views of a host block shared with up to 63
    other prompts of the extraction: ``.clone()`` one to keep it without the block."""

    index: int  # position in the prompts given to extract
    token_ids: list[int]
    layers: tuple[int, ...]
    values: dict[str, torch.Tensor]
    generated: list[int] = field(default_factory=list)

    def __getitem__(self, accessor: str) -> torch.Tensor:
        return self.values[accessor]


BLOCK_BYTES = 256 << 20  # a RowBlock's size at most (more where one prompt needs more)
BLOCK_PROMPTS = 64  # prompts per block at most: what one kept prompt holds on to


class RowBlock:
    """Host memory for the rows of up to :data:`BLOCK_PROMPTS` prompts, each a contiguous ``[taps, expected,
    width]`` region of it, so that a step's single rows (a decode step's) of all its prompts are written by one
    scatter. A prompt's tensor is a view of its region: the block's memory lives while one of them does."""

    __slots__ = ("tensor", "bytes", "used", "prompts", "lane", "device")

    def __init__(self, memory: np.ndarray, rows: int, row_bytes: int, lane: int) -> None:
        self.bytes = memory[:rows * row_bytes].reshape(rows, row_bytes)
        with torch.inference_mode(False):
            self.tensor = torch.from_numpy(self.bytes)
        self.used = 0  # rows given to prompts
        self.prompts = 0
        self.lane = lane  # the copier thread that writes this block
        self.device: Optional[torch.Tensor] = None  # the same memory as a GPU writes it (see device_rows.py)

    def fits(self, rows: int, row_bytes: int) -> bool:
        fits_rows = self.used + rows <= self.bytes.shape[0]
        return self.prompts < BLOCK_PROMPTS and fits_rows and self.bytes.shape[1] == row_bytes


class PromptRows:
    """One prompt's rows ``[taps, expected, width]``, written in a region of a :class:`RowBlock` out of the
    captured buffers holding them, by the writer of its extraction (a :class:`RowCopier` thread once the buffer is
    in host memory, or the capturing device: :class:`~.device_rows.DeviceRows`). ``expected``: how many rows the
    prompt runs at most; rows past it belong to a step an engine ran ahead and discards, and are dropped."""

    __slots__ = ("expected", "length", "handed", "last_buffer", "block", "first", "shape", "dtype", "_error")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.length = 0  # rows added so far (on the thread that adds them)
        self.handed = 0  # rows handed to the writer so far (on the same thread)
        self.last_buffer = -1  # the number of the last buffer holding rows of this prompt (see RowCopier.copy)
        self.block: Optional[RowBlock] = None  # placed at the prompt's first copy, once the row size is known
        self.first = 0  # the region's first row in the block
        self.shape: tuple[int, int, int] = (0, 0, 0)  # taps, expected, width
        self.dtype: Optional[torch.dtype] = None
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

    def fail(self, error: BaseException) -> None:
        """A write of the prompt's rows failed: its first error is raised where its rows are asked for."""
        self._error = self._error or error

    def region(self) -> np.ndarray:
        """The bytes of the prompt's rows, ``[taps, expected, width * item size]``."""
        taps, expected, _ = self.shape
        return self.block.bytes[self.first:self.first + taps * expected].reshape(taps, expected, -1)

    def _result(self) -> torch.Tensor:
        """The prompt's rows (after the writer's writes of them): a view of its region when the prompt ran
        every row expected, else a tensor of its own holding the rows it ran."""
        if self._error is not None:
            raise self._error
        length = min(self.length, self.expected)
        if self.block is None or self.handed < length:
            raise RuntimeError(f"{self.handed} of {length} rows were copied: the capture lost track of this prompt.")
        taps, expected, width = self.shape
        if length == expected:
            return self.block.tensor[self.first:self.first + taps * expected].view(self.dtype).view(self.shape)
        with torch.inference_mode(False):
            return torch.from_numpy(np.ascontiguousarray(self.region()[:, :length])).view(self.dtype)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or ``taskset``'s limit), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class BlockPlacement:
    """Where prompts' regions go: ``lanes`` blocks open at a time, prompts taking turns between them, a new block
    where a prompt does not fit its lane's."""

    def __init__(self, lanes: int, memory: BlockMemory, placed: Optional[Callable[[RowBlock], None]] = None) -> None:
        self.lanes = lanes
        self.memory = memory
        self._placed = placed  # told the block of each prompt placed
        self._next_lane = 0
        self.open: dict[int, RowBlock] = {}  # where each lane places its next prompts

    def group(self, items: list[tuple[PromptRows, int, int, int]], shape: tuple[int, ...], dtype: torch.dtype,
              number: int) -> dict[RowBlock, list]:
        """``items`` (from :meth:`PromptRows.add`) by block, the prompts seen for the first time placed; each
        prompt notes buffer ``number`` as holding its rows so far."""
        by_block: dict[RowBlock, list] = {}
        for item in items:
            prompt = item[0]
            prompt.last_buffer = number
            prompt.handed = prompt.length
            block = prompt.block or self.place(prompt, shape, dtype)
            group = by_block.get(block)
            if group is None:
                group = by_block[block] = []
            group.append(item)
        return by_block

    def place(self, prompt: PromptRows, shape: tuple[int, ...], dtype: torch.dtype) -> RowBlock:
        taps, _, width = shape
        row_bytes = width * dtype.itemsize
        rows = taps * prompt.expected
        lane, self._next_lane = self._next_lane, (self._next_lane + 1) % self.lanes  # prompts take turns
        block = self.open.get(lane)
        if block is None or not block.fits(rows, row_bytes):
            # room for this many prompts of about this one's size: memory a system that commits every page
            # asked for (strict overcommit) must find, while unused pages cost nothing elsewhere
            size = max(rows, min(BLOCK_BYTES // row_bytes, 2 * BLOCK_PROMPTS * rows))
            block = self.open[lane] = RowBlock(self.memory.take(size * row_bytes), size, row_bytes, lane)
        prompt.block, prompt.first, prompt.dtype = block, block.used, dtype
        prompt.shape = (taps, prompt.expected, width)
        block.used += rows
        block.prompts += 1
        if self._placed is not None:
            self._placed(block)
        return block

    def clear(self) -> None:
        """Forgets the open blocks (the memory is cleared by its owner)."""
        self.open = {}


class RowCopier:
    """Threads that copy prompts' rows out of captured buffers into the prompts' regions while the thread that
    drives the model goes on (each block always on the same thread, so its writes keep their order). Copies are
    numpy's, which release the interpreter while they run: a torch copy on the CPU wakes a thread per core, which
    then spin and slow the driving thread (on an H100, copies of one layer made on that thread cost 0.75x of the
    engine's throughput). Prompts take turns between the threads, each thread placing its prompts in blocks of its
    own, so a decode step's rows (one per prompt) are scattered by one call per thread: a Python loop per prompt
    on a copier thread takes the interpreter back from the driving thread at each of its torch calls, which
    release it (256 prompts: 300 small torch calls took 1.9 ms instead of 0.3 ms).

    The copier threads never call CUDA: the driving thread hands a buffer over once its transfer is done (checked
    at each :meth:`copy`, waited for where a prompt's rows are asked for) and releases it once its copies ran."""

    def __init__(self, threads: Optional[int] = None, memory: Optional[BlockMemory] = None) -> None:
        self.threads = threads or max(1, min(4, usable_cpus() // 4))
        self._lanes: list[ThreadPoolExecutor] = []
        self._own_memory = memory is None  # else the memory outlives this copier, kept by whoever passed it
        self.placement = BlockPlacement(self.threads, memory if memory is not None else BlockMemory())
        self._numbered = 0  # buffers given to copy so far
        self._waiting: deque = deque()  # (number, buffer, items by block): transfers not yet seen done, in order
        self._copying: deque = deque()  # (buffer, futures): handed over, to release once the futures are done

    def copy(self, buffer: InFlight, items: list[tuple[PromptRows, int, int, int]]) -> None:
        """Copy each item's rows ``(prompt, start, count, position)`` (from :meth:`PromptRows.add`) out of
        ``buffer`` (``[taps, rows, width]``) once it is in host memory."""
        number, self._numbered = self._numbered, self._numbered + 1
        by_block = self.placement.group(items, buffer.shape, buffer.dtype, number)
        self._waiting.append((number, buffer, list(by_block.items())))
        self.hand_over()

    def finish(self, prompt: PromptRows) -> Future:
        """The prompt's rows ``[taps, tokens, width]`` once every copy asked for so far has run (a future; waits
        here for the transfers holding the prompt's rows)."""
        self.hand_over(until=prompt.last_buffer)
        lane = prompt.block.lane if prompt.block is not None else 0
        return self._lane(lane).submit(prompt._result)

    def hand_over(self, until: int = -1) -> None:
        """Gives the copier threads every buffer whose transfer is done, in order, waiting for those numbered up
        to ``until``; releases the buffers whose copies all ran."""
        while self._copying and all(future.done() for future in self._copying[0][1]):
            self._copying.popleft()[0].release()
        while self._waiting:
            number, buffer, blocks = self._waiting[0]
            try:
                if not buffer.done():
                    if number > until:
                        return
                    buffer.wait()
            except Exception as error:  # a failed transfer
                for _, items in blocks:
                    for prompt, *_ in items:
                        prompt.fail(error)
                self._waiting.popleft()
                continue
            self._waiting.popleft()
            by_lane: dict[int, list] = {}
            for block, items in blocks:
                by_lane.setdefault(block.lane, []).append(items)
            futures = [self._lane(lane).submit(_write_blocks, buffer, groups) for lane, groups in by_lane.items()]
            self._copying.append((buffer, futures))

    def _lane(self, lane: int) -> ThreadPoolExecutor:
        while len(self._lanes) <= lane:
            self._lanes.append(ThreadPoolExecutor(1, thread_name_prefix=f"nnterp-rows-{len(self._lanes)}"))
        return self._lanes[lane]

    def close(self) -> None:
        """Stops the threads; the buffers no copy reads any more are released (a copy still running keeps its
        buffer's block from being handed out again)."""
        for lane in self._lanes:
            lane.shutdown(wait=False, cancel_futures=True)
        self._lanes = []
        self._waiting.clear()
        for buffer, futures in self._copying:
            if all(future.done() for future in futures):
                buffer.release()
        self._copying.clear()
        self.placement.clear()
        if self._own_memory:
            self.placement.memory.clear()


class CopiedRows:
    """Captured buffers copied to host memory (:class:`~.transfer.HostTransfer`) and written into the prompts'
    regions by :class:`RowCopier` threads: the writer where the capturing device cannot write host memory (the
    interface of :class:`~.device_rows.DeviceRows`)."""

    def __init__(self) -> None:
        self.transfer = HostTransfer()
        self.copier = RowCopier()

    def copy(self, buffer: torch.Tensor, items: list[tuple[PromptRows, int, int, int]]) -> None:
        self.copier.copy(self.transfer.start(buffer), items)

    def finish(self, prompt: PromptRows) -> Future:
        return self.copier.finish(prompt)


def _write_blocks(buffer: InFlight, groups: list[list[tuple[PromptRows, int, int, int]]]) -> None:
    """Writes the items of some blocks (``groups``, a list per block) out of a buffer in host memory, on these
    blocks' copier thread."""
    for items in groups:
        _write_rows(buffer, items)


def _write_rows(buffer: InFlight, items: list[tuple[PromptRows, int, int, int]]) -> None:
    """Writes one block's items: the single rows by one scatter, the others one prompt at a time (long copies,
    during which numpy releases the interpreter)."""
    try:
        host = buffer.host_bytes()
        singles = [item for item in items if item[2] == 1 and item[0]._error is None]
        if singles:
            _scatter_single_rows(host, singles)
        for prompt, start, count, position in items:
            if count != 1 and prompt._error is None:
                count = min(count, prompt.expected - position)
                if count > 0:
                    prompt.region()[:, position:position + count] = host[:, start:start + count]
    except Exception as error:
        for prompt, *_ in items:
            prompt.fail(error)


def _scatter_single_rows(host: np.ndarray, items: list[tuple[PromptRows, int, int, int]]) -> None:
    """Row ``start`` of each tap of ``host`` to row ``position`` of the prompt's region, for every item (one
    block's), in a few numpy calls; rows past a prompt's expected count are dropped."""
    taps, rows, row_bytes = host.shape
    destination, source = scatter_indices(items, taps, rows)
    if len(destination):
        items[0][0].block.bytes[destination] = host.reshape(taps * rows, row_bytes)[source]


def scatter_indices(items: list[tuple[PromptRows, int, int, int]], taps: int,
                    rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Where one block's items ``(prompt, start, count, position)`` go: the rows of the block (``[rows, row
    bytes]``) and of the buffer (``[taps, rows, ...]`` flattened to ``[taps * rows, ...]``) of every row kept,
    tap by tap; rows past a prompt's expected count are dropped."""
    first, expected, start, position, count = np.array(
        [(prompt.first, prompt.expected, start, position, count) for prompt, start, count, position in items],
        dtype=np.int64).reshape(-1, 5).T
    kept = np.clip(np.minimum(count, expected - position), 0, None)
    if (kept == 1).all():  # a decode step: one row each
        item, within = np.arange(len(kept)), 0
    else:
        item = np.repeat(np.arange(len(kept)), kept)
        within = np.arange(len(item)) - np.repeat(np.cumsum(kept) - kept, kept)
    tap = np.arange(taps)[:, None]
    destination = (first + position)[item] + within + tap * expected[item]
    source = start[item] + within + tap * rows
    return destination.reshape(-1), source.reshape(-1)


def compact(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` in memory of its own (a copy when it is a view of a larger block, which pickling would carry
    whole)."""
    return rows.clone() if rows.untyped_storage().nbytes() > rows.nbytes else rows


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
