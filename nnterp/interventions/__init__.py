"""Research tools on top of the standardized accessors (nnterp 1.x's ``interventions`` and more)."""

from .logit_lens import get_topk_closest_tokens, layer_streams, logit_lens
from .patching import activation_patching
from .patchscope import (
    TargetPrompt,
    TargetPromptBatch,
    it_repeat_prompt,
    patch_object_attn_lens,
    patchscope_generate,
    patchscope_lens,
    repeat_prompt,
)
from .sae import Splice, splice
from .steering import Generation, steer, steered_generation

__all__ = [
    "Generation",
    "Splice",
    "TargetPrompt",
    "TargetPromptBatch",
    "activation_patching",
    "get_topk_closest_tokens",
    "it_repeat_prompt",
    "layer_streams",
    "logit_lens",
    "patch_object_attn_lens",
    "patchscope_generate",
    "patchscope_lens",
    "repeat_prompt",
    "splice",
    "steer",
    "steered_generation",
]
