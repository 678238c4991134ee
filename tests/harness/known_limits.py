"""Why an architecture cannot pass the sweep as it stands, shown before its failing checks in the generated
tables (the recorded results keep the checks' own messages). Each entry names what is missing or different; an
entry for an architecture that passes is stale, which the tests refuse."""

from __future__ import annotations

TIMM = "the vision tower is a timm model and timm is not installed (gemma3n_text covers the decoder)"
HYPER_CONNECTIONS = ("hyper-connections concatenated along the hidden axis: the stream between layers is hc_count "
                     "(4) copies of the hidden state side by side ([batch, seq, 4 x hidden]), which the layouts, "
                     "looking for the hidden size, do not recognise")

HF_LIMITS: dict[str, str] = {
    "blt": "byte latent transformer: a local byte encoder, a global transformer over patches and a local byte "
           "decoder, three stacks with no single stream of layers",
    "cpmant": "CPM-Ant prepends prompt_length learned prompt positions inside the model and drops them after the "
              "last layer: the stream has more positions than the input and the logits",
    "gemma3n": TIMM,
    "gemma3n_text": "AltUp: the stream between layers is altup_num_inputs parallel copies ([4, batch, seq, hidden]) "
                    "that the model mixes after the last layer outside any module, so no single layer output "
                    "projects to the logits",
    "gemma4_assistant": "a drafter for assisted decoding: its forward needs the target model's embeddings and "
                        "shared key/value states",
    "gemma4_unified_assistant": "a drafter for assisted decoding: its forward needs the target model's embeddings "
                                "and shared key/value states",
    "gpt_neox_japanese": "the last layer's attention returns its output-projection bias separately and the layer "
                         "adds it: attentions_output[-1] excludes that bias, so the block sums on every layer but "
                         "the last",
    "hrm_text": "hierarchical reasoning model: a high-level and a low-level stack each run for several cycles, "
                "there is no single sequence of layers",
    "modernbert-decoder": "the LM head is two sibling modules (lm_head: dense, activation, norm; decoder: the vocabulary "
                          "projection) called in sequence by the model, so no one module maps the stream to logits",
    "musicgen": "AutoModelForCausalLM cannot build MusicgenForCausalLM (the composite config reaches a class that "
                "reads decoder fields; the decoder config has no causal-LM mapping); its inputs are audio codebooks",
    "musicgen_melody": "AutoModelForCausalLM cannot build MusicgenMelodyForCausalLM (the composite config reaches a "
                       "class that reads decoder fields); its inputs are audio codebooks",
    "prophetnet": "the decoder runs the main stream and the n-gram predicting streams through each layer: its layers "
                  "return both, and HF's hidden_states keep the main stream only",
    **dict.fromkeys(("qwen4_exp", "qwen4_exp_text"), HYPER_CONNECTIONS),
    "reformer": "reversible residual layers carry two streams of hidden width between blocks, concatenated only "
                "after the last block, so no single tensor is the stream",
    "xlm": "the blocks are four parallel ModuleLists (attentions, layer_norm1, ffns, layer_norm2) run by the "
           "model's forward: there is no layer module whose input and output are the stream",
    "xlnet": "XLNet runs its layers sequence-first ([seq, batch, hidden]) on two streams (content and query) and "
             "permutes to batch-first only after the last layer, so the LM head never reads a layer output",
}

VLLM_DROPPED = "vLLM dropped its {name} implementation in {version} and its Transformers backend cannot run {what}"

SPARSE_ATTENTION = "DeepSeek sparse attention (its indexer) has no CPU implementation in vLLM"

TORCHVISION = ("vLLM's {name} module imports transformers' image processor, which needs torchvision (not installable "
               "beside the CPU torch build)")

CPU_SIGMOID_ROUTER = ("vLLM's CPU MoE router scores experts with a sigmoid only in grouped top-k; {name} routes with "
                      "sigmoid scores over all experts (AssertionError)")

CPU_ROTARY = ("vLLM's CPU rotary kernel (_C.rotary_embedding) takes a 3-D query or key [tokens, heads, head_dim] "
              "as `tokens` rows of one head: it rotates only the first `tokens` of the tokens x heads rows, row r at "
              "position r, and leaves the rest unrotated (a 2-D [tokens, heads x head_dim] one, as Llama's, is "
              "rotated right); {what}: attention differs at every position after the first")
MLA_ROTARY = CPU_ROTARY.format(what="vLLM's multi-head latent attention rotates its query slice [tokens, heads, "
                                    "qk_rope_head_dim] so")

VLLM_LIMITS: dict[str, str] = {
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "glm4_moe_lite"), MLA_ROTARY),
    "axk1": MLA_ROTARY + "; and vLLM's A.X-K1 layer applies post_mlp_layernorm after its MoE module, where "
                         "transformers' AXK1MoE applies it inside, so mlps_output is normed on HF only",
    "longcat_flash": "transformers' LongCat-Flash checkpoint holds gate/up projections for its zero (identity) "
                     "experts, which vLLM's loader has no parameter for (KeyError); and vLLM routes LongCat-Flash "
                     "through its zero-expert router, picked before the CPU router whenever zero_expert_type is set, "
                     "which calls the CUDA kernel _moe_C.topk_softmax",
    **dict.fromkeys(("lfm2", "lfm2_moe"), CPU_ROTARY.format(
        what="vLLM's LFM2 attention rotates its per-head normed queries and keys [tokens, heads, head_dim] so")),
    **dict.fromkeys(("mamba", "falcon_mamba", "jamba"),
                    "vLLM's Mamba-1 layer calls _C.selective_scan_fwd, which the CPU build does not ship"),
    "laguna": CPU_SIGMOID_ROUTER.format(name="Laguna"),
    "minimax_m2": CPU_SIGMOID_ROUTER.format(name="MiniMax-M2"),
    "mimo_v2_flash": "vLLM's MiMo-V2-Flash reads the released checkpoint's field names (hybrid_layer_pattern, "
                     "moe_layer_freq, swa_*) that transformers' config spells otherwise",
    "mpt": "vLLM supported MptForCausalLM until 0.28 and refuses it since",
    "phimoe": "vLLM's Transformers MoE backend swaps in a router whose output transformers' Phimoe block cannot "
              "unpack (ValueError)",
    **dict.fromkeys(("qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text"), TORCHVISION.format(name="Qwen3.5")),
    "qwen3_next": "vLLM's CPU gated DeltaNet kernel runs only in bfloat16; the sweep compares in float32",
    "olmo_hybrid": "vLLM's gated DeltaNet layers run Triton kernels, which have no CPU backend here",
    "nemotron_h": "vLLM's CPU MoE runs gated (act-and-mul) experts only; Nemotron-H's experts are not gated",
    **dict.fromkeys(("qwen4_exp", "qwen4_exp_text"), HF_LIMITS["qwen4_exp"]),
    **dict.fromkeys(("gemma3", "gemma4", "gemma4_unified"), TORCHVISION.format(name="multimodal Gemma")
                    + "; the text models cover the decoder"),
    "fuyu": VLLM_DROPPED.format(name="Fuyu", version="0.25", what="it without the image processor files"),
    "falcon": "HF's Falcon layer adds the attention output into the MLP's output tensor in place after the MLP "
              "returns (parallel attention), so HF's mlps_output read includes the attention output; vLLM's does not",
    "gemma3n_text": HF_LIMITS["gemma3n_text"],
    "hrm_text": HF_LIMITS["hrm_text"],
    "dbrx": "vLLM 0.32's DBRX loader maps the expert weights to ffn.experts.w13_weight while its MoE layer holds "
            "them at ffn.experts.routed_experts.w13_weight (KeyError): the model does not load",
    "ernie4_5_moe": "vLLM's CPU MoE router ignores the expert-score correction bias outside grouped top-k, where HF "
                    "picks experts on the bias-corrected scores: with nonzero biases other experts run",
    "deepseek_v32": SPARSE_ATTENTION,
    "gemma3n": TIMM,
    "inkling_text": "vLLM's Inkling model reads fields of its own Inkling config (use_embed_norm, ...) that "
                    "transformers' inkling_text config does not have",
    "llama4": "vLLM's Llama4ForCausalLM reads the text model's fields from the root config, which for the llama4 "
              "model type is the multimodal one (llama4_text covers the text model)",
    "kimi_linear": "vLLM's Kimi-Linear module imports NVIDIA CUTLASS (a GPU library) at load",
    "hy_v4": "HY-V4's sparse MLA attention has no CPU backend in vLLM (it refuses to fall back to dense attention)",
    "glm_moe_dsa": SPARSE_ATTENTION,
    "deepseek_v4": "vLLM's DeepSeek-V4 config accepts only sparse/dense MLP layer types where transformers' config "
                   "writes hash_moe",
    "bamba": VLLM_DROPPED.format(name="Bamba", version="0.23", what="Mamba layers"),
    "minimax": VLLM_DROPPED.format(name="MiniMax-Text-01", version="0.23", what="its lightning-attention layers"),
    "bloom": "HF's Bloom attention and MLP add the residual inside the module (their outputs are the updated "
             "stream) where vLLM's return only their contribution, so attentions_output and mlps_output differ by "
             "the residual; the stream itself agrees to 1.3e-4 relative (ALiBi attention), above the 1e-4 tolerance",
    "apertus": "vLLM builds its xIELU activation with the default bfloat16 parameters whatever the model's dtype, "
               "so float32 activations differ from HF by about 1e-3 relative",
}

LIMITS = {"hf": HF_LIMITS, "vllm": VLLM_LIMITS}
