"""The HF backend's batching of prompts: nnsight's batcher, keeping the attention mask of the padded batch it
assembles, and the probe that tells which models left padding would shift."""

from __future__ import annotations

import torch
from nnsight.intervention.batching import Batcher


class AttentionMaskBatcher(Batcher):
    """nnsight's batcher, keeping the attention mask of the forward it assembles (the padded batch of every
    invoke's prompts), so a trace body can tell each prompt's tokens from padding. It refuses a left-padded
    batch for a model whose positions left padding shifts (see :func:`left_padding_shifts_positions`), and the
    generation of a right-padded batch of such a model."""

    attention_mask: torch.Tensor | None = None

    def assemble(self, fn):
        args, kwargs = super().assemble(fn)
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        if self.attention_mask is not None:
            architecture = type(self.envoy._module).__name__
            shifts = bool(getattr(self.envoy, "left_padding_shifts_positions", False))
            if shifts:
                refuse_left_padding(self.attention_mask, architecture)
            if getattr(fn, "__name__", fn) == "generate":
                refuse_right_padded_generation(self.attention_mask, architecture, shifts)
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


def refuse_right_padded_generation(attention_mask: torch.Tensor, architecture: str, shifts: bool) -> None:
    """Generation appends each new token after the whole padded row: a shorter prompt padded on the right would
    be continued after its padding, not after its last token."""
    real = attention_mask.bool()
    padded_right = bool((real[:, :-1] & ~real[:, 1:]).any()) or bool((~real[:, -1] & real.any(-1)).any())
    if not padded_right:
        return
    lengths = real.sum(-1).tolist()
    remedy = ("it pads on the right because left padding would shift its positions: generate them one per "
              "model.generate call (or one per trace), or give prompts of equal length" if shifts else
              "pad on the left for generation: model.tokenizer.padding_side = 'left'")
    raise ValueError(
        f"Generating a right-padded batch of prompts of different lengths ({lengths} tokens) on {architecture} "
        f"would continue the shorter ones after their padding; {remedy}."
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
