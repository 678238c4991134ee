"""Activation patching on the residual stream."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm as auto_tqdm

from ..core.progress import with_progress
from ..core.tracing import with_tokens_at
from .logit_lens import layer_streams


def _last_token_probs(model, prompt: str, patches: Sequence[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """Next-token probabilities of ``prompt`` with ``(layer, position, vector)`` written into layers_output."""
    with torch.no_grad(), model.trace(prompt):
        for layer, position, vector in sorted(patches, key=lambda patch: patch[0]):
            model.layers_output[layer] = with_tokens_at(model, model.layers_output[layer], position, vector)
        probs = model.next_token_probs.save()
    return probs[0]


def activation_patching(
    model,
    clean: str,
    corrupt: str,
    target_token: int,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    tqdm: Callable | None = auto_tqdm,
) -> torch.Tensor:
    """Probability of ``target_token`` on ``corrupt`` when the clean residual stream replaces it at one
    (layer, position) at a time. Returns ``[layers, positions]``, ready to plot; one trace per cell
    (``tqdm=None`` hides the bar)."""
    clean_length = len(model.tokenizer(clean)["input_ids"])
    corrupt_length = len(model.tokenizer(corrupt)["input_ids"])
    if clean_length != corrupt_length:
        raise ValueError(f"clean and corrupt prompts must have the same number of tokens ({clean_length} != {corrupt_length}).")
    layers = list(range(model.num_layers)) if layers is None else list(layers)
    positions = list(range(clean_length)) if positions is None else list(positions)
    streams = layer_streams(model, clean, layers)
    result = torch.empty(len(layers), len(positions))
    for i, layer in enumerate(with_progress(tqdm, layers, "Patching layers")):
        for j, position in enumerate(positions):
            probs = _last_token_probs(model, corrupt, [(layer, position, streams[i][0, position])])
            result[i, j] = probs[target_token]
    return result
