"""Logit lens: the model's final norm and LM head applied to every layer's residual stream."""

from __future__ import annotations

from typing import Any, Sequence

import nnsight
import torch

from .activations import (
    get_layer_output,
    get_num_layers,
    layer_index,
    project_negated_on_vocab,
    project_on_vocab,
    read_token_activations,
)
from ..core.tracing import token_positions, trace_prompts


def _layers(model, layers: Sequence[int] | None) -> list[int]:
    return list(range(get_num_layers(model))) if layers is None else [layer_index(model, l, "layers") for l in layers]


def layer_streams(model, prompts: str | Sequence[str], layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """``layers_output[l]`` as ``[batch, seq, hidden]`` for each requested layer (all by default), one trace."""
    layers = _layers(model, layers)
    order = sorted(set(layers))
    with torch.no_grad(), model.trace(prompts):
        streams = nnsight.save([])
        for layer in order:
            streams.append(model.as_batch(model.layers_output[layer]))
    return [streams[order.index(layer)] for layer in layers]


@torch.no_grad()
def logit_lens(
    nn_model: Any,
    prompts: list[str] | str,
    remote: bool = False,
    return_inv_logits: bool = False,
    *,
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] = -1,
    tokens: Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Next-token probabilities read off each layer's output at each prompt's last token:
    ``[num_prompts, num_layers, vocab]`` on CPU (float32).

    ``return_inv_logits`` also returns the probabilities of the LM head applied to ``-ln_final(h)``.
    Keyword-only: ``layers`` (default all), ``positions`` (token indices counted in each prompt's own
    tokens, negative from its last; a list adds a positions axis after the layers), ``tokens`` (keep only
    these vocabulary entries). The projection runs inside the trace, so it also runs where the engine
    holds the weights (vLLM, tensor or pipeline parallel).
    """
    layers = _layers(nn_model, layers)
    index = [positions] if isinstance(positions, int) else list(positions)

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        return (probs if tokens is None else probs[..., list(tokens)]).cpu()

    def compute(model, rows):
        where = [token_positions(model, position) for position in index]
        hidden = read_token_activations(model, layers, get_layer_output, where).transpose(0, 1)
        probs = probabilities(project_on_vocab(model, hidden))
        if not return_inv_logits:
            return probs
        return probs, probabilities(project_negated_on_vocab(model, hidden))

    result = trace_prompts(nn_model, prompts, compute, remote)
    if isinstance(positions, int):
        result = tuple(part[:, :, 0] for part in result) if return_inv_logits else result[:, :, 0]
    return result


def get_topk_closest_tokens(model, vector: torch.Tensor, k: int = 5, use_unembed: bool = True) -> list[tuple[str, float]]:
    """The ``k`` tokens whose unembedding (or embedding) row has the highest cosine similarity with ``vector``."""
    matrix = model.parameter("lm_head.weight" if use_unembed else "embed_tokens.weight").float()
    if vector.shape[-1] != matrix.shape[-1]:
        raise ValueError(f"vector has width {vector.shape[-1]}, the {'unembedding' if use_unembed else 'embedding'} has {matrix.shape[-1]}.")
    similarity = torch.nn.functional.cosine_similarity(matrix, vector.detach().float()[None], dim=-1)
    top = similarity.topk(k)
    return [(model.tokenizer.decode([int(t)]), float(s)) for s, t in zip(top.values, top.indices)]
