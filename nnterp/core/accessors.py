"""LayerAccessor: ``model.layers_output[i]`` style reads and writes of the residual stream."""

from __future__ import annotations

from typing import Any, Literal

import torch

from . import flat_tokens
from .forward_order import in_forward_order, record_access
from .surface import StandardModel

Role = Literal["layer", "self_attn", "mlp"]
Direction = Literal["input", "output"]


class PerLayer:
    """What every value indexed by layer inside a trace offers besides ``[i]``: ``accessor(i)``, ``len`` (the
    layer count), and a clear refusal to iterate."""

    _model: StandardModel
    name: str

    def __call__(self, layer: int) -> torch.Tensor:
        return self[layer]

    def __len__(self) -> int:
        return self._model.num_layers

    def __iter__(self):
        raise TypeError(f"{self.name} cannot be iterated; index it inside a trace, e.g. {self.name}[0].")


class LayerAccessor(PerLayer):
    """Index with a layer number (negative counts from the end) inside a trace to read or assign.

    Reads follow the module's inferred layout and go through the backend's read policy (vLLM clones
    buffers it will mutate later); writes are checked against the current shape and replace the value
    in the form the engine accepts.
    """

    def __init__(self, model: StandardModel, role: Role | None, direction: Direction | Any) -> None:
        direction = getattr(direction, "value", direction)  # nnterp 1.x passes rename_utils.IOType members
        if direction not in ("input", "output"):
            raise ValueError(
                f"LayerAccessor reads a module's 'input' or 'output', got {direction!r}; for the modules "
                f"themselves use model.layers, model.attentions or model.mlps."
            )
        role = role or "layer"  # nnterp 1.x names the layer itself None
        if role not in ("layer", "self_attn", "mlp"):
            raise ValueError(
                f"LayerAccessor reads a layer, its 'self_attn' or its 'mlp', got {role!r}; read other modules "
                f"through the envoys, e.g. model.layers[i].{role}.output."
            )
        self._model = model
        self._role = role
        self._direction = direction

    @property
    def name(self) -> str:
        plural = {"layer": "layers", "self_attn": "attentions", "mlp": "mlps"}[self._role]
        return f"{plural}_{self._direction}"

    def _locate(self, layer_index: int):
        """The envoy, layout and error label of an already checked layer index."""
        envoy = self._model._role_envoy(self._role, layer_index, self.name)
        layout = self._model.layout.for_module(self._role, envoy._module)
        return envoy, layout, f"{self.name}[{layer_index}] ({type(envoy._module).__name__})"

    def _owned(self, index: int) -> tuple[int, bool, str]:
        """The checked layer index, whether this process runs that layer (a pipeline stage may not), and
        the read's name."""
        layer_index = self._model._check_layer_index(index, self.name)
        self._model._backend.check_served(self.name)
        owned = self._model._backend.owns(layer_index)
        return layer_index, owned, f"model.{self.name}[{layer_index}]"

    def __getitem__(self, index: int) -> torch.Tensor:
        layer_index, owned, name = self._owned(index)
        if not owned:
            record_access(name)
            return self._model._backend.remote_read(name, layer_index)
        envoy, layout, where = self._locate(layer_index)
        if self._direction == "input":
            args, kwargs = in_forward_order(name, lambda: envoy.inputs)
            value, fresh = layout.input.read_stream(args, kwargs, where)
        else:
            value, fresh = layout.output.read_stream(in_forward_order(name, lambda: envoy.output), where)
        if self._side(layout).flat_tokens:
            value = flat_tokens.unflatten(value, where)
        return self._model._backend.after_read(value, fresh, name)

    def _side(self, layout):
        return layout.input if self._direction == "input" else layout.output

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        layer_index, owned, name = self._owned(index)
        if not owned:
            record_access(name)
            return  # the stage that runs this layer applies the write
        envoy, layout, where = self._locate(layer_index)
        value = self._model._backend.before_write(value)
        if self._direction == "input":
            args, kwargs = in_forward_order(name, lambda: envoy.inputs)
            if layout.input.flat_tokens:
                value = flat_tokens.flatten(layout.input.read(args, kwargs, where), value, where)
            envoy.inputs = layout.input.write(args, kwargs, value, where)
        else:
            output = in_forward_order(name, lambda: envoy.output)
            if layout.output.flat_tokens:
                value = flat_tokens.flatten(layout.output.read(output, where), value, where)
            envoy.output = layout.output.write(output, value, where)

    def get_module(self, layer: int):
        """The envoy of layer ``layer``'s module this accessor reads."""
        return self._model._role_envoy(self._role, self._model._check_layer_index(layer, self.name), self.name)

    @property
    def returns_tuple(self) -> bool | None:
        """Whether the module returns a tuple holding the stream (known from the layout at load; None where
        module classes of this role differ). Inputs are read from the call's arguments: False."""
        if self._direction == "input":
            return False
        kinds = {layout.output.kind for key, layout in self._model.layout.modules.items() if key.startswith(f"{self._role}:")}
        return kinds.pop() != "tensor" if len(kinds) == 1 else None


class ModuleListView:
    """``model.attentions[i]`` / ``model.mlps[i]``: the sub-module envoy of layer ``i``."""

    def __init__(self, model: StandardModel, role: Role, name: str) -> None:
        self._model, self._role, self._name = model, role, name

    returns_tuple = None  # a module, not a value

    def __getitem__(self, index: int):
        return self._model._role_envoy(self._role, self._model._check_layer_index(index, self._name), self._name)

    def __call__(self, layer: int):
        return self[layer]

    def get_module(self, layer: int):
        return self[layer]

    def __setitem__(self, index: int, value) -> None:
        raise ValueError(
            f"Cannot set the value of a module accessor: {self._name}[{index}] is the module. "
            f"Did you mean {self._name}_input/{self._name}_output?"
        )

    def __len__(self) -> int:
        return self._model.num_layers

    def __iter__(self):
        return (self[i] for i in range(len(self)))
