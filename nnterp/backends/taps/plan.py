"""What an extraction reads: one tap per (accessor, layer), each a module path and the layout to read it through.

A plan is built once from a standardized model (names and inferred layouts) and travels as JSON, so an
engine's worker, which holds only the raw modules, reads the residual stream exactly as the accessors do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...core.layout import ModelLayout, ModuleLayout
from ...core.rename import ModuleNames, layer_child
from .spec import ACCESSORS

ROLE_OF = {"layers": "layer", "attentions": "self_attn", "mlps": "mlp"}


def module_tap(root: torch.nn.Module, names: ModuleNames, layout: ModelLayout, accessor: str, layer: int) -> Tap:
    """The tap of ``accessor`` (one of :data:`ACCESSORS`) at ``layer``: the native path of the module it reads,
    the direction, and that module's layout."""
    path, direction = tap_site(root, names, accessor, layer)
    role = ROLE_OF[accessor.partition("_")[0]]
    return Tap(accessor, layer, path, direction, layout.for_module(role, root.get_submodule(path)))


def tap_site(root: torch.nn.Module, names: ModuleNames, accessor: str, layer: int) -> tuple[str, str]:
    """Where ``accessor`` at ``layer`` is read: the native path of its module and ``"input"`` or ``"output"``."""
    plural, _, direction = accessor.partition("_")
    role = ROLE_OF[plural]
    layer_module = root.get_submodule(names.layers)[layer]
    path = f"{names.layers}.{layer}"
    if role != "layer":
        child = layer_child(layer_module, role, names)
        if child is None:
            children = [name for name, _ in layer_module.named_children()]
            raise ValueError(f"{accessor}[{layer}]: layer {layer} ({type(layer_module).__name__}) has no {role} module "
                             f"(its children are {children}).")
        path = f"{path}.{child}"
    return path, direction


def graph_sites(root: torch.nn.Module, names: ModuleNames, accessors: Sequence[str]) -> list[tuple[str, str]]:
    """The sites a graph-captured engine keeps seams at so that ``accessors`` are served at every layer; a layer
    without the accessor's module (a hybrid stack's mixer) has none."""
    sites = []
    for layer, layer_module in enumerate(root.get_submodule(names.layers)):
        for accessor in accessors:
            role = ROLE_OF[accessor.partition("_")[0]]
            if role == "layer" or layer_child(layer_module, role, names) is not None:
                sites.append(tap_site(root, names, accessor, layer))
    return list(dict.fromkeys(sites))


@dataclass(frozen=True)
class Tap:
    """The stream one accessor reads at one layer: ``direction`` of the module at ``path``."""

    accessor: str
    layer: int
    path: str
    direction: str  # "input" or "output"
    layout: ModuleLayout

    @property
    def where(self) -> str:
        return f"{self.accessor}[{self.layer}]"

    def read(self, args: tuple, kwargs: dict, output: Any = None) -> torch.Tensor:
        """The stream from a module call's inputs (``direction == "input"``) or its output."""
        if self.direction == "input":
            return self.layout.input.read(args, kwargs, self.where)
        return self.layout.output.read(output, self.where)


@dataclass(frozen=True)
class ExtractionPlan:
    """Taps in accessor-major order: ``taps[a * len(layers) + i]`` is ``accessors[a]`` at ``layers[i]``."""

    accessors: tuple[str, ...]
    layers: tuple[int, ...]
    taps: tuple[Tap, ...]

    def to_json(self) -> str:
        taps = [{"accessor": t.accessor, "layer": t.layer, "path": t.path, "direction": t.direction,
                 "layout": t.layout.to_json()} for t in self.taps]
        return json.dumps({"accessors": self.accessors, "layers": self.layers, "taps": taps})

    @classmethod
    def from_json(cls, text: str) -> "ExtractionPlan":
        data = json.loads(text)
        taps = tuple(Tap(t["accessor"], t["layer"], t["path"], t["direction"], ModuleLayout.from_json(t["layout"]))
                     for t in data["taps"])
        return cls(tuple(data["accessors"]), tuple(data["layers"]), taps)


def plan_extraction(model: Any, accessors: str | Sequence[str], layers: int | Sequence[int] | None) -> ExtractionPlan:
    """The taps of ``accessors`` (names of the model's layer accessors) at ``layers`` (None: every layer)."""
    accessors = (accessors,) if isinstance(accessors, str) else tuple(accessors)
    if not accessors:
        raise ValueError("extract needs at least one accessor, e.g. accessors=('layers_output',).")
    unknown = [name for name in accessors if name not in ACCESSORS]
    if unknown:
        raise ValueError(f"extract reads the layer accessors {ACCESSORS}; {unknown} is not one of them.")
    if len(set(accessors)) != len(accessors):
        raise ValueError(f"accessors {accessors} names one accessor twice.")
    for name in accessors:
        model._backend.check_served(name)
    if layers is None:
        layers = range(model.num_layers)
    elif isinstance(layers, int):
        layers = [layers]
    checked = tuple(model._check_layer_index(layer, "extract layers") for layer in layers)
    if not checked:
        raise ValueError("extract needs at least one layer.")
    if len(set(checked)) != len(checked):
        raise ValueError(f"layers {list(layers)} names one layer twice.")
    taps = [module_tap(model._module, model.names, model.layout, name, layer) for name in accessors for layer in checked]
    return ExtractionPlan(accessors, checked, tuple(taps))
