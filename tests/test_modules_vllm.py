"""The nnterp 1.x modules on StandardizedVLLM (one request per prompt, several per trace) equal
StandardizedTransformer on the same weights, whose results the other test files check against hooks."""

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


from nnterp.interventions import (  # noqa: E402
    TargetPrompt,
    TargetPromptBatch,
    logit_lens,
    patch_object_attn_lens,
    patchscope_generate,
    patchscope_lens,
)
from nnterp.nnsight_utils import (  # noqa: E402
    collect_token_activations_batched,
    compute_next_token_probs,
    get_token_activations,
)
from nnterp.prompt_utils import Prompt, run_prompts  # noqa: E402

PROMPTS = ["The capital of France is", "Hello", "One two three four five six"]
ATOL = 1e-5


def both(pair, run):
    hf, vllm = pair
    return run(hf), run(vllm)


def close(a, b):
    if isinstance(a, tuple):
        return all(close(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL)


@pytest.mark.parametrize("idx", [None, 0, -2])
def test_token_activations_per_request_equal_hf(pair, idx):
    hf, vllm = both(pair, lambda m: get_token_activations(m, PROMPTS, layers=[2, 0], idx=idx))
    assert hf.shape == (2, 3, pair[0].hidden_size) and close(hf, vllm)


def test_attention_inputs_batched_collection_and_next_token_probs_equal_hf(pair):
    def run(model):
        attention = get_token_activations(model, PROMPTS, get_activations=lambda m, layer: m.attentions_input[layer])
        return attention, collect_token_activations_batched(model, PROMPTS, batch_size=2), compute_next_token_probs(model, PROMPTS)

    hf, vllm = both(pair, run)
    assert hf[2].shape == (3, pair[0].vocab_size) and close(hf, vllm)


def test_logit_lens_with_inverse_equals_hf(pair):
    hf, vllm = both(pair, lambda m: logit_lens(m, PROMPTS, return_inv_logits=True))
    assert hf[0].shape == (3, pair[0].num_layers, pair[0].vocab_size) and close(hf, vllm)


def test_patchscope_lens_with_per_prompt_indices_equals_hf(pair):
    targets = TargetPromptBatch.from_prompts(["x y z w", "a", "one two three"], [1, 0, -2])
    hf, vllm = both(pair, lambda m: patchscope_lens(m, PROMPTS, targets, layers=[0, 2], tqdm=None))
    assert hf.shape == (3, 2, pair[0].vocab_size) and close(hf, vllm)


def test_attention_patch_lens_equals_hf(pair):
    hf, vllm = both(pair, lambda m: patch_object_attn_lens(m, PROMPTS[0], PROMPTS, 1, num_patches=2, tqdm=None))
    assert hf.shape == (3, pair[0].num_layers, pair[0].vocab_size) and close(hf, vllm)


def test_run_prompts_equals_hf(pair):
    prompts = [Prompt(text, {"a": [5, 6], "b": [7]}) for text in PROMPTS]
    hf, vllm = both(pair, lambda m: run_prompts(m, prompts, batch_size=2, tqdm=None))
    assert hf["a"].shape == (3, 1) and all(close(hf[key], vllm[key]) for key in hf)


def test_patchscope_generate_equals_hf_token_for_token(pair):
    hf, vllm = both(pair, lambda m: patchscope_generate(m, PROMPTS[:2], TargetPrompt("a b c", -1), max_length=4, layers=[0, 1], tqdm=None))
    assert sorted(hf) == sorted(vllm) == [0, 1]
    assert all(torch.equal(hf[layer], vllm[layer]) for layer in hf)


def test_remote_on_vllm_names_the_hf_alternative(pair):
    with pytest.raises(NotImplementedError, match="StandardizedTransformer"):
        compute_next_token_probs(pair[1], PROMPTS, remote=True)
