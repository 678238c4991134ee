"""Standard module names: alias tables, structural fallbacks and user overrides."""

from __future__ import annotations

import inspect
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Union

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
CONTAINER = "model"  # the standard name of the backbone that holds the layers (nnterp 1.x exposes it)


class RenamingError(Exception):
    """The standard modules could not be located, or do not behave as their names promise."""


class UnknownArchitectureError(RenamingError, ValueError):
    """A standard module could not be located in the model."""


class AttnProbFunction(ABC):
    """Where a model's attention probabilities are computed, for ``RenameConfig(attn_prob_source=...)``.

    Called with a layer's attention envoy, it returns the nnsight operation envoy (from ``.source``) whose
    output is the probabilities ``[batch, heads, query, key]``; with ``return_module_source=True``, the
    source envoy that operation lives in (printed by ``attention_probabilities.print_source()``).
    """

    @abstractmethod
    def get_attention_prob_source(self, attention_module: Any, return_module_source: bool = False) -> Any:
        ...

    def __call__(self, attention_module: Any, return_module_source: bool = False) -> Any:
        return self.get_attention_prob_source(attention_module, return_module_source)


Names = Union[str, list, None]
ConfigKey = Union[str, list, int, None]

# nnterp 1.x's field for each standard module (``model`` is the backbone that holds the layers).
LEGACY_FIELDS = {
    "self_attn": "attn_name", "mlp": "mlp_name", "ln_final": "ln_final_name", "lm_head": "lm_head_name",
    "layers": "layers_name", CONTAINER: "model_name",
}
DEFAULT_CONFIG_KEYS = {
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
}


@dataclass
class RenameConfig:
    """Where the standard modules live, for models the alias tables and the structure get wrong.

    nnterp 1.x spelling (positional order kept): ``attn_name``, ``mlp_name``, ``ln_final_name``,
    ``lm_head_name``, ``model_name`` (the backbone holding the layers, exposed as ``model.model``) and
    ``layers_name`` each take a module name or dotted path, or a list of candidates (the first that
    exists wins; a bare name matches the shallowest module so named); ``attn_prob_source`` (an
    ``AttnProbFunction``); ``ignore_mlp`` / ``ignore_attn`` (skip that module in the load-time check);
    ``attn_head_config_key``, ``hidden_size_config_key``, ``vocab_size_config_key`` (a config key, a list of
    keys tried first, or the number itself).

    Standard-name spelling (keyword only): ``embed_tokens``, ``layers``, ``ln_final``, ``lm_head`` take the
    native path from the model root, ``self_attn`` and ``mlp`` the child's name in a layer, e.g.
    ``RenameConfig(layers="backbone.blocks", self_attn="mixer")``. A module named both ways must agree.
    Every module named here must exist: a name that does not raises ``UnknownArchitectureError``.
    """

    attn_name: Names = None
    mlp_name: Names = None
    ln_final_name: Names = None
    lm_head_name: Names = None
    model_name: Names = None
    layers_name: Names = None
    attn_prob_source: AttnProbFunction | Callable | None = None
    ignore_mlp: bool | None = None
    ignore_attn: bool | None = None
    attn_head_config_key: ConfigKey = None
    hidden_size_config_key: ConfigKey = None
    vocab_size_config_key: ConfigKey = None
    embed_tokens: str | None = field(default=None, kw_only=True)
    layers: str | None = field(default=None, kw_only=True)
    ln_final: str | None = field(default=None, kw_only=True)
    lm_head: str | None = field(default=None, kw_only=True)
    self_attn: str | None = field(default=None, kw_only=True)
    mlp: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        for legacy in LEGACY_FIELDS.values():
            value = getattr(self, legacy)
            if value is not None and not _is_names(value):
                raise TypeError(f"RenameConfig({legacy}=...) takes a module name or a list of names, got {value!r}.")
        for standard, legacy in LEGACY_FIELDS.items():
            ours, theirs = getattr(self, standard, None), getattr(self, legacy)
            if ours is not None and theirs is not None and [ours] != _as_list(theirs)[:1]:
                raise ValueError(f"RenameConfig names the {standard} module twice: {standard}={ours!r} and {legacy}={theirs!r}.")
        for key in ("attn_head_config_key", "hidden_size_config_key", "vocab_size_config_key"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) or _is_names(value)):
                raise TypeError(f"RenameConfig({key}=...) takes a config key, a list of keys or an int, got {value!r}.")

    def candidates(self, standard: str) -> list[str]:
        """The native names given for a standard module, in order of preference (empty: none given)."""
        ours = getattr(self, standard, None) if standard != CONTAINER else None
        legacy = LEGACY_FIELDS.get(standard)
        return ([ours] if ours else []) + (_as_list(getattr(self, legacy)) if legacy else [])

    def config_keys(self, size: str) -> tuple[list[str], int | None]:
        """Config keys to try for ``num_heads``/``hidden_size``/``vocab_size`` (the user's first), or the
        number the user gave."""
        given = getattr(self, {"num_heads": "attn_head_config_key", "hidden_size": "hidden_size_config_key",
                               "vocab_size": "vocab_size_config_key"}[size])
        if isinstance(given, int):
            return [], given
        return _as_list(given) + list(DEFAULT_CONFIG_KEYS[size]), None

    def ignores(self) -> set[str]:
        """Standard modules the load-time check skips."""
        return {name for name, flag in (("mlp", self.ignore_mlp), ("self_attn", self.ignore_attn)) if flag}


def _is_names(value: Any) -> bool:
    return isinstance(value, str) or isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _as_list(value: Names) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# Keyword arguments nnterp 1.x's error messages asked for (``attn_rename="..."``): aliases, as ``rename`` entries.
RENAME_KEYWORDS = {"attn_rename": "self_attn", "mlp_rename": "mlp", "ln_final_rename": "ln_final",
                   "lm_head_rename": "lm_head", "layers_rename": "layers"}


def split_rename(
    rename: "RenameConfig | dict | None", rename_config: RenameConfig | None, loader_kwargs: dict | None = None
) -> tuple[RenameConfig, dict[str, list[str]], dict]:
    """The constructor's ``rename`` / ``rename_config`` as (config, hints, extra aliases).

    ``rename`` is a ``RenameConfig`` or, as in nnterp 1.x, a dict ``{native name: alias}`` merged over the
    defaults: an entry whose alias is a standard name is a hint (tried before the alias tables, skipped
    where the model has no such module); any other entry is passed on to nnsight as a plain alias.
    ``attn_rename=...``-style keywords are taken out of ``loader_kwargs`` as hints too (deprecated).
    """
    entries = {}
    for keyword, standard in RENAME_KEYWORDS.items():
        if loader_kwargs is not None and keyword in loader_kwargs:
            warnings.warn(f"`{keyword}` is deprecated: pass rename_config=RenameConfig(...) or rename={{...}}.",
                          DeprecationWarning, stacklevel=3)
            for native in _as_list(loader_kwargs.pop(keyword)):
                entries[native] = standard
    if isinstance(rename, RenameConfig):
        if rename_config is not None:
            raise ValueError("Pass the RenameConfig once, as rename=... or rename_config=..., not both.")
        rename_config, rename = rename, None
    if rename is not None and not isinstance(rename, dict):
        raise TypeError(f"rename takes a RenameConfig or a dict {{native name: alias}}, got {type(rename).__name__}.")
    entries.update(rename or {})
    hints: dict[str, list[str]] = {}
    extra: dict = {}
    for native, alias in entries.items():
        if alias in STANDARD_NAMES or alias == CONTAINER:
            hints.setdefault(alias, []).append(native)
        else:
            extra[native] = alias
    return rename_config or RenameConfig(), hints, extra


@dataclass(frozen=True)
class ModuleNames:
    """Where each standard module lives natively. ``self_attn``/``mlp`` are relative to a layer;
    ``container`` is the backbone holding the layers (``model.model``), ``in_container`` the root modules also
    mounted on it under their standard names, ``extra`` the user's other aliases.

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
    container: str | None = field(default=None, compare=False)
    in_container: tuple[str, ...] = field(default=(), compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    def nnsight_rename(self) -> dict[str, list[str]]:
        """The ``rename=`` mapping that mounts the native modules under their standard names: at the root,
        in the backbone (``model.model.layers``, also where it is called ``transformer``) and in each layer.
        A path through a module named after a value nnsight serves on every envoy (GIT's LM head is ``output``)
        is left out: nnsight moves such a module to ``E_<name>`` and would match the key on every envoy that has
        one, so the standardized model mounts it itself (``envoy_path``)."""
        rename: dict[str, list[str]] = {}
        if self.container and self.container != CONTAINER:
            rename[self.container] = [CONTAINER]
        for standard in STANDARD_NAMES:
            native = self.module_path(standard)
            if native is None or envoy_path(native) != native:
                continue
            aliases = [] if native == standard else [standard]
            if standard in self.in_container:
                aliases.append(f"{self.container}.{standard}")  # bound on the backbone
            for alias in aliases:
                if alias not in rename.setdefault(native, []):
                    rename[native].append(alias)
        for native, alias in self.extra.items():
            rename.setdefault(native, []).extend(_as_list(alias))
        return {native: aliases for native, aliases in rename.items() if aliases}

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


def _ends_with(path: str, name: str) -> bool:
    parts, tail = path.split("."), name.split(".")
    return len(tail) <= len(parts) and parts[-len(tail):] == tail


def _find_module(model: torch.nn.Module, name: str) -> str | None:
    """The module ``name`` names: the path itself from the root, else the shallowest module whose path
    ends with it (a bare name such as ``"ln_f"``, as nnterp 1.x and nnsight's ``rename`` take them)."""
    if name and _has(model, name):
        return name
    matches = [path for path, _ in model.named_modules() if path and _ends_with(path, name)]
    return min(matches, key=lambda path: path.count(".")) if matches else None


def _given(rename: RenameConfig, standard: str) -> str:
    """How the user spelled a standard module in the config, for error messages."""
    fields = [standard] if standard != CONTAINER else []
    fields += [LEGACY_FIELDS[standard]] if standard in LEGACY_FIELDS else []
    return "RenameConfig(" + ", ".join(f"{f}={getattr(rename, f)!r}" for f in fields if getattr(rename, f)) + ")"


def _first(candidates: list[str], locate: Callable[[str], str | None]) -> str | None:
    return next((path for path in map(locate, candidates) if path is not None), None)


def text_config(config: Any) -> Any:
    """The language model's config of a (possibly multimodal) config; the config itself otherwise."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def resolve_names(
    model: torch.nn.Module,
    rename: RenameConfig | None = None,
    hints: dict[str, list[str]] | None = None,
    extra: dict | None = None,
) -> ModuleNames:
    """Locate every standard module in ``model``: the user's config (which must match), then the user's
    hints (``rename`` dict entries, skipped where absent), then the alias tables, then the structure."""
    rename = rename or RenameConfig()
    hints = hints or {}
    config = getattr(model, "config", None)
    language_config = text_config(config)
    num_layers = getattr(language_config, "num_hidden_layers", None)
    found: dict[str, str | None] = {}
    found_by: dict[str, str] = {}

    def locate_root(name: str) -> str | None:
        return _find_module(model, name)

    for standard, aliases in ROOT_ALIASES.items():
        given = rename.candidates(standard)
        if given:
            path = _first(given, locate_root)
            if path is None:
                raise UnknownArchitectureError(
                    f"{_given(rename, standard)} names no module of {type(model).__name__} (top-level modules: "
                    + ", ".join(name for name, _ in model.named_children()) + ")."
                )
            found[standard], found_by[standard] = path, "rename_config"
            continue
        path = _first(hints.get(standard, []), locate_root)
        if path is not None:
            found[standard], found_by[standard] = path, "rename"
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
    if not found.get("lm_head") and found.get("embed_tokens") and getattr(language_config, "tie_word_embeddings", False):
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
    if not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)) or len(layers) == 0:
        raise UnknownArchitectureError(
            f"The layers of {type(model).__name__} were located at {found['layers']!r}, a {type(layers).__name__}, "
            "not a non-empty list of layers. Pass the path of the decoder layer list, e.g. RenameConfig(layers_name='<path>')."
        )

    first_layer = layers[0]
    for standard in LAYER_ALIASES:
        given = rename.candidates(standard)
        if given:
            child = next((name for name in given if _has(first_layer, name)), None)
            if child is None:
                raise UnknownArchitectureError(
                    f"{_given(rename, standard)} names no child of layer 0 "
                    f"({type(first_layer).__name__}); its children are {list(dict(first_layer.named_children()))}."
                )
            found[standard], found_by[standard] = child, "rename_config"
            continue
        child = next((name for name in hints.get(standard, []) if _has(first_layer, name)), None)
        if child is not None:
            found[standard], found_by[standard] = child, "rename"
        else:
            found[standard] = _layer_child(layers, standard)
            found_by[standard] = "alias" if found[standard] else "absent"
    container = _container(model, rename, hints, found["layers"])
    return ModuleNames(**found, found_by=found_by, container=container,
                       in_container=_mountable_in(model, container, found), extra=dict(extra or {}))


def _mountable_in(model: torch.nn.Module, container: str | None, found: dict[str, str | None]) -> tuple[str, ...]:
    """The root standard modules under ``container`` that can also be named there (the name is free)."""
    if container is None:
        return ()
    backbone = model.get_submodule(container)
    return tuple(
        standard for standard in ROOT_ALIASES
        if found[standard] is not None and found[standard].startswith(container + ".") and not hasattr(backbone, standard)
    )


def _container(model: torch.nn.Module, rename: RenameConfig, hints: dict[str, list[str]], layers: str) -> str | None:
    """The backbone exposed as ``model.model``: the user's, else the root child the layers live under. None
    where that name cannot be given (the root already has another ``model``)."""
    given = rename.candidates(CONTAINER)
    if given:
        container = _first(given, lambda name: _find_module(model, name))
        if container is None:
            raise UnknownArchitectureError(f"{_given(rename, CONTAINER)} names no module of {type(model).__name__}.")
    else:
        container = _first(hints.get(CONTAINER, []), lambda name: _find_module(model, name))
        if container is None:
            container = layers.partition(".")[0] if "." in layers else None
    if container is None or container == CONTAINER:
        return container
    return None if hasattr(model, CONTAINER) else container
