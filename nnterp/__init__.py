"""nnterp: one standardized interface to the residual stream of any causal language model.

Exports are imported on first use: ``import nnterp`` (and ``python -m nnterp ...``) stays fast, and vllm,
an optional heavy dependency, is imported only by ``StandardizedVLLM``. ``get_rename_dict`` and
``ModuleAccessor`` are nnterp 1.x's top-level names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AttnProbFunction": ".core.rename",
    "RenameConfig": ".core.rename",
    "RenamingError": ".core.rename",
    "StandardizedTransformer": ".standardized",
    "StandardizedVLLM": ".standardized.vllm",
    "get_rename_dict": ".rename_utils",
    "ModuleAccessor": ".nnsight_utils",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .nnsight_utils import ModuleAccessor
    from .core.rename import AttnProbFunction, RenameConfig, RenamingError
    from .rename_utils import get_rename_dict
    from .standardized import StandardizedTransformer
    from .standardized.vllm import StandardizedVLLM


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nnterp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
