"""``attention_probabilities[i]`` on vLLM: recomputed from the queries and keys the layer's attention kernel receives.

vLLM's kernels never materialize the pattern. Its ``Attention`` layer receives the queries and keys after the
model's rotary embedding and query/key norms, and holds the rest of the recipe: the scale, the key/value head
count (grouped-query attention), the sliding window, the logit soft cap, ALiBi slopes and attention sinks. The
pattern of a request's prompt tokens is ``softmax`` over its keys of those scores with the causal (and
window) mask: ``[1, heads, tokens, tokens]`` (under tensor parallelism, this rank's heads). Generation steps
after the first see only their new tokens' keys, and are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...core.accessors import PerLayer
from ...core.forward_order import current_block, in_forward_order

NO_WRITES = (
    "attention_probabilities[{layer}] cannot be written on vLLM: its attention kernel never materializes the "
    "pattern (nnterp recomputes it from the queries and keys), so an edit would not change what the heads mix. "
    "Use StandardizedTransformer(..., enable_attention_probs=True) to edit attention patterns."
)


def attention_kernel(attention: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The vLLM ``Attention`` layer inside an attention module: ``(relative path, module)``."""
    for path, module in attention.named_modules():
        if path and hasattr(module, "impl") and hasattr(module, "num_kv_heads") and hasattr(module, "head_size"):
            return path, module
    return None


def recipe(kernel: torch.nn.Module) -> dict[str, Any]:
    """What the kernel does besides ``q @ k``: read from the layer and its backend implementation."""
    impl = kernel.impl
    window = getattr(kernel, "sliding_window", None)
    cap = getattr(impl, "logits_soft_cap", None)
    slopes = getattr(impl, "alibi_slopes", None)
    sinks = getattr(impl, "sinks", None)
    return {
        "scale": float(impl.scale),
        "heads": int(kernel.num_heads),
        "kv_heads": int(kernel.num_kv_heads),
        "head_size": int(kernel.head_size),
        "window": int(window) if isinstance(window, int) and window > 0 else None,
        "soft_cap": float(cap) if cap else None,
        "alibi": None if slopes is None else torch.as_tensor(slopes, dtype=torch.float32),
        "sinks": None if sinks is None else sinks.detach().float(),
    }


def probabilities(query: torch.Tensor, key: torch.Tensor, recipe: dict[str, Any]) -> torch.Tensor:
    """``[1, heads, tokens, tokens]`` from a request's flat ``query`` ``[tokens, heads x head]`` and ``key``."""
    heads, kv_heads, size = recipe["heads"], recipe["kv_heads"], recipe["head_size"]
    tokens = query.shape[0]
    q = query.reshape(tokens, heads, size).float().transpose(0, 1)
    k = key.reshape(tokens, kv_heads, size).float().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
    scores = q @ k.transpose(1, 2) * recipe["scale"]
    if recipe["soft_cap"]:
        scores = recipe["soft_cap"] * torch.tanh(scores / recipe["soft_cap"])
    position = torch.arange(tokens, device=scores.device)
    distance = position[:, None] - position[None, :]  # query - key
    if recipe["alibi"] is not None:
        scores = scores - recipe["alibi"].to(scores.device)[:, None, None] * distance
    allowed = distance >= 0
    if recipe["window"] is not None:
        allowed &= distance < recipe["window"]
    scores = scores.masked_fill(~allowed, -math.inf)
    if recipe["sinks"] is not None:
        sinks = recipe["sinks"].to(scores.device)[:, None, None].expand(heads, tokens, 1)
        return torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1][None]
    return scores.softmax(-1)[None]


class RecomputedAttentionProbabilities(PerLayer):
    """``model.attention_probabilities`` of StandardizedVLLM (read-only, prompt tokens)."""

    enabled = True
    name = "attention_probabilities"

    def __init__(self, model: Any) -> None:
        self._model = model
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._disabled:
            raise RuntimeError("attention_probabilities was disabled on this model (disable()).")
        model = self._model
        layer = model._check_layer_index(index, "attention_probabilities")
        model._backend.check_served("attention_probabilities")
        attention = model.attentions[layer]
        found = attention_kernel(attention._module)
        where = f"model.attention_probabilities[{layer}]"
        if found is None:
            raise ValueError(f"{where}: the attention module ({type(attention._module).__name__}) runs no vLLM attention "
                             "layer nnterp can read queries and keys from. Use StandardizedTransformer(..., "
                             "enable_attention_probs=True) on the same weights.")
        block = current_block()
        if block is not None and getattr(block, "iteration", 0):
            raise ValueError(f"{where}: on vLLM the pattern covers the prompt's tokens (the first step); a later "
                             "generation step runs only its new tokens against cached keys. Read it in the first step.")
        path, kernel = found
        envoy = attention
        for part in path.split("."):
            envoy = getattr(envoy, part)
        args, kwargs = in_forward_order(where, lambda: envoy.inputs)
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        steps = recipe(kernel)
        tokens = query.shape[0]
        if (query.numel() != tokens * steps["heads"] * steps["head_size"] or key.shape[0] != tokens
                or key.numel() != tokens * steps["kv_heads"] * steps["head_size"]):
            raise ValueError(
                f"{where}: {type(kernel).__name__} receives queries {tuple(query.shape)} and keys {tuple(key.shape)}, "
                f"not {steps['heads']} and {steps['kv_heads']} heads of {steps['head_size']} per token (multi-head latent "
                "attention or a fused layout), so its pattern cannot be recomputed here. Use StandardizedTransformer("
                "..., enable_attention_probs=True) on the same weights.")
        return probabilities(query, key, steps)

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        raise TypeError(NO_WRITES.format(layer=index))
