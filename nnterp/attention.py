"""``model.attention_probabilities[i]``: the softmax attention pattern of layer ``i`` (HF, eager attention).

The pattern is read and written where the model computes it: the softmax inside the attention function
the attention module calls (found by walking nnsight's source view of the module, not by name tables),
so an edit changes what the heads mix. Shape ``[batch, heads, query, key]``.
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .standardized.base import StandardizedMixin


class AttentionProbabilitiesUnavailable(RuntimeError):
    """The model does not materialize attention probabilities where nnterp can reach them."""


class AttentionProbabilities:
    """Index with a layer number inside a trace to read (``[batch, heads, query, key]``) or assign."""

    def __init__(self, model: "StandardizedMixin") -> None:
        self._model = model
        self._calls: dict[type, str | AttentionProbabilitiesUnavailable] = {}

    def _softmax_site(self, index: int) -> Any:
        layer = self._model._check_layer_index(index, "attention_probabilities")
        implementation = getattr(self._model._module.config, "_attn_implementation", None)
        if implementation not in (None, "eager"):
            raise AttentionProbabilitiesUnavailable(
                f"attention_probabilities[{layer}]: the model runs {implementation!r} attention, which never "
                "materializes the probabilities. Load it with StandardizedTransformer(..., attn_implementation='eager')."
            )
        attention = self._model.attentions[layer]
        cls = type(attention._module)
        if cls not in self._calls:
            try:
                self._calls[cls] = attention_call(attention.source.compiled, cls.__name__)
            except AttentionProbabilitiesUnavailable as error:
                self._calls[cls] = error
        call = self._calls[cls]
        if isinstance(call, AttentionProbabilitiesUnavailable):
            raise call
        inner = getattr(attention.source, call).source  # the function is resolved when the call runs
        softmax = [name for name in inner.names if "softmax" in name]
        if not softmax:
            raise AttentionProbabilitiesUnavailable(
                f"attention_probabilities[{layer}]: {cls.__name__}'s attention function computes no softmax "
                f"nnterp can reach (its operations: {list(inner.names)})."
            )
        return getattr(inner, softmax[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._softmax_site(index).output

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        from .layout import check_same_shape

        site = self._softmax_site(index)
        check_same_shape(site.output, value, f"attention_probabilities[{index}]")
        site.output = value

    def __len__(self) -> int:
        return self._model.num_layers


def attention_call(compiled: Any, class_name: str) -> str:
    """The label of the attention-function call in an attention module's forward: an operation on a line
    where a function whose name mentions attention is called (not assigned), from the forward's syntax tree."""
    tree = ast.parse(compiled.source)
    call_lines = {node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and "attention" in node.func.id}
    labels = [name for name in compiled.names if "attention" in name and compiled.lines.get(name) in call_lines]
    if not labels:
        raise AttentionProbabilitiesUnavailable(
            f"{class_name}.forward calls no attention function nnterp can drill into "
            f"(its operations: {list(compiled.names)})."
        )
    return labels[0]
