"""Streams a module carries with its tokens flattened, ``[batch * seq, hidden]`` (HF Llama 4's MoE block returns
so and its layer reshapes), read and written as ``[batch, seq, hidden]`` like every other accessor.

Inside a trace a block (an invoke) owns rows ``start .. start + size`` of the forward's batch. nnsight narrows
a tensor to those rows only when its leading dimension is the batch size, which a flattened tensor's is only
when each prompt contributes one token (a generation step after the first); otherwise every block sees the
whole flattened tensor, and the rows are taken and put back here.
"""

from __future__ import annotations

import torch

from .forward_order import current_block


def block_rows() -> tuple[int, int, int]:
    """``(batch size of this forward pass, first row of the running block, its rows)``; one block that owns the
    whole batch outside a batched trace."""
    block = current_block()
    batcher = getattr(getattr(block, "interleaver", None), "batcher", None)
    total = getattr(batcher, "total", 0)
    group = getattr(block, "batch_group", None)
    if not total:
        raise ValueError("a flattened stream is read inside a trace only (its batch size comes from the trace).")
    if group is None or not batcher.batching:
        return total, 0, total
    return total, group[0], group[1]


def _narrowed_by_nnsight(flat: torch.Tensor, total: int, size: int) -> bool:
    return total != size and flat.shape[0] == size


def unflatten(flat: torch.Tensor, where: str) -> torch.Tensor:
    """``[batch * seq, hidden]`` as this block's ``[rows, seq, hidden]`` (a view)."""
    total, start, size = block_rows()
    if _narrowed_by_nnsight(flat, total, size):
        return flat[:, None]  # one token per prompt: nnsight already kept this block's rows
    if flat.shape[0] % total:
        raise ValueError(
            f"{where}: the module returned {flat.shape[0]} flattened token rows, which do not split into the "
            f"forward pass's {total} prompts."
        )
    return flat.reshape(total, flat.shape[0] // total, flat.shape[-1])[start:start + size]


def flatten(current: torch.Tensor, value: torch.Tensor, where: str) -> torch.Tensor:
    """The module's flattened tensor with this block's rows replaced by ``value`` (``[rows, seq, hidden]``)."""
    expected = unflatten(current, where)
    if value.shape != expected.shape:
        raise ValueError(
            f"{where}: shape mismatch, the stream has shape {tuple(expected.shape)} (batch, tokens, hidden) but the new "
            f"value has shape {tuple(value.shape)}. Write a tensor of the same shape."
        )
    total, start, size = block_rows()
    if _narrowed_by_nnsight(current, total, size):
        return value.reshape(current.shape)
    full = current.reshape(total, current.shape[0] // total, current.shape[-1])
    rows = torch.cat([full[:start], value.to(full), full[start + size:]]) if size != total else value.to(full)
    return rows.reshape(current.shape)
