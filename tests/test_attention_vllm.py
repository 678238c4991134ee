"""attention_probabilities on vLLM (recomputed from the kernel's queries and keys) against the probabilities a
plain HF forward with eager attention returns (output_attentions) on the same weights: grouped-query attention,
sliding windows, soft-capping, ALiBi, sinks."""

import nnsight
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402
from nnterp.testing.tiny import build_tiny_model  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank"
# model_type -> config overrides that make each feature visible on a short prompt
CASES = {
    "llama": {},                                                     # grouped-query attention (tiny: 4 heads, 2 kv)
    "qwen2": {},
    "mistral": {"sliding_window": 4},                                 # sliding window on every layer
    "gemma2": {"sliding_window": 4, "attn_logit_softcapping": 0.5},  # soft-capping, alternating windows
    "gemma3_text": {"sliding_window": 4},                             # query/key norms, local layers
    "gpt_oss": {"sliding_window": 4},                                 # attention sinks, alternating windows
    "bloom": {},                                                      # ALiBi
    "phi3": {},
    "qwen3": {},                                                      # query/key norms
    "gpt2": {},                                                       # learned positions, no rotary
    "opt": {},
    "stablelm": {},                                                   # partial rotary
}


def read_patterns(model):
    with torch.no_grad(), model.trace(PROMPT):
        patterns = nnsight.save([model.attention_probabilities[layer] for layer in range(model.num_layers)])
    return patterns


@pytest.mark.parametrize("model_type", list(CASES))
def test_vllm_patterns_equal_hf_eager(tmp_path, model_type):
    path = str(build_tiny_model(model_type, tmp_path / model_type, **CASES[model_type]).path)
    raw = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        expected = raw(**tokenizer(PROMPT, return_tensors="pt"), output_attentions=True).attentions
    model = StandardizedVLLM(path, dtype="float32", max_model_len=128, max_num_seqs=2)
    try:
        patterns = read_patterns(model)
    finally:
        model.close()
    for layer, (pattern, reference) in enumerate(zip(patterns, expected)):
        assert pattern.shape == reference.shape, layer
        assert torch.allclose(pattern, reference.float(), atol=2e-5), (layer, float((pattern - reference).abs().max()))


def test_writes_and_later_generation_steps_are_refused(tiny_path):
    model = StandardizedVLLM(str(tiny_path("llama")), dtype="float32", max_model_len=128, max_num_seqs=2)
    try:
        with pytest.raises(TypeError, match="cannot be written on vLLM"), model.trace(PROMPT):
            model.attention_probabilities[0] = torch.zeros(1)
        with pytest.raises(ValueError, match="covers the prompt's tokens"):
            with model.trace(PROMPT, max_tokens=3) as tracer:
                with tracer.iter[1]:
                    model.attention_probabilities[0].save()
        assert read_patterns(model)[0].shape[-1] == len(model.tokenizer(PROMPT)["input_ids"])  # still serving
    finally:
        model.close()


def test_latent_attention_is_refused_with_the_hf_alternative(tmp_path):
    path = str(build_tiny_model("deepseek_v2", tmp_path / "deepseek_v2").path)
    model = StandardizedVLLM(path, dtype="float32", max_model_len=128, max_num_seqs=2)
    try:
        with pytest.raises(ValueError, match=r"attention_probabilities\[0\].*StandardizedTransformer\(\.\.\., enable_attention_probs=True\)"):
            read_patterns(model)
        with torch.no_grad(), model.trace(PROMPT):  # the engine serves the next trace
            after = model.layers_output[0].save()
        assert after.shape[-1] == model.hidden_size
    finally:
        model.close()
