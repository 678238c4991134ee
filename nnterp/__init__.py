"""nnterp: one standardized interface to the residual stream of any causal language model."""

from .rename import RenameConfig
from .standardized import StandardizedTransformer

__all__ = ["RenameConfig", "StandardizedTransformer", "StandardizedVLLM"]


def __getattr__(name: str):
    if name == "StandardizedVLLM":  # imported on first use: vllm is an optional, heavy dependency
        from .standardized.vllm import StandardizedVLLM

        return StandardizedVLLM
    raise AttributeError(f"module 'nnterp' has no attribute {name!r}")
