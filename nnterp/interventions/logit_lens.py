"""Logit lens: the model's final norm and LM head applied to every layer's residual stream."""

from __future__ import annotations

from typing import Sequence

import torch


def layer_streams(model, prompts: str | Sequence[str], layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """``layers_output[l]`` for each requested layer (all by default), read in one trace."""
    layers = list(range(model.num_layers)) if layers is None else [model._check_layer_index(l, "layers") for l in layers]
    streams: list[torch.Tensor] = []
    with torch.no_grad(), model.trace(prompts):
        for layer in sorted(layers):
            streams.append(model.layers_output[layer].save())
    order = sorted(layers)
    return [streams[order.index(layer)] for layer in layers]


def logit_lens(
    model,
    prompts: str | Sequence[str],
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] = -1,
    tokens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Next-token probabilities read off each layer's output.

    Returns ``[layers, batch, positions, vocab]`` (or ``[..., len(tokens)]`` when ``tokens`` is given);
    an integer ``positions`` drops that axis.
    """
    streams = layer_streams(model, prompts, layers)
    index = [positions] if isinstance(positions, int) else list(positions)
    with torch.no_grad():
        probs = torch.stack([model.project_on_vocab(stream[:, index]).float().softmax(-1) for stream in streams])
    if tokens is not None:
        probs = probs[..., list(tokens)]
    return probs[:, :, 0] if isinstance(positions, int) else probs


def get_topk_closest_tokens(model, vector: torch.Tensor, k: int = 5, use_unembed: bool = True) -> list[tuple[str, float]]:
    """The ``k`` tokens whose unembedding (or embedding) row has the highest cosine similarity with ``vector``."""
    matrix = model._torch_module("lm_head" if use_unembed else "embed_tokens").weight.detach().float()
    if vector.shape[-1] != matrix.shape[-1]:
        raise ValueError(f"vector has width {vector.shape[-1]}, the {'unembedding' if use_unembed else 'embedding'} has {matrix.shape[-1]}.")
    similarity = torch.nn.functional.cosine_similarity(matrix, vector.detach().float()[None], dim=-1)
    top = similarity.topk(k)
    return [(model.tokenizer.decode([int(t)]), float(s)) for s, t in zip(top.values, top.indices)]
