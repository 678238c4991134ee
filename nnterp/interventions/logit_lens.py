"""Logit lens: the model's final norm and LM head applied to every layer's residual stream."""

from __future__ import annotations

from typing import Sequence

import nnsight
import torch


def _layers(model, layers: Sequence[int] | None) -> list[int]:
    return list(range(model.num_layers)) if layers is None else [model._check_layer_index(l, "layers") for l in layers]


def layer_streams(model, prompts: str | Sequence[str], layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """``layers_output[l]`` as ``[batch, seq, hidden]`` for each requested layer (all by default), one trace."""
    layers = _layers(model, layers)
    order = sorted(set(layers))
    with torch.no_grad(), model.trace(prompts):
        streams = nnsight.save([])
        for layer in order:
            streams.append(model.as_batch(model.layers_output[layer]))
    return [streams[order.index(layer)] for layer in layers]


def logit_lens(
    model,
    prompts: str | Sequence[str],
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] = -1,
    tokens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Next-token probabilities read off each layer's output (projected inside the trace, so it also runs
    where the weights live on the engine's side).

    Returns ``[layers, batch, positions, vocab]`` (or ``[..., len(tokens)]`` when ``tokens`` is given);
    an integer ``positions`` drops that axis.
    """
    layers = _layers(model, layers)
    order = sorted(set(layers))
    index = [positions] if isinstance(positions, int) else list(positions)
    with torch.no_grad(), model.trace(prompts):
        per_layer = nnsight.save([])
        for layer in order:
            stream = model.as_batch(model.layers_output[layer])[:, index]
            probs = model.project_on_vocab(stream).float().softmax(-1)
            per_layer.append(probs if tokens is None else probs[..., list(tokens)])
    probs = torch.stack([per_layer[order.index(layer)] for layer in layers])
    return probs[:, :, 0] if isinstance(positions, int) else probs


def get_topk_closest_tokens(model, vector: torch.Tensor, k: int = 5, use_unembed: bool = True) -> list[tuple[str, float]]:
    """The ``k`` tokens whose unembedding (or embedding) row has the highest cosine similarity with ``vector``."""
    matrix = model.parameter("lm_head.weight" if use_unembed else "embed_tokens.weight").float()
    if vector.shape[-1] != matrix.shape[-1]:
        raise ValueError(f"vector has width {vector.shape[-1]}, the {'unembedding' if use_unembed else 'embedding'} has {matrix.shape[-1]}.")
    similarity = torch.nn.functional.cosine_similarity(matrix, vector.detach().float()[None], dim=-1)
    top = similarity.topk(k)
    return [(model.tokenizer.decode([int(t)]), float(s)) for s, t in zip(top.values, top.indices)]
