"""Tiny random-initialised causal LMs built from transformers configs, saved to a directory."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .tokenizer import save_tokenizer

VOCAB_SIZE = 320
HIDDEN = 128
LAYERS = 3
HEADS = 4
HEAD_DIM = HIDDEN // HEADS

# Every spelling transformers configs use for the size knobs, set wherever the config has the field.
SMALL_CONFIG = {
    "vocab_size": VOCAB_SIZE, "padded_vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "n_embed": HIDDEN, "dim": HIDDEN,
    "intermediate_size": 2 * HIDDEN, "n_inner": 2 * HIDDEN, "ffn_dim": 2 * HIDDEN,
    "ffn_hidden_size": 2 * HIDDEN, "hidden_dim": 2 * HIDDEN, "decoder_ffn_dim": 2 * HIDDEN,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "num_key_value_heads": HEADS // 2, "n_kv_heads": HEADS // 2, "num_kv_heads": HEADS // 2,
    "multi_query_group_num": HEADS // 2,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_sequence_length": 256,
    "seq_length": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "moe_intermediate_size": HIDDEN, "shared_expert_intermediate_size": HIDDEN,
    "expert_intermediate_size": HIDDEN,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": HEAD_DIM, "qk_head_dim": 24,
    "sliding_window": 64, "attention_window": 64,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "decoder_start_token_id": 1,
    "tie_word_embeddings": False, "use_cache": True,
}


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
    """The default config of ``model_type`` shrunk to a few layers of width 64."""
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    known = set(defaults) | set(getattr(config_class, "attribute_map", {}))
    kwargs = {key: value for key, value in SMALL_CONFIG.items() if key in known}
    kwargs.update(overrides)
    config = config_class(**kwargs)
    config.architectures = [causal_lm_architectures()[model_type]]
    return config


def build_tiny_model(model_type: str, directory: str | Path | None = None, seed: int = 0, **overrides) -> TinyModel:
    """Random-initialise ``model_type`` from its tiny config and save it with a local tokenizer."""
    directory = Path(directory or tempfile.mkdtemp(prefix=f"nnterp-{model_type}-"))
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model, seed)
    model.save_pretrained(str(directory))
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
