"""nnterp.nnsight_utils against forward hooks on the raw torch model, each prompt run alone."""

import pytest
import torch
from nnsight import LanguageModel

from nnterp.nnsight_utils import (
    ModuleAccessor,
    collect_last_token_activations_session,
    collect_token_activations_batched,
    compute_next_token_probs,
    get_attention,
    get_attention_output,
    get_embed_tokens,
    get_layer,
    get_layer_input,
    get_layer_output,
    get_layers,
    get_logits,
    get_mlp,
    get_mlp_output,
    get_next_token_probs,
    get_num_layers,
    get_token_activations,
    get_unembed,
    get_unembed_norm,
    project_on_vocab,
    set_layer_output,
)

PROMPTS = ["Hello", "The capital of France is", "a b c d e f g h"]


def first(value):
    return value[0] if isinstance(value, tuple) else value


def hooked_run(raw, layers_path: str, prompt: str, tokenizer, children=("self_attn", "mlp"), replace=None):
    """One prompt alone through the raw HF model: each layer's input and output, its children's outputs
    (forward hooks, cloned at hook time) and the logits. ``replace``: ``{layer: tensor}`` layer outputs."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    seen, handles = {}, []
    for i, layer in enumerate(raw.get_submodule(layers_path)):
        def hook(module, args, kwargs, output, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[("in", i)] = hidden.detach().clone()
            if replace and i in replace:
                output = (replace[i], *output[1:]) if isinstance(output, tuple) else replace[i]
            seen[("out", i)] = first(output).detach().clone()
            return output
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        for child in children:
            if child and hasattr(layer, child):
                handles.append(getattr(layer, child).register_forward_hook(
                    lambda m, a, o, key=(child, i): seen.__setitem__(key, first(o).detach().clone())))
    try:
        with torch.no_grad():
            seen["logits"] = raw(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.fixture(scope="module")
def plain_gpt2(tiny_path):
    return LanguageModel(str(tiny_path("gpt2")), dispatch=True)


def test_getters_on_standardized_model_read_what_hooks_see(llama):
    raw = llama._module
    ref = hooked_run(raw, "model.layers", PROMPTS[1], llama.tokenizer)
    reads = {}  # an outer object: filled by the trace body
    with torch.no_grad(), llama.trace(PROMPTS[1]):
        for i in range(get_num_layers(llama)):
            reads["in", i] = get_layer_input(llama, i).save()
            reads["self_attn", i] = get_attention_output(llama, i).save()
            reads["mlp", i] = get_mlp_output(llama, i).save()
            reads["out", i] = get_layer_output(llama, i).save()
        logits = get_logits(llama).save()
        probs = get_next_token_probs(llama).save()
    assert get_num_layers(llama) == 3
    for key, value in reads.items():
        assert torch.allclose(value, ref[key], atol=1e-6), key
    assert torch.allclose(logits, ref["logits"], atol=1e-6)
    assert torch.allclose(probs, ref["logits"][:, -1].softmax(-1), atol=1e-6)
    assert get_layers(llama)[1]._module is raw.model.layers[1] and get_layer(llama, -1)._module is raw.model.layers[2]
    assert get_attention(llama, 0)._module is raw.model.layers[0].self_attn and get_mlp(llama, 2)._module is raw.model.layers[2].mlp
    assert get_embed_tokens(llama)._module is raw.model.embed_tokens
    assert get_unembed_norm(llama)._module is raw.model.norm and get_unembed(llama)._module is raw.lm_head


def test_getters_on_plain_language_model_of_gpt2(plain_gpt2):
    raw = plain_gpt2._module
    ref = hooked_run(raw, "transformer.h", PROMPTS[1], plain_gpt2.tokenizer, children=("attn", "mlp"))
    with torch.no_grad(), plain_gpt2.trace(PROMPTS[1]):
        layer_in = get_layer_input(plain_gpt2, 1).save()
        attn = get_attention_output(plain_gpt2, 1).save()
        mlp = get_mlp_output(plain_gpt2, 1).save()
        out = get_layer_output(plain_gpt2, 1).save()
        projected = project_on_vocab(plain_gpt2, out).save()
        probs = get_next_token_probs(plain_gpt2).save()
    assert torch.allclose(layer_in, ref["in", 1]) and torch.allclose(out, ref["out", 1])
    assert torch.allclose(attn, ref["attn", 1]) and torch.allclose(mlp, ref["mlp", 1])
    assert get_num_layers(plain_gpt2) == 3 and get_layer(plain_gpt2, 0)._module is raw.transformer.h[0]
    manual = raw.lm_head(raw.transformer.ln_f(ref["out", 1]))
    assert torch.allclose(projected, manual, atol=1e-6)
    assert torch.allclose(probs, ref["logits"][:, -1].softmax(-1), atol=1e-6)


def test_project_on_vocab_is_norm_then_head(llama):
    hidden = torch.randn(2, 5, llama.hidden_size)
    with torch.no_grad():
        assert torch.allclose(project_on_vocab(llama, hidden), llama._module.lm_head(llama._module.model.norm(hidden)), atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_set_layer_output_equals_hooked_replacement(model_type, tiny_path, request):
    standardized = request.getfixturevalue(model_type)
    plain = LanguageModel(str(tiny_path(model_type)), dispatch=True)
    layers_path = standardized.names.layers
    base = hooked_run(standardized._module, layers_path, PROMPTS[0], standardized.tokenizer)
    ref = hooked_run(standardized._module, layers_path, PROMPTS[0], standardized.tokenizer, replace={1: base["out", 0]})
    for model in (standardized, plain):
        with torch.no_grad(), model.trace(PROMPTS[0]):
            set_layer_output(model, 1, get_layer_output(model, 0))
            logits = get_logits(model).save()
        assert torch.allclose(logits, ref["logits"], atol=1e-5), type(model).__name__
        assert not torch.allclose(logits, base["logits"], atol=1e-3)


def alone_at(model, prompt, layers, index):
    """Layer outputs of ``prompt`` run alone at its token ``index``: ``[len(layers), hidden]``."""
    ref = hooked_run(model._module, model.names.layers, prompt, model.tokenizer)
    return torch.stack([ref["out", layer % model.num_layers][0, index] for layer in layers])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("idx", [None, -2, 0, 1])
def test_token_activations_are_each_prompts_own_token(llama, side, idx):
    llama.tokenizer.padding_side = side
    try:
        layers = [2, 0, -1]
        acts = get_token_activations(llama, PROMPTS, layers=layers, idx=idx)
    finally:
        llama.tokenizer.padding_side = "left"
    assert acts.shape == (3, len(PROMPTS), llama.hidden_size) and acts.device.type == "cpu"
    for p, prompt in enumerate(PROMPTS):
        assert torch.allclose(acts[:, p], alone_at(llama, prompt, layers, -1 if idx is None else idx), atol=1e-5)


def test_token_index_past_a_prompt_is_refused_naming_it(llama):
    length = len(llama.tokenizer(PROMPTS[0]).input_ids)
    with pytest.raises(IndexError, match=f"token index {length} is out of range for prompt 0 of this batch, which has {length} tokens"):
        get_token_activations(llama, PROMPTS, idx=length)


def test_batched_collection_equals_one_batch_and_shows_progress(llama):
    whole = get_token_activations(llama, PROMPTS * 2)
    calls = []

    def progress(iterable, desc=None):
        calls.append(desc)
        return iterable

    batched = collect_token_activations_batched(llama, PROMPTS * 2, batch_size=4, tqdm=progress)
    session = collect_last_token_activations_session(llama, PROMPTS * 2, batch_size=1, layers=[0, 1])
    assert batched.shape == whole.shape == (llama.num_layers, 6, llama.hidden_size)
    assert torch.allclose(batched, whole, atol=1e-5) and torch.allclose(session, whole[:2], atol=1e-5)
    assert calls == ["Collecting activations"]


def test_activations_inside_an_open_trace(llama):
    with torch.no_grad(), llama.trace(PROMPTS) as tracer:
        acts = get_token_activations(llama, layers=[0, 2], tracer=tracer).save()
    assert torch.allclose(acts, get_token_activations(llama, PROMPTS, layers=[0, 2]), atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_next_token_probs_are_each_prompts_last_token(llama, side):
    llama.tokenizer.padding_side = side
    try:
        probs = compute_next_token_probs(llama, PROMPTS)
    finally:
        llama.tokenizer.padding_side = "left"
    for p, prompt in enumerate(PROMPTS):
        ids = llama.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            alone = llama._module(ids).logits[0, -1].softmax(-1)
        assert torch.allclose(probs[p], alone, atol=1e-6)


def test_plain_model_refuses_last_position_of_right_padded_batch(plain_gpt2):
    plain_gpt2.tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="right-padded batch"):
            with torch.no_grad(), plain_gpt2.trace(PROMPTS):
                get_next_token_probs(plain_gpt2).save()
        probs = compute_next_token_probs(plain_gpt2, PROMPTS)  # reads each prompt's last real token instead
    finally:
        plain_gpt2.tokenizer.padding_side = "left"
    ids = plain_gpt2.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(probs[0], plain_gpt2._module(ids).logits[0, -1].softmax(-1), atol=1e-6)


def test_module_accessor_gives_the_raw_modules(llama, tiny_path):
    raw = llama._module
    accessor = ModuleAccessor(raw, rename={"model.rotary_emb": "rope"})
    assert accessor.get_embed_tokens() is raw.model.embed_tokens and accessor.get_layers() is raw.model.layers
    assert accessor.get_attention(1) is raw.model.layers[1].self_attn and accessor.get_mlp(2) is raw.model.layers[2].mlp
    assert accessor.get_unembed_norm() is raw.model.norm and accessor.get_unembed() is raw.lm_head
    assert accessor.rope is raw.model.rotary_emb and accessor.layers is raw.model.layers
    with pytest.raises(AttributeError, match="not a module"):
        accessor.nothing_here
