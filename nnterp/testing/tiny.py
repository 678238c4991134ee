"""Tiny random-initialised causal LMs built from transformers configs, saved to a directory."""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .tiny_configs import CONFIG_OVERRIDES, SMALL_CONFIG, VOCAB_SIZE
from .tokenizer import save_tokenizer


@dataclass(frozen=True)
class TinyModel:
    """A saved tiny model: ``path`` loads with ``from_pretrained`` and ``AutoTokenizer``."""

    model_type: str
    architecture: str
    path: Path


def causal_lm_architectures() -> dict[str, str]:
    """model_type -> ``*ForCausalLM`` class name, for every causal LM transformers registers."""
    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """The default config of ``model_type`` shrunk to a few layers of width 128: every size knob of
    ``SMALL_CONFIG`` the config (and each of its sub-configs: text, vision, audio) has, then the family's
    ``CONFIG_OVERRIDES``, then ``overrides``."""
    config_class = CONFIG_MAPPING[model_type]
    config = config_class(**_small_kwargs(config_class, _merged(CONFIG_OVERRIDES.get(model_type, {}), overrides)))
    config.architectures = [causal_lm_architectures()[model_type]]
    return config


def _small_kwargs(config_class: type[PretrainedConfig], overrides: dict[str, Any]) -> dict[str, Any]:
    known = _config_fields(config_class)
    kwargs: dict[str, Any] = {key: value for key, value in SMALL_CONFIG.items() if key in known}
    for name, sub_class in getattr(config_class, "sub_configs", {}).items():
        if name in known and getattr(sub_class, "model_type", ""):  # AutoConfig slots have no defaults to shrink
            kwargs[name] = _small_kwargs(sub_class, overrides.get(name, {}))
    return _merged(kwargs, overrides)


def _config_fields(config_class: type[PretrainedConfig]) -> set[str]:
    if dataclasses.is_dataclass(config_class):
        fields = {field.name for field in dataclasses.fields(config_class)}
    else:
        fields = set(inspect.signature(config_class.__init__).parameters)
    return fields | set(getattr(config_class, "attribute_map", {}))


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``, nested dicts (sub-configs) merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_tiny_model(model_type: str, directory: str | Path | None = None, seed: int = 0, **overrides) -> TinyModel:
    """Random-initialise ``model_type`` from its tiny config and save it with a local tokenizer."""
    directory = Path(directory or tempfile.mkdtemp(prefix=f"nnterp-{model_type}-"))
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model, seed)
    model.save_pretrained(str(directory))
    if type(model.config) is not type(config):
        # the class keeps only its text sub-config; a checkpoint carries the whole config, which is what
        # AutoModelForCausalLM maps back to this class
        config.save_pretrained(str(directory))
    save_tokenizer(directory, VOCAB_SIZE)
    return TinyModel(model_type, type(model).__name__, directory)


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every floating parameter so zero- or one-initialised tensors (norms, biases) also vary.

    Random norms and biases make mistakes visible that a default identity norm hides.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim == 1:
                param.copy_(param + 0.1 * noise.to(param.dtype))
            else:
                param.copy_((noise * 0.05).to(param.dtype))
