"""A tensor view that refuses in-place edits, for reads that are copies of the engine's buffers."""

from __future__ import annotations

import torch

ALLOWED_TRAILING_UNDERSCORE = {"requires_grad_", "share_memory_", "retain_grad"}


class InPlaceWriteError(RuntimeError):
    """An in-place edit on a read that is a copy: it would be silently lost."""


class ReadOnlyStream(torch.Tensor):
    """Behaves as a tensor; in-place operations raise ``InPlaceWriteError`` naming the accessor to assign."""

    _nnterp_where: str = "this activation"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__setitem__" or (name.endswith("_") and not name.endswith("__") and name not in ALLOWED_TRAILING_UNDERSCORE):
            where = getattr(args[0], "_nnterp_where", cls._nnterp_where) if args else cls._nnterp_where
            raise InPlaceWriteError(
                f"In-place edit ({name}) on {where}: on vLLM this read is a copy of the engine's buffers "
                f"(which vLLM mutates in place), so the edit would be lost. Assign instead, e.g. "
                f"`{where} = {where} * 0`."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def read_only(value: torch.Tensor, where: str) -> torch.Tensor:
    guarded = value.as_subclass(ReadOnlyStream)
    guarded._nnterp_where = where
    return guarded
