"""Research tools checked against independent computations: plain HF forwards of each prompt alone, with
forward hooks on the raw torch modules where something is patched."""

import pytest
import torch
from nnsight import LanguageModel

from nnterp.interventions import (
    TargetPrompt,
    TargetPromptBatch,
    activation_patching,
    get_topk_closest_tokens,
    it_repeat_prompt,
    logit_lens,
    patch_object_attn_lens,
    patchscope_generate,
    patchscope_lens,
    repeat_prompt,
    steer,
)

PROMPTS = ["The capital of France is", "Hello world"]


def plain_probs(model, prompts):
    """Next-token probabilities from a plain HF forward on the trace's inputs."""
    with torch.no_grad(), model.trace(prompts):
        fed = model.inputs.save()
    with torch.no_grad():
        return model._module(*fed[0], **fed[1]).logits.float().softmax(-1)


def alone(model, prompt, hooks=()):
    """``prompt`` run alone through the raw model with ``(module, hook)`` forward hooks (``hook`` returns the
    replacement output or None); returns (layer outputs, attention inputs, last-token probabilities)."""
    raw, layers = model._module, model._module.get_submodule(model.names.layers)
    outputs, attention_inputs, handles = {}, {}, []
    for module, hook in hooks:
        handles.append(module.register_forward_hook(hook, with_kwargs=True) if hook.__code__.co_argcount == 4
                       else module.register_forward_pre_hook(hook, with_kwargs=True))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: outputs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().clone())))
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: attention_inputs.__setitem__(i, (a[0] if a else k["hidden_states"]).detach().clone()),
            with_kwargs=True))
    try:
        with torch.no_grad():
            logits = raw(model.tokenizer(prompt, return_tensors="pt").input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return outputs, attention_inputs, logits[0, -1].float().softmax(-1)


def hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def write_at(position, vector):
    """A forward hook replacing a layer's output at ``position`` by ``vector``."""
    def hook(module, args, kwargs, output):
        hidden = hidden_of(output).clone()
        hidden[:, position] = vector
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


def norm_head(model, hidden, sign=1):
    with torch.no_grad():
        return model._module.lm_head(sign * model._module.model.norm(hidden)).float().softmax(-1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_logit_lens_is_norm_and_head_of_each_prompts_last_token(llama, side):
    llama.tokenizer.padding_side = side
    try:
        lens = logit_lens(llama, PROMPTS)
        lens_again, inverse = logit_lens(llama, PROMPTS, return_inv_logits=True)
    finally:
        llama.tokenizer.padding_side = "left"
    assert lens.shape == inverse.shape == (2, llama.num_layers, llama.vocab_size)
    assert torch.equal(lens, lens_again)
    for p, prompt in enumerate(PROMPTS):
        outputs, _, last_probs = alone(llama, prompt)
        assert torch.allclose(lens[p, -1], last_probs, atol=1e-6)
        for layer in range(llama.num_layers):
            assert torch.allclose(lens[p, layer], norm_head(llama, outputs[layer][0, -1]), atol=1e-6)
            assert torch.allclose(inverse[p, layer], norm_head(llama, outputs[layer][0, -1], sign=-1), atol=1e-6)


def test_logit_lens_extras_select_layers_positions_and_tokens(llama):
    lens = logit_lens(llama, PROMPTS)
    tokens = [5, 7]
    assert torch.allclose(logit_lens(llama, PROMPTS, layers=[-1, 0], tokens=tokens), lens[:, [2, 0]][..., tokens], atol=1e-7)
    at_positions = logit_lens(llama, PROMPTS[0], positions=[0, -1])
    assert at_positions.shape == (1, llama.num_layers, 2, llama.vocab_size)
    outputs, _, _ = alone(llama, PROMPTS[0])
    assert torch.allclose(at_positions[0, 1, 0], norm_head(llama, outputs[1][0, 0]), atol=1e-6)
    assert torch.allclose(at_positions[0, :, 1], lens[0], atol=1e-6)


def test_logit_lens_on_plain_language_model(tiny_path):
    plain = LanguageModel(str(tiny_path("gpt2")), dispatch=True)
    lens = logit_lens(plain, PROMPTS)
    assert lens.shape == (2, 3, plain._module.config.vocab_size)
    assert torch.allclose(lens[:, -1], plain_probs(plain, PROMPTS)[:, -1], atol=1e-6)


def test_logit_lens_on_smollm2_reaches_paris(smollm2):
    paris = smollm2.tokenizer.encode(" Paris")[0]
    lens = logit_lens(smollm2, "The capital of France is", tokens=[paris])[0, :, 0]
    assert lens[-1] > 0.5 and lens[0] < 0.01


def test_patching_a_run_with_itself_changes_nothing(llama):
    prompt = PROMPTS[0]
    target = int(plain_probs(llama, prompt)[0, -1].argmax())
    result = activation_patching(llama, prompt, prompt, target, layers=[0, 2], positions=[0, -1], tqdm=None)
    assert torch.allclose(result, plain_probs(llama, prompt)[0, -1, target].expand(2, 2), atol=1e-6)


def test_patching_clean_into_corrupt_at_last_layer_restores_clean(smollm2):
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    paris = smollm2.tokenizer.encode(" Paris")[0]
    clean_prob = plain_probs(smollm2, clean)[0, -1, paris]
    result = activation_patching(smollm2, clean, corrupt, paris, layers=[0, smollm2.num_layers - 1], positions=[-1])
    assert torch.allclose(result[-1, 0], clean_prob, atol=1e-5)
    assert result[0, 0] < 0.5 * clean_prob


@pytest.mark.parametrize("side", ["left", "right"])
def test_patchscope_lens_equals_hooked_patch_of_each_target_alone(llama, side):
    sources = ["The capital of France is", "Hello world", "a b"]
    targets = TargetPromptBatch.from_prompts(["x y z w v", "one two", "a b c"], [1, -1, -2])
    layers = [0, 2]
    llama.tokenizer.padding_side = side
    try:
        lens = patchscope_lens(llama, sources, targets, layers=layers, tqdm=None)
    finally:
        llama.tokenizer.padding_side = "left"
    assert lens.shape == (3, 2, llama.vocab_size)
    for s, (source, target) in enumerate(zip(sources, targets)):
        source_outputs, _, _ = alone(llama, source)
        for j, layer in enumerate(layers):
            hook = write_at(target.index_to_patch, source_outputs[layer][0, -1])
            _, _, expected = alone(llama, target.prompt, [(llama._module.model.layers[layer], hook)])
            assert torch.allclose(lens[s, j], expected, atol=1e-6), (s, layer)


def test_patchscope_identity_at_last_layer_is_source_prediction(llama):
    lens = patchscope_lens(llama, PROMPTS[0], TargetPrompt(PROMPTS[1], -1), layers=llama.num_layers - 1, tqdm=None)
    assert lens.shape == (1, 1, llama.vocab_size)
    assert torch.allclose(lens[0, 0], plain_probs(llama, PROMPTS[0])[0, -1], atol=1e-6)


def test_patchscope_lens_with_latents_and_default_target(llama):
    from nnterp.nnsight_utils import get_token_activations

    latents = get_token_activations(llama, PROMPTS, layers=[1, 2])
    from_latents = patchscope_lens(llama, target_patch_prompts=repeat_prompt(), layers=[1, 2], latents=latents, tqdm=None)
    assert torch.allclose(from_latents, patchscope_lens(llama, PROMPTS, layers=[1, 2], tqdm=None), atol=1e-6)
    every_layer = get_token_activations(llama, PROMPTS)  # one row per model layer, layers picked from it
    assert torch.allclose(patchscope_lens(llama, None, repeat_prompt(), layers=[1, 2], latents=every_layer, tqdm=None), from_latents, atol=1e-6)
    with pytest.raises(ValueError, match="latents must be"):
        patchscope_lens(llama, None, repeat_prompt(), layers=[1, 2], latents=every_layer[:1])
    with pytest.raises(ValueError, match="both source_prompts and latents"):
        patchscope_lens(llama, PROMPTS, layers=[1, 2], latents=latents)
    with pytest.raises(ValueError, match="Number of sources"):
        patchscope_lens(llama, PROMPTS, [TargetPrompt("a", -1)] * 3)


def test_patchscope_generate_equals_hooked_greedy_generation(llama):
    sources = ["The capital of France is", "Hello world"]
    target = TargetPrompt("a b c d", 2)
    result = patchscope_generate(llama, sources, target, max_length=5, layers=[0, 2], tqdm=None)
    assert sorted(result) == [0, 2]
    ids = llama.tokenizer(target.prompt, return_tensors="pt").input_ids
    unpatched = llama._module.generate(ids, **llama.greedy_generation_kwargs(5))[0]
    assert any(not torch.equal(row[: len(unpatched)], unpatched) for rows in result.values() for row in rows)
    for layer in (0, 2):
        assert result[layer].shape[0] == 2
        for s, source in enumerate(sources):
            source_outputs, _, _ = alone(llama, source)
            patch = write_at(target.index_to_patch, source_outputs[layer][0, -1])
            first_pass = llama._module.model.layers[layer].register_forward_hook(
                lambda m, a, k, o: patch(m, a, k, o) if hidden_of(o).shape[1] > 1 else o, with_kwargs=True)  # prompt pass only
            try:
                expected = llama._module.generate(ids, **llama.greedy_generation_kwargs(5))[0]
            finally:
                first_pass.remove()
            row = result[layer][s]
            assert torch.equal(row[: len(expected)], expected), (layer, s)


def test_patch_object_attn_lens_equals_hooked_attention_input(llama):
    source, targets = "The capital of France is", ["x y z w", "Hello world"]
    result = patch_object_attn_lens(llama, source, targets, attn_idx_patch=1, num_patches=2, tqdm=None)
    assert result.shape == (2, llama.num_layers, llama.vocab_size)
    _, source_attention_inputs, _ = alone(llama, source)

    def replace_input(vector):
        def pre_hook(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[:, 1] = vector
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return pre_hook

    for t, target in enumerate(targets):
        for layer in range(llama.num_layers):
            hooks = [(llama._module.model.layers[l].self_attn, replace_input(source_attention_inputs[l][0, -1]))
                     for l in range(layer, min(llama.num_layers, layer + 2))]
            _, _, expected = alone(llama, target, hooks)
            assert torch.allclose(result[t, layer], expected, atol=1e-6), (t, layer)


def test_target_prompt_batches():
    batch = TargetPromptBatch.from_target_prompts([TargetPrompt("Hello", -1), TargetPrompt("World", 0)])
    assert len(batch) == 2 and batch.prompts == ["Hello", "World"] and torch.equal(batch.index_to_patch, torch.tensor([-1, 0]))
    assert [p.prompt for p in batch] == ["Hello", "World"] and batch[1] == TargetPrompt("World", 0)
    assert TargetPromptBatch.auto(TargetPrompt("Hi", -1), 3).prompts == ["Hi"] * 3
    assert TargetPromptBatch.auto(batch, 5) is batch and len(TargetPromptBatch.auto([TargetPrompt("a", 0)], 9)) == 1
    assert torch.equal(TargetPromptBatch.from_prompts("Hello", -1).index_to_patch, torch.tensor([-1]))
    assert TargetPromptBatch.from_target_prompt(TargetPrompt("T", 2), 2).index_to_patch.tolist() == [2, 2]
    with pytest.raises(ValueError, match="index_to_patch must be"):
        TargetPromptBatch.from_prompts(["a"], "x")
    with pytest.raises(ValueError, match="must be a str, a TargetPrompt"):
        TargetPromptBatch.auto(3, 1)


def test_repeat_prompts(smollm2):
    assert repeat_prompt() == TargetPrompt("king king\n1135 1135\nhello hello\n?", -1)
    assert repeat_prompt(["cat", "dog"], rel="->", sep=" | ", placeholder="X").prompt == "cat->cat | dog->dog | X"
    chat = it_repeat_prompt(smollm2.tokenizer)
    assert chat.index_to_patch == -1 and chat.prompt.rstrip().endswith("hello hello\n?")
    assert "<|im_start|>assistant" in chat.prompt
    bare = it_repeat_prompt(smollm2.tokenizer, words=["a"], complete_prompt=False, add_user_instr=False, use_system_prompt=False)
    assert "a a\n?" in bare.prompt and bare.prompt.rstrip().endswith("<|im_start|>assistant")


def test_steer_function_adds_the_vector_like_a_hook(llama, tiny_path):
    vector = torch.randn(llama.hidden_size)

    def add(module, args, kwargs, output):
        return (output[0] + 2 * vector, *output[1:]) if isinstance(output, tuple) else output + 2 * vector

    _, _, expected = alone(llama, PROMPTS[0], [(llama._module.model.layers[1], add)])
    plain = LanguageModel(str(tiny_path("llama")), dispatch=True)
    for model in (llama, plain):
        with torch.no_grad(), model.trace(PROMPTS[0]):
            steer(model, 1, vector, factor=2)
            logits = model.output.logits.save()
        assert torch.allclose(logits[0, -1].softmax(-1), expected, atol=1e-6), type(model).__name__
    with pytest.raises(ValueError, match="needs a StandardizedTransformer"):
        with torch.no_grad(), plain.trace(PROMPTS[0]):
            steer(plain, 1, vector, batch_index=0)


def test_topk_closest_tokens_finds_unembedding_row(smollm2):
    paris = smollm2.tokenizer.encode(" Paris")[0]
    row = smollm2._torch_module("lm_head").weight[paris]
    top = get_topk_closest_tokens(smollm2, row, k=3)
    assert top[0][0] == " Paris" and abs(top[0][1] - 1) < 1e-5


def test_heatmaps_are_written_as_png(llama, tmp_path):
    from nnterp.display import plot_logit_lens, plot_patching

    tokens = [5, 7, 9]
    lens = logit_lens(llama, PROMPTS[0], tokens=tokens)[0]
    plot_logit_lens(llama, lens, tokens, tmp_path / "lens.png")
    prompt = PROMPTS[0]
    patch = activation_patching(llama, prompt, prompt, 5, tqdm=None)
    plot_patching(llama, patch, prompt, tmp_path / "patch.png")
    for name in ("lens.png", "patch.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="expected a"):
        plot_logit_lens(llama, lens, tokens[:2])
