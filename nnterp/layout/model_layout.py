"""The layout of a whole model: standard names plus one ModuleLayout per (role, module class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..distributed.pp import is_local
from ..rename import ModuleNames, UnknownArchitectureError, layer_child
from .infer import Observation, infer_module_layout, input_from_probe, observe, output_from_probe, signature_of
from .model import LayoutError, ModuleLayout

ROLES = ("layer", "self_attn", "mlp")


@dataclass
class ModelLayout:
    """Everything the accessors need to read and write the residual stream of one architecture."""

    backend: str
    architecture: str
    names: ModuleNames
    modules: dict[str, ModuleLayout]
    residual_additive: bool | None = None
    evidence: dict = field(default_factory=dict)

    def for_module(self, role: str, module: torch.nn.Module) -> ModuleLayout:
        key = module_key(role, module)
        if key not in self.modules:
            raise LayoutError(
                f"No layout for {key}: this module class was not seen when the layout of "
                f"{self.architecture} was inferred."
            )
        return self.modules[key]

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "architecture": self.architecture,
            "names": self.names.as_dict(),
            "modules": {key: layout.to_json() for key, layout in sorted(self.modules.items())},
            "residual_additive": self.residual_additive,
            "evidence": self.evidence,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ModelLayout":
        return cls(
            backend=data["backend"],
            architecture=data["architecture"],
            names=ModuleNames(**data["names"]),
            modules={key: ModuleLayout.from_json(value) for key, value in data["modules"].items()},
            residual_additive=data.get("residual_additive"),
            evidence=data.get("evidence", {}),
        )


def module_key(role: str, module: torch.nn.Module) -> str:
    return f"{role}:{type(module).__name__}"


def role_instances(model: torch.nn.Module, names: ModuleNames) -> list[tuple[str, torch.nn.Module, torch.nn.Module, str, int]]:
    """(role, module, parent, attribute the parent calls it by, layer index) for the first instance of each
    class this process holds (a pipeline stage's stubs for other stages' layers have no layout)."""
    layers = model.get_submodule(names.layers)
    layers_parent = model.get_submodule(names.layers.rpartition(".")[0]) if "." in names.layers else model
    layers_attr = names.layers.rpartition(".")[2]
    seen, found = set(), []

    def add(role, module, parent, attr, index):
        key = module_key(role, module)
        if key not in seen:
            seen.add(key)
            found.append((role, module, parent, attr, index))

    for index, layer in enumerate(layers):
        if not is_local(layer):
            continue
        add("layer", layer, layers_parent, layers_attr, index)
        for role in ("self_attn", "mlp"):
            child_name = layer_child(layer, role, names)
            if child_name is not None:
                add(role, getattr(layer, child_name), layer, child_name, index)
    return found


def infer_model_layout(
    model: torch.nn.Module,
    names: ModuleNames,
    hidden_size: int,
    backend: str,
    architecture: str,
    run: Callable[[], Any] | None,
) -> ModelLayout:
    """Infer every module class's layout; ``run`` (a forward pass) enables the runtime probe."""
    instances = role_instances(model, names)
    observations: dict[str, Observation] = {}
    if run is not None:
        observations = observe(model, {module_key(r, m): m for r, m, *_ in instances}, run)
    modules, evidence = {}, {}
    for role, module, parent, attr, index in instances:
        key = module_key(role, module)
        where = f"{role} {index} ({type(module).__name__})"
        layout, module_evidence = infer_module_layout(module, parent, attr, observations.get(key), hidden_size, where)
        evidence[key] = module_evidence
        if layout is not None:
            modules[key] = layout
    additive = _residual_additive(model, names, modules, observations) if observations else None
    return ModelLayout(backend, architecture, names, modules, additive, evidence)


def _residual_additive(model, names, modules, observations) -> bool | None:
    """Whether layer 0's output equals its input plus its attention and MLP outputs."""
    layer = model.get_submodule(names.layers)[0]
    parts = [("layer", layer)]
    for role in ("self_attn", "mlp"):
        child_name = layer_child(layer, role, names)
        if child_name is None:
            return None
        child = getattr(layer, child_name)
        parts.append((role, child))
    values = {}
    for role, module in parts:
        key = module_key(role, module)
        if key not in modules or key not in observations:
            return None
        obs = observations[key]
        values[role] = (modules[key].input.read(obs.args, obs.kwargs), modules[key].output.read(obs.output))
    stream_in, stream_out = values["layer"]
    try:
        rebuilt = stream_in + values["self_attn"][1] + values["mlp"][1]
    except RuntimeError:
        return False
    scale = stream_out.abs().max().clamp_min(1e-6)
    return bool(rebuilt.shape == stream_out.shape and ((rebuilt - stream_out).abs().max() / scale) < 1e-4)


def check_head_reads_last_layer(model: torch.nn.Module, names: ModuleNames, hidden_size: int, run: Callable[[], Any]) -> None:
    """Where no final norm was found (``ln_final`` is the identity), the LM head must read exactly the last
    layer's output; otherwise something the alias tables do not know transforms the stream in between."""
    layers = model.get_submodule(names.layers)
    last, head = layers[len(layers) - 1], model.get_submodule(names.lm_head)
    seen = observe(model, {"last": last, "head": head}, run)
    where = f"{type(model).__name__} without a final norm"
    if "last" not in seen or "head" not in seen:
        return  # the probe did not reach them; the layer layouts report that
    stream = output_from_probe(seen["last"].output, signature_of(last), hidden_size, where).read(seen["last"].output)
    head_input = input_from_probe(seen["head"], signature_of(head), hidden_size, where).read(seen["head"].args, seen["head"].kwargs)
    if stream.shape != head_input.shape or not torch.equal(stream, head_input):
        raise UnknownArchitectureError(
            f"{type(model).__name__}: no module is named like a final norm, and the LM head ({names.lm_head}) does not "
            f"read the last layer's output, so a module nnterp does not know transforms the stream in between. "
            f"Pass its path as StandardizedTransformer(..., rename=RenameConfig(ln_final='<path>'))."
        )
