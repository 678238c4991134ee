"""Activation patching and patchscopes on the residual stream."""

from __future__ import annotations

from typing import Sequence

import torch

from .logit_lens import layer_streams


def _last_token_probs(model, prompt: str, patches: Sequence[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """Next-token probabilities of ``prompt`` with ``(layer, position, vector)`` written into layers_output."""
    with torch.no_grad(), model.trace(prompt):
        for layer, position, vector in sorted(patches, key=lambda patch: patch[0]):
            current = model.layers_output[layer]
            stream = model.as_batch(current).clone()
            stream[:, position] = vector
            model.layers_output[layer] = stream.reshape(current.shape)
        probs = model.next_token_probs.save()
    return probs[0]


def activation_patching(
    model,
    clean: str,
    corrupt: str,
    target_token: int,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Probability of ``target_token`` on ``corrupt`` when the clean residual stream replaces it at one
    (layer, position) at a time. Returns ``[layers, positions]``, ready to plot."""
    clean_length = len(model.tokenizer(clean)["input_ids"])
    corrupt_length = len(model.tokenizer(corrupt)["input_ids"])
    if clean_length != corrupt_length:
        raise ValueError(f"clean and corrupt prompts must have the same number of tokens ({clean_length} != {corrupt_length}).")
    layers = list(range(model.num_layers)) if layers is None else list(layers)
    positions = list(range(clean_length)) if positions is None else list(positions)
    streams = layer_streams(model, clean, layers)
    result = torch.empty(len(layers), len(positions))
    for i, layer in enumerate(layers):
        for j, position in enumerate(positions):
            probs = _last_token_probs(model, corrupt, [(layer, position, streams[i][0, position])])
            result[i, j] = probs[target_token]
    return result


def patchscope_lens(
    model,
    source_prompt: str,
    target_prompt: str,
    source_position: int = -1,
    target_position: int = -1,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Next-token probabilities of ``target_prompt`` after its stream at ``target_position`` is replaced by
    the source's stream at ``source_position``, for each layer in turn. Returns ``[layers, vocab]``."""
    layers = list(range(model.num_layers)) if layers is None else list(layers)
    streams = layer_streams(model, source_prompt, layers)
    return torch.stack([
        _last_token_probs(model, target_prompt, [(layer, target_position, stream[0, source_position])])
        for layer, stream in zip(layers, streams)
    ])
