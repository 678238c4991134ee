"""Checking a standardized model against independent references: :func:`validate` (every accessor of a
``StandardizedTransformer`` against a plain HF forward pass and manual sums, :mod:`.hf`) and
:func:`check_vllm_against_hf` (``StandardizedVLLM`` against ``StandardizedTransformer`` on the same weights,
:mod:`.vllm`, which imports vLLM only when called). ``python -m nnterp validate`` prints either."""

from .hf import Check, ValidationReport, validate
from .vllm import check_vllm_against_hf, within_tolerance

__all__ = ["Check", "ValidationReport", "check_vllm_against_hf", "validate", "within_tolerance"]
