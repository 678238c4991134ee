"""A vLLM trace's results brought home as a local trace would have them.

Each ``tracer.invoke`` is its own engine request, and its body runs in the worker on its own copy of the
names bound before the invokes. A container built there (``values = nnsight.save([])``, then
``values.append(...)`` in each invoke) therefore comes back once per request, each copy holding the
original contents plus that request's edits. Locally the invokes run one after another on the one object;
:func:`merge_invoke_copies` rebuilds that object from the copies and the original, which the client still
holds untouched. Errors raised in the worker come back as ``RuntimeError`` text; :func:`worker_error`
rebuilds their original type.
"""

from __future__ import annotations

import builtins
from typing import Any, Callable

from nnsight.intervention.interleaver import OutOfOrderError


def collect_like_local(mediators: list, outputs: list, collect: Callable[[list, list], None]) -> None:
    """Run nnsight's ``collect`` (which pushes each request's saves into the trace's names), then replace
    every container shared by several invokes with its merge in invoke order, then raise the first worker
    error with its original type."""
    from nnsight.tracing.tracer import mark

    originals = _shared_originals(mediators)
    errors = [getattr(output, "nnsight_error", None) for output in outputs]
    for output in outputs:
        output.nnsight_error = None  # raised below, with its type
    try:
        collect(mediators, outputs)
    finally:
        for output, error in zip(outputs, errors):
            output.nnsight_error = error
    per_request = [_primary_saves(output) for output in outputs]
    for name, original in originals.items():
        copies = [saves[name] for saves in per_request if name in saves]
        if len(copies) < 2:
            continue
        merged = mark(merge_invoke_copies(original, copies))
        for mediator in mediators:
            mediator.lcls[name] = merged
    for error in errors:
        if error and not error.get("is_control_flow"):
            raise worker_error(error)


def _shared_originals(mediators: list) -> dict[str, Any]:
    """The client's own objects behind the names saved above the invokes (never run here, so unedited)."""
    originals = {}
    for mediator in mediators:
        for name in getattr(mediator, "presaved", ()):
            if name in mediator.lcls and name not in originals:
                originals[name] = mediator.lcls[name]
    return originals


def _primary_saves(output: Any) -> dict:
    sequences = getattr(output, "nnsight_sequences", None)
    return sequences[0] if sequences else getattr(output, "nnsight_saves", {}) or {}


def merge_invoke_copies(original: Any, copies: list) -> Any:
    """What ``original`` holds after every invoke ran on it in order, given each invoke's copy (``original``
    plus that invoke's edits): lists keep their slots (each filled by the last invoke that changed it) and
    get every invoke's appended items in invoke order; dicts and sets likewise by key; any other value is
    the last invoke's that changed it."""
    if isinstance(original, list) and all(isinstance(c, list) and len(c) >= len(original) for c in copies):
        head = [merge_invoke_copies(item, [copy[i] for copy in copies]) for i, item in enumerate(original)]
        return head + [item for copy in copies for item in copy[len(original):]]
    if isinstance(original, dict) and all(isinstance(c, dict) for c in copies):
        merged = {key: merge_invoke_copies(item, [copy[key] for copy in copies])
                  for key, item in original.items() if all(key in copy for copy in copies)}
        for copy in copies:
            merged.update({key: item for key, item in copy.items() if key not in original})
        return merged
    if isinstance(original, set) and all(isinstance(c, set) for c in copies):
        removed = set().union(*(original - copy for copy in copies))
        added = set().union(*(copy - original for copy in copies))
        return (original - removed) | added
    changed = [copy for copy in copies if not _same(copy, original)]
    return changed[-1] if changed else copies[-1]


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    try:
        return bool(a == b)
    except Exception:  # e.g. containers of tensors: treat as changed
        return False


def worker_error(error: dict) -> BaseException:
    """The exception a worker captured, with its original type where it is a builtin, nnsight's
    ``OutOfOrderError`` or one of nnterp's; it is also a ``RuntimeError`` (what nnsight raises for every
    worker error), so existing handlers keep catching it."""
    type_name = error.get("type_name", "Exception")
    text = error.get("message", "")
    if type_name == "NameError":
        text += (". On vLLM each tracer.invoke runs as its own engine request, with its own copy of the "
                 "variables set before the invokes: a variable assigned in one invoke is not defined in another. "
                 "Compute it in the invoke that uses it, or save it and use it in a later trace (on "
                 "StandardizedTransformer the invokes share one forward pass and can share variables).")
    if type_name == "UnknownPersistentIdError":
        text += (f": the trace refers to an object that lives outside the engine (nnsight sends it as a reference, "
                 f"{text!r}, which only the process holding it resolves), e.g. another model such as a "
                 "StandardizedTransformer, or its accessor, left in a variable the trace body reads or assigns. "
                 "Use another variable name inside the vLLM trace, or read what you need from that object "
                 "before the trace.")
    if error.get("traceback"):
        text += "\n\nIntervention traceback:\n" + error["traceback"].rstrip()
    original = _known_exceptions().get(type_name)
    if original is None:
        return RuntimeError(f"{type_name}: {text}")
    try:
        return _also_runtime_error(original)(text)
    except TypeError:  # a constructor that does not take one message
        return RuntimeError(f"{type_name}: {text}")


def _known_exceptions() -> dict[str, type[BaseException]]:
    known = {name: value for name, value in vars(builtins).items()
             if isinstance(value, type) and issubclass(value, Exception)}
    known[OutOfOrderError.__name__] = OutOfOrderError
    pending = list(Exception.__subclasses__())
    while pending:
        klass = pending.pop()
        pending.extend(klass.__subclasses__())
        if klass.__module__.startswith("nnterp."):
            known[klass.__name__] = klass
    return known


_DUAL_TYPES: dict[type, type] = {}


def _also_runtime_error(original: type[BaseException]) -> type[BaseException]:
    if issubclass(original, RuntimeError):
        return original
    if original not in _DUAL_TYPES:
        try:
            dual = type(original.__name__, (original, RuntimeError), {"__module__": original.__module__,
                                                                      "__doc__": original.__doc__})
        except TypeError:  # incompatible layouts (e.g. OSError): the original type alone
            dual = original
        _DUAL_TYPES[original] = dual
    return _DUAL_TYPES[original]
