"""Model structures beyond the pre-norm decoder: no final norm, hybrid stacks whose layers differ, state-space
and recurrent blocks. Each is checked against the raw torch modules (forward hooks) or a plain HF forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nnterp import StandardizedTransformer
from nnterp.core.rename import IDENTITY, UnknownArchitectureError
from nnterp.validation import validate

PROMPTS = ["The capital of France is", "Hello"]


def hooked_stream(model: StandardizedTransformer, prompts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's first positional/keyword hidden input and first hidden-width output, from hooks on the raw
    torch modules of a plain forward (no nnsight)."""
    torch_model = model._module
    layers = torch_model.get_submodule(model.names.layers)
    inputs, outputs = [], []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else next(iter(kwargs.values()))
        inputs.append(hidden.detach().clone())
        value = output if isinstance(output, torch.Tensor) else output[0]
        outputs.append(value.detach().clone())

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        batch = model.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            torch_model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def read_stream(model: StandardizedTransformer, prompts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ins, outs = [], []
    with torch.no_grad(), model.trace(prompts):
        for i in range(model.num_layers):
            ins.append(model.layers_input[i].save())
            outs.append(model.layers_output[i].save())
    return ins, outs


@pytest.mark.parametrize("model_type", ["bert", "openai-gpt", "bart"])
def test_model_without_final_norm_has_identity_ln_final(model_type, tiny_path):
    """Post-norm models have no final norm: ln_final is the identity, reported as such, and the logit lens of
    the last layer reproduces the logits (BERT's head keeps its own transform inside lm_head)."""
    model = StandardizedTransformer(str(tiny_path(model_type)), check_layout=False)
    assert model.names.ln_final is None and model.names.found_by["ln_final"] == IDENTITY
    with torch.no_grad(), model.trace(PROMPTS):
        last = model.layers_output[-1].save()
        final = model.ln_final.output.save()
        logits = model.logits.save()
    assert torch.equal(final, last)
    assert torch.allclose(model.project_on_vocab(last), logits, atol=1e-5)
    assert validate(model).passed
    with pytest.raises(AttributeError, match="no final norm"):
        model.parameter("ln_final.weight")
    with pytest.raises(AttributeError, match=r"Assign model.layers_output\[-1\]"):
        model.ln_final.output = last


def test_unrecognised_final_norm_is_refused_not_treated_as_identity(tiny_path):
    """A final norm under a name no alias or structural rule knows: the LM head then reads something other than
    the last layer's output, and loading says so instead of using an identity that would be wrong."""
    path = tiny_path("llama")
    torch_model = AutoModelForCausalLM.from_pretrained(str(path))
    inner = torch_model.model
    inner.add_module("mix", inner._modules.pop("norm"))

    class MixModel(type(inner)):
        """Llama whose final norm is registered as `mix` (its forward borrows it under the usual name)."""

        def forward(self, *args, **kwargs):
            self._modules["norm"] = self.mix
            try:
                return super().forward(*args, **kwargs)
            finally:
                del self._modules["norm"]

    inner.__class__ = MixModel
    with pytest.raises(UnknownArchitectureError, match=r"does not read the last layer's output.*RenameConfig\(ln_final="):
        StandardizedTransformer(torch_model, tokenizer=AutoTokenizer.from_pretrained(str(path)), check_layout=False)


def test_hybrid_stack_maps_each_layers_mixer(tiny_path):
    """GraniteMoeHybrid sets `self_attn` on every layer (None on state-space layers, whose mixer is `mamba`):
    attentions[i] is whichever mixer layer i runs, and no rename hides the attention layers."""
    model = StandardizedTransformer(str(tiny_path("granitemoehybrid")), check_layout=False)
    layers = model._module.model.layers
    kinds = [layer.mamba is not None for layer in layers]
    assert kinds == [True, False, True]  # the tiny config mixes both kinds
    assert model.names.self_attn == "self_attn"
    for i, layer in enumerate(layers):
        expected = layer.mamba if kinds[i] else layer.self_attn
        assert model.attentions[i]._module is expected
    assert {"self_attn:GraniteMoeHybridMambaLayer", "self_attn:GraniteMoeHybridAttention"} <= set(model.layout.modules)
    mixer_outputs = []
    with torch.no_grad(), model.trace(PROMPTS):
        for i in range(model.num_layers):
            mixer_outputs.append(model.attentions_output[i].save())
    assert all(output.shape[-1] == model.hidden_size for output in mixer_outputs)
    assert validate(model).passed


@pytest.mark.parametrize("model_type", ["mamba", "rwkv"])
def test_state_space_stream_is_the_stream_between_blocks(model_type, tiny_path):
    """Mamba and RWKV record no embeddings in `hidden_states` (block outputs only): layers_input/output are
    still what each block receives and returns, checked against hooks on the raw blocks and against HF's
    `output_hidden_states` entry by entry."""
    model = StandardizedTransformer(str(tiny_path(model_type)), check_layout=False)
    expected_in, expected_out = hooked_stream(model, PROMPTS)
    ins, outs = read_stream(model, PROMPTS)
    for i in range(model.num_layers):
        assert torch.equal(ins[i], expected_in[i]) and torch.equal(outs[i], expected_out[i])
    batch = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model._module(**batch, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == model.num_layers + 1
    assert all(torch.allclose(outs[i], hidden[i], atol=1e-6) for i in range(model.num_layers))
    report = validate(model)
    assert report.passed, str(report)
    assert any(check.name.startswith("layers_output[i] == HF hidden_states[i]") and check.status == "pass"
               for check in report.checks)


def test_hyper_connection_head_runs_before_the_final_norm(tiny_path):
    """DeepSeek-V4 carries hc_mult copies of the stream between layers ([batch, seq, 4, hidden]) and mixes them
    with `hc_head` before its final norm: ln_final applies both, the envoy is the norm itself."""
    model = StandardizedTransformer(str(tiny_path("deepseek_v4")), check_layout=False)
    inner = model._module.model
    assert model.names.ln_final == "model.hc_head+model.norm"
    assert model.ln_final._module is inner.norm
    assert torch.equal(model.parameter("ln_final.weight"), inner.norm.weight)
    with torch.no_grad(), model.trace(PROMPTS):
        last = model.layers_output[-1].save()
        normed = model.ln_final.output.save()
        logits = model.logits.save()
    assert last.shape[-2:] == (model._module.config.hc_mult, model.hidden_size)
    with torch.no_grad():
        assert torch.equal(model._torch_module("ln_final")(last), inner.norm(inner.hc_head(last)))
        assert torch.allclose(model._torch_module("ln_final")(last), normed, atol=1e-6)
        assert torch.allclose(model.project_on_vocab(last), logits, atol=1e-5)
    assert validate(model).passed


def test_attention_residual_argument_is_not_part_of_its_input(tiny_path):
    """HF Bloom passes the residual to its attention and MLP, which add it to their own output: attentions_input
    and mlps_input are the normed hidden states each block receives (hooks on the raw modules), not their sum
    with the residual."""
    model = StandardizedTransformer(str(tiny_path("bloom")), check_layout=False)
    layer = model._module.transformer.h[1]
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [layer.self_attention.register_forward_pre_hook(keep("attn"), with_kwargs=True),
               layer.mlp.register_forward_pre_hook(keep("mlp"), with_kwargs=True)]
    try:
        with torch.no_grad():
            model._module(**model.tokenizer(PROMPTS, return_tensors="pt", padding=True), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), model.trace(PROMPTS):
        attn_in = model.attentions_input[1].save()
        mlp_in = model.mlps_input[1].save()
    assert torch.equal(attn_in, seen["attn"]) and torch.equal(mlp_in, seen["mlp"])
    assert model.layout.modules["self_attn:BloomAttention"].input.residual is None


@pytest.mark.parametrize("model_type", ["gemma3", "mllama"])
def test_multimodal_checkpoint_exposes_its_text_model(model_type, tiny_path):
    """A multimodal checkpoint (vision tower shrunk with the text model) loads as a causal LM whose standard
    modules are its language model's; the vision tower is left alone."""
    from transformers import AutoConfig

    assert hasattr(AutoConfig.from_pretrained(str(tiny_path(model_type))), "vision_config")  # the whole checkpoint
    model = StandardizedTransformer(str(tiny_path(model_type)), check_layout=False)
    layers = model._module.get_submodule(model.names.layers)
    assert len(layers) == model._module.config.get_text_config().num_hidden_layers
    assert "vision" not in model.names.layers and "vision" not in model.names.embed_tokens
    report = validate(model)
    assert report.passed, str(report)
