"""Steering during greedy generation against a plain transformers decode loop with a forward hook."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nnterp.interventions import steered_generation

PROMPT = "The capital of France is"
LAYER_LISTS = {"llama": "model.layers", "gpt2": "transformer.h"}


def hooked_greedy(path, layers_path: str, layer: int, vector, max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy decoding by full forward passes (no cache), the vector added to one decoder layer's output by a hook."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")["input_ids"]

    def add(module, args, output):
        if vector is None:
            return output
        if isinstance(output, tuple):
            return (output[0] + vector,) + output[1:]
        return output + vector

    handle = model.get_submodule(layers_path)[layer].register_forward_hook(add)
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=tokens).logits[0, -1].argmax())
            generated.append(token)
            if token == eos:
                break
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    handle.remove()
    return generated


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_steered_generation_equals_hooked_decode_loop(model_type, tiny_path, request):
    model = request.getfixturevalue(model_type)
    path = str(tiny_path(model_type))
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(1)) * 20
    plain = steered_generation(model, PROMPT, max_new_tokens=6)
    steered = steered_generation(model, PROMPT, vector, layers=1, max_new_tokens=6)
    eos = model._module.generation_config.eos_token_id
    assert plain.tokens == hooked_greedy(path, LAYER_LISTS[model_type], 1, None, 6, eos)
    assert steered.tokens == hooked_greedy(path, LAYER_LISTS[model_type], 1, vector, 6, eos)
    assert steered.tokens != plain.tokens  # the vector is strong enough for the comparison to mean something
    assert steered.text == model.tokenizer.decode(steered.tokens)


def test_steering_several_layers_with_factor(llama, tiny_path):
    vector = torch.randn(llama.hidden_size, generator=torch.Generator().manual_seed(2)) * 10
    once = steered_generation(llama, PROMPT, vector, layers=[0, 2], factor=2.0, max_new_tokens=5)
    doubled = steered_generation(llama, PROMPT, 2 * vector, layers=[0, 2], max_new_tokens=5)
    assert once.tokens == doubled.tokens
    eos = llama._module.generation_config.eos_token_id
    reference = hooked_greedy(str(tiny_path("llama")), "model.layers", 0, 2 * vector, 5, eos)
    assert steered_generation(llama, PROMPT, vector, layers=[0], factor=2.0, max_new_tokens=5).tokens == reference


def test_generation_stops_at_end_of_sequence(llama):
    plain = steered_generation(llama, PROMPT, max_new_tokens=6).tokens
    stop = next(i for i, token in enumerate(plain) if i > 0 and token not in plain[:i])  # a token's first occurrence
    config = llama._module.generation_config
    original = config.eos_token_id
    config.eos_token_id = plain[stop]
    try:
        assert steered_generation(llama, PROMPT, max_new_tokens=6).tokens == plain[: stop + 1]
    finally:
        config.eos_token_id = original


def test_bad_steering_input_is_refused(llama):
    with pytest.raises(ValueError, match=r"shape \(128,\) \(the hidden size\), got \(64,\)"):
        steered_generation(llama, PROMPT, torch.zeros(64), layers=1)
    with pytest.raises(ValueError, match="at least 1"):
        steered_generation(llama, PROMPT, max_new_tokens=0)
    with pytest.raises(IndexError):
        steered_generation(llama, PROMPT, torch.zeros(llama.hidden_size), layers=7, max_new_tokens=2)


def test_one_greedy_decoding_everywhere_even_with_a_forced_end_of_sequence(tiny_path):
    """MBart's checkpoint forces the end-of-sequence token at the length limit (``forced_eos_token_id``), a logit
    processor transformers fills into any GenerationConfig it is given. Every nnterp greedy decoding (generate
    with greedy_generation_kwargs, the tokens each step picks, steered_generation, extract) gives the raw argmax
    tokens of a plain decode loop."""
    import nnsight

    from nnterp import StandardizedTransformer

    path = str(tiny_path("mbart"))
    model = StandardizedTransformer(path)
    assert model._module.generation_config.forced_eos_token_id is not None, "the case this test is about"
    eos = model._module.generation_config.eos_token_id
    expected = hooked_greedy(path, "model.decoder.layers", 0, None, 3, eos)
    prompt_length = len(model.tokenizer(PROMPT)["input_ids"])
    with torch.no_grad(), model.generate(PROMPT, **model.greedy_generation_kwargs(3)) as tracer:
        generated = tracer.result.save()
    with torch.no_grad(), model.generate(PROMPT, **model.greedy_generation_kwargs(3)) as tracer:
        steps = nnsight.save([])
        for _ in tracer.iter[:]:
            steps.append(int(model.step_token[0]))
    assert generated[0, prompt_length:].tolist() == expected
    assert list(steps) == expected
    assert steered_generation(model, PROMPT, max_new_tokens=3).tokens == expected
    assert next(iter(model.extract([PROMPT], max_new_tokens=3, progress=False))).generated == expected
