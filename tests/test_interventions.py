"""Research tools checked against independent computations."""

import torch

from nnterp.interventions import activation_patching, get_topk_closest_tokens, logit_lens, patchscope_lens

PROMPTS = ["The capital of France is", "Hello world"]


def plain_probs(model, prompts):
    """Next-token probabilities from a plain HF forward on the trace's inputs."""
    with torch.no_grad(), model.trace(prompts):
        fed = model.inputs.save()
    with torch.no_grad():
        return model._module(*fed[0], **fed[1]).logits.float().softmax(-1)


def test_logit_lens_last_layer_equals_model_output(llama):
    lens = logit_lens(llama, PROMPTS)
    assert lens.shape == (llama.num_layers, 2, llama.vocab_size)
    assert torch.allclose(lens[-1], plain_probs(llama, PROMPTS)[:, -1], atol=1e-6)
    tokens = [5, 7]
    assert torch.equal(logit_lens(llama, PROMPTS, layers=[0, -1], tokens=tokens), lens[[0, -1]][..., tokens])


def test_logit_lens_on_smollm2_reaches_paris(smollm2):
    paris = smollm2.tokenizer.encode(" Paris")[0]
    lens = logit_lens(smollm2, "The capital of France is", tokens=[paris])[:, 0, 0]
    assert lens[-1] > 0.5 and lens[0] < 0.01


def test_patching_a_run_with_itself_changes_nothing(llama):
    prompt = PROMPTS[0]
    target = int(plain_probs(llama, prompt)[0, -1].argmax())
    result = activation_patching(llama, prompt, prompt, target, layers=[0, 2], positions=[0, -1])
    assert torch.allclose(result, plain_probs(llama, prompt)[0, -1, target].expand(2, 2), atol=1e-6)


def test_patching_clean_into_corrupt_at_last_layer_restores_clean(smollm2):
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    paris = smollm2.tokenizer.encode(" Paris")[0]
    clean_prob = plain_probs(smollm2, clean)[0, -1, paris]
    result = activation_patching(smollm2, clean, corrupt, paris, layers=[0, smollm2.num_layers - 1], positions=[-1])
    assert torch.allclose(result[-1, 0], clean_prob, atol=1e-5)
    assert result[0, 0] < 0.5 * clean_prob


def test_patchscope_identity_at_last_layer_is_source_prediction(llama):
    lens = patchscope_lens(llama, PROMPTS[0], PROMPTS[1], layers=[llama.num_layers - 1])
    assert torch.allclose(lens[0], plain_probs(llama, PROMPTS[0])[0, -1], atol=1e-6)


def test_topk_closest_tokens_finds_unembedding_row(smollm2):
    paris = smollm2.tokenizer.encode(" Paris")[0]
    row = smollm2._torch_module("lm_head").weight[paris]
    top = get_topk_closest_tokens(smollm2, row, k=3)
    assert top[0][0] == " Paris" and abs(top[0][1] - 1) < 1e-5


def test_heatmaps_are_written_as_png(llama, tmp_path):
    from nnterp.display import plot_logit_lens, plot_patching

    tokens = [5, 7, 9]
    lens = logit_lens(llama, PROMPTS[0], tokens=tokens)[:, 0]
    plot_logit_lens(llama, lens, tokens, tmp_path / "lens.png")
    prompt = PROMPTS[0]
    patch = activation_patching(llama, prompt, prompt, 5)
    plot_patching(llama, patch, prompt, tmp_path / "patch.png")
    for name in ("lens.png", "patch.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pytest

    with pytest.raises(ValueError, match="expected a"):
        plot_logit_lens(llama, lens, tokens[:2])
