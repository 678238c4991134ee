"""nnterp: one standardized interface to the residual stream of any causal language model."""

from importlib import import_module

from .rename import AttnProbFunction, RenameConfig, RenamingError
from .standardized import StandardizedTransformer

__all__ = [
    "AttnProbFunction", "ModuleAccessor", "RenameConfig", "RenamingError", "StandardizedTransformer",
    "StandardizedVLLM", "get_rename_dict",
]

# Imported on first use: vllm is an optional, heavy dependency; the others are nnterp 1.x's top-level names.
_LAZY = {
    "StandardizedVLLM": ".standardized.vllm",
    "get_rename_dict": ".rename_utils",
    "ModuleAccessor": ".nnsight_utils",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'nnterp' has no attribute {name!r}")
