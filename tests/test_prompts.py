"""nnterp.prompt_utils: first tokens, prompts with targets, and batched runs against each prompt alone."""

import pytest
import torch

from nnterp.prompt_utils import Prompt, TokenizationError, get_first_tokens, next_token_probs_unsqueeze, run_prompts

WORDS = ["Paris", "Rome", "France"]


def alone_probs(model, prompt):
    with torch.no_grad():
        return model._module(model.tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].softmax(-1)


def test_first_tokens_cover_both_spellings(smollm2):
    tokenizer = smollm2.tokenizer
    tokens = get_first_tokens(WORDS, smollm2)
    expected = []
    for word in WORDS:
        expected += [tokenizer.encode(word, add_special_tokens=False)[0], tokenizer.encode(" " + word, add_special_tokens=False)[0]]
    assert tokens == list(dict.fromkeys(expected)) and len(tokens) == 6
    assert get_first_tokens("Paris", tokenizer) == tokens[:2]
    assert get_first_tokens("Paris", tokenizer, use_hacky_implementation=True) == tokens[:2]


def test_first_tokens_with_a_prefix_space_tokenizer_read_the_bare_word_after_a_pear():
    import copy

    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nnterp.testing.tokenizer import SPECIAL_TOKENS, _trained, build_tokenizer

    plain = build_tokenizer()
    backend = copy.deepcopy(_trained(320))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    spaced = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    words = ["Paris", "Rome", "capital"]
    assert spaced("Paris", add_special_tokens=False).input_ids == spaced(" Paris", add_special_tokens=False).input_ids
    assert plain("Paris", add_special_tokens=False).input_ids != plain(" Paris", add_special_tokens=False).input_ids
    assert get_first_tokens(words, spaced) == get_first_tokens(words, plain)


def test_first_tokens_refuse_a_tokenizer_they_cannot_read():
    class Merging:  # merges the pear into the word: the bare spelling cannot be isolated
        def __call__(self, text, add_special_tokens=False):
            from types import SimpleNamespace

            return SimpleNamespace(input_ids=[hash(text.strip()) % 1000])

    with pytest.raises(TokenizationError):
        get_first_tokens("Paris", Merging())


def test_prompt_from_strings_and_target_probs(smollm2):
    prompt = Prompt.from_strings("The capital of France is", "Paris", smollm2)
    assert prompt.prompt == "The capital of France is" and prompt.target_strings == {"target": "Paris"}
    assert prompt.target_tokens == {"target": get_first_tokens("Paris", smollm2)}
    both = Prompt.from_words("x", {"city": ["Paris", "Rome"], "country": "France"}, smollm2.tokenizer)
    probs = torch.rand(2, 3, smollm2.vocab_size)
    target_probs = both.get_target_probs(probs)
    assert target_probs["city"].shape == (2, 3)
    assert torch.allclose(target_probs["city"], probs[:, :, both.target_tokens["city"]].sum(-1))
    assert torch.equal(both.get_target_probs(probs, layer=1)["country"], target_probs["country"][:, 1])
    with pytest.raises(ValueError, match=r"\[batch, layers, vocab\]"):
        both.get_target_probs(probs[0])


def test_collisions_between_targets(smollm2):
    prompt = Prompt.from_strings("Hello", {"greeting": "hello", "punctuation": ".", "greeting2": "hello"}, smollm2)
    assert not prompt.has_no_collisions()
    assert prompt.has_no_collisions(ignore_targets="greeting")
    assert prompt.has_no_collisions(ignore_targets=["greeting", "punctuation"])


def test_prompt_run_with_logit_lens(smollm2):
    from nnterp.interventions import logit_lens

    prompt = Prompt.from_strings("The capital of France is", {"paris": "Paris"}, smollm2)
    result = prompt.run(smollm2, logit_lens)
    assert result["paris"].shape == (1, smollm2.num_layers)
    assert torch.allclose(result["paris"][0, -1], alone_probs(smollm2, prompt.prompt)[prompt.target_tokens["paris"]].sum(), atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_run_prompts_equals_each_prompt_alone(smollm2, side):
    texts = ["The capital of France is", "Rome is the capital of", "Paris"]
    prompts = [Prompt.from_strings(text, {"paris": "Paris", "italy": "Italy"}, smollm2) for text in texts]
    smollm2.tokenizer.padding_side = side
    try:
        result = run_prompts(smollm2, prompts, batch_size=2, tqdm=None)
    finally:
        smollm2.tokenizer.padding_side = "left"
    assert set(result) == {"paris", "italy"} and result["paris"].shape == (3, 1)
    for i, prompt in enumerate(prompts):
        probs = alone_probs(smollm2, prompt.prompt)
        for target, tokens in prompt.target_tokens.items():
            assert torch.allclose(result[target][i, 0], probs[tokens].sum(), atol=1e-5), (i, target)
    assert result["paris"][0, 0] > 0.5 and result["italy"][1, 0] > result["paris"][1, 0]


def test_run_prompts_layouts_interventions_and_errors(llama):
    from nnterp.interventions import logit_lens

    prompts = [Prompt("Hello world", {"a": [5, 6]}), Prompt("The quick brown", {"a": [7]})]
    assert next_token_probs_unsqueeze(llama, "Hello world").shape == (1, 1, llama.vocab_size)
    per_layer = run_prompts(llama, prompts, batch_size=1, get_probs_func=lambda m, batch, **_: logit_lens(m, batch), tqdm=None)
    assert per_layer["a"].shape == (2, llama.num_layers)
    plain = run_prompts(llama, prompts, tqdm=None)
    assert torch.allclose(per_layer["a"][:, -1], plain["a"][:, 0], atol=1e-6)
    vector = torch.randn(llama.hidden_size) * 10
    steered = run_prompts(llama, prompts, intervention=lambda m: m.steer(1, vector), tqdm=None)

    def add(module, args, output):
        return output + vector

    handle = llama._module.model.layers[1].register_forward_hook(add)
    try:
        expected = torch.stack([alone_probs(llama, p.prompt)[p.target_tokens["a"]].sum() for p in prompts])
    finally:
        handle.remove()
    assert torch.allclose(steered["a"][:, 0], expected, atol=1e-6) and not torch.allclose(steered["a"], plain["a"], atol=1e-4)
    assert run_prompts(llama, []) == {}
    with pytest.raises(ValueError, match="same target keys"):
        run_prompts(llama, [prompts[0], Prompt("x", {"b": [1]})])
    with pytest.raises(ValueError, match="own get_probs_func"):
        run_prompts(llama, prompts, get_probs_func=logit_lens, intervention=lambda m: None)


def test_prompts_module_is_prompt_utils():
    import nnterp.prompt_utils as prompt_utils
    import nnterp.prompts as prompts

    assert prompts.Prompt is prompt_utils.Prompt and prompts.run_prompts is prompt_utils.run_prompts
