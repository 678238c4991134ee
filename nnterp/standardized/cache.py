"""``logits, cache = model.run_with_cache(prompts)``: every requested accessor of one forward pass, kept for
reading in any order, with TransformerLens's residual-stream decompositions in standardized names.

Layout, the same on every backend: ``cache["layers_output", 5]`` is ``[batch, seq, hidden]`` (``heads_output``:
``[batch, seq, heads, head_dim]``), padded on the left (on HF, as the model pads its batches: left unless its
family needs right padding), with zeros at padding positions; ``cache.attention_mask`` is 1 at real tokens. On
vLLM, whose requests are never padded, each prompt runs as its own request and is padded here.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import nnsight
import torch

from ..core.backend import HEAD
from ..core.tracing import CHECK_PROMPT, as_prompts, one_request_per_prompt

# Accessors in the order a layer computes them (a trace reads in forward order).
CACHEABLE = ("layers_input", "attentions_input", "heads_output", "attentions_output", "mlps_input", "mlps_output",
             "layers_output")
DEFAULT_NAMES = {"layers_input": [0], "attentions_output": None, "mlps_output": None, "layers_output": None}
Names = Sequence[str] | Mapping[str, Sequence[int] | None] | None


def requested(model: Any, names: Names, layers: Sequence[int] | None) -> dict[str, list[int]]:
    """``{accessor: sorted layer indices}`` from ``names`` (accessor names, or ``{accessor: layers or None}``) and
    ``layers`` (applies to names given as a list; None: every layer)."""
    if names is None:  # the default: what the model has (some layers have no MLP module)
        names = {name: (indices if layers is None or name == "layers_input" else layers)
                 for name, indices in DEFAULT_NAMES.items() if has_accessor(model, name)}
    elif isinstance(names, str):
        names = {names: layers}
    elif not isinstance(names, Mapping):
        names = dict.fromkeys(names, layers)
    chosen = {}
    for name, indices in names.items():
        if name not in CACHEABLE:
            raise ValueError(f"run_with_cache: unknown accessor {name!r}; cacheable ones are {', '.join(CACHEABLE)}.")
        indices = range(model.num_layers) if indices is None else ([indices] if isinstance(indices, int) else indices)
        chosen[name] = sorted({model._check_layer_index(index, f"run_with_cache({name!r})") for index in indices})
    return chosen


def has_accessor(model: Any, name: str) -> bool:
    """Whether layer 0 has the module ``name`` reads (a layer always does; attention and MLP may be missing)."""
    role = {"attentions": "attentions", "mlps": "mlps", "heads": "attentions"}.get(name.split("_")[0])
    if role is None:
        return True
    try:
        getattr(model, role)[0]
    except AttributeError:
        return False
    return True


def run_with_cache(model: Any, prompts: str | Sequence[str], names: Names = None,
                   layers: Sequence[int] | None = None) -> tuple[torch.Tensor, "ActivationCache"]:
    """See ``StandardizedMixin.run_with_cache``."""
    prompts = as_prompts(prompts)
    if not prompts:
        raise ValueError("run_with_cache: no prompts given.")
    chosen = requested(model, names, layers)
    reads = [(layer, name) for layer in range(model.num_layers) for name in CACHEABLE if layer in chosen.get(name, ())]

    def read(batched: bool) -> dict:
        values = {"input_ids": model.input_ids}  # the forward's own tokens, read before any module
        for layer, name in reads:
            value = getattr(model, name)[layer]
            if name == "heads_output":
                values[name, layer] = value if value.ndim == 4 else value[None]
            else:
                values[name, layer] = model.as_batch(value)
        if batched:
            values["logits"] = model.logits
        else:  # vLLM computes logits at sampled tokens only: project every token's final stream
            values["logits"] = model.as_batch(model.project_on_vocab(model.layers_output[model.num_layers - 1]))
        return values

    with torch.no_grad():
        if not one_request_per_prompt(model):
            with model.trace(prompts):
                mask = nnsight.save(model.trace_attention_mask())
                values = nnsight.save(read(True))
            ids = values.pop("input_ids")
            mask = torch.ones_like(ids) if mask is None else mask
        else:
            with model.trace() as tracer:
                slots = nnsight.save([None] * len(prompts))
                for row, prompt in enumerate(prompts):
                    with tracer.invoke(prompt):
                        slots[row] = read(False)
            values, ids, mask = _left_padded(model, list(slots))
    cache_values = {key: _zero_padding(value, mask) for key, value in values.items()}
    logits = cache_values.pop("logits")
    return logits, ActivationCache(model, cache_values, mask, ids)


def _left_padded(model: Any, slots: list[dict]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Per-request values ``[1, tokens_i, ...]`` as one left-padded batch, with its token ids and mask."""
    lengths = [slot["input_ids"].shape[-1] for slot in slots]
    longest = max(lengths)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(slots), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(slots), longest), dtype=torch.long)
    values = {}
    for row, (slot, length) in enumerate(zip(slots, lengths)):
        ids[row, longest - length:] = slot["input_ids"].reshape(-1).cpu()
        mask[row, longest - length:] = 1
        for key, value in slot.items():
            if key == "input_ids":
                continue
            if key not in values:
                values[key] = torch.zeros((len(slots), longest, *value.shape[2:]), dtype=value.dtype)
            values[key][row, longest - length:] = value[0].cpu()
    return values, ids, mask


def _zero_padding(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.to(value.device).bool().reshape(*mask.shape, *([1] * (value.ndim - 2)))
    return torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))


class ActivationCache:
    """The values of one ``run_with_cache``: ``cache[accessor, layer]`` (negative layers count from the end),
    ``cache.attention_mask``, ``cache.input_ids``, and TransformerLens's decompositions of the residual stream."""

    def __init__(self, model: Any, values: dict[tuple[str, int], torch.Tensor], attention_mask: torch.Tensor,
                 input_ids: torch.Tensor) -> None:
        self.model = model
        self._values = values
        self.attention_mask = attention_mask
        self.input_ids = input_ids

    # -- mapping ---------------------------------------------------------------------

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KeyError(f"cache[{key!r}]: index with (accessor, layer), e.g. cache['layers_output', 5]; "
                           f"cache.stack_activation({key!r}) stacks every cached layer.")
        name, layer = key
        layer = self.model._check_layer_index(layer, f"cache[{name!r}, ...]")
        if (name, layer) not in self._values:
            cached = ", ".join(f"{n}{self.layers(n)}" for n in self.names())
            raise KeyError(f"cache[{name!r}, {layer}] was not cached (cached: {cached}); pass names={{...}} to "
                           "run_with_cache to cache it.")
        return self._values[name, layer]

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._values)

    def keys(self):
        return self._values.keys()

    def items(self):
        return self._values.items()

    def names(self) -> list[str]:
        return [name for name in CACHEABLE if any(key[0] == name for key in self._values)]

    def layers(self, name: str) -> list[int]:
        return sorted(layer for key_name, layer in self._values if key_name == name)

    def per_prompt(self, name: str, layer: int) -> list[torch.Tensor]:
        """One tensor per prompt, its real tokens only (``[tokens, ...]``)."""
        value = self[name, layer]
        return [row[mask.bool()] for row, mask in zip(value, self.attention_mask)]

    # -- stacks ----------------------------------------------------------------------

    def stack_activation(self, name: str, layer: int | None = None) -> torch.Tensor:
        """``[layers, batch, seq, ...]``: ``name`` at every cached layer below ``layer`` (None: all)."""
        limit = self.model.num_layers if layer is None else self._boundary(layer)
        chosen = [index for index in self.layers(name) if index < limit]
        if not chosen:
            raise KeyError(f"stack_activation({name!r}): no cached layer of it below {limit}.")
        return torch.stack([self._values[name, index] for index in chosen])

    def _boundary(self, layer: int | None) -> int:
        """A layer count in ``0..num_layers`` (None, -1 and num_layers: the final stream)."""
        n = self.model.num_layers
        if layer is None or layer == -1:
            return n
        if not 0 <= layer <= n:
            raise IndexError(f"layer {layer} is out of range: 0..{n} (or -1/None for the final stream).")
        return layer

    def _stream_before(self, layer: int) -> torch.Tensor:
        """The residual stream entering ``layer`` (``layer == num_layers``: the last layer's output)."""
        if layer == 0:
            return self["layers_input", 0]
        return self["layers_output", layer - 1]

    def accumulated_resid(self, layer: int | None = None, apply_ln: bool = False,
                          return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """``[layer + 1, batch, seq, hidden]``: the residual stream entering each layer up to ``layer``
        (None or -1: through the last layer's output), ``apply_ln``: each through the final norm (the logit lens)."""
        limit = self._boundary(layer)
        stack = torch.stack([self._stream_before(index) for index in range(limit + 1)])
        labels = ["layers_input_0"] + [f"layers_output_{index}" for index in range(limit)]
        if apply_ln:
            stack = _zero_padding_stack(self.final_norm(stack), self.attention_mask)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mode: str = "all", apply_ln: bool = False,
                        return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """``[components, batch, seq, hidden]``: the stream entering layer 0, then each layer's attention and/or
        MLP output (``mode``: ``"all"``, ``"attn"``, ``"mlp"``) below ``layer``. With ``mode="all"`` they sum to
        the stream entering ``layer``; this is checked, and an architecture whose layers rescale those outputs
        before adding them (post-norms) is refused. ``apply_ln``: the final norm linearized at that stream
        (:meth:`apply_ln_to_stack`), so the components plus the norm's bias sum to its normalized value."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"decompose_resid: mode is 'all', 'attn' or 'mlp', got {mode!r}.")
        limit = self._boundary(layer)
        for name in ("attentions_output", "mlps_output"):
            if not has_accessor(self.model, name):
                raise ValueError(
                    f"decompose_resid: {type(self.model._module).__name__}'s layers have no {name.split('_')[0][:-1]} "
                    f"module, so there is no {name} to decompose into. Decompose by layer instead: layers_output[i] - "
                    "layers_input[i].")
        parts, labels = [self["layers_input", 0]], ["layers_input_0"]
        for index in range(limit):
            for name, short in (("attentions_output", "attn"), ("mlps_output", "mlp")):
                if mode in ("all", short):
                    parts.append(self[name, index])
                    labels.append(f"{name}_{index}")
        stack = torch.stack(parts)
        self._check_sums(limit)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, limit)
        return (stack, labels) if return_labels else stack

    def _check_sums(self, limit: int) -> None:
        for index in range(limit):
            entering, leaving = self._stream_before(index), self._stream_before(index + 1)
            blocks = self["attentions_output", index] + self["mlps_output", index]
            error = (entering.double() + blocks.double() - leaving.double()).abs().max()
            if float(error) > 1e-3 * float(leaving.double().abs().max()) + 1e-5:
                raise ValueError(
                    f"decompose_resid: on {type(self.model._module).__name__}, layer {index}'s output is not its input "
                    f"plus its attention and MLP outputs (off by {float(error):.3g}): the layer transforms them before "
                    f"adding them to the stream. Decompose by layer instead: layers_output[i] - layers_input[i].")

    def stack_head_results(self, layer: int | None = None, apply_ln: bool = False,
                           return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """``[layers x heads, batch, seq, hidden]``: each head's contribution to the stream (``heads_output``
        through its slice of the output projection, bias excluded) at every cached layer below ``layer``."""
        limit = self._boundary(layer)
        parts, labels = [], []
        for index in [i for i in self.layers("heads_output") if i < limit]:
            heads = self["heads_output", index]
            results = self._at(f"ActivationCache.stack_head_results[{index}]", index,
                               lambda value, layer=index: self.model.project_heads(layer, value), heads)
            results = _zero_padding(results, self.attention_mask).movedim(2, 0)
            parts.append(results)
            labels += [f"L{index}H{head}" for head in range(results.shape[0])]
        if not parts:
            raise KeyError("stack_head_results: heads_output was not cached; pass names=['heads_output', ...].")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, limit)
        return (stack, labels) if return_labels else stack

    # -- the final norm and the unembedding -----------------------------------------------

    def final_norm(self, stack: torch.Tensor) -> torch.Tensor:
        """``ln_final`` applied to every vector of ``stack`` (``[..., hidden]``), with the model's own module."""
        flat = stack.reshape(-1, stack.shape[-1])
        return self._at("ActivationCache.final_norm", HEAD, self.model._final_normed, flat).reshape(stack.shape).to(stack)

    def apply_ln_to_stack(self, stack: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``ln_final`` linearized at the stream entering ``layer`` (None: the final stream): each component is
        centred (LayerNorm) and scaled by that stream's normalization and the norm's weight, the bias left out,
        so components summing to the stream map to vectors summing to ``ln_final(stream) - bias``."""
        stream = self._stream_before(self._boundary(layer))
        width = stream.shape[-1]
        probe = torch.full((width,), 1000.0)
        probe[1::2] = -1000.0
        if width % 2:
            probe[-1] = 0.0
        probes = torch.stack([torch.zeros(width), probe, probe + 500.0]).to(stream)
        # one pass of the norm (one engine request on vLLM) over the probes and the stream
        through_norm = self.final_norm(torch.cat([probes, stream.reshape(-1, width)]))
        zero, normed_probe, shifted = through_norm[:3]
        bias, weight = zero.double(), (normed_probe.double() - zero.double()) * probe.double().sign()
        centred = torch.allclose(normed_probe, shifted, rtol=1e-3, atol=1e-4)
        normed = through_norm[3:].reshape(stream.shape).double() - bias
        centre = (lambda x: x - x.mean(-1, keepdim=True)) if centred else (lambda x: x)
        numerator = weight * centre(stream.double())
        scale = numerator.norm(dim=-1, keepdim=True) / normed.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        if not torch.allclose(numerator / scale.clamp_min(1e-30), normed, rtol=1e-3, atol=1e-3 * float(normed.abs().max())):
            raise ValueError(
                f"apply_ln: the final norm ({type(self.model._torch_module('ln_final')).__name__}) is not a LayerNorm or "
                "RMSNorm (a weight times the centred or raw vector over one scale per token), so it cannot be "
                "linearized; use accumulated_resid(apply_ln=True), which applies it to each stream.")
        result = weight * centre(stack.double()) / scale.clamp_min(1e-30)
        return _zero_padding_stack(result.to(stack.dtype), self.attention_mask)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: Any, incorrect_tokens: Any = None) -> torch.Tensor:
        """Each component's logit for ``tokens`` (minus ``incorrect_tokens``'): the dot product with the
        unembedding rows, ``[components, batch, seq]`` for a ``[components, batch, seq, hidden]`` stack. ``tokens``:
        a token id or string (every position), ``[batch]`` ids (one per prompt) or ``[batch, seq]``. Apply the
        final norm first (``apply_ln=True``); the model's logit scaling and soft-capping are not included."""
        directions = self._directions(tokens, residual_stack)
        if incorrect_tokens is not None:
            directions = directions - self._directions(incorrect_tokens, residual_stack)
        return (residual_stack.to(directions) * directions).sum(-1)

    def _directions(self, tokens: Any, stack: torch.Tensor) -> torch.Tensor:
        if isinstance(tokens, str):
            ids = self.model.tokenizer(tokens, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"logit_attrs: {tokens!r} is {len(ids)} tokens; give one token (or its id).")
            tokens = ids[0]
        ids = torch.as_tensor(tokens, dtype=torch.long)
        rows = self._unembedding(ids.reshape(-1)).reshape(*ids.shape, -1).to(stack.dtype)
        if ids.ndim == 1:  # one per prompt
            if ids.shape[0] != stack.shape[-3]:
                raise ValueError(f"logit_attrs: {ids.shape[0]} tokens for {stack.shape[-3]} prompts.")
            return rows[:, None, :]
        return rows

    def _unembedding(self, ids: torch.Tensor) -> torch.Tensor:
        def rows() -> torch.Tensor:
            weight = self.model.parameter("lm_head.weight")  # gathered once under tensor parallelism
            return weight[ids.to(weight.device)]

        if not one_request_per_prompt(self.model):
            with torch.no_grad():
                return rows().detach().cpu()
        with torch.no_grad(), self.model.trace(CHECK_PROMPT):
            value = nnsight.save(rows().cpu())
        return value

    def _at(self, where: str, position: Any, compute, tensor: torch.Tensor) -> torch.Tensor:
        """``compute(tensor)`` where the modules at ``position`` (a layer, or the final norm and LM head) are: here
        on HF, in a short request on vLLM."""
        model = self.model
        if not one_request_per_prompt(model):
            with torch.no_grad():
                device = next(model._torch_module("lm_head").parameters()).device
                return compute(tensor.to(device)).cpu()
        with torch.no_grad(), model.trace(CHECK_PROMPT):
            value = nnsight.save(model._backend.compute_at(where, position, compute, tensor).cpu())
        return value


def _zero_padding_stack(stack: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool()[None, ..., None].to(stack.device), stack, torch.zeros((), dtype=stack.dtype))
