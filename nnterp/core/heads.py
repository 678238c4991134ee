"""``model.heads_output[i]``: each attention head's value-weighted output, before the output projection mixes the
heads into the residual stream.

The value is the input of the attention module's output projection (``o_proj``, ``out_proj``, ``dense``,
``c_proj``, ...), split into heads: ``[batch, seq, heads, head_dim]`` on HF, ``[tokens, heads, head_dim]`` on
vLLM (a request's flat tokens; under tensor parallelism, this rank's heads). Writing it (e.g. zeroing one head)
changes what the projection receives, so the edit reaches the stream.
"""

from __future__ import annotations

import torch

from .accessors import PerLayer
from .forward_order import in_forward_order
from .layout import check_same_shape
from .surface import StandardModel

# Child names of an attention module's output projection, most common first.
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "proj", "attn_out")


def output_projection_name(attention: torch.nn.Module, where: str) -> str:
    """The child name of ``attention``'s output projection; a clear error when it has none."""
    for name in OUTPUT_PROJECTIONS:
        if isinstance(getattr(attention, name, None), torch.nn.Module):
            return name
    children = [name for name, _ in attention.named_children()]
    raise AttributeError(
        f"{where}: the attention module ({type(attention).__name__}) has no output projection nnterp knows "
        f"(looked for {', '.join(OUTPUT_PROJECTIONS)}; its children are {children}), so its heads are not "
        "separable here."
    )


class HeadsAccessor(PerLayer):
    """Index with a layer number inside a trace to read or assign the per-head attention output."""

    name = "heads_output"

    def __init__(self, model: StandardModel) -> None:
        self._model = model

    def head_dim(self) -> int:
        """From the config's ``head_dim``, else hidden size / heads."""
        config = self._model._text_config
        head_dim = getattr(config, "head_dim", None)
        if isinstance(head_dim, int) and head_dim > 0:
            return head_dim
        heads = self._model.num_heads
        if not heads:
            raise ValueError("heads_output: the config gives neither head_dim nor the number of heads; pass "
                             "RenameConfig(attn_head_config_key=...).")
        return self._model.hidden_size // heads

    def projection(self, index: int):
        """The checked layer index and the envoy of its output projection."""
        layer = self._model._check_layer_index(index, self.name)
        self._model._backend.check_served(self.name)
        attention = self._model.attentions[layer]
        where = f"{self.name}[{layer}]"
        return layer, getattr(attention, output_projection_name(attention._module, where))

    def _split(self, value: torch.Tensor, where: str) -> torch.Tensor:
        head_dim = self.head_dim()
        if value.shape[-1] % head_dim:
            raise ValueError(f"{where}: the output projection receives width {value.shape[-1]}, not a multiple of "
                             f"head_dim {head_dim}.")
        return value.unflatten(-1, (value.shape[-1] // head_dim, head_dim))

    def __getitem__(self, index: int) -> torch.Tensor:
        layer, projection = self.projection(index)
        where = f"model.{self.name}[{layer}]"
        args, kwargs = in_forward_order(where, lambda: projection.inputs)
        value = args[0] if args else next(iter(kwargs.values()))
        return self._model._backend.after_read(self._split(value, where), False, where)

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        layer, projection = self.projection(index)
        where = f"model.{self.name}[{layer}]"
        args, kwargs = in_forward_order(where, lambda: projection.inputs)
        current = args[0] if args else next(iter(kwargs.values()))
        check_same_shape(self._split(current, where), value, where)
        new = self._model._backend.before_write(value).flatten(-2).to(current.dtype)
        if args:
            projection.inputs = ((new, *args[1:]), kwargs)
        else:
            key = next(iter(kwargs))
            projection.inputs = (args, {**kwargs, key: new})
