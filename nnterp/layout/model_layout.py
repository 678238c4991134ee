"""The layout of a whole model: standard names plus one ModuleLayout per (role, module class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..distributed.pp import is_local
from ..rename import ModuleNames
from .edits import embedding_edits, with_in_place_edits
from .infer import Observation, infer_module_layout, observe
from .model import LayoutError, ModuleLayout

ROLES = ("layer", "self_attn", "mlp")
EMBEDDINGS_KEY = "embed_tokens"


@dataclass
class ModelLayout:
    """Everything the accessors need to read and write the residual stream of one architecture."""

    backend: str
    architecture: str
    names: ModuleNames
    modules: dict[str, ModuleLayout]
    residual_additive: bool | None = None
    evidence: dict = field(default_factory=dict)
    embeddings_edited_in_place: bool = False  # the parent edits embed_tokens' output in place (HF CTRL)

    def for_module(self, role: str, module: torch.nn.Module) -> ModuleLayout:
        key = module_key(role, module)
        if key not in self.modules:
            raise LayoutError(
                f"No layout for {key}: this module class was not seen when the layout of "
                f"{self.architecture} was inferred."
            )
        return self.modules[key]

    def to_json(self) -> dict:
        data = {
            "backend": self.backend,
            "architecture": self.architecture,
            "names": self.names.as_dict(),
            "modules": {key: layout.to_json() for key, layout in sorted(self.modules.items())},
            "residual_additive": self.residual_additive,
            "evidence": self.evidence,
        }
        if self.embeddings_edited_in_place:  # recorded only where it holds
            data["embeddings_edited_in_place"] = True
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ModelLayout":
        return cls(
            backend=data["backend"],
            architecture=data["architecture"],
            names=ModuleNames(**data["names"]),
            modules={key: ModuleLayout.from_json(value) for key, value in data["modules"].items()},
            residual_additive=data.get("residual_additive"),
            evidence=data.get("evidence", {}),
            embeddings_edited_in_place=data.get("embeddings_edited_in_place", False),
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
            child_name = getattr(names, role)
            child = getattr(layer, child_name, None) if child_name else None
            if isinstance(child, torch.nn.Module):
                add(role, child, layer, child_name, index)
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
    embedding = model.get_submodule(names.embed_tokens)
    observations: dict[str, Observation] = {}
    if run is not None:
        observations = observe(model, {EMBEDDINGS_KEY: embedding, **{module_key(r, m): m for r, m, *_ in instances}}, run)
    modules, evidence = {}, {}
    for role, module, parent, attr, index in instances:
        key = module_key(role, module)
        where = f"{role} {index} ({type(module).__name__})"
        layout, module_evidence = infer_module_layout(module, parent, attr, observations.get(key), hidden_size, where)
        if layout is not None:
            layout, module_evidence = with_in_place_edits(layout, module_evidence, module, parent, attr, observations.get(key))
        evidence[key] = module_evidence
        if layout is not None:
            modules[key] = layout
    additive = _residual_additive(model, names, modules, observations) if observations else None
    parent_path, _, attr = names.embed_tokens.rpartition(".")
    embedding_sources = embedding_edits(model.get_submodule(parent_path), attr, observations.get(EMBEDDINGS_KEY))
    if embedding_sources:
        evidence[EMBEDDINGS_KEY] = {"edited_in_place": {"output": embedding_sources}}
    return ModelLayout(backend, architecture, names, modules, additive, evidence, bool(embedding_sources))


def _residual_additive(model, names, modules, observations) -> bool | None:
    """Whether layer 0's output equals its input plus its attention and MLP outputs."""
    layer = model.get_submodule(names.layers)[0]
    parts = [("layer", layer)]
    for role in ("self_attn", "mlp"):
        child = getattr(layer, getattr(names, role) or "", None)
        if not isinstance(child, torch.nn.Module):
            return None
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
