from .hf import StandardizedTransformer

__all__ = ["StandardizedTransformer"]
