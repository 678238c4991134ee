"""What the core's accessors need of a standardized model: a structural type, so the core never imports the
model classes built on it (``nnterp.standardized``)."""

from __future__ import annotations

from typing import Any, Protocol

from .backend import Backend
from .layout import ModelLayout
from .rename import ModuleNames


class StandardModel(Protocol):
    """A model with standard names, an inferred layout and a backend (``StandardizedTransformer``,
    ``StandardizedVLLM``)."""

    names: ModuleNames
    layout: ModelLayout
    _backend: Backend
    _module: Any

    @property
    def num_layers(self) -> int: ...

    @property
    def num_heads(self) -> int | None: ...

    def _check_layer_index(self, index: int, accessor: str) -> int: ...

    def _role_envoy(self, role: str, index: int, accessor: str) -> Any: ...

    def trace(self, *inputs: Any, **kwargs: Any) -> Any: ...
