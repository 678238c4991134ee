"""Padded prompt batches: each prompt's last real token, from the attention mask the forward received (kept by
the HF backend's batcher, ``nnterp.backends.hf.batcher``)."""

from __future__ import annotations

import torch

from .forward_order import current_block


def in_trace() -> bool:
    """Whether the caller runs inside a trace body (an nnsight intervention block)."""
    return current_block() is not None


def current_attention_mask() -> torch.Tensor | None:
    """Inside a trace body: the rows of the forward's attention mask that belong to this block (its invoke's
    prompts), ``[batch, seq]``; None when the forward got no mask or outside a trace."""
    block = current_block()
    batcher = getattr(getattr(block, "interleaver", None), "batcher", None)
    mask = getattr(batcher, "attention_mask", None)
    if mask is None:
        return None
    return batcher.narrow(mask, block.batch_group)


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (the last 1) in a ``[batch, seq]`` attention mask, ``[batch]``."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}.")
    real = attention_mask.bool()
    empty = (~real.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} have no real token (all padding).")
    positions = torch.arange(real.shape[-1], device=real.device).expand_as(real)
    return torch.where(real, positions, -1).amax(-1)


def at_last_token(tensor: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``tensor[b, last real token of prompt b]`` for a ``[batch, seq, ...]`` tensor.

    Without a mask, or with left padding (every prompt ends at the last position), that is ``tensor[:, -1]``,
    which also holds for a generation step's one new position.
    """
    if attention_mask is None:
        return tensor[:, -1]
    last = last_token_indices(attention_mask)
    if bool((last == attention_mask.shape[-1] - 1).all()):
        return tensor[:, -1]
    if tensor.ndim < 2 or tuple(tensor.shape[:2]) != tuple(attention_mask.shape):
        if tensor.ndim >= 2 and tensor.shape[0] == attention_mask.shape[0] and tensor.shape[1] == 1:
            return tensor[:, -1]  # a generation step: the one new position of every prompt
        raise ValueError(
            f"last position: the prompts are right-padded (attention mask {tuple(attention_mask.shape)}), but the "
            f"tensor has shape {tuple(tensor.shape)}, not [batch, seq, ...] of the same batch and sequence length, "
            f"so where each prompt ends in it is unknown."
        )
    rows = torch.arange(tensor.shape[0], device=tensor.device)
    return tensor[rows, last.to(tensor.device)]
