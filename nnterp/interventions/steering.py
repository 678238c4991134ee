"""Steering during greedy multi-token generation, identical on both backends."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import nnsight
import torch

# nnsight's notice when an open `tracer.iter[:]` loop outlives a generation stopped early by the
# end-of-sequence token: expected here, the tokens generated so far are the result.
_LOOP_CUT_SHORT = ".*was never reached.*"


@dataclass
class Generation:
    """A greedy continuation: the generated token ids and their text."""

    tokens: list[int]
    text: str


def steered_generation(
    model,
    prompt: str,
    steering_vector: torch.Tensor | None = None,
    layers: int | Sequence[int] = (),
    factor: float = 1.0,
    max_new_tokens: int = 20,
) -> Generation:
    """Greedy generation of up to ``max_new_tokens`` tokens (stopping at end of sequence), with
    ``factor * steering_vector`` added to ``layers_output`` of each of ``layers`` at every step: over the whole
    prompt on the first step, on each new token after. Without a vector it is the plain greedy continuation."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if steering_vector is not None and steering_vector.shape != (model.hidden_size,):
        raise ValueError(
            f"steering_vector must have shape ({model.hidden_size},) (the hidden size), got {tuple(steering_vector.shape)}."
        )
    layers = [layers] if isinstance(layers, int) else list(layers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LOOP_CUT_SHORT)
        with torch.no_grad(), model.generate(prompt, **model.greedy_generation_kwargs(max_new_tokens)) as tracer:
            tokens = nnsight.save([])
            for _ in tracer.iter[:]:
                if steering_vector is not None and layers:
                    model.steer(layers=layers, steering_vector=steering_vector, factor=factor)
                tokens.append(model.step_token.item())
    tokens = list(tokens)
    return Generation(tokens=tokens, text=model.tokenizer.decode(tokens))
