"""``model.routers_output[i]``: the router logits of layer ``i``'s mixture-of-experts block, and the experts chosen.

The router is the MoE block's child named ``router`` or ``gate`` (``gating``). Its logits are read from the
router's own output: the entry equal to the router's linear map of its input (HF routers return
``(logits, scores, indices)``, ``(scores, logits)`` or the logits alone), the first entry of vLLM's
``(output, bias)``. ``[batch, seq, experts]`` on HF, a request's ``[tokens, experts]`` on vLLM. Read-only:
the router has already chosen the experts from them.
"""

from __future__ import annotations

import torch

from . import flat_tokens
from .accessors import PerLayer
from .forward_order import in_forward_order
from .surface import StandardModel

ROUTER_NAMES = ("router", "gate", "gating")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def router_name(block: torch.nn.Module) -> str | None:
    for name in ROUTER_NAMES:
        if isinstance(getattr(block, name, None), torch.nn.Module):
            return name
    return None


def router_weight(router: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [experts, hidden], bias)`` of the router's linear map: its own, or its one linear child's."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel():
        return weight, getattr(router, "bias", None)
    linears = [child for child in router.children() if isinstance(child, torch.nn.Linear)]
    if len(linears) == 1:
        return linears[0].weight, linears[0].bias
    return None


class RoutersAccessor(PerLayer):
    """Index with a layer number inside a trace to read the router logits of that layer's MoE block."""

    name = "routers_output"

    def __init__(self, model: StandardModel) -> None:
        self._model = model

    def router(self, index: int):
        """The checked layer index and its router's envoy; a dense layer raises."""
        layer = self._model._check_layer_index(index, self.name)
        self._model._backend.check_served(self.name)
        block = self._model.mlps[layer]
        name = router_name(block._module)
        if name is None:
            children = [child for child, _ in block._module.named_children()]
            raise ValueError(
                f"{self.name}[{layer}]: layer {layer}'s MLP ({type(block._module).__name__}) has no router (children: "
                f"{children}); it is a dense layer. Routers are read on the layers of a mixture of experts.")
        return layer, getattr(block, name)

    def _entries(self, index: int):
        layer, router = self.router(index)
        where = f"model.{self.name}[{layer}]"
        args, kwargs = in_forward_order(where, lambda: router.inputs)
        output = router.output
        entries = output if isinstance(output, tuple) else (output,)
        return layer, router, where, (args[0] if args else next(iter(kwargs.values()))), entries

    def __getitem__(self, index: int) -> torch.Tensor:
        layer, router, where, hidden, entries = self._entries(index)
        logits = self._logits(router._module, hidden, entries, where)
        return self._model._backend.after_read(self._batched(logits, where), False, where)

    def experts_chosen(self, index: int) -> torch.Tensor:
        """The experts the router chose for each token, ``[..., top_k]`` (as ``routers_output[index]`` is laid
        out), where the router returns them (most HF routers of transformers 5)."""
        layer, router, where, hidden, entries = self._entries(index)
        tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        chosen = [e for e in entries if isinstance(e, torch.Tensor) and not e.is_floating_point() and e.ndim == 2
                  and e.shape[0] == tokens]
        if len(chosen) != 1:
            raise ValueError(
                f"model.experts_chosen({layer}): the router ({type(router._module).__name__}) does not return the "
                "experts it chose (it returns its logits only, or the engine chooses inside a fused kernel). Read "
                f"model.routers_output[{layer}] and apply the family's routing rule, or use the HF backend.")
        return self._model._backend.after_read(self._batched(chosen[0], where), False, where)

    def _logits(self, router: torch.nn.Module, hidden: torch.Tensor, entries: tuple, where: str) -> torch.Tensor:
        tensors = [e for e in entries if isinstance(e, torch.Tensor) and e.is_floating_point()]
        expected_width = self._expert_count()
        linear = router_weight(router)
        if linear is None:  # an engine's linear layer that keeps no plain weight: (logits, bias)
            logits = tensors[0]
        else:
            weight, bias = linear
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            expected = torch.nn.functional.linear(flat_hidden.to(weight.dtype), weight, bias)
            match = [t for t in tensors if t.numel() == expected.numel()
                     and torch.allclose(t.reshape(expected.shape).float(), expected.float(), rtol=1e-3, atol=1e-4)]
            if not match:
                raise ValueError(
                    f"{where}: none of the router's outputs ({type(router).__name__}) is its linear map of its input, "
                    "so its logits cannot be told apart from its scores. Read the router's output through "
                    "model.mlps[i].<router>.output.")
            logits = match[0]
        if expected_width is not None and logits.shape[-1] != expected_width:
            raise ValueError(f"{where}: the router returns width {logits.shape[-1]}, the config has {expected_width} "
                             "experts.")
        return logits

    def _expert_count(self) -> int | None:
        config = self._model._text_config
        for key in EXPERT_COUNT_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _batched(self, value: torch.Tensor, where: str) -> torch.Tensor:
        if not self._model._backend.batches_prompts or value.ndim != 2:
            return value  # vLLM: a request's flat tokens; or already [batch, seq, ...]
        return flat_tokens.unflatten(value, where)

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        raise TypeError(
            f"routers_output[{index}] is read-only: the router has already chosen the experts from these logits, so "
            "writing them would change nothing. To change the routing, write mlps_input (what the router reads) or "
            "assign the router's output through model.mlps[i].<router>.output.")
