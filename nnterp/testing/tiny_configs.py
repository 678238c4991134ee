"""The data of the tiny-model factory: the shared small sizes, and per-family config overrides (what an
architecture needs beyond them to build a model that runs on CPU). Nested dicts override a sub-config."""

from __future__ import annotations

from typing import Any

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

# Multi-head latent attention expands its compressed keys and values to every query head. vLLM's CPU MLA kernel
# runs one latent size only, DeepSeek's: a 512-wide compressed key/value plus a 64-wide rotary key.
MLA = {"num_key_value_heads": HEADS, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
       "qk_head_dim": SMALL_CONFIG["qk_nope_head_dim"] + 64}
# Hybrid stacks: a full-attention layer between two linear-attention / state-space ones (the defaults put
# the first attention layer past the third layer, and a cache of linear-attention layers only fails).
HYBRID_LAYER_TYPES = {"layer_types": ["linear_attention", "full_attention", "linear_attention"]}

def _table(*entries: tuple[str | tuple[str, ...], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model type, the union of the entries naming it; two entries setting one field differently is an error."""
    table: dict[str, dict[str, Any]] = {}
    for model_types, overrides in entries:
        for model_type in (model_types,) if isinstance(model_types, str) else model_types:
            merged = table.setdefault(model_type, {})
            clashes = [key for key in overrides if key in merged and merged[key] != overrides[key]]
            if clashes:
                raise ValueError(f"{model_type}: tiny-config entries disagree on {clashes}")
            merged.update(overrides)
    return table


CONFIG_OVERRIDES: dict[str, dict[str, Any]] = _table(
    # -- what the transformers model needs to build and run at this size --
    (("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "minicpm3", "youtu", "axk1",
      "axk2", "kimi_linear", "longcat_flash"), MLA),
    # their rotary width is head_dim (GLM-4 MoE Lite maps head_dim onto qk_rope_head_dim)
    (("longcat_flash", "glm4_moe_lite"), {"head_dim": MLA["qk_rope_head_dim"]}),
    (("kimi_linear", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "granitemoehybrid"), HYBRID_LAYER_TYPES),
    (("qwen3_5", "qwen3_5_moe"), {"text_config": HYBRID_LAYER_TYPES}),
    ("jamba", {"attn_layer_period": 2, "attn_layer_offset": 1}),
    ("bamba", {"attn_layer_indices": [1]}),
    # the shared attention reads the stream concatenated with the embeddings: twice the hidden size over the heads
    ("zamba2", {"layers_block_type": ["linear_attention", "hybrid", "linear_attention"],
                "attention_head_dim": 2 * HIDDEN // HEADS}),
    ("zaya", {"num_experts_per_tok": 1}),
    ("gpt_neo", {"attention_types": [[["global", "local"], 1], [["global"], 1]]}),  # one entry per layer
    ("mamba2", {"num_heads": 8, "head_dim": 32}),  # num_heads * head_dim == expand * hidden_size
    # the attention reads rope_theta (its config class has no default) and clamps by clip_qkv
    ("dbrx", {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}}),
    ("lfm2_moe", {"layer_types": ["conv", "full_attention", "conv"], "num_dense_layers": 1}),
    # key/value sharing: the shared tail must follow a sliding and a full attention layer
    ("gemma3n_text", {"num_hidden_layers": 4, "num_kv_shared_layers": 2,
                      "layer_types": ["sliding_attention", "full_attention"] * 2}),
    # rotary parameters per layer type; the 3-D rotary sections must add up to half a head
    ("cohere_compass_text", {"rope_parameters": {"full_attention": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 6, 4]}}}),
    # a decoder; the axial position embedding widths add up to the hidden size; one attention kind per layer
    ("reformer", {"is_decoder": True, "axial_pos_embds_dim": [HIDDEN // 2, HIDDEN // 2],
                  "attn_layers": ["local", "lsh", "local"]}),
    ("xmod", {"default_language": "en_XX"}),  # the language adapter to run (a checkpoint sets it)
    # partial rotary embeddings: the rotated slice must fit in a head
    (("codegen", "gptj"), {"rotary_dim": 16}),
    # -- what vLLM's implementation reads that transformers' config derives, spells otherwise or lacks --
    # the routing released DeepSeek-V3 checkpoints name (transformers' model always routes this way)
    ("deepseek_v3", {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}),
    # AFMoE: sigmoid scores renormalised over the chosen experts, no expert groups (transformers' router)
    ("afmoe", {"score_func": "sigmoid", "route_norm": True, "n_group": 1, "topk_group": 1}),
    # the number of leading dense layers (transformers' mlp_layer_types puts one)
    (("glm4_moe_lite", "hy_v3"), {"first_k_dense_replace": 1}),
    # every layer a MoE layer: vLLM gives each layer a post-MLP norm and wants it in the checkpoint, which holds
    # it for MoE layers only
    ("axk1", {"first_k_dense_replace": 0}),
    ("glm4_moe", {"head_dim": HEAD_DIM}),  # hidden / heads
    # HY-V3's expert width (transformers: moe_intermediate_size), its renormalised top-k, its query/key norms
    ("hy_v3", {"expert_hidden_dim": SMALL_CONFIG["moe_intermediate_size"], "route_norm": True, "qk_norm": True}),
    # LongCat-Flash: transformers always scales the LoRA'd queries and keys and runs identity zero experts
    ("longcat_flash", {"mla_scale_q_lora": True, "mla_scale_kv_lora": True, "zero_expert_type": "identity"}),
    ("zamba2", {"num_key_value_heads": HEADS}),  # vLLM's Zamba2 attention has as many key/value heads as queries
    ("lfm2", {"block_dim": HIDDEN, "conv_dim": HIDDEN}),  # LFM2's own names of the widths
    # MiniMax-M2's released fields: partial rotary width, sigmoid routing on bias-corrected scores
    ("minimax_m2", {"rotary_dim": HEAD_DIM // 2, "scoring_func": "sigmoid", "use_routing_bias": True}),
    ("inkling_text", {"padded_vocab_size": VOCAB_SIZE}),  # the embedding's rows
    # vLLM's implementations always unembed with the input embedding: a checkpoint with its own LM head fails there
    (("bloom", "cohere", "cohere2", "cohere2_moe", "gemma2", "gemma3n_text", "zamba2"), {"tie_word_embeddings": True}),
    # one group: transformers' Mamba-2 normalises the gated output over all groups at once, vLLM (like mamba_ssm)
    # per group, and the two agree only with one
    ("mamba2", {"n_groups": 1}),
    ("llama4_text", {"num_experts_per_tok": 1}),  # Llama 4 routes each token to one expert; vLLM only runs that
    ("falcon", {"ffn_hidden_size": 4 * HIDDEN}),  # vLLM's Falcon MLP is 4 x hidden whatever the config says
    # vLLM builds Gemma 4's expert block wherever num_experts is set: the MoE variant, on both backends
    ("gemma4_text", {"enable_moe_block": True, "top_k_experts": 2}),
)
