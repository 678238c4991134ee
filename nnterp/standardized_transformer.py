"""nnterp 1.x's module path of :class:`StandardizedTransformer` (defined in :mod:`nnterp.standardized`)."""

from .standardized import StandardizedTransformer

__all__ = ["StandardizedTransformer"]
