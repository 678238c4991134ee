"""Reads, writes, helpers and errors of the standardized surface, against plain HF forwards with hooks."""

import pytest
import torch
from torch import nn

from nnterp import RenameConfig, StandardizedTransformer
from nnterp.core.rename import UnknownArchitectureError

PROMPTS = ["The capital of France is", "Hello world"]


def hf_logits(model, hooks=()):
    """Logits of a plain HF forward on the trace's inputs, with (module, pre-hook or hook) pairs installed."""
    with torch.no_grad(), model.trace(PROMPTS):
        fed = model.inputs.save()
    handles = [register(module) for register, module in hooks]
    try:
        with torch.no_grad():
            return model._module(*fed[0], **fed[1]).logits
    finally:
        for handle in handles:
            handle.remove()


def replace_layer_output(fn):
    def register(module):
        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + output[1:]
            return fn(output)
        return module.register_forward_hook(hook)
    return register


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_steer_matches_hooked_hf_forward(fixture, request):
    model = request.getfixturevalue(fixture)
    vector = torch.randn(model.hidden_size)
    with torch.no_grad(), model.trace(PROMPTS):
        model.steer(layers=[0, 2], steering_vector=vector, factor=3.0, token_positions=-1)
        steered = model.logits.save()

    def add_last(h):
        h = h.clone()
        h[:, -1] += 3.0 * vector
        return h

    layers = model._torch_module("layers")
    expected = hf_logits(model, [(replace_layer_output(add_last), layers[0]), (replace_layer_output(add_last), layers[2])])
    assert torch.allclose(steered, expected, atol=1e-5)
    assert not torch.allclose(steered, hf_logits(model), atol=1e-3)


def test_layers_input_write_matches_hooked_hf_forward(llama):
    with torch.no_grad(), llama.trace(PROMPTS):
        llama.layers_input[1] = llama.layers_input[1] * 0.5
        written = llama.logits.save()

    def register(module):
        def pre(mod, args, kwargs):
            return (args[0] * 0.5,) + args[1:], kwargs
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    expected = hf_logits(llama, [(register, llama._torch_module("layers")[1])])
    assert torch.allclose(written, expected, atol=1e-5)


def test_attention_write_propagates_to_layer_output(llama):
    with torch.no_grad(), llama.trace(PROMPTS):
        stream_in = llama.layers_input[0].save()
        llama.attentions_output[0] = torch.zeros_like(llama.attentions_output[0])
        mlp_out = llama.mlps_output[0].save()
        stream_out = llama.layers_output[0].save()
    assert torch.allclose(stream_out, stream_in + mlp_out, atol=1e-6)


def test_mlp_input_is_post_attention_norm_of_mid_stream(llama):
    layer = llama._torch_module("layers")[0]
    with torch.no_grad(), llama.trace(PROMPTS):
        stream_in = llama.layers_input[0].save()
        attn_in = llama.attentions_input[0].save()
        attn_out = llama.attentions_output[0].save()
        mlp_in = llama.mlps_input[0].save()
    assert torch.allclose(attn_in, layer.input_layernorm(stream_in), atol=1e-6)
    assert torch.allclose(mlp_in, layer.post_attention_layernorm(stream_in + attn_out), atol=1e-6)


def test_skip_layers_passes_stream_through(llama):
    with torch.no_grad(), llama.trace(PROMPTS):
        stream_in = llama.token_embeddings.save()  # Llama feeds its embeddings straight into layer 0
        llama.skip_layers(0, 1)
        out1 = llama.layers_output[1].save()
        in2 = llama.layers_input[2].save()
    assert torch.equal(out1, stream_in) and torch.equal(in2, stream_in)


def test_project_on_vocab_is_logit_lens_at_last_layer(llama):
    with torch.no_grad(), llama.trace(PROMPTS):
        last = llama.layers_output[-1].save()
        logits = llama.logits.save()
    assert torch.allclose(llama.project_on_vocab(last), logits, atol=1e-5)


def test_sizes_match_config(llama):
    config = llama._module.config
    assert (llama.num_layers, llama.hidden_size, llama.num_heads, llama.vocab_size) == (
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.vocab_size)
    assert len(llama.attentions) == llama.num_layers and llama.attentions[0]._module is llama.layers[0].self_attn._module


def test_gpt2_modules_available_under_standard_names(gpt2):
    assert gpt2.names.layers == "transformer.h" and gpt2.names.self_attn == "attn"
    assert gpt2.layers[0].self_attn._module is gpt2._module.transformer.h[0].attn
    assert gpt2.ln_final._module is gpt2._module.transformer.ln_f


def test_layer_index_out_of_range_is_clear(llama):
    with pytest.raises(IndexError, match=r"layers_output\[7\] is out of range: the model has 3 layers"):
        with llama.trace(PROMPTS):
            llama.layers_output[7].save()


def test_wrong_shape_write_is_clear(llama):
    with pytest.raises(ValueError, match=r"layers_output\[1\].*shape mismatch.*\(2, \d+, 128\).*\(128,\)"):
        with llama.trace(PROMPTS):
            llama.layers_output[1] = torch.zeros(llama.hidden_size)


class OddModel(nn.Module):
    """A causal LM whose modules use names no alias table knows."""

    def __init__(self, vocab=50, width=16):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 2, "hidden_size": width, "vocab_size": vocab,
                                          "num_attention_heads": 2})()
        self.vocab_in = nn.Embedding(vocab, width)
        self.stack = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.unembed = nn.Linear(width, vocab)


def test_unknown_architecture_names_missing_modules_and_rename_config():
    """A missing final norm is not an error (ln_final is then the identity, which loading checks on a forward
    pass); missing embeddings or LM head are."""
    with pytest.raises(UnknownArchitectureError, match=r"\['embed_tokens', 'lm_head'\].*RenameConfig\("):
        from nnterp.core.rename import resolve_names

        resolve_names(OddModel())


def test_rename_config_overrides_and_reports_bad_path():
    from nnterp.core.rename import resolve_names

    names = resolve_names(OddModel(), RenameConfig(embed_tokens="vocab_in", ln_final="stack.1", lm_head="unembed"))
    assert names.layers == "stack" and names.embed_tokens == "vocab_in"
    with pytest.raises(UnknownArchitectureError, match="RenameConfig\\(lm_head='nope'\\)"):
        resolve_names(OddModel(), RenameConfig(lm_head="nope"))


def test_rename_config_on_real_model(tiny_path):
    model = StandardizedTransformer(str(tiny_path("llama")), rename=RenameConfig(ln_final="model.layers.2.input_layernorm"))
    assert model.names.ln_final == "model.layers.2.input_layernorm"
    assert model.ln_final._module is model._module.model.layers[2].input_layernorm


def test_parameter_translates_standard_paths(gpt2):
    native = gpt2._module.transformer.h[1].attn.c_attn.weight
    assert torch.equal(gpt2.parameter("layers.1.self_attn.c_attn.weight"), native)
    assert torch.equal(gpt2.parameter("transformer.h.1.attn.c_attn.weight"), native)
    assert gpt2.parameter("lm_head.weight").shape == (gpt2.vocab_size, gpt2.hidden_size)


def test_tied_model_without_lm_head_unembeds_with_its_embedding():
    """Engines such as vLLM's Cohere unembed with the tied input embedding and have no LM head module."""
    from nnterp.core.rename import resolve_names

    model = OddModel()
    del model.unembed
    with pytest.raises(UnknownArchitectureError, match="lm_head"):
        resolve_names(model, RenameConfig(embed_tokens="vocab_in", ln_final="stack.1"))
    model.config.tie_word_embeddings = True
    names = resolve_names(model, RenameConfig(embed_tokens="vocab_in", ln_final="stack.1"))
    assert names.lm_head == "vocab_in" and names.found_by["lm_head"] == "tied embeddings"


def test_layer_zero_input_without_residual_is_not_a_fresh_tensor():
    """vLLM's first decoder layer gets ``residual=None``: its input read is the engine's own buffer (which the
    fused add+RMSNorm of the next layer rewrites in place), so the read policy must clone it; later layers'
    ``hidden + residual`` is a fresh sum and is not cloned again."""
    from nnterp.core.layout import load_snapshot

    layout = load_snapshot("vllm", "LlamaForCausalLM").modules["layer:LlamaDecoderLayer"].input
    positions, hidden, residual = torch.arange(4), torch.randn(4, 8), torch.randn(4, 8)
    value, fresh = layout.read_stream((positions, hidden, None), {})
    assert value is hidden and not fresh
    value, fresh = layout.read_stream((positions, hidden, residual), {})
    assert fresh and torch.equal(value, hidden + residual)
    assert torch.equal(layout.read((positions, hidden, residual), {}), hidden + residual)
