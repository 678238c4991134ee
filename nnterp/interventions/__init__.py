"""Research tools on top of the standardized accessors."""

from .logit_lens import get_topk_closest_tokens, layer_streams, logit_lens
from .patching import activation_patching, patchscope_lens
from .steering import Generation, steered_generation

__all__ = [
    "Generation",
    "activation_patching",
    "get_topk_closest_tokens",
    "layer_streams",
    "logit_lens",
    "patchscope_lens",
    "steered_generation",
]
