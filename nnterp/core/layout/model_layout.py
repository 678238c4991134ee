"""The layout of a whole model: standard names plus one ModuleLayout per (role, module class)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..backend import is_local
from ..rename import IDENTITY, ModuleNames, UnknownArchitectureError, layer_child
from .edits import embedding_edits, with_in_place_edits
from .infer import Observation, infer_module_layout, input_from_probe, observe, output_from_probe, signature_of
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
    embedding = model.get_submodule(names.embed_tokens)
    observations: dict[str, Observation] = {}
    parts = _block_parts(model, names, instances)
    if run is not None:
        watched = {EMBEDDINGS_KEY: embedding, **{module_key(r, m): m for r, m, *_ in instances}, **parts}
        observations = observe(model, watched, run)
    modules, evidence = {}, {}
    embedded = observations.get(EMBEDDINGS_KEY)
    stream_ndim = embedded.output.ndim if embedded is not None and isinstance(embedded.output, torch.Tensor) else None
    for role, module, parent, attr, index in instances:
        key = module_key(role, module)
        where = f"{role} {index} ({type(module).__name__})"
        layout, module_evidence = infer_module_layout(module, parent, attr, observations.get(key), hidden_size, where,
                                                      stream_ndim)
        if layout is not None:
            layout, module_evidence = with_in_place_edits(layout, module_evidence, module, parent, attr, observations.get(key))
        evidence[key] = module_evidence
        if layout is not None:
            modules[key] = layout if role == "layer" else _as_block_layout(layout)
    additive = _residual_additive(parts, modules, observations) if observations else None
    parent_path, _, attr = names.embed_tokens.rpartition(".")
    embedding_sources = embedding_edits(model.get_submodule(parent_path), attr, observations.get(EMBEDDINGS_KEY))
    if embedding_sources:
        evidence[EMBEDDINGS_KEY] = {"edited_in_place": {"output": embedding_sources}}
    return ModelLayout(backend, architecture, names, modules, additive, evidence, bool(embedding_sources))


def _as_block_layout(layout: ModuleLayout) -> ModuleLayout:
    """An attention or MLP block's ``residual`` argument is never part of what it reads: HF Bloom and MPT add it
    to their own output, vLLM's Falcon-H1 attention passes it through and returns it second. Only a layer's
    residual argument and ``(hidden, residual)`` output (vLLM's fused add and norm) carry the stream."""
    if layout.input.residual is None and layout.output.kind != "dual":
        return layout
    output = replace(layout.output, kind="tuple", index=0) if layout.output.kind == "dual" else layout.output
    return ModuleLayout(replace(layout.input, residual=None, residual_position=None), output)


def _block_parts(model, names, instances) -> dict[str, torch.nn.Module]:
    """The first layer of each layer class with its own attention and MLP, keyed ``<index>/<role>``: whether a
    block sums its parts is a property of the layer class (a hybrid stack mixes pre- and post-norm layers)."""
    layers = model.get_submodule(names.layers)
    parts = {}
    for role, _, _, _, index in instances:
        if role != "layer":
            continue
        parts[f"{index}/layer"] = layers[index]
        for child_role in ("self_attn", "mlp"):
            child_name = layer_child(layers[index], child_role, names)
            if child_name is not None:
                parts[f"{index}/{child_role}"] = getattr(layers[index], child_name)
    return parts


def _residual_additive(parts: dict[str, torch.nn.Module], modules, observations) -> bool | None:
    """Whether every layer class's output equals its input plus its attention and MLP outputs (checked on the
    first layer of each class); None where a part is missing or unobserved."""
    indices = sorted({key.split("/")[0] for key in parts}, key=int)
    verdicts = [_block_sums(index, parts, modules, observations) for index in indices]
    if not verdicts or None in verdicts:
        return None
    return all(verdicts)


def _block_sums(index: str, parts, modules, observations) -> bool | None:
    values = {}
    for role in ("layer", "self_attn", "mlp"):
        part = f"{index}/{role}"
        key = module_key(role, parts[part]) if part in parts else None
        if key not in modules or part not in observations:
            return None
        observed = observations[part]
        values[role] = (modules[key].input.read(observed.args, observed.kwargs), modules[key].output.read(observed.output))
    stream_in, stream_out = values["layer"]
    try:
        rebuilt = stream_in + values["self_attn"][1] + values["mlp"][1]
    except RuntimeError:
        return False
    scale = stream_out.abs().max().clamp_min(1e-6)
    return bool(rebuilt.shape == stream_out.shape and ((rebuilt - stream_out).abs().max() / scale) < 1e-4)


def confirm_final_norm(model: torch.nn.Module, names: ModuleNames, hidden_size: int, run: Callable[[], Any]) -> ModuleNames:
    """Check, on one forward pass, what the structure alone cannot tell about the final norm.

    A norm found by structure must read the last layer's output; one that does not (BART's
    ``layernorm_embedding`` normalises the embeddings) is not the final norm, and ``ln_final`` becomes the
    identity. Where ``ln_final`` is the identity, the LM head must read exactly the last layer's output;
    otherwise something the alias tables do not know transforms the stream in between, which is an error.
    """
    structural = names.found_by.get("ln_final") == "structure"
    if not structural and names.ln_final is not None:
        return names
    layers = model.get_submodule(names.layers)
    last, head = layers[len(layers) - 1], model.get_submodule(names.lm_head)
    watched = {"last": last, "head": head}
    if structural:
        watched["norm"] = model.get_submodule(names.module_path("ln_final"))
    seen = observe(model, watched, run)
    if "last" not in seen:
        return names  # the probe did not reach the last layer; its layout reports that
    where = f"{type(model).__name__} final norm"
    stream = output_from_probe(seen["last"].output, signature_of(last), hidden_size, where).read(seen["last"].output)

    def reads_stream(key: str) -> bool:
        if key not in seen:
            return False
        value = input_from_probe(seen[key], signature_of(watched[key]), hidden_size, where).read(seen[key].args, seen[key].kwargs)
        return value.shape == stream.shape and torch.equal(value, stream)

    if structural and reads_stream("norm"):
        return names
    if not reads_stream("head"):
        raise UnknownArchitectureError(
            f"{type(model).__name__}: no module is named like a final norm, and the LM head ({names.lm_head}) does not "
            f"read the last layer's output, so a module nnterp does not know transforms the stream in between. "
            f"Pass its path as StandardizedTransformer(..., rename=RenameConfig(ln_final='<path>'))."
        )
    return replace(names, ln_final=None, found_by={**names.found_by, "ln_final": IDENTITY})
