"""Steering during greedy multi-token generation, identical on both backends."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import nnsight
import torch

# nnsight's notice when an open `tracer.iter[:]` loop outlives a generation stopped early by the
# end-of-sequence token: expected here, the tokens generated so far are the result.
LOOP_CUT_SHORT = ".*was never reached.*"


def steer(
    nn_model,
    layers: int | Sequence[int],
    steering_vector: torch.Tensor,
    factor: float = 1,
    positions=None,
    token_positions=None,
    batch_index=None,
) -> None:
    """Inside a trace: add ``factor * steering_vector`` to the output of each of ``layers`` (the model's
    ``steer``; ``token_positions`` / ``batch_index`` restrict it to those tokens / prompts)."""
    from .activations import get_layer_output, is_standardized, layer_index, set_layer_output

    restrict = {name: value for name, value in (("positions", positions), ("token_positions", token_positions),
                                                ("batch_index", batch_index)) if value is not None}
    if is_standardized(nn_model):
        nn_model.steer(layers, steering_vector, factor, **restrict)
        return
    if restrict:
        raise ValueError(f"steer({', '.join(restrict)}=...) needs a StandardizedTransformer (each prompt's own "
                         f"token positions); {type(nn_model).__name__} can only be steered at every position.")
    if steering_vector.ndim != 1:
        raise ValueError(f"steer on a {type(nn_model).__name__} takes a [hidden] vector, got shape "
                         f"{tuple(steering_vector.shape)}; one vector per prompt needs a StandardizedTransformer.")
    for layer in sorted(layer_index(nn_model, l, "steer") for l in ([layers] if isinstance(layers, int) else layers)):
        stream = get_layer_output(nn_model, layer)
        set_layer_output(nn_model, layer, stream + factor * steering_vector.to(device=stream.device, dtype=stream.dtype))


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
        warnings.filterwarnings("ignore", message=LOOP_CUT_SHORT)
        with torch.no_grad(), model.generate(prompt, **model.greedy_generation_kwargs(max_new_tokens)) as tracer:
            tokens = nnsight.save([])
            for _ in tracer.iter[:]:
                if steering_vector is not None and layers:
                    model.steer(layers=layers, steering_vector=steering_vector, factor=factor)
                tokens.append(model.step_token.item())
    tokens = list(tokens)
    return Generation(tokens=tokens, text=model.tokenizer.decode(tokens))
