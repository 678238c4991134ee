"""Padded prompt batches: each prompt's last real token, from the attention mask the forward received."""

from __future__ import annotations

import torch
from nnsight.intervention.batching import Batcher

from .forward_order import current_block


class AttentionMaskBatcher(Batcher):
    """nnsight's batcher, keeping the attention mask of the forward it assembles (the padded batch of every
    invoke's prompts), so a trace body can tell each prompt's tokens from padding. It refuses a left-padded
    batch for a model whose positions left padding shifts (see :func:`left_padding_shifts_positions`)."""

    attention_mask: torch.Tensor | None = None

    def assemble(self, fn):
        args, kwargs = super().assemble(fn)
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        if self.attention_mask is not None and getattr(self.envoy, "left_padding_shifts_positions", False):
            refuse_left_padding(self.attention_mask, type(self.envoy._module).__name__)
        return args, kwargs


def refuse_left_padding(attention_mask: torch.Tensor, architecture: str) -> None:
    real = attention_mask.bool()
    if bool((~real[:, 0] & real.any(-1)).any()):
        raise ValueError(
            f"{architecture} places each token by its index in the padded batch, so left padding shifts the "
            f"positions of the shorter prompts and changes every value they produce. Pad on the right "
            f"(model.tokenizer.padding_side = 'right', the default nnterp sets for this model: last_position and "
            f"next_token_probs read each prompt's last real token), or trace one prompt at a time."
        )


def left_padding_shifts_positions(model, probe_tokens: list[int]) -> bool | None:
    """Whether a prompt left-padded in a batch gives other next-token logits than the same prompt alone (its
    tokens then sit at other positions: models whose positional embeddings ignore ``position_ids``, such as
    HF MBart, Pegasus, Blenderbot). ``model`` is a StandardizedTransformer whose tokenizer pads on the left;
    None when the probe cannot run."""
    import nnsight

    short = probe_tokens[-2:]
    try:
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke({"input_ids": torch.tensor([probe_tokens])}):
                pass
            with tracer.invoke({"input_ids": torch.tensor([short])}):
                padded = nnsight.save(model.logits[:, -1])
        with torch.no_grad(), model.trace({"input_ids": torch.tensor([short])}):
            alone = nnsight.save(model.logits[:, -1])
    except Exception:  # an input this probe cannot build (a multimodal model); nothing is claimed
        return None
    scale = alone.float().abs().max().clamp_min(1e-6)
    return bool(((padded.float() - alone.float()).abs().max() / scale) > 1e-3)


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
