"""Which prompts and tokens a steering call means: per prompt, counted over its real tokens only."""

from __future__ import annotations

from typing import Sequence

import torch

Positions = int | Sequence[int] | slice | torch.Tensor | None


def chosen_tokens(real: torch.Tensor, token_positions: Positions, batch_index: Positions, note: str = "") -> torch.Tensor:
    """``[batch, tokens]``: True at ``token_positions`` of each prompt in ``batch_index`` (None: all), where a
    prompt's positions index its real tokens (``real``, True where the attention mask is 1) so that 0 is its first
    real token and -1 its last, whatever the padding side. ``note`` is added to the out-of-range error for
    ``batch_index``."""
    mask = torch.zeros(real.shape, dtype=torch.bool, device=real.device)
    for row in select(torch.arange(real.shape[0]), batch_index, "batch_index", f"a batch of {real.shape[0]} prompt(s){note}").tolist():
        own = real[row].nonzero().flatten()
        where = f"prompt {row}, which has {len(own)} token(s) in this forward pass"
        mask[row, select(own, token_positions, "token_positions", where)] = True
    return mask


def select(values: torch.Tensor, index: Positions, name: str, where: str) -> torch.Tensor:
    """``values[index]`` (None: all; int, list, slice or tensor; negative counts from the end), as a 1-D tensor;
    an index out of range names ``where``."""
    if index is None:
        return values
    if isinstance(index, slice):
        return values[index]
    picks = torch.as_tensor(index).flatten().tolist()
    bad = [i for i in picks if not -len(values) <= i < len(values)]
    if bad:
        raise IndexError(f"{name}={bad} is out of range for {where}.")
    return values[torch.as_tensor(picks, dtype=torch.long, device=values.device)]
