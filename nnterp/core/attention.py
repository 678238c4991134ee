"""``model.attention_probabilities[i]``: the softmax attention pattern of layer ``i`` (HF, eager attention).

The pattern is read and written where the model computes it: the softmax inside the attention function
the attention module calls (found by walking nnsight's source view of the module, not by name tables),
so an edit changes what the heads mix. Shape ``[batch, heads, query, key]``.
"""

from __future__ import annotations

import ast
from typing import Any, Callable, NamedTuple

import nnsight
import torch

from .layout import check_same_shape
from .rename import RenamingError
from .surface import StandardModel
from .tracing import CHECK_PROMPT


class AttentionProbabilitiesUnavailable(RenamingError, RuntimeError):
    """The model does not materialize attention probabilities where nnterp can reach them."""


def eager_for_probabilities(enable_attention_probs: bool, attn_implementation: str | None) -> str | None:
    """The attention implementation to load with: eager when probabilities are asked for (a conflicting
    request is refused, as nnterp 1.x did), else the one requested."""
    if enable_attention_probs and attn_implementation not in (None, "eager"):
        raise ValueError(
            f"Cannot use attn_implementation='{attn_implementation}' with enable_attention_probs=True. "
            "Either set enable_attention_probs=False or don't pass attn_implementation."
        )
    return "eager" if enable_attention_probs else attn_implementation


class AttentionProbabilities:
    """Index with a layer number inside a trace to read (``[batch, heads, query, key]``) or assign.

    ``enabled`` while the model runs eager attention (``enable_attention_probs=True`` or
    ``attn_implementation="eager"``) and ``disable()`` was not called. ``source`` (an ``AttnProbFunction``
    from ``RenameConfig(attn_prob_source=...)``) replaces the automatic search for the softmax.
    """

    def __init__(self, model: StandardModel, source: Callable | None = None) -> None:
        self._model = model
        self._source = source
        self._calls: dict[type, Candidate | AttentionProbabilitiesUnavailable] = {}
        self._disabled = False

    @property
    def enabled(self) -> bool:
        return not self._disabled and self._implementation() in (None, "eager")

    def disable(self) -> None:
        """Refuse further reads and writes (nnterp 1.x's switch)."""
        self._disabled = True

    def _implementation(self) -> str | None:
        return getattr(self._model._module.config, "_attn_implementation", None)

    def _check_enabled(self, layer: int) -> None:
        if self._disabled:
            raise AttentionProbabilitiesUnavailable("Attention probabilities are disabled for this model (disable() was called).")
        implementation = self._implementation()
        if implementation not in (None, "eager"):
            raise AttentionProbabilitiesUnavailable(
                f"attention_probabilities[{layer}]: the model runs {implementation!r} attention, which never "
                "materializes the probabilities. Load it with StandardizedTransformer(..., enable_attention_probs=True) "
                "(or attn_implementation='eager')."
            )

    def _site(self, index: int, module_source: bool = False) -> Any:
        """The operation whose output is the probabilities (``module_source``: the source it lives in)."""
        layer = self._model._check_layer_index(index, "attention_probabilities")
        self._check_enabled(layer)
        attention = self._model.attentions[layer]
        if self._source is not None:
            return self._source(attention, return_module_source=module_source)
        cls = type(attention._module)
        if cls not in self._calls:
            raise AttentionProbabilitiesUnavailable(
                f"attention_probabilities[{layer}]: where {cls.__name__} computes its probabilities is found on a "
                "probe pass when the model loads with eager attention; load it with "
                "StandardizedTransformer(..., enable_attention_probs=True)."
            )
        found = self._calls[cls]
        if isinstance(found, AttentionProbabilitiesUnavailable):
            raise found
        return _site_of(attention, found, module_source)

    def find_sites(self) -> None:
        """Find, for each attention class of the model, the operation that computes its probabilities: of the
        candidate sites in its source (the softmax inside an attention function it calls, one it computes
        inline, one inside a method it calls), the first that runs on a probe prompt and returns
        ``[batch, heads, query, key]`` rows summing to 1. A forward with several branches (Falcon: SDPA or
        eager, with or without ALiBi) has several candidates, and the configuration decides which runs."""
        if self._source is not None or not self.enabled:
            return
        first_of_class: dict[type, int] = {}
        for index in range(self._model.num_layers):
            try:
                attention = self._model.attentions[index]
            except AttributeError:  # a hybrid stack's layer without attention
                continue
            first_of_class.setdefault(type(attention._module), index)
        for cls, index in first_of_class.items():
            if cls not in self._calls:
                self._calls[cls] = self._probe(index)

    def _probe(self, layer: int) -> Candidate | AttentionProbabilitiesUnavailable:
        attention = self._model.attentions[layer]
        module = attention._module
        try:
            candidates = candidate_sites(attention.source.compiled, module)
        except AttentionProbabilitiesUnavailable as error:
            return error
        tried = []
        for candidate in candidates:
            try:
                with torch.no_grad(), self._model.trace(CHECK_PROMPT):
                    probs = _site_of(self._model.attentions[layer], candidate, False).output.save()
            except Exception as error:  # the branch did not run, or the callee computes no softmax
                tried.append(f"{candidate.describe()}: {type(error).__name__}")
                continue
            if _is_probability_pattern(probs):
                return candidate
            tried.append(f"{candidate.describe()}: shape {tuple(probs.shape)}, not probabilities over keys")
        return AttentionProbabilitiesUnavailable(
            f"{type(module).__name__} computes no attention probabilities nnterp can reach on a probe prompt "
            f"(candidates tried: {'; '.join(tried) or 'none'}). Name the operation with "
            "RenameConfig(attn_prob_source=...)."
        )

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._site(index).output

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        site = self._site(index)
        check_same_shape(site.output, value, f"attention_probabilities[{index}]")
        site.output = value

    def __len__(self) -> int:
        return self._model.num_layers

    def check_source(self, layer: int = 0, allow_dispatch: bool = True, use_trace: bool = True) -> None:
        """Raise ``RenamingError`` unless layer ``layer``'s probabilities on a short prompt have shape
        ``[batch, heads, query, key]`` and sum to 1 over the keys, and (``use_trace``) editing them changes
        the logits. ``allow_dispatch`` is accepted for nnterp 1.x code: the weights are always loaded."""
        heads = self._model.num_heads
        if heads is None:
            raise RenamingError(
                "check_source: the number of attention heads is not in the config; pass "
                "RenameConfig(attn_head_config_key=<key or number>)."
            )
        with torch.no_grad(), self._model.trace(CHECK_PROMPT):
            size = nnsight.save(tuple(self._model.input_size))
            probs = self[layer].save()
            clean = self._model.logits.save()
        expected = (size[0], heads, size[1], size[1])
        if tuple(probs.shape) != expected:
            raise RenamingError(
                f"attention_probabilities[{layer}] has shape {tuple(probs.shape)}, expected {expected} (batch, heads, query, key)."
            )
        sums = probs.float().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise RenamingError(
                f"attention_probabilities[{layer}] do not sum to 1 over the keys (sums range {sums.min():.4f}..{sums.max():.4f})."
            )
        if not use_trace:
            return
        with torch.no_grad(), self._model.trace(CHECK_PROMPT):
            first_key_only = torch.zeros_like(self[layer])
            first_key_only[..., 0] = 1
            self[layer] = first_key_only
            edited = self._model.logits.save()
        if torch.allclose(edited, clean):
            raise RenamingError(
                f"Editing attention_probabilities[{layer}] does not change the logits: they are not the ones the model uses."
            )

    def print_source(self, layer: int = 0, allow_dispatch: bool = True) -> None:
        """Print the operation the probabilities are read from, then the source of the function it lives in
        (resolved during a short trace, where the attention function is known)."""
        with torch.no_grad(), self._model.trace(CHECK_PROMPT):
            texts = nnsight.save([])
            texts.append(str(self._site(layer)))
            texts.append(str(self._site(layer, module_source=True)))
        print("Accessing attention probabilities from:")
        print(texts[0])
        print("\n\nFull module source:")
        print(texts[1])


class Candidate(NamedTuple):
    """A place an attention forward may compute its probabilities: the ``softmax``-th softmax operation inside
    the function called at ``call`` (an operation label of the forward), or of the forward itself (None)."""

    call: str | None
    softmax: int

    def describe(self) -> str:
        return f"softmax {self.softmax} of {self.call or 'the forward itself'}"


def _site_of(attention: Any, candidate: Candidate, module_source: bool) -> Any:
    """The operation envoy of ``candidate`` (``module_source``: the source envoy it lives in); a callee is
    resolved when the call runs, inside a trace."""
    inner = attention.source if candidate.call is None else getattr(attention.source, candidate.call).source
    if module_source:
        return inner
    softmax = [name for name in inner.names if "softmax" in name]
    if len(softmax) <= candidate.softmax:
        raise AttentionProbabilitiesUnavailable(
            f"{candidate.describe()}: the function computes no such softmax (its operations: {list(inner.names)})."
        )
    return getattr(inner, softmax[candidate.softmax])


def _is_probability_pattern(probs: Any) -> bool:
    if not isinstance(probs, torch.Tensor) or probs.ndim != 4 or probs.shape[-2] != probs.shape[-1]:
        return False
    sums = probs.float().sum(-1)
    return bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def candidate_sites(compiled: Any, module: torch.nn.Module) -> list[Candidate]:
    """Where an attention module's forward may compute its softmax, in order of preference: inside each call
    of a function whose name mentions attention (transformers' attention interface, SDPA), each softmax the
    forward computes inline (Bloom, Falcon's eager branches), inside each call of a method whose name
    mentions attn (GPT-J's ``self._attn``). Read from the forward's syntax tree and nnsight's operation
    labels; which one runs is for a probe pass to tell."""
    calls = [(ast.unparse(node.func), range(node.lineno, node.end_lineno + 1))
             for node in ast.walk(ast.parse(compiled.source)) if isinstance(node, ast.Call)]

    def labels(mentioning: str) -> list[str]:
        """Labels of calls (not of assignments to the same name) to non-module callables named so."""
        found = []
        for callee, lines in calls:
            name = callee.rpartition(".")[2]
            if mentioning not in name or callee.startswith("self.") and isinstance(getattr(module, name, None), torch.nn.Module):
                continue
            prefix = callee.replace(".", "_") + "_"
            found += [label for label in compiled.names
                      if label.startswith(prefix) and label[len(prefix):].isdigit() and compiled.lines.get(label) in lines]
        return sorted(set(found), key=list(compiled.names).index)  # source order

    inline = [name for name in compiled.names if "softmax" in name]
    attention_calls = labels("attention")
    candidates = [Candidate(call, 0) for call in attention_calls]
    candidates += [Candidate(None, index) for index in range(len(inline))]
    candidates += [Candidate(call, 0) for call in labels("attn") if call not in attention_calls]
    if not candidates:
        raise AttentionProbabilitiesUnavailable(
            f"{type(module).__name__}.forward computes no softmax and calls no attention function nnterp can drill "
            f"into (its operations: {list(compiled.names)})."
        )
    return candidates
