"""Plain text prompts of a trace are tokenized in one call: the model inputs equal nnsight's, which tokenizes each
prompt through the pipeline on its own."""

import pytest
import torch
from nnsight.modeling import processing

from nnterp.backends.hf.text_batch import batch_text_prompts

PROMPTS = ["The capital of France is", "Hello", "A cat sat on the mat; the dog ran in the park. One two three"]


def invokes_of(*inputs):
    return [((data,), {}) for data in inputs]


@pytest.mark.parametrize("fixture", ["llama", "gpt2", "smollm2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("inputs", [(PROMPTS[0],), (PROMPTS,), (PROMPTS[0], PROMPTS[1:]), (PROMPTS[1], PROMPTS[1])],
                         ids=["one", "list", "mixed", "equal"])
def test_inputs_equal_nnsight_per_prompt(request, fixture, side, inputs):
    model = request.getfixturevalue(fixture)
    saved, model.tokenizer.padding_side = model.tokenizer.padding_side, side
    try:
        invokes = invokes_of(*inputs)
        ours = batch_text_prompts(model, invokes)
        args, reference = processing.batch_forward(model, invokes)
    finally:
        model.tokenizer.padding_side = saved
    assert ours is not None and args == ()
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("invokes", [
    [(("The capital",), {"max_length": 2})],                       # an argument the pipeline takes
    [(({"input_ids": torch.tensor([[5, 6, 7]])},), {})],           # token ids
    [((PROMPTS[0],), {}), ((), {})],                               # an invoke without input
    [(([[5, 6, 7]],), {})],                                        # ids as lists
])
def test_other_inputs_are_left_to_nnsight(llama, invokes):
    assert batch_text_prompts(llama, invokes) is None


def test_a_pipeline_with_a_prefix_is_left_to_nnsight(llama, monkeypatch):
    monkeypatch.setattr(processing, "sanitize", lambda model, kwargs: ({"prefix": "<s>"}, {}, {}))
    assert batch_text_prompts(llama, invokes_of(PROMPTS[0])) is None


def test_trace_of_several_invokes_reads_each_prompt_as_alone(gpt2):
    """Left-padded absolute-position model, two invokes: each prompt's last-layer stream at its last token equals
    the raw model run on that prompt alone."""
    saved, gpt2.tokenizer.padding_side = gpt2.tokenizer.padding_side, "left"
    try:
        with torch.no_grad(), gpt2.trace() as tracer:
            with tracer.invoke(PROMPTS[1]):
                short = gpt2.layers_output[gpt2.num_layers - 1][:, -1].save()
            with tracer.invoke([PROMPTS[2]]):
                long = gpt2.layers_output[gpt2.num_layers - 1][:, -1].save()
    finally:
        gpt2.tokenizer.padding_side = saved
    last_block = gpt2._module.transformer.h[-1]
    for prompt, value in ((PROMPTS[1], short), (PROMPTS[2], long)):
        seen = []
        handle = last_block.register_forward_hook(lambda module, args, output: seen.append(
            output[0] if isinstance(output, tuple) else output))
        try:
            with torch.no_grad():
                gpt2._module(**gpt2.tokenizer(prompt, return_tensors="pt"))
        finally:
            handle.remove()
        torch.testing.assert_close(value, seen[0][:, -1], rtol=1e-4, atol=1e-4)
