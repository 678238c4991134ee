"""Running one computation over many prompts, and finding each prompt's own token positions.

On HuggingFace a list of prompts is one padded batch in one trace; on vLLM each prompt is its own request
(one ``tracer.invoke`` per prompt, many per trace, no padding). :func:`trace_prompts` hides that difference;
:func:`token_positions` turns "the i-th token" (negative: counted back from the last real token) into an
index per prompt that is right for left and right padding alike.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import nnsight
import torch

Positions = Union[int, torch.Tensor]
# A short prompt for load-time checks and one-off requests to an engine.
CHECK_PROMPT = "The quick brown fox"
Rows = Sequence[int]


def one_request_per_prompt(nn_model: Any) -> bool:
    """Whether the engine runs each prompt as its own unpadded request (vLLM) rather than a padded batch."""
    return not getattr(getattr(nn_model, "_backend", None), "batches_prompts", True)


def as_prompts(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def trace_prompts(
    nn_model: Any,
    prompts: str | Sequence[str],
    compute: Callable[[Any, Rows], Any],
    remote: bool = False,
) -> Any:
    """``compute(nn_model, rows)`` inside one trace over ``prompts``; returns its results for every prompt,
    concatenated along the first axis (a tensor, or a tuple of tensors).

    ``rows`` are the indices (into ``prompts``) of the prompts the call sees, in order: all of them at once
    on a batching backend, one per ``tracer.invoke`` on vLLM. ``compute`` returns tensors whose first axis
    follows ``rows``.
    """
    prompts = as_prompts(prompts)
    if not prompts:
        raise ValueError("no prompts given.")
    if not one_request_per_prompt(nn_model):
        with torch.no_grad(), nn_model.trace(prompts, **remote_kwargs(nn_model, remote)):
            result = nnsight.save(compute(nn_model, list(range(len(prompts)))))
        return result
    remote_kwargs(nn_model, remote)
    with torch.no_grad(), nn_model.trace() as tracer:
        slots = nnsight.save([None] * len(prompts))  # one slot per request: filled by its own invoke
        for row, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                slots[row] = compute(nn_model, [row])
    return concat_rows(list(slots))


def concat_rows(parts: list[Any]) -> Any:
    """Per-request results joined along the first axis (tuples element-wise)."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([part[i] for part in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def remote_kwargs(nn_model: Any, remote: bool) -> dict:
    """The trace arguments for ``remote=``; engines that run locally only say so."""
    if not remote:
        return {}
    if one_request_per_prompt(nn_model):
        raise NotImplementedError(
            f"remote=True: {type(nn_model).__name__} runs a local vLLM engine; remote execution (NDIF) goes "
            "through nnsight's LanguageModel. Use StandardizedTransformer(..., remote=True) for it."
        )
    return {"remote": remote}


def attention_mask(nn_model: Any) -> torch.Tensor | None:
    """The current trace's attention mask ``[batch, seq]``: on a standardized model the mask the forward
    received (readable anywhere in the trace body); on a plain nnsight model its inputs, readable only
    before any module of the trace."""
    if hasattr(nn_model, "trace_attention_mask"):
        return nn_model.trace_attention_mask()
    from nnsight.intervention.interleaver import OutOfOrderError

    try:
        _, kwargs = nn_model.inputs
    except OutOfOrderError as error:
        raise RuntimeError(
            "Token positions come from the trace's attention mask, which a plain nnsight model exposes only "
            "before the first module runs: call this before reading any module in the trace (or pass explicit "
            "positions, or load the model with StandardizedTransformer)."
        ) from error
    return kwargs.get("attention_mask") if isinstance(kwargs, dict) else None


def token_positions(nn_model: Any, index: Positions = -1) -> Positions:
    """Where each prompt of the current trace has its ``index``-th real token.

    ``index`` is an int or one int per prompt; negative values count back from each prompt's own last real
    token, so ``-1`` is every prompt's last token whether the batch is padded on the left or the right.
    Returns a ``[batch]`` tensor of sequence positions on padded batches; on engines that run each prompt
    alone (vLLM) the index itself. Call it inside the trace (on a plain nnsight model, before reading any
    module). An index past a prompt's length raises ``IndexError`` naming the prompt.
    """
    if one_request_per_prompt(nn_model):
        return index if isinstance(index, int) else int(torch.as_tensor(index).reshape(-1)[0])
    mask = attention_mask(nn_model)
    if mask is None:
        return index
    mask = mask.bool()
    lengths = mask.sum(-1)
    first = mask.int().argmax(-1)  # left padding: the number of pads; right padding or none: 0
    index = torch.as_tensor(index, device=mask.device).expand(mask.shape[0])
    out_of_range = (index >= lengths) | (index < -lengths)
    if bool(out_of_range.any()):
        row = int(out_of_range.nonzero()[0, 0])
        raise IndexError(
            f"token index {int(index[row])} is out of range for prompt {row} of this batch, which has "
            f"{int(lengths[row])} tokens."
        )
    return first + torch.where(index < 0, lengths + index, index)


def tokens_at(nn_model: Any, activation: torch.Tensor, positions: Positions) -> torch.Tensor:
    """``activation`` (``[batch, seq, ...]``, or a vLLM request's flat ``[tokens, ...]``) at each prompt's
    position from :func:`token_positions`: ``[batch, ...]``."""
    batch = nn_model.as_batch(activation) if hasattr(nn_model, "as_batch") else activation
    if isinstance(positions, int):
        length = batch.shape[1]
        if not -length <= positions < length:
            raise IndexError(f"token index {positions} is out of range for a prompt of {length} tokens.")
        return batch[:, positions]
    return batch[torch.arange(batch.shape[0], device=batch.device), positions.to(batch.device)]


def with_tokens_at(nn_model: Any, activation: torch.Tensor, positions: Positions, values: torch.Tensor) -> torch.Tensor:
    """A new tensor shaped like ``activation`` whose vectors at ``positions`` (one per prompt) are ``values``
    (``[batch, hidden]`` or ``[hidden]``); ``activation`` itself is left untouched."""
    batch = nn_model.as_batch(activation) if hasattr(nn_model, "as_batch") else activation
    rows = torch.arange(batch.shape[0], device=batch.device)
    if isinstance(positions, int):
        if not -batch.shape[1] <= positions < batch.shape[1]:
            raise IndexError(f"token index {positions} is out of range for a prompt of {batch.shape[1]} tokens.")
        positions = torch.full_like(rows, positions % batch.shape[1])
    values = values.to(device=batch.device, dtype=batch.dtype).expand(batch.shape[0], batch.shape[-1])
    patched = batch.index_put((rows, positions.to(batch.device)), values)
    return patched.reshape(activation.shape)
