"""One prompt's extracted activations, and how they are put together from captured rows."""

from __future__ import annotations

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
        """``[taps, tokens, width]``, a tensor of its own (not a view of a shared buffer): one concatenation of
        the chunks' rows (on this thread alone below ``PARALLEL_COPY_BYTES``: a torch copy wakes a thread per
        core, which then spin and slow the thread that drives the model; on an H100 the copies of one layer cost
        0.75x of the engine's throughput that way, nothing on one thread; larger results, every layer of a
        prompt, need the cores' bandwidth)."""
        first = self.chunks[0][0].host()
        with torch.inference_mode(False):
            rows = torch.empty((first.shape[0], self.length, first.shape[2]), dtype=first.dtype)
        if rows.numel() * rows.element_size() >= PARALLEL_COPY_BYTES:
            torch.cat([buffer.host()[:, start:start + count] for buffer, start, count in self.chunks], dim=1, out=rows)
        else:
            np.concatenate([buffer.host_bytes()[:, start:start + count] for buffer, start, count in self.chunks],
                           axis=1, out=rows.view(torch.uint8).numpy())
        return rows


PARALLEL_COPY_BYTES = 4 << 20


class Pending:
    """A prompt's rows, assembled on first demand: a caller arranges for that to happen while the device
    computes the next forward pass (background threads were slower: they compete with the thread that drives
    the model for the interpreter and the cores)."""

    __slots__ = ("_rows", "_result")

    def __init__(self, rows: PromptRows) -> None:
        self._rows: Optional[PromptRows] = rows
        self._result: Optional[torch.Tensor] = None

    def result(self) -> torch.Tensor:
        if self._result is None:
            self._result, self._rows = self._rows.assemble(), None
        return self._result


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
