"""Activation extraction at engine speed: many prompts in, one prompt's activations out at a time.

``model.extract(prompts, layers=..., accessors=...)`` reads the same streams as the accessors inside a trace
(same layouts, dual-stream sums, values copied when read), but through plain forward hooks over whole batches
instead of one intervention per prompt (the taps of :mod:`nnterp.backends.taps`, run by each backend); see
:meth:`nnterp.standardized.base.StandardizedMixin.extract`. :func:`save_activations` writes the results to
safetensors shards.
"""

from ..backends.taps.plan import ACCESSORS, ExtractionPlan, Tap, plan_extraction
from ..backends.taps.rows import Activations
from .shards import save_activations

__all__ = ["ACCESSORS", "Activations", "ExtractionPlan", "Tap", "plan_extraction", "save_activations"]
