"""Progress bars over many prompts, shown only when the caller passes a ``tqdm``."""

from __future__ import annotations

from typing import Callable


def with_progress(tqdm: Callable | None, items, desc: str):
    """``items`` wrapped in ``tqdm`` (e.g. ``tqdm.auto.tqdm``) with ``desc``; as they are when ``tqdm`` is None."""
    return items if tqdm is None else tqdm(items, desc=desc)
