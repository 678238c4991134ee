"""Reads and writes inside a trace follow the forward pass: an access the model already ran past raises
an error that names the standard accessor (not nnsight's internal module path) and the access before it."""

from __future__ import annotations

from typing import Callable, TypeVar
from weakref import WeakKeyDictionary

from greenlet import getcurrent
from nnsight.intervention.interleaver import OutOfOrderError

T = TypeVar("T")

# The latest access that was served, per intervention block (an nnsight mediator).
_LAST_ACCESS: "WeakKeyDictionary[object, str]" = WeakKeyDictionary()


def current_block() -> object | None:
    """The nnsight intervention block the caller runs in (a trace body or an invoke), None outside one."""
    reference = getattr(getcurrent(), "mediator", None)
    return reference() if reference is not None else None


class OutsideTraceError(RuntimeError):
    """A value of the forward pass was read or written outside a trace."""


def in_forward_order(name: str, access: Callable[[], T]) -> T:
    """``access()`` (which waits for the model to reach a module), with nnsight's out-of-order error
    reworded to name ``name``; the access is remembered to name it in the next error."""
    if current_block() is None:
        raise OutsideTraceError(
            f"{name} is a value of a forward pass: read or assign it inside a trace, e.g. "
            f"`with model.trace(prompt): value = {name}.save()` (then use `value` after the block)."
        )
    try:
        value = access()
    except OutOfOrderError as error:
        block = current_block()
        if block is not None and getattr(block, "iteration", 0) != 0:
            raise  # a `tracer.iter` loop that outran a generation: nnsight warns and ends it by design
        before = _LAST_ACCESS.get(block) if block is not None else None
        raise OutOfOrderError(out_of_order_message(name, before)) from error
    record_access(name)
    return value


def record_access(name: str) -> None:
    """Remember ``name`` as the current block's latest access (also for values another pipeline stage serves)."""
    block = current_block()
    if block is not None:
        _LAST_ACCESS[block] = name


def out_of_order_message(name: str, before: str | None) -> str:
    earlier = f" The access before it was {before}." if before else ""
    return (
        f"{name} was requested, but the model had already run past it (or does not run it in this pass, e.g. "
        f"a skipped layer).{earlier} Inside one trace (or one "
        f"tracer.invoke), read and write values in the order the forward pass computes them: token_embeddings, "
        f"then layer by layer (a layer's input, its attention, its MLP, its output), then logits. Read an "
        f"earlier value before a later one, or use a separate trace."
    )
