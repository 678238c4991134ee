"""nnterp: one standardized interface to the residual stream of any causal language model."""

from .rename import RenameConfig
from .standardized import StandardizedTransformer

__all__ = ["RenameConfig", "StandardizedTransformer", "StandardizedVLLM", "load_model"]


def __getattr__(name):
    if name == "StandardizedVLLM":
        from .standardized.vllm import StandardizedVLLM

        return StandardizedVLLM
    if name == "load_model":
        from .standardized.loading import load_model

        return load_model
    raise AttributeError(name)
