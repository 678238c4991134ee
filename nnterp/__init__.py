"""nnterp: one standardized interface to the residual stream of any causal language model."""

from .rename import RenameConfig
from .standardized import StandardizedTransformer

__all__ = ["RenameConfig", "StandardizedTransformer"]
