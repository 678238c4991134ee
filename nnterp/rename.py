"""Standard module names: alias tables, structural fallbacks and user overrides."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

# Absolute paths (from the causal-LM root) each architecture family uses for the standard modules.
ROOT_ALIASES: dict[str, tuple[str, ...]] = {
    "embed_tokens": (
        "model.embed_tokens", "transformer.wte", "gpt_neox.embed_in", "model.decoder.embed_tokens",
        "transformer.word_embeddings", "transformer.embedding.word_embeddings", "backbone.embeddings",
        "backbone.embedding", "model.language_model.embed_tokens", "transformer.embd.wte",
        "model.embed_in", "model.word_embeddings", "model.embeddings", "rwkv.embeddings",
        "transformer.embeddings", "model.embedding", "model.wte",
    ),
    "layers": (
        "model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
        "transformer.blocks", "transformer.encoder.layers", "backbone.layers", "model.language_model.layers",
        "model.h", "rwkv.blocks", "model.blocks", "transformer.encoder.layer", "model.transformer.h",
    ),
    "ln_final": (
        # hyper-connections (DeepSeek-V4, HY-V4): a head mixes the parallel copies of the stream, then the norm
        "model.hc_head+model.norm",
        "model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
        "transformer.norm_f", "model.final_layernorm", "backbone.norm_f", "model.ln_f",
        "transformer.encoder.final_layernorm", "model.language_model.norm", "transformer.final_layernorm",
        "model.decoder.layer_norm", "model.final_norm", "model.norm_f", "rwkv.ln_out", "transformer.norm",
        "model.final_layer_norm", "transformer.ln_final",
        "model.embedding_norm",  # LFM2: registered as an embedding norm, applied after the last layer
        "generator_predictions",  # ELECTRA: activation and norm between the last layer and the LM head
    ),
    # "cls": BERT-style heads, whose prediction transform (dense, activation, norm) precedes the decoder
    "lm_head": ("lm_head", "embed_out", "output_layer", "transformer.output_layer", "head", "output", "cls"),
}

# How ``ln_final`` is found where the model has no final norm (post-norm models such as BERT, RoBERTa,
# Marian): the stream leaving the last layer goes straight into the LM head, so ``ln_final`` is the identity.
IDENTITY = "identity"
SEQUENCE = "+"  # joins the paths of modules a standard name applies in order

# Names, relative to one decoder layer, of its attention and MLP blocks.
LAYER_ALIASES: dict[str, tuple[str, ...]] = {
    "self_attn": (
        "self_attn", "attn", "attention", "self_attention", "mixer", "attn_layer", "temporal_block",
        "mamba", "linear_attn",
    ),
    "mlp": (
        "mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "mlp_layer", "feedforward", "ff",
        "channel_mixer",
    ),
}

STANDARD_NAMES = tuple(ROOT_ALIASES) + tuple(LAYER_ALIASES)


@dataclass(frozen=True)
class RenameConfig:
    """User overrides: the native path (root modules) or name (layer children) of each standard module.

    Example: ``RenameConfig(layers="backbone.blocks", self_attn="mixer")``.
    """

    embed_tokens: str | None = None
    layers: str | None = None
    ln_final: str | None = None
    lm_head: str | None = None
    self_attn: str | None = None
    mlp: str | None = None

    def override(self, name: str) -> str | None:
        return getattr(self, name)


@dataclass(frozen=True)
class ModuleNames:
    """Where each standard module lives natively. ``self_attn``/``mlp`` are relative to a layer.

    ``ln_final`` is None where the model has no final norm (``found_by['ln_final'] == IDENTITY``): the
    standardized model treats it as the identity. It may name modules applied in sequence, joined by ``+``
    (``"model.hc_head+model.norm"``); the last one is the norm the ``ln_final`` envoy mounts.
    """

    embed_tokens: str
    layers: str
    ln_final: str | None
    lm_head: str
    self_attn: str | None
    mlp: str | None
    found_by: dict[str, str] = field(default_factory=dict, compare=False)

    def nnsight_rename(self) -> dict[str, str]:
        """The ``rename=`` mapping that mounts the native modules under their standard names. A path through a
        module named after a value nnsight serves on every envoy (GIT's LM head is ``output``) is left out:
        nnsight moves such a module to ``E_<name>`` and would match the key on every envoy that has one, so the
        standardized model mounts it itself (``envoy_path``)."""
        rename = {}
        for standard in STANDARD_NAMES:
            native = self.module_path(standard)
            if native is not None and native != standard and envoy_path(native) == native:
                rename[native] = standard
        return rename

    def module_path(self, standard: str) -> str | None:
        """The native path of the module mounted as ``standard`` (of a sequence, its last module)."""
        native = getattr(self, standard)
        return native.split(SEQUENCE)[-1] if native is not None else None

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in STANDARD_NAMES}


def envoy_path(path: str) -> str:
    """``path`` as nnsight's envoy tree spells it: a module named after a value nnsight serves on every envoy
    (``output``, ``input``, ...) is mounted as ``E_<name>``."""
    from nnsight.intervention.envoy import Envoy

    return ".".join(
        f"{Envoy.OVERLOAD_PREFIX}{part}" if not part.startswith("_") and inspect.isdatadescriptor(getattr(Envoy, part, None))
        else part
        for part in path.split(".")
    )


class UnknownArchitectureError(ValueError):
    """A standard module could not be located in the model."""


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        for part in path.split(SEQUENCE):
            module.get_submodule(part)
        return True
    except AttributeError:
        return False


def _path_of(root: torch.nn.Module, target: torch.nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in root.named_modules():
        if module is target and name:
            return name
    return None


def _structural_layers(root: torch.nn.Module, num_layers: int | None) -> str | None:
    """The longest ModuleList, preferring one whose length is the config's layer count."""
    candidates = [
        (name, len(module)) for name, module in root.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and name
    ]
    exact = [name for name, size in candidates if size == num_layers]
    if exact:
        return min(exact, key=lambda name: name.count("."))
    return max(candidates, key=lambda item: item[1])[0] if candidates else None


def _structural_final_norm(root: torch.nn.Module, layers_path: str) -> str | None:
    """A norm registered after the layer list as its sibling, or after the module holding it
    (RoBERTa-PreLayerNorm's ``LayerNorm`` follows its ``encoder``). The name alone cannot tell a final norm:
    Pegasus-style decoders apply ``layernorm_embedding`` after the last layer, BART to the embeddings; a
    runtime probe confirms it (``nnterp.layout.confirm_final_norm``)."""
    path = layers_path
    for _ in range(2):
        if not path:
            break
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        names = list(dict(parent.named_children()))
        for sibling in names[names.index(name) + 1:] if name in names else []:
            lowered = sibling.lower()
            if "norm" in lowered or lowered.startswith("ln"):
                return f"{parent_path}.{sibling}" if parent_path else sibling
        path = parent_path
    return None


def _layer_child(layers: torch.nn.ModuleList, standard: str) -> str | None:
    """The native name of ``standard`` in the layers: the standard name itself where a layer has an attribute
    of that name (hybrid stacks set ``self_attn`` on every layer, None where a state-space mixer replaces it;
    renaming the mixer onto it would hide the attention layers), else the first alias layer 0 has."""
    if any(hasattr(layer, standard) and not _is_container(getattr(layer, standard)) for layer in layers):
        return standard
    return _first_alias_child(layers[0], standard)


def _is_container(value: object) -> bool:
    """A list or dict of modules (LongCat's two attentions per layer): not one block the stream runs through."""
    return isinstance(value, (torch.nn.ModuleList, torch.nn.ModuleDict))


def _first_alias_child(layer: torch.nn.Module, standard: str) -> str | None:
    children = dict(layer.named_children())
    return next((alias for alias in LAYER_ALIASES[standard] if alias in children and not _is_container(children[alias])), None)


def layer_child(layer: torch.nn.Module, standard: str, names: ModuleNames) -> str | None:
    """The native name of ``standard`` (``self_attn`` or ``mlp``) in this ``layer``: the resolved name, or in a
    hybrid stack whose layers differ (a state-space mixer here, attention there) the first alias this layer
    has. A name the user gave in ``RenameConfig`` has no fallback."""
    native = getattr(names, standard)
    child = getattr(layer, native, None) if native is not None else None
    if isinstance(child, torch.nn.Module) and not _is_container(child):
        return native
    if names.found_by.get(standard) == "rename_config":
        return None
    return _first_alias_child(layer, standard)


def resolve_names(model: torch.nn.Module, rename: RenameConfig | None = None) -> ModuleNames:
    """Locate every standard module in ``model``: user override, then alias table, then structure."""
    rename = rename or RenameConfig()
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    found: dict[str, str | None] = {}
    found_by: dict[str, str] = {}

    for standard, aliases in ROOT_ALIASES.items():
        override = rename.override(standard)
        if override is not None:
            if not _has(model, override):
                raise UnknownArchitectureError(
                    f"RenameConfig({standard}={override!r}) names no module of {type(model).__name__}."
                )
            found[standard], found_by[standard] = override, "rename_config"
            continue
        path = next((alias for alias in aliases if _has(model, alias)), None)
        if path is not None:
            found[standard], found_by[standard] = path, "alias"
    if "layers" not in found:
        found["layers"], found_by["layers"] = _structural_layers(model, num_layers), "structure"
    if "embed_tokens" not in found and hasattr(model, "get_input_embeddings"):
        found["embed_tokens"], found_by["embed_tokens"] = _path_of(model, model.get_input_embeddings()), "structure"
    if "lm_head" not in found and hasattr(model, "get_output_embeddings"):
        found["lm_head"], found_by["lm_head"] = _path_of(model, model.get_output_embeddings()), "structure"
    if not found.get("lm_head") and found.get("embed_tokens") and getattr(text_config, "tie_word_embeddings", False):
        # engines that unembed with the tied input embedding itself (vLLM's Cohere) have no LM head module
        found["lm_head"], found_by["lm_head"] = found["embed_tokens"], "tied embeddings"
    if "ln_final" not in found and found.get("layers"):
        found["ln_final"], found_by["ln_final"] = _structural_final_norm(model, found["layers"]), "structure"
        if found["ln_final"] is None:
            found_by["ln_final"] = IDENTITY

    missing = [name for name in ROOT_ALIASES if not found.get(name) and found_by.get(name) != IDENTITY]
    if missing:
        raise UnknownArchitectureError(
            f"nnterp could not find the standard module(s) {missing} in {type(model).__name__}. "
            f"Pass their native paths, e.g. StandardizedTransformer(model, rename=RenameConfig("
            + ", ".join(f"{name}='<path>'" for name in missing)
            + ")). Top-level modules: "
            + ", ".join(name for name, _ in model.named_children())
        )

    layers = model.get_submodule(found["layers"])
    first_layer = layers[0]
    for standard in LAYER_ALIASES:
        override = rename.override(standard)
        if override is not None:
            if not _has(first_layer, override):
                raise UnknownArchitectureError(
                    f"RenameConfig({standard}={override!r}) names no child of layer 0 "
                    f"({type(first_layer).__name__}); its children are {list(dict(first_layer.named_children()))}."
                )
            found[standard], found_by[standard] = override, "rename_config"
        else:
            found[standard] = _layer_child(layers, standard)
            found_by[standard] = "alias" if found[standard] else "absent"
    return ModuleNames(**found, found_by=found_by)
