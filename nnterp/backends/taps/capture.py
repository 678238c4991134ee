"""Plain forward hooks that copy each tap's stream into one ``[taps, rows, width]`` buffer per forward pass.

The copy is taken when the hook fires, so a later in-place update of the module's buffer (vLLM's fused
kernels, a parent adding into a child's output) cannot reach it; a dual ``(hidden, residual)`` stream is read
as its sum, exactly as the accessors read it. Only the rows the caller selects are kept (the prompts being
extracted, without padding or other requests' tokens).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .plan import Tap
from .seams import seams_of


def hook_module(root: torch.nn.Module, path: str, direction: str, hook: Callable) -> Any:
    """A forward pre-hook (``direction == "input"``: ``hook(module, args, kwargs)``) or forward hook
    (``hook(module, args, kwargs, output)``) on ``root``'s module at ``path``; returns its handle. On an engine
    that replays CUDA graphs the hook listens at the site's seam (served at replay too); a site without one raises."""
    seams = seams_of(root)
    if seams is not None:
        return seams.add(path, direction, hook)
    module = root.get_submodule(path)
    register = module.register_forward_pre_hook if direction == "input" else module.register_forward_hook
    return register(hook, with_kwargs=True)


class CaptureError(RuntimeError):
    """A tap could not be read during the forward pass."""


class Capture:
    """Hooks on the modules of ``taps``; between :meth:`arm` and :meth:`disarm` each call of a tapped
    module writes its stream's selected rows into slot ``i`` of the buffer for ``taps[i]``."""

    def __init__(self, root: torch.nn.Module, taps: Sequence[Tap], after_fill: Optional[Callable[[], None]] = None,
                 defer_errors: bool = False):
        self.taps = tuple(taps)
        self._after_fill = after_fill  # called once every tap has been written (e.g. to stop the forward pass)
        self._defer_errors = defer_errors  # an engine's forward must not raise: the error waits for disarm
        self._error: Optional[Exception] = None
        self._handles = []
        self._rows: torch.Tensor | slice | None = None
        self._count = 0
        self.buffer: torch.Tensor | None = None
        self._filled: set[int] = set()
        by_module: dict[tuple[str, str], list[int]] = {}
        for slot, tap in enumerate(self.taps):
            by_module.setdefault((tap.path, tap.direction), []).append(slot)
        for (path, direction), slots in by_module.items():
            self._handles.append(hook_module(root, path, direction, self._hook(slots)))

    def arm(self, rows: torch.Tensor | slice, count: int) -> None:
        """Capture the next forward pass: ``rows`` of each stream's flattened ``[tokens, width]`` (a slice, or
        an index tensor on the stream's device), ``count`` rows in all."""
        self._rows, self._count, self.buffer, self._filled, self._error = rows, count, None, set(), None

    def disarm(self) -> torch.Tensor:
        """The filled buffer ``[taps, count, width]``; raises when a tap's module did not run."""
        rows, self._rows = self._rows, None
        if self._error is not None:
            raise self._error
        missing = [self.taps[slot].where for slot in range(len(self.taps)) if slot not in self._filled]
        if rows is not None and missing:
            raise CaptureError(
                f"{missing} were not reached in this forward pass (the module did not run, or ran under another "
                "name); nothing was extracted."
            )
        return self.buffer

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def complete(self) -> bool:
        return len(self._filled) == len(self.taps)

    def _hook(self, slots: list[int]):
        """A forward pre-hook (three arguments) or forward hook (four) storing ``slots`` while armed."""
        def hook(module, args, kwargs, output=None):
            if self._rows is not None:
                self._guarded_store(slots, args, kwargs, output)

        return hook

    def _guarded_store(self, slots: list[int], args: tuple, kwargs: dict, output) -> None:
        try:
            self._store(slots, args, kwargs, output)
        except Exception as error:
            if not self._defer_errors:
                raise
            self._error, self._rows = error, None  # nothing more is captured in this pass
            return
        if self._after_fill is not None and self.complete:
            self._after_fill()

    def _store(self, slots: list[int], args: tuple, kwargs: dict, output) -> None:
        for slot in slots:
            if slot in self._filled:
                continue  # a module called twice in one pass: the first call is the stream the accessor reads
            tap = self.taps[slot]
            value = tap.read(args, kwargs, output)
            flat = value.reshape(-1, value.shape[-1])
            selected = flat[self._rows] if isinstance(self._rows, slice) else flat.index_select(0, self._rows)
            if selected.shape[0] != self._count:
                raise CaptureError(
                    f"{tap.where}: the stream has {flat.shape[0]} token rows, fewer than the {self._count} being "
                    "extracted."
                )
            if self.buffer is None:
                self.buffer = torch.empty((len(self.taps), self._count, flat.shape[-1]), dtype=flat.dtype,
                                          device=flat.device)
            elif (flat.shape[-1], flat.dtype) != (self.buffer.shape[-1], self.buffer.dtype):
                first = next(self.taps[s].where for s in sorted(self._filled))
                raise CaptureError(
                    f"{tap.where} is {flat.dtype} of width {flat.shape[-1]} but {first} is "
                    f"{self.buffer.dtype} of width {self.buffer.shape[-1]}: extract them in separate calls."
                )
            self.buffer[slot].copy_(selected)
            self._filled.add(slot)
