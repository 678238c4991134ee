"""The model classes: ``StandardizedTransformer`` (``hf``) and ``StandardizedVLLM`` (``vllm``, imported on use),
over the surface they share (``base``: sizes, module lookup, steering, skipping, projections, extraction),
the load-time renaming check (``checks``), the identity final norm (``identity``) and what a ``model`` argument
may be (``source``). They import the core and the backends; the tools and faces import them.
"""

from .hf import StandardizedTransformer

__all__ = ["StandardizedTransformer"]
