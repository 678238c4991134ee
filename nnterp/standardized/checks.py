"""The load-time renaming check (``check_renaming=True``): on a short prompt, every standard module reads a
tensor of the shape its name promises, and every layer runs."""

from __future__ import annotations

import logging

import nnsight
import torch

from ..core.rename import RenamingError, layer_child
from ..core.surface import StandardModel
from ..core.tracing import CHECK_PROMPT

logger = logging.getLogger("nnterp")

SUBMODULES = {"self_attn": ("attentions", "attn_name", "ignore_attn"), "mlp": ("mlps", "mlp_name", "ignore_mlp")}


def check_renaming(model: StandardModel, allow_multimodal: bool = False) -> None:
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
        elif not _stream_shaped(model, name, value, expected, stream):
            raise RenamingError(
                f"check_renaming: {name} has shape {tuple(value.shape)}, expected {expected} (batch, tokens, hidden "
                f"size). The module behind it is probably the wrong one: pass its name in a RenameConfig, or "
                f"RenameConfig(hidden_size_config_key=...) if the hidden size is wrong."
            )
    ignored = model._rename_config.ignores()
    for role, (plural, field, flag) in SUBMODULES.items():
        if role in ignored:
            continue
        if not (model._backend.serves(f"{plural}_input") and model._backend.serves(f"{plural}_output")):
            continue  # an engine on CUDA graphs that does not serve them (cuda_graphs=(...))
        if getattr(model.names, role) is None:
            children = [name for name, _ in model._torch_module("layers")[0].named_children()]
            logger.warning(
                "nnterp: no %s module found in layer 0 (children: %s); %s_input/%s_output are unavailable. Pass "
                "RenameConfig(%s='<child>') if one of them is it, or RenameConfig(%s=True) to silence this.",
                plural[:-1], children, plural, plural, field, flag,
            )
            continue
        for name, value in _read_submodule(model, role, plural).items():
            if not _stream_shaped(model, name, value, expected, stream):
                raise RenamingError(
                    f"check_renaming: {name} has shape {tuple(value.shape)}, expected {expected} (batch, tokens, "
                    f"hidden size). Pass the right module with RenameConfig({field}='<child of a layer>'), or skip "
                    f"this check with RenameConfig({flag}=True)."
                )


def _read_stream(model: StandardModel, every_layer: bool) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Embeddings, layer inputs and outputs, the projection of the last one, and the logits, in forward order."""
    layers = range(model.num_layers) if every_layer else [0]
    served = {name: model._backend.serves(name) for name in ("layers_input", "layers_output")}
    if not served["layers_output"]:
        layers = []
    try:
        with torch.no_grad(), model.trace(CHECK_PROMPT):
            size = nnsight.save(tuple(model.input_size))
            reads = nnsight.save({})
            reads["token_embeddings"] = model.token_embeddings
            if served["layers_input"]:
                reads["layers_input[0]"] = model.layers_input[0]
            for index in layers:
                last = model.layers_output[index]
                reads[f"layers_output[{index}]"] = last
            if layers:
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


def _stream_shaped(model: StandardModel, name: str, value: torch.Tensor, expected: tuple[int, ...],
                   stream: dict[str, torch.Tensor]) -> bool:
    """``value`` has the stream's shape ``expected``; token embeddings may have the embedding's own width where
    the stream itself has the expected one (RemBERT projects narrower embeddings up inside the model), and a
    hyper-connection stream carries parallel copies (DeepSeek-V4: ``[batch, tokens, copies, hidden]``)."""
    shape = tuple(model.as_batch(value).shape)
    if shape == expected or len(shape) == 4 and shape[:2] == expected[:2] and shape[-1] == expected[-1]:
        return True
    if name == "token_embeddings":
        width = getattr(getattr(model._torch_module("embed_tokens"), "weight", None), "shape", (None,))[-1]
        reference = stream.get("layers_input[0]", stream.get("layers_output[0]"))  # what a graph engine serves
        if reference is None:
            return False
        stream_shape = tuple(model.as_batch(reference).shape)
        return shape == (*expected[:-1], width) and stream_shape == expected
    return False


def _read_submodule(model: StandardModel, role: str, plural: str) -> dict[str, torch.Tensor]:
    """The block's input and output in the first layer that has one (a hybrid stack's first layer may be a
    state-space mixer without attention)."""
    layers = model._torch_module("layers")
    index = next((i for i, layer in enumerate(layers) if layer_child(layer, role, model.names) is not None), 0)
    inputs, outputs = getattr(model, f"{plural}_input"), getattr(model, f"{plural}_output")
    try:
        with torch.no_grad(), model.trace(CHECK_PROMPT):
            reads = nnsight.save({})
            reads[f"{plural}_input[{index}]"] = inputs[index]
            reads[f"{plural}_output[{index}]"] = outputs[index]
    except Exception as error:
        raise RenamingError(
            f"check_renaming: reading {plural}_input/output[{index}] failed: {type(error).__name__}: {error}"
        ) from error
    return reads
