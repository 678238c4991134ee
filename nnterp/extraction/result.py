"""One prompt's extracted activations, and how they are put together from captured rows."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

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
    """Where one prompt's rows sit in captured buffers: chunks ``(buffer, start, count)`` in token order."""

    __slots__ = ("chunks", "length")

    def __init__(self) -> None:
        self.chunks: list[tuple[InFlight, int, int]] = []
        self.length = 0

    def add(self, buffer: InFlight, start: int, count: int, position: int, where: str) -> None:
        """Rows for tokens ``position .. position + count - 1``. An engine that recomputes a request (after
        preempting it) starts again from an earlier position: the rows from there on are replaced."""
        if position > self.length:
            raise RuntimeError(
                f"{where}: tokens {self.length}..{position - 1} were never run through the model (served from "
                "a prefix cache?), so their activations cannot be extracted. Disable prefix caching."
            )
        while position < self.length:
            buffer_, start_, count_ = self.chunks.pop()
            self.length -= count_
            if position > self.length:  # keep the part of the chunk before the recomputed tokens
                keep = position - self.length
                self.chunks.append((buffer_, start_, keep))
                self.length += keep
        self.chunks.append((buffer, start, count))
        self.length += count

    def assemble(self) -> torch.Tensor:
        """``[taps, tokens, width]``, a tensor of its own (not a view of a shared buffer)."""
        first = self.chunks[0][0].host()
        with torch.inference_mode(False):
            rows = torch.empty((first.shape[0], self.length, first.shape[2]), dtype=first.dtype)
        position = 0
        for buffer, start, count in self.chunks:
            copy_rows(rows[:, position:position + count], buffer.host()[:, start:start + count])
            position += count
        return rows


def copy_rows(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target[...] = source`` for host tensors, on this thread alone. (A torch copy fans out to every core,
    whose threads then spin and compete with the engine's own thread for the CPU.)"""
    np.copyto(target.view(torch.uint8).numpy(), source.view(torch.uint8).numpy())


class Assembler:
    """Assembles prompts' rows on a few background threads, so the thread that drives the model is free to
    queue the next forward pass meanwhile."""

    def __init__(self, threads: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads or max(1, min(4, (os.cpu_count() or 2) // 2)),
                                        thread_name_prefix="nnterp-extract")

    def submit(self, rows: PromptRows) -> Future:
        return self._pool.submit(rows.assemble)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


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
