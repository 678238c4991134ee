"""Small helpers shared by nnterp's modules (nnterp 1.x's ``utils``)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import nnsight
import torch
import transformers

from .logging import logger

# Inside an nnsight trace activations are real tensors; kept as a name for annotations.
TraceTensor = torch.Tensor

NNSIGHT_VERSION = nnsight.__version__
TRANSFORMERS_VERSION = transformers.__version__


def is_notebook() -> bool:
    """Whether the code runs in a Jupyter kernel."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:
        return False


def display_markdown(text: str) -> None:
    """Render markdown in a notebook (needs IPython)."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def display_source(source: str) -> None:
    """Render Python source as a markdown code block in a notebook."""
    display_markdown(f"```py\n{source}\n```")


class DummyCache:
    """Stands in for a layer's key-value cache in a skipped layer's output tuple."""

    def to_legacy_cache(self) -> None:
        return None


def dummy_inputs() -> dict[str, torch.Tensor]:
    """A three-token batch, enough to run any causal LM once."""
    return {"input_ids": torch.tensor([[0, 1, 1]])}


def try_with_scan(
    model: Any,
    function: Callable[[], Any],
    error_to_throw: Exception,
    allow_dispatch: bool,
    warn_if_scan_fails: bool = True,
    errors_to_raise: tuple[type[Exception], ...] | type[Exception] | None = None,
) -> bool:
    """Run ``function`` inside ``model.scan`` (fake tensors, no weights needed); if that fails and
    ``allow_dispatch`` (or the model is already dispatched), inside ``model.trace`` on :func:`dummy_inputs`.

    Returns True when the scan worked, False when the trace was needed. Exceptions of ``errors_to_raise``
    propagate as they are; any other failure raises ``error_to_throw`` (chained to the cause).
    """

    def run(context) -> None:
        with context as tracer:
            function()
            tracer.stop()

    try:
        run(model.scan(dummy_inputs(), use_cache=False))
        return True
    except Exception as scan_error:
        if errors_to_raise is not None and isinstance(scan_error, errors_to_raise):
            raise
        if not allow_dispatch and not getattr(model, "dispatched", False):
            logger.error("Scan failed and trace() fallback is disabled")
            raise error_to_throw from scan_error
        if warn_if_scan_fails:
            logger.warning("Error when trying to scan the model - using .trace() instead (which will dispatch the model)...")
        try:
            run(model.trace(dummy_inputs()))
        except Exception as trace_error:
            if errors_to_raise is not None and isinstance(trace_error, errors_to_raise):
                raise
            raise error_to_throw from trace_error
        return False


def unpack_tuple(tensor_or_tuple: Any) -> Any:
    """The first element of a tuple (a module's hidden state), anything else as it is."""
    return tensor_or_tuple[0] if isinstance(tensor_or_tuple, tuple) else tensor_or_tuple


__all__ = [
    "DummyCache",
    "NNSIGHT_VERSION",
    "TRANSFORMERS_VERSION",
    "TraceTensor",
    "display_markdown",
    "display_source",
    "dummy_inputs",
    "is_notebook",
    "logger",
    "try_with_scan",
    "unpack_tuple",
]


def with_progress(tqdm: Callable | None, items, desc: str):
    """``items`` wrapped in ``tqdm`` (e.g. ``tqdm.auto.tqdm``) with ``desc``; as they are when ``tqdm`` is None."""
    return items if tqdm is None else tqdm(items, desc=desc)


def token_id_list(token_ids: int | list[int] | None) -> list[int]:
    """A config's ``eos_token_id`` (one id, a list, or None) as a list."""
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def until_eos(tokens: list[int], eos: set[int] | list[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence id."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens
