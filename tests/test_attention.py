"""Attention probabilities on HF eager attention, against output_attentions and hooked forwards."""

import pytest
import torch

from nnterp import StandardizedTransformer
from nnterp.core.attention import AttentionProbabilitiesUnavailable

PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def eager(request, tiny_path):
    return StandardizedTransformer(str(tiny_path(request.param)), attn_implementation="eager")


def reference_attentions(model):
    inputs = model.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model._module(**inputs, output_attentions=True).attentions


def test_probabilities_equal_hf_output_attentions_and_sum_to_one(eager):
    with torch.no_grad(), eager.trace(PROMPT):
        probs = eager.attention_probabilities[1].save()
    expected = reference_attentions(eager)[1]
    assert probs.shape == expected.shape == (1, eager.num_heads, probs.shape[2], probs.shape[2])
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert torch.all(probs.triu(diagonal=1) == 0)  # causal


def test_editing_probabilities_changes_outputs_and_writing_back_does_not(eager):
    with torch.no_grad(), eager.trace(PROMPT):
        baseline = eager.logits.save()
    with torch.no_grad(), eager.trace(PROMPT):
        eager.attention_probabilities[0] = eager.attention_probabilities[0] * 1
        same = eager.logits.save()
    with torch.no_grad(), eager.trace(PROMPT):
        probs = eager.attention_probabilities[0]
        first_token_only = torch.zeros_like(probs)
        first_token_only[..., 0] = 1  # every query attends to the first token only
        eager.attention_probabilities[0] = first_token_only
        stream = eager.attentions_output[0].save()
        edited = eager.logits.save()
    assert torch.allclose(same, baseline, atol=1e-6)
    assert not torch.allclose(edited, baseline, atol=1e-3)
    # attending only to token 0 makes every position's attention output identical
    assert stream.shape[1] > 1 and torch.allclose(stream[0, 1:], stream[0, :1].expand_as(stream[0, 1:]), atol=1e-5)


def test_non_eager_attention_gets_a_clear_error(tiny_path):
    model = StandardizedTransformer(str(tiny_path("llama")), attn_implementation="sdpa")
    with pytest.raises(AttentionProbabilitiesUnavailable, match="attn_implementation='eager'"):
        with model.trace(PROMPT):
            model.attention_probabilities[0].save()


@pytest.mark.parametrize("alibi", [False, True])
def test_falcon_branches_find_the_softmax_that_runs(tiny_path, tmp_path, alibi):
    """Falcon's attention forward has SDPA and eager branches, with and without ALiBi: the site is the one
    that runs (the probabilities Falcon itself returns as output_attentions), found at load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = tiny_path("falcon")
    config = AutoConfig.from_pretrained(source)
    config.alibi = alibi
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path)
    model = StandardizedTransformer(str(tmp_path), enable_attention_probs=True)
    with torch.no_grad(), model.trace(PROMPT):
        probs = model.attention_probabilities[1].save()
    torch.testing.assert_close(probs, reference_attentions(model)[1])
