"""The load-time renaming check (``check_renaming=True``): on a short prompt, every standard module reads a
tensor of the shape its name promises, and every layer runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import nnsight
import torch

from ..rename import RenamingError

if TYPE_CHECKING:
    from .base import StandardizedMixin

logger = logging.getLogger("nnterp")

CHECK_PROMPT = "The quick brown fox"
SUBMODULES = {"self_attn": ("attentions", "attn_name", "ignore_attn"), "mlp": ("mlps", "mlp_name", "ignore_mlp")}


def check_renaming(model: "StandardizedMixin", allow_multimodal: bool = False) -> None:
    """Raise ``RenamingError`` naming the first standard module that does not read a hidden-width tensor of
    ``[batch, tokens, hidden]`` (``as_batch`` shape on vLLM), or the layers that do not run on a text-only
    prompt (a multimodal model's cross-attention layers) unless ``allow_multimodal``."""
    stream, size = _read_stream(model, every_layer=not allow_multimodal)
    hidden = model.hidden_size
    expected = (*size, hidden)
    for name, value in stream.items():
        if name in ("logits", "project_on_vocab(layers_output)"):
            vocab = model.vocab_size
            if vocab is not None and value.shape[-1] != vocab:
                raise RenamingError(
                    f"check_renaming: {name} has shape {tuple(value.shape)}, expected a last dimension of {vocab} "
                    f"(the vocabulary size). If the size is wrong, pass RenameConfig(vocab_size_config_key=...); if "
                    f"lm_head is the wrong module, pass RenameConfig(lm_head_name='<path>')."
                )
        elif tuple(model.as_batch(value).shape) != expected:
            raise RenamingError(
                f"check_renaming: {name} has shape {tuple(value.shape)}, expected {expected} (batch, tokens, hidden "
                f"size). The module behind it is probably the wrong one: pass its name in a RenameConfig, or "
                f"RenameConfig(hidden_size_config_key=...) if the hidden size is wrong."
            )
    ignored = model._rename_config.ignores()
    for role, (plural, field, flag) in SUBMODULES.items():
        if role in ignored:
            continue
        if getattr(model.names, role) is None:
            children = [name for name, _ in model._torch_module("layers")[0].named_children()]
            logger.warning(
                "nnterp: no %s module found in layer 0 (children: %s); %s_input/%s_output are unavailable. Pass "
                "RenameConfig(%s='<child>') if one of them is it, or RenameConfig(%s=True) to silence this.",
                plural[:-1], children, plural, plural, field, flag,
            )
            continue
        for name, value in _read_submodule(model, plural).items():
            if tuple(model.as_batch(value).shape) != expected:
                raise RenamingError(
                    f"check_renaming: {name} has shape {tuple(value.shape)}, expected {expected} (batch, tokens, "
                    f"hidden size). Pass the right module with RenameConfig({field}='<child of a layer>'), or skip "
                    f"this check with RenameConfig({flag}=True)."
                )


def _read_stream(model: "StandardizedMixin", every_layer: bool) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Embeddings, layer inputs and outputs, the projection of the last one, and the logits, in forward order."""
    layers = range(model.num_layers) if every_layer else [0]
    try:
        with torch.no_grad(), model.trace(CHECK_PROMPT):
            size = nnsight.save(tuple(model.input_size))
            reads = nnsight.save({})
            reads["token_embeddings"] = model.token_embeddings
            reads["layers_input[0]"] = model.layers_input[0]
            for index in layers:
                last = model.layers_output[index]
                reads[f"layers_output[{index}]"] = last
            reads["project_on_vocab(layers_output)"] = model.project_on_vocab(last)
            reads["logits"] = model.logits
    except nnsight.intervention.interleaver.OutOfOrderError as error:
        classes = sorted({type(layer).__name__ for layer in model._torch_module("layers")})
        raise RenamingError(
            f"check_renaming: not every layer runs on a text-only prompt ({error}; layer classes: {classes}). "
            "This is likely a multimodal model whose other layers (e.g. cross-attention) only run with images, "
            "so nnterp cannot give standardized access to every layer. Pass allow_multimodal=True to load it anyway."
        ) from error
    except Exception as error:
        raise RenamingError(f"check_renaming: reading the residual stream failed: {type(error).__name__}: {error}") from error
    return reads, tuple(size)


def _read_submodule(model: "StandardizedMixin", plural: str) -> dict[str, torch.Tensor]:
    inputs, outputs = getattr(model, f"{plural}_input"), getattr(model, f"{plural}_output")
    try:
        with torch.no_grad(), model.trace(CHECK_PROMPT):
            reads = nnsight.save({})
            reads[f"{plural}_input[0]"] = inputs[0]
            reads[f"{plural}_output[0]"] = outputs[0]
    except Exception as error:
        raise RenamingError(f"check_renaming: reading {plural}_input/output[0] failed: {type(error).__name__}: {error}") from error
    return reads
