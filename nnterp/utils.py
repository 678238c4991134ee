"""nnterp 1.x's ``utils``: its small helpers, most defined where nnterp uses them."""

from __future__ import annotations

from typing import Any, Callable

import nnsight
import torch
import transformers

from .core.log import logger
from .core.progress import with_progress
from .core.tokens import token_id_list, until_eos
from .display import is_notebook
from .interventions.activations import TraceTensor, unpack_tuple

NNSIGHT_VERSION = nnsight.__version__
TRANSFORMERS_VERSION = transformers.__version__


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
    "token_id_list",
    "unpack_tuple",
    "until_eos",
    "with_progress",
]
