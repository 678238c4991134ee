"""nnterp 1.x's ``rename_utils``: the renaming vocabulary and the config lookups of model sizes.

``RenameConfig``, ``RenamingError`` and ``AttnProbFunction`` are defined in :mod:`nnterp.core.rename`; the
accessor classes in :mod:`nnterp.core.accessors` and :mod:`nnterp.core.attention`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from .core.accessors import LayerAccessor
from .core.attention import AttentionProbabilities as AttentionProbabilitiesAccessor
from .core.log import logger
from .core.rename import LAYER_ALIASES, ROOT_ALIASES, STANDARD_NAMES, RenameConfig, resolve_names
from .core.rename import text_config as language_config

_DEFINED_IN_RENAME = ("RenamingError", "AttnProbFunction")

# The standard names, and the native names nnterp tries for each (alias tables of nnterp.core.rename).
MODEL_NAMES = ["model", "transformer", "gpt_neox", "decoder", "language_model", "backbone"]
ATTENTION_NAMES = list(LAYER_ALIASES["self_attn"])
MLP_NAMES = list(LAYER_ALIASES["mlp"])
LAYER_NAMES = list(ROOT_ALIASES["layers"])
LN_NAMES = list(ROOT_ALIASES["ln_final"])
LM_HEAD_NAMES = list(ROOT_ALIASES["lm_head"])
EMBED_TOKENS_NAMES = list(ROOT_ALIASES["embed_tokens"])


class IOType(Enum):
    """Whether an accessor reads a module's input or its output."""

    INPUT = "input"
    OUTPUT = "output"


def default_attn_head_config_keys() -> list[str]:
    return ["n_heads", "num_attention_heads", "n_head", "num_heads"]


def default_hidden_size_config_keys() -> list[str]:
    return ["hidden_size", "d_model", "n_embd", "dim"]


def default_vocab_size_config_keys() -> list[str]:
    return ["vocab_size", "n_vocab", "padded_vocab_size"]


def get_rename_dict(rename_config: RenameConfig | None = None) -> dict[str, str]:
    """``{native name or path: standard name}``: the aliases nnterp tries, with ``rename_config``'s entries.

    A layer child (``attn``, ``feed_forward``) is named relative to its layer; the other modules by their
    path from the model root (``transformer.h``, ``model.norm``).
    """
    rename: dict[str, str] = {}
    if rename_config is not None:
        for standard in (*STANDARD_NAMES, "model"):
            for native in rename_config.candidates(standard):
                rename[native] = standard
    for standard, aliases in (*ROOT_ALIASES.items(), *LAYER_ALIASES.items()):
        for alias in aliases:
            rename.setdefault(alias, standard)
    for container in MODEL_NAMES[1:]:
        rename.setdefault(container, "model")
    return rename


def get_ignores(model: Any, rename_config: RenameConfig | None = None) -> list[str]:
    """The standard modules nnterp 1.x's renaming checks skip on ``model`` (a torch model): ``"mlp"`` where its
    layers have no MLP module nnterp finds (OPT's is inlined in the layer), ``"attention"`` likewise, and those
    ``rename_config`` asks to ignore."""
    names = resolve_names(model, rename_config)
    ignores = []
    if names.mlp is None or (rename_config is not None and rename_config.ignore_mlp):
        if names.mlp is None:
            logger.warning("%s has no mlp module nnterp finds in its layers.", type(model).__name__)
        ignores.append("mlp")
    if names.self_attn is None or (rename_config is not None and rename_config.ignore_attn):
        ignores.append("attention")
    return ignores


def text_config(model: Any) -> Any:
    """The config of the language model: its text config for multimodal models, else ``config``."""
    return language_config(model.config)


def _config_size(model: Any, what: str, keys: list[str], given: Any, raise_error: bool) -> int | None:
    if isinstance(given, int) and not isinstance(given, bool):
        return given
    if given is not None and not isinstance(given, (str, list, tuple)):
        raise ValueError(f"Invalid {what} config key: {given!r}, expected None, str, list[str] or int")
    keys = ([given] if isinstance(given, str) else list(given or [])) + keys
    config = text_config(model)
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    if raise_error:
        raise ValueError(f"{type(config).__name__} has none of the {what} keys {keys}; name the key (or give the "
                         f"number) with RenameConfig({what}_config_key=...).")
    return None


def get_num_attention_heads(model: Any, raise_error: bool = True, rename_config: RenameConfig | None = None) -> int | None:
    """The number of attention heads from the model's config (``rename_config.attn_head_config_key`` first)."""
    given = getattr(rename_config, "attn_head_config_key", None)
    return _config_size(model, "attn_head", default_attn_head_config_keys(), given, raise_error)


def get_hidden_size(model: Any, raise_error: bool = True, rename_config: RenameConfig | None = None) -> int | None:
    """The hidden size from the model's config (``rename_config.hidden_size_config_key`` first)."""
    given = getattr(rename_config, "hidden_size_config_key", None)
    return _config_size(model, "hidden_size", default_hidden_size_config_keys(), given, raise_error)


def get_vocab_size(model: Any, raise_error: bool = True, rename_config: RenameConfig | None = None) -> int | None:
    """The vocabulary size from the model's config (``rename_config.vocab_size_config_key`` first)."""
    given = getattr(rename_config, "vocab_size_config_key", None)
    return _config_size(model, "vocab_size", default_vocab_size_config_keys(), given, raise_error)


def __getattr__(name: str) -> Any:
    if name in _DEFINED_IN_RENAME:
        from .core import rename

        return getattr(rename, name)
    raise AttributeError(f"module 'nnterp.rename_utils' has no attribute {name!r}")


__all__ = [
    "ATTENTION_NAMES", "EMBED_TOKENS_NAMES", "IOType", "LAYER_NAMES", "LM_HEAD_NAMES", "LN_NAMES", "MLP_NAMES",
    "MODEL_NAMES", "AttentionProbabilitiesAccessor", "LayerAccessor", "RenameConfig",
    "default_attn_head_config_keys", "default_hidden_size_config_keys", "default_vocab_size_config_keys",
    "get_hidden_size", "get_ignores", "get_num_attention_heads", "get_rename_dict", "get_vocab_size", "text_config",
]
