"""run_with_cache, its decompositions and per-head results, against forward hooks on the raw HF model run on each
prompt alone and manual computation."""

import pytest
import torch
from hf_reference import logits_with_hook

from nnterp import StandardizedTransformer

PROMPTS = ["The capital of France is", "Hi", "One two three"]
NAMES = {"layers_input": [0], "attentions_output": None, "mlps_output": None, "layers_output": None,
         "heads_output": None}


def first(value):
    return value[0] if isinstance(value, tuple) else value


def raw_reads(model, prompt):
    """Per-prompt reference: hooks on the raw torch modules of one unpadded forward pass."""
    raw = model._module
    layers = model._torch_module("layers")
    seen, handles = {}, []

    def keep(key, pre=False):
        if pre:
            return lambda module, args, kwargs: seen.__setitem__(key, (args[0] if args else kwargs["hidden_states"]).detach().clone())
        return lambda module, args, output: seen.__setitem__(key, first(output).detach().clone())

    for index, layer in enumerate(layers):
        attention = next(getattr(layer, n) for n in ("self_attn", "attn", "self_attention") if hasattr(layer, n))
        mlp = layer.mlp
        projection = next(getattr(attention, name) for name in ("o_proj", "c_proj", "dense") if hasattr(attention, name))
        handles += [layer.register_forward_pre_hook(keep(("layers_input", index), True), with_kwargs=True),
                    layer.register_forward_hook(keep(("layers_output", index))),
                    attention.register_forward_hook(keep(("attentions_output", index))),
                    mlp.register_forward_hook(keep(("mlps_output", index))),
                    projection.register_forward_pre_hook(keep(("o_proj_input", index), True), with_kwargs=True)]
    try:
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            seen["logits"] = raw(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return {key: value[0] for key, value in seen.items()}


@pytest.fixture(scope="module", params=["llama", "gpt2", "falcon"])
def cached(request, tiny_path):
    model = StandardizedTransformer(str(tiny_path(request.param)))
    logits, cache = model.run_with_cache(PROMPTS, names=NAMES)
    return model, logits, cache, [raw_reads(model, prompt) for prompt in PROMPTS]


def test_cache_equals_each_prompt_alone(cached):
    model, logits, cache, references = cached
    assert cache.attention_mask.sum(-1).tolist() == [len(r["logits"]) for r in references]
    for row, reference in enumerate(references):
        real = cache.attention_mask[row].bool()
        assert torch.allclose(logits[row][real], reference["logits"], atol=1e-4)
        assert not logits[row][~real].any() and not cache["layers_output", 0][row][~real].any()  # zero padding
        for index in range(model.num_layers):
            for name in ("attentions_output", "mlps_output", "layers_output"):
                assert torch.allclose(cache.per_prompt(name, index)[row], reference[name, index], atol=1e-4), (name, index)
            heads = cache.per_prompt("heads_output", index)[row]
            assert torch.allclose(heads.flatten(-2), reference["o_proj_input", index], atol=1e-5)
        assert torch.allclose(cache.per_prompt("layers_input", 0)[row], reference["layers_input", 0], atol=1e-5)


def test_accumulated_resid_is_the_logit_lens(cached):
    model, _, cache, references = cached
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert len(labels) == model.num_layers + 1 and stack.shape[0] == model.num_layers + 1
    norm = model._torch_module("ln_final")
    for row, reference in enumerate(references):
        streams = [reference["layers_input", 0]] + [reference["layers_output", i] for i in range(model.num_layers)]
        real = cache.attention_mask[row].bool()
        for component, stream in enumerate(streams):
            with torch.no_grad():
                assert torch.allclose(stack[component, row][real], norm(stream), atol=1e-4)
    partial = cache.accumulated_resid(layer=1)
    assert partial.shape[0] == 2 and torch.equal(partial[1], cache["layers_output", 0])


def test_decompose_resid_sums_to_the_stream_and_the_logits(cached):
    model, logits, cache, references = cached
    components, labels = cache.decompose_resid(return_labels=True)
    assert labels[:3] == ["layers_input_0", "attentions_output_0", "mlps_output_0"]
    assert torch.allclose(components.sum(0), cache["layers_output", -1], atol=1e-4)
    norm, head = model._torch_module("ln_final"), model._torch_module("lm_head")
    normed = cache.decompose_resid(apply_ln=True)
    bias = norm.bias if getattr(norm, "bias", None) is not None else torch.zeros(model.hidden_size)
    tokens = logits[:, -1].argmax(-1)
    attributions = cache.logit_attrs(normed, tokens)
    for row, reference in enumerate(references):
        real = cache.attention_mask[row].bool()
        with torch.no_grad():
            manual = norm(reference["layers_output", model.num_layers - 1])
            assert torch.allclose(normed[:, row][:, real].sum(0) + bias, manual, atol=1e-4)
            direction = head.weight[tokens[row]]
            expected = reference["logits"][:, tokens[row]] - bias @ direction
            expected = expected - (head.bias[tokens[row]] if getattr(head, "bias", None) is not None else 0)
        assert torch.allclose(attributions[:, row][:, real].sum(0), expected, atol=1e-4)
    against = cache.logit_attrs(normed, tokens, incorrect_tokens=tokens)
    assert not against.any()


def test_head_results_sum_to_the_projection(cached):
    model, _, cache, references = cached
    results, labels = cache.stack_head_results(return_labels=True)
    heads = cache["heads_output", 0].shape[2]
    assert labels[heads] == "L1H0" and results.shape[0] == heads * model.num_layers
    for index in range(model.num_layers):
        projection = model.attentions[index]._module
        projection = next(getattr(projection, n) for n in ("o_proj", "c_proj", "dense") if hasattr(projection, n))
        for row, reference in enumerate(references):
            real = cache.attention_mask[row].bool()
            with torch.no_grad():
                full = projection(reference["o_proj_input", index])
                bias = projection.bias if getattr(projection, "bias", None) is not None else 0
            summed = results[index * heads:(index + 1) * heads, row][:, real].sum(0)
            assert torch.allclose(summed + bias, full, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_ablating_one_head_equals_a_hook_on_the_raw_model(tiny_path, model_type):
    model = StandardizedTransformer(str(tiny_path(model_type)))
    head_dim = model.heads_output.head_dim()
    with torch.no_grad(), model.trace(PROMPTS[0]):
        heads = model.heads_output[1]
        ablated = heads.clone()
        ablated[:, :, 2] = 0
        model.heads_output[1] = ablated
        per_head = model.head_results(1).save()
        logits = model.logits.save()
    attention = model.attentions[1]._module
    projection = next(getattr(attention, n) for n in ("o_proj", "c_proj", "dense") if hasattr(attention, n))

    def zero_head(module, args):
        value = args[0].clone()
        value[..., 2 * head_dim:3 * head_dim] = 0
        return (value, *args[1:])

    reference = logits_with_hook(model, projection, zero_head, PROMPTS[0], pre=True)
    assert torch.allclose(logits, reference, atol=1e-5)
    assert not per_head[:, :, 2].any() and per_head[:, :, 1].abs().sum() > 0


def test_bad_requests_are_named(tiny_path, llama):
    with pytest.raises(ValueError, match="unknown accessor 'resid_post'"):
        llama.run_with_cache("Hi", names=["resid_post"])
    _, cache = llama.run_with_cache("Hi", names=["layers_output"])
    with pytest.raises(KeyError, match="was not cached"):
        cache["mlps_output", 0]
    with pytest.raises(KeyError, match=r"index with \(accessor, layer\)"):
        cache["layers_output"]
    with pytest.raises(KeyError, match="heads_output was not cached"):
        cache.stack_head_results()
    gemma = StandardizedTransformer(str(tiny_path("gemma2")))
    _, cache = gemma.run_with_cache("Hi")
    with pytest.raises(ValueError, match="layer 0's output is not its input plus its attention and MLP outputs"):
        cache.decompose_resid()
    opt = StandardizedTransformer(str(tiny_path("opt")))  # its layers compute the MLP inline
    _, cache = opt.run_with_cache(["Hi", "One two three"])
    assert cache.names() == ["layers_input", "attentions_output", "layers_output"]
    with pytest.raises(ValueError, match="layers have no mlp module"):
        cache.decompose_resid()
    with pytest.raises(TypeError, match="one integer layer index"), gemma.trace("Hi"):
        gemma.heads_output["0"]


def test_every_refusal_names_the_problem(llama, tiny_path):
    from nnterp.core.heads import output_projection_name
    from nnterp.interventions import splice
    from test_sae import TinySAE

    _, cache = llama.run_with_cache(PROMPTS)
    with pytest.raises(ValueError, match="mode is 'all', 'attn' or 'mlp', got 'heads'"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(IndexError, match=r"layer 7 is out of range: 0\.\.3"):
        cache.accumulated_resid(layer=7)
    with pytest.raises(KeyError, match="no cached layer of it below 3"):
        cache.stack_activation("heads_output")
    with pytest.raises(ValueError, match="' Paris is' is 2 tokens; give one token"):
        cache.logit_attrs(cache.decompose_resid(), " Paris is")
    with pytest.raises(ValueError, match="2 tokens for 3 prompts"):
        cache.logit_attrs(cache.decompose_resid(), [1, 2])
    cache.final_norm = lambda stack: torch.tanh(stack)  # a norm that is not a weight over one scale per token
    with pytest.raises(ValueError, match="is not a LayerNorm or RMSNorm"):
        cache.apply_ln_to_stack(cache.decompose_resid())
    with pytest.raises(AttributeError, match=r"heads_output\[0\]: the attention module \(Module\) has no output projection"):
        output_projection_name(torch.nn.Module(), "heads_output[0]")
    from types import SimpleNamespace

    from nnterp.core.heads import HeadsAccessor

    bare = HeadsAccessor(SimpleNamespace(_text_config=SimpleNamespace(), num_heads=None, hidden_size=128))
    with pytest.raises(ValueError, match="the config gives neither head_dim nor the number of heads"):
        bare.head_dim()
    with pytest.raises(ValueError, match="not a multiple of head_dim 32"):
        llama.heads_output._split(torch.zeros(1, 30), "heads_output[0]")
    with pytest.raises(ValueError, match="'embed_tokens' is not a stream accessor"), llama.trace("Hi"):
        splice(llama, "embed_tokens", 0, TinySAE(llama.hidden_size))
    with pytest.raises(ValueError, match=r"the features have shape \(1, 2, 16\), the new value \(1, 2, 3\)"):
        with llama.trace("Hi"):
            spliced = splice(llama, "layers_output", 0, TinySAE(llama.hidden_size))
            spliced.features = torch.zeros(1, 2, 3)
