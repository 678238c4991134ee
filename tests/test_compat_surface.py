"""nnterp 1.x's model surface (constructor arguments, module tree, methods) on StandardizedTransformer, each
checked against a plain HF forward with hooks on the raw torch model, the tokenizer, or a manual computation."""

from pathlib import Path

import nnsight
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from nnterp import AttnProbFunction, RenameConfig, RenamingError, StandardizedTransformer
from nnterp.core.rename import UnknownArchitectureError

from hf_reference import add_at, stream_of
from hf_reference import hooked_logits as raw_hooked_logits

PROMPTS = ["The capital of France is", "Hi", "One two three four"]


# -- references ---------------------------------------------------------------------------------------------


def hooked_logits(model, prompt: str, edits: dict) -> torch.Tensor:
    """The raw model's logits on ``prompt`` alone, ``edits`` applied to layer outputs by hooks."""
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return raw_hooked_logits(model._module, model._torch_module("layers"), ids, edits)


def prompt_length(model, prompt: str) -> int:
    return len(model.tokenizer(prompt)["input_ids"])


def real_rows(mask: torch.Tensor, row: int) -> torch.Tensor:
    return mask[row].nonzero().flatten()


def recording(store: dict, name: str, pick):
    """A hook that keeps ``pick(*hook arguments)`` under ``name`` and changes nothing."""
    def hook(*arguments):
        store.setdefault(name, pick(*arguments))
    return hook


def raw_forward(model, prompt: str, hooks) -> None:
    """A plain forward of the raw model with (register function, hook) pairs installed for its duration."""
    handles = [register(hook) for register, hook in hooks]
    try:
        with torch.no_grad():
            model(input_ids=prompt) if isinstance(prompt, torch.Tensor) else model(**prompt)
    finally:
        for handle in handles:
            handle.remove()


# -- module tree ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, layers", [("gpt2", "transformer.h"), ("opt", "model.decoder.layers"), ("llama", "model.layers")])
def test_backbone_is_exposed_as_model_model(model_type, layers, tiny_path):
    model = StandardizedTransformer(str(tiny_path(model_type)))
    assert model.model.layers._module is model._module.get_submodule(layers) is model.layers._module
    assert model.model.ln_final._module is model.ln_final._module
    assert model.model.layers[0].self_attn._module is model.attentions[0]._module
    with torch.no_grad(), model.trace("Hello world"):
        direct = model.model.layers[0].output.save()
        accessor = model.layers_output[0].save()
    assert torch.equal(stream_of(direct), accessor)


def test_accessors_are_callable_and_module_accessors_refuse_assignment(gpt2):
    raw_layer = gpt2._module.transformer.h[1]
    assert gpt2.attentions(1)._module is raw_layer.attn and gpt2.mlps[1]._module is raw_layer.mlp
    assert gpt2.layers_output.get_module(1)._module is raw_layer
    with torch.no_grad(), gpt2.trace("Hello world"):
        called = gpt2.layers_output(1).save()
        indexed = gpt2.layers_output[1].save()
    assert torch.equal(called, indexed)
    with pytest.raises(ValueError, match=r"Cannot set the value of a module accessor.*attentions_input/attentions_output"):
        gpt2.attentions[0] = torch.zeros(1)


def test_returns_tuple_matches_what_the_raw_modules_return(gpt2, llama):
    for model in (gpt2, llama):
        seen = {}
        modules = {"layer": model._torch_module("layers")[0], "attn": model.attentions[0]._module, "mlp": model.mlps[0]._module}
        raw_forward(model._module, torch.tensor([[5, 6, 7]]), [
            (module.register_forward_hook, recording(seen, name, lambda m, a, out: isinstance(out, tuple)))
            for name, module in modules.items()])
        assert model.detect_layer_output_type() is None
        assert (model.layers_output.returns_tuple, model.attentions_output.returns_tuple, model.mlps_output.returns_tuple) == (
            seen["layer"], seen["attn"], seen["mlp"])
        assert model.layers_input.returns_tuple is False and model.attentions.returns_tuple is None


# -- inputs and tokenizers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["left", "right"])
def padded(request, tiny_path):
    """The tiny Llama with its tokenizer padding on one side, and that side."""
    return StandardizedTransformer(str(tiny_path("llama")), tokenizer_kwargs={"padding_side": request.param}), request.param


def test_input_ids_attention_mask_and_input_size_equal_the_tokenizer(padded, tiny_path):
    model, side = padded
    expected = AutoTokenizer.from_pretrained(str(tiny_path("llama")), padding_side=side)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad(), model.trace(PROMPTS):
        ids, mask, size = model.input_ids.save(), model.attention_mask.save(), nnsight.save(tuple(model.input_size))
    assert model.tokenizer.padding_side == side
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert size == tuple(expected["input_ids"].shape)


def test_add_prefix_false_tokenizer(llama, tiny_path):
    reference = AutoTokenizer.from_pretrained(str(tiny_path("llama")), add_prefix_space=False)
    tokenizer = llama.add_prefix_false_tokenizer
    assert tokenizer is llama.add_prefix_false_tokenizer and tokenizer is not llama.tokenizer
    assert tokenizer(" Paris hello")["input_ids"] == reference(" Paris hello")["input_ids"]


# -- steering -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_positions", [0, -1, [0, 1], slice(1, None)])
def test_steer_positions_are_each_prompts_own_tokens(padded, token_positions):
    """A padded batch steers each prompt as that prompt alone is steered (plain forward with a hook)."""
    model, _ = padded
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad(), model.trace(PROMPTS):
        mask = model.attention_mask.save()
        model.steer(layers=[2, 0], steering_vector=vector, factor=2.0, token_positions=token_positions)
        steered = model.logits.save()
    for row, prompt in enumerate(PROMPTS):
        positions = torch.arange(prompt_length(model, prompt))[token_positions].flatten().tolist()
        expected = hooked_logits(model, prompt, {0: add_at(2 * vector, positions), 2: add_at(2 * vector, positions)})
        assert torch.allclose(steered[row, real_rows(mask, row)], expected, atol=1e-4), (row, prompt)
        assert not torch.allclose(expected, hooked_logits(model, prompt, {}), atol=1e-3)


def test_steer_batch_index_and_token_positions_match_hooks(llama):
    vector = torch.randn(llama.hidden_size, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad(), llama.trace(PROMPTS):
        mask = llama.attention_mask.save()
        llama.steer(1, vector, batch_index=[2, 0], token_positions=-1)
        steered = llama.logits.save()
    for row, prompt in enumerate(PROMPTS):
        edits = {1: add_at(vector, [-1])} if row in (0, 2) else {}
        assert torch.allclose(steered[row, real_rows(mask, row)], hooked_logits(llama, prompt, edits), atol=1e-4)


def test_steer_with_one_vector_per_prompt_adds_each_prompts_own(llama):
    """A [prompts, hidden] vector adds row b to prompt b at every real token (each prompt alone, hooked)."""
    prompts = ["one two three", "four five six", "seven eight nine"]  # as many tokens as prompts: no broadcast trap
    vectors = torch.randn(3, llama.hidden_size, generator=torch.Generator().manual_seed(5)) * 4
    with torch.no_grad(), llama.trace(prompts):
        mask = llama.attention_mask.save()
        llama.steer(1, vectors)
        steered = llama.logits.save()
    for row, prompt in enumerate(prompts):
        expected = hooked_logits(llama, prompt, {1: add_at(vectors[row], list(range(prompt_length(llama, prompt))))})
        assert torch.allclose(steered[row, real_rows(mask, row)], expected, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, None), (11, None), (3, 3, None)])
def test_steer_refuses_other_vector_shapes_by_name(llama, shape):
    """A [k, hidden] vector for another number of prompts, or a [prompts, tokens, hidden] one: a ValueError
    naming the shape and the accepted ones, never a broadcast."""
    vector = torch.zeros(*[llama.hidden_size if size is None else size for size in shape])
    with pytest.raises(ValueError, match=r"steer: the steering vector has shape .*\[hidden\]|one row per prompt"):
        with torch.no_grad(), llama.trace(["one two three", "four five six", "seven eight nine"]):
            llama.steer(1, vector)
            llama.logits.save()


def test_steer_after_reading_modules_still_steers_each_prompts_own_tokens(llama):
    vector = torch.randn(llama.hidden_size, generator=torch.Generator().manual_seed(4)) * 4
    side, llama.tokenizer.padding_side = llama.tokenizer.padding_side, "right"
    try:
        with torch.no_grad(), llama.trace(PROMPTS):
            mask = llama.attention_mask.save()
            llama.layers_output[0].save()
            llama.steer(1, vector, token_positions=-1)
            steered = llama.logits.save()
    finally:
        llama.tokenizer.padding_side = side
    assert not bool(mask.all()), "the prompts must differ in length for this test"
    for row, prompt in enumerate(PROMPTS):
        assert torch.allclose(steered[row, real_rows(mask, row)], hooked_logits(llama, prompt, {1: add_at(vector, [-1])}), atol=1e-4)


def test_steer_inside_invokes_uses_each_invokes_prompts(llama):
    vector = torch.randn(llama.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    with torch.no_grad(), llama.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            first_mask = llama.attention_mask.save()
            llama.steer(0, vector, token_positions=0)
            first = llama.logits.save()
        with tracer.invoke(PROMPTS[1]):
            second_mask = llama.attention_mask.save()
            llama.steer(0, vector, batch_index=0, token_positions=0)
            second = llama.logits.save()
    for logits, mask, prompt in ((first, first_mask, PROMPTS[0]), (second, second_mask, PROMPTS[1])):
        assert torch.allclose(logits[0, real_rows(mask, 0)], hooked_logits(llama, prompt, {0: add_at(vector, [0])}), atol=1e-4)


def test_steer_deprecated_positions_and_bad_arguments(llama):
    vector = torch.randn(llama.hidden_size)
    with pytest.warns(DeprecationWarning, match="positions"):
        with torch.no_grad(), llama.trace(PROMPTS[0]):
            llama.steer(0, vector, positions=-1)
            deprecated = llama.logits.save()
    assert torch.allclose(deprecated[0], hooked_logits(llama, PROMPTS[0], {0: add_at(vector, [-1])}), atol=1e-4)
    with pytest.raises(ValueError, match="Cannot specify both"):
        with llama.trace(PROMPTS[0]):
            llama.steer(0, vector, positions=0, token_positions=0)
    with pytest.raises(ValueError, match="hidden size is 128"):
        with llama.trace(PROMPTS[0]):
            llama.steer(0, torch.randn(7))
    with pytest.raises(IndexError, match=r"token_positions=\[5\] is out of range for prompt 1, which has 2 token"):
        with llama.trace(PROMPTS[:2]):
            llama.steer(0, vector, token_positions=5)
    with pytest.raises(IndexError, match=r"batch_index=\[3\] is out of range for a batch of 2 prompt"):
        with llama.trace(PROMPTS[:2]):
            llama.steer(0, vector, batch_index=3)


# -- skipping, projecting -------------------------------------------------------------------------------------


def test_skip_layers_with_skip_with_matches_replacing_outputs(gpt2):
    replacement = torch.randn(1, prompt_length(gpt2, PROMPTS[0]), gpt2.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), gpt2.trace(PROMPTS[0]):
        gpt2.skip_layers(0, 1, skip_with=replacement)
        skipped = gpt2.logits.save()
    with torch.no_grad(), gpt2.trace(PROMPTS[0]):
        stream = gpt2.layers_input[2].save()
        gpt2.skip_layer(2)
        skipped_last = gpt2.logits.save()
    replace = {0: lambda s: replacement, 1: lambda s: replacement}
    assert torch.allclose(skipped[0], hooked_logits(gpt2, PROMPTS[0], replace), atol=1e-4)
    assert torch.allclose(skipped_last[0], hooked_logits(gpt2, PROMPTS[0], {2: lambda s: stream[:1]}), atol=1e-4)
    with pytest.raises(ValueError, match=r"skip_layers\(0, 1, skip_with=...\).*shape mismatch"):
        with gpt2.trace(PROMPTS[0]):
            gpt2.skip_layers(0, 1, skip_with=torch.zeros(3, gpt2.hidden_size))


def test_project_on_vocab_and_topk_closest_tokens_equal_manual_unembedding(llama):
    hidden = torch.randn(2, llama.hidden_size, generator=torch.Generator().manual_seed(4))
    raw = llama._module
    with torch.no_grad():
        manual = raw.lm_head(raw.model.norm(hidden)).softmax(-1)
    assert torch.allclose(llama.project_on_vocab(hidden_state=hidden).softmax(-1), manual, atol=1e-6)
    top = llama.get_topk_closest_tokens(hidden, k=3)
    single = llama.get_topk_closest_tokens(hidden[1], k=3)
    for row, result in enumerate(top):
        values, indices = manual[row].topk(3)
        assert list(result) == llama.tokenizer.convert_ids_to_tokens(indices.tolist())
        assert list(result.values()) == pytest.approx(values.tolist(), abs=1e-6)
    assert list(single) == list(top[1]) and list(single.values()) == pytest.approx(list(top[1].values()), abs=1e-6)
    with pytest.raises(ValueError, match="does not match the model's hidden size 128"):
        llama.get_topk_closest_tokens(torch.zeros(5))
    with pytest.raises(ValueError, match=r"takes a \[hidden\] or \[n, hidden\] tensor"):
        llama.get_topk_closest_tokens(torch.zeros(1, 1, 128))


# -- attention probabilities ----------------------------------------------------------------------------------


def read_probabilities_and_reference(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_probabilities[layer]`` on one prompt, and HF's ``output_attentions`` for the same layer."""
    with torch.no_grad():
        reference = model._module(**model.tokenizer(PROMPTS[0], return_tensors="pt"), output_attentions=True).attentions[layer]
    with torch.no_grad(), model.trace(PROMPTS[0]):
        probs = model.attention_probabilities[layer].save()
    return probs, reference


class SiteInAttentionFunction(AttnProbFunction):
    """An operation of Llama's eager attention function: its dropout of the probabilities (what nnterp 1.x
    read), or a wrong site such as the scores before the softmax."""

    def __init__(self, operation: str):
        self.operation = operation

    def get_attention_prob_source(self, attention_module, return_module_source=False):
        inner = attention_module.source.attention_interface_1.source
        return inner if return_module_source else getattr(inner, self.operation)


def test_enable_attention_probs_gives_eager_probabilities_that_drive_the_output(tiny_path, capsys):
    model = StandardizedTransformer(str(tiny_path("llama")), enable_attention_probs=True)
    assert model._module.config._attn_implementation == "eager" and model.attn_probs_available
    probs, reference = read_probabilities_and_reference(model, 1)
    assert torch.allclose(probs, reference, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    with torch.no_grad(), model.trace(PROMPTS[0]):
        first_key = torch.zeros_like(model.attention_probabilities[0])
        first_key[..., 0] = 1
        model.attention_probabilities[0] = first_key
        attended = model.attentions_output[0].save()
    # every query now mixes the first token's value only: the same attention output at every position
    assert torch.allclose(attended[0, 1:], attended[0, :1].expand_as(attended[0, 1:]), atol=1e-5)
    model.attention_probabilities.print_source()
    assert "softmax" in capsys.readouterr().out
    model.attention_probabilities.disable()
    assert not model.attn_probs_available
    with pytest.raises(RenamingError, match="disabled"):
        with model.trace(PROMPTS[0]):
            model.attention_probabilities[0].save()


def test_attn_prob_source_from_rename_config_is_used_and_checked(tiny_path):
    path = str(tiny_path("llama"))
    at = lambda operation: RenameConfig(attn_prob_source=SiteInAttentionFunction(operation))  # noqa: E731
    model = StandardizedTransformer(path, enable_attention_probs=True, rename_config=at("nn_functional_dropout_0"))
    probs, reference = read_probabilities_and_reference(model, 2)
    assert torch.allclose(probs, reference, atol=1e-6)
    with pytest.raises(RenamingError, match="do not sum to 1"):
        StandardizedTransformer(path, enable_attention_probs=True, rename_config=at("torch_matmul_0"))


def test_probabilities_computed_inline_in_the_attention_forward(tiny_path):
    """Bloom's attention computes its softmax in its own forward, not in an attention function."""
    model = StandardizedTransformer(str(tiny_path("bloom")), enable_attention_probs=True)  # checked at load
    probs, reference = read_probabilities_and_reference(model, 1)
    assert torch.allclose(probs, reference, atol=1e-6)


def test_attention_probability_arguments_are_checked(tiny_path):
    with pytest.raises(ValueError, match="Cannot use attn_implementation='sdpa' with enable_attention_probs=True"):
        StandardizedTransformer(str(tiny_path("llama")), enable_attention_probs=True, attn_implementation="sdpa")
    sdpa = StandardizedTransformer(str(tiny_path("llama")), attn_implementation="sdpa")
    assert not sdpa.attn_probs_available
    with pytest.raises(RenamingError, match="enable_attention_probs=True"):
        with sdpa.trace(PROMPTS[0]):
            sdpa.attention_probabilities[0].save()


# -- renaming -------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A Llama decoder layer whose children carry names no alias table knows."""

    def __init__(self, layer):
        super().__init__()
        self.token_mixer, self.channel_block = layer.self_attn, layer.mlp
        self.pre_norm, self.mid_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.widen = layer.mlp.up_proj  # a child that is not hidden-width, to point a rename at by mistake

    def forward(self, hidden_states, **kwargs):
        mixed, _ = self.token_mixer(hidden_states=self.pre_norm(hidden_states), **kwargs)
        hidden_states = hidden_states + mixed
        return hidden_states + self.channel_block(self.mid_norm(hidden_states))


@pytest.fixture(scope="module")
def odd_llama(tiny_path):
    """The tiny Llama, its layers rebuilt as ``Block``s, and its tokenizer."""
    path = str(tiny_path("llama"))
    raw = AutoModelForCausalLM.from_pretrained(path).eval()
    raw.model.layers = nn.ModuleList(Block(layer) for layer in raw.model.layers)
    return raw, AutoTokenizer.from_pretrained(path)


def test_rename_config_of_nnterp_1x_on_a_renamed_model_reads_what_hooks_see(odd_llama):
    raw, tokenizer = odd_llama
    config = RenameConfig(attn_name=["attention", "token_mixer"], mlp_name="channel_block", ln_final_name="norm",
                          lm_head_name="lm_head", model_name="model", layers_name="layers", attn_head_config_key=2)
    model = StandardizedTransformer(raw, tokenizer=tokenizer, rename_config=config, check_layout=False)
    assert (model.names.self_attn, model.names.mlp, model.names.ln_final) == ("token_mixer", "channel_block", "model.norm")
    assert model.num_heads == 2
    seen = {}
    attention, mlp = raw.model.layers[1].token_mixer, raw.model.layers[1].channel_block
    raw_forward(raw, tokenizer(PROMPTS[0], return_tensors="pt"), [
        (lambda hook: attention.register_forward_pre_hook(hook, with_kwargs=True), recording(seen, "attn_in", lambda m, a, kw: kw["hidden_states"])),
        (attention.register_forward_hook, recording(seen, "attn_out", lambda m, a, out: out[0])),
        (mlp.register_forward_pre_hook, recording(seen, "mlp_in", lambda m, a: a[0])),
        (mlp.register_forward_hook, recording(seen, "mlp_out", lambda m, a, out: out)),
    ])
    with torch.no_grad(), model.trace(PROMPTS[0]):
        reads = nnsight.save({})
        reads["attn_in"], reads["attn_out"] = model.attentions_input[1], model.attentions_output[1]
        reads["mlp_in"], reads["mlp_out"] = model.mlps_input[1], model.mlps_output[1]
    for name, value in reads.items():
        assert torch.allclose(value, seen[name], atol=1e-6), name


def test_check_renaming_refuses_a_rename_that_reads_the_wrong_module(odd_llama):
    raw, tokenizer = odd_llama
    with pytest.raises(RenamingError, match=r"mlp 0 \(Linear\): output is .* shape \(1, \d+, 256\), not a hidden state of width 128"):
        StandardizedTransformer(raw, tokenizer=tokenizer, rename_config=RenameConfig(attn_name="token_mixer", mlp_name="widen"),
                                check_layout=False)
    with pytest.raises(RenamingError, match=r"token_embeddings has shape \(1, \d+, 128\), expected \(1, \d+, 64\)"):
        StandardizedTransformer(raw, tokenizer=tokenizer, rename_config=RenameConfig(hidden_size_config_key=64), check_layout=False)
    unchecked = StandardizedTransformer(raw, tokenizer=tokenizer, check_renaming=False, check_layout=False,
                                        rename_config=RenameConfig(hidden_size_config_key=64))
    assert unchecked.hidden_size == 64
    with pytest.raises(UnknownArchitectureError, match=r"RenameConfig\(attn_name='mixer'\) names no child of layer 0"):
        StandardizedTransformer(raw, tokenizer=tokenizer, rename_config=RenameConfig(attn_name="mixer"))
    with pytest.raises(ValueError, match="names the self_attn module twice"):
        RenameConfig(attn_name="a", self_attn="b")
    assert issubclass(UnknownArchitectureError, RenamingError)


def test_missing_submodules_are_reported_unless_ignored(odd_llama, caplog):
    raw, tokenizer = odd_llama
    with caplog.at_level("WARNING", logger="nnterp"):
        model = StandardizedTransformer(raw, tokenizer=tokenizer, check_layout=False)
    assert "no attention module found in layer 0" in caplog.text and "RenameConfig(attn_name='<child>')" in caplog.text
    with pytest.raises(AttributeError, match="has no self_attn module.*token_mixer"):
        with model.trace(PROMPTS[0]):
            model.attentions_output[0].save()
    caplog.clear()
    with caplog.at_level("WARNING", logger="nnterp"):
        StandardizedTransformer(raw, tokenizer=tokenizer, check_layout=False, rename_config=RenameConfig(ignore_attn=True, ignore_mlp=True))
    assert "module found" not in caplog.text


def test_rename_dict_is_merged_over_the_defaults(llama, tiny_path):
    """Entries naming standard modules win over the alias tables (missing ones are skipped); others are aliases."""
    model = StandardizedTransformer(str(tiny_path("llama")), check_layout=False,
                                    rename={"transformer.h": "layers", "input_layernorm": "ln_final", "gate_proj": "w_gate"})
    assert model.names.layers == "model.layers" and model.names.ln_final == "model.layers.0.input_layernorm"
    assert model.layers[1].mlp.w_gate._module is model._module.model.layers[1].mlp.gate_proj
    hidden = torch.randn(3, model.hidden_size)
    raw = model._module
    with torch.no_grad():
        assert torch.allclose(model.project_on_vocab(hidden), raw.lm_head(raw.model.layers[0].input_layernorm(hidden)), atol=1e-6)


def test_size_config_keys(tiny_path):
    path = str(tiny_path("llama"))
    model = StandardizedTransformer(path, rename_config=RenameConfig(attn_head_config_key=["n_nothing", "num_key_value_heads"],
                                                                     vocab_size_config_key=320))
    config = model._module.config
    assert (model.num_heads, model.vocab_size, model.hidden_size) == (config.num_key_value_heads, 320, config.hidden_size)
    with pytest.raises(TypeError, match="takes a config key, a list of keys or an int"):
        RenameConfig(hidden_size_config_key=1.5)


class CrossAttentionLayer(nn.Module):
    """A stand-in for a multimodal model's layer that a text-only forward never runs."""

    def __init__(self, layer):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp

    def forward(self, hidden_states, **kwargs):
        return hidden_states


def test_layers_that_do_not_run_on_text_need_allow_multimodal(tiny_path):
    path = str(tiny_path("llama"))
    raw = AutoModelForCausalLM.from_pretrained(path).eval()
    raw.model.layers[2] = CrossAttentionLayer(raw.model.layers[2])
    raw.config.num_hidden_layers = 2  # Llama's forward runs layers[:num_hidden_layers]: layer 2 never runs
    tokenizer = AutoTokenizer.from_pretrained(path)
    with pytest.raises(RenamingError, match=r"not every layer runs on a text-only prompt.*CrossAttentionLayer.*allow_multimodal=True"):
        StandardizedTransformer(raw, tokenizer=tokenizer, check_layout=False)
    model = StandardizedTransformer(raw, tokenizer=tokenizer, check_layout=False, allow_multimodal=True)
    with torch.no_grad(), model.trace(PROMPTS[0]):
        first = model.layers_output[1].save()
    assert first.shape[-1] == model.hidden_size


# -- constructor arguments and bad input ------------------------------------------------------------------------


def test_nnterp_1x_constructor_arguments_are_accepted(tiny_path):
    model = StandardizedTransformer(str(tiny_path("gpt2")), trust_remote_code=False, check_renaming=True, remote=False,
                                    allow_dispatch=False, enable_attention_probs=False, check_attn_probs_with_trace=False,
                                    allow_multimodal=False, rename_config=None, device_map="cpu", tokenizer_kwargs={}, dispatch=True)
    assert model.num_layers == 3 and next(model._module.parameters()).device.type == "cpu"
    with pytest.raises(NotImplementedError, match="remote execution on NDIF is not available"):
        StandardizedTransformer(str(tiny_path("gpt2")), remote=True)


def test_rename_keywords_are_deprecated_aliases_and_unknown_keywords_are_named(tiny_path):
    path = str(tiny_path("gpt2"))
    with pytest.warns(DeprecationWarning, match="`attn_rename` is deprecated"):
        model = StandardizedTransformer(path, attn_rename="nonexistent_attn", mlp_rename="mlp", check_renaming=False)
    assert (model.names.self_attn, model.names.mlp) == ("attn", "mlp")  # an alias the model lacks is skipped
    assert model._model is model._module
    with pytest.raises(TypeError, match="got 'no_such_argument', which is neither its own argument nor one that from_pretrained"):
        StandardizedTransformer(path, no_such_argument=1)


def test_bad_model_arguments_get_specific_errors(tmp_path, llama):
    missing = tmp_path / "no_such_model"
    for source in (str(missing), missing, "./no/such/model"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            StandardizedTransformer(source)
    with pytest.raises(FileNotFoundError, match=r"is a directory without config\.json.*'weights.bin'"):
        (tmp_path / "weights.bin").write_text("")
        StandardizedTransformer(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        StandardizedTransformer(tmp_path / "weights.bin")
    with pytest.raises(TypeError, match="got a int"):
        StandardizedTransformer(3)
    with pytest.raises(TypeError, match="got a tokenizer.*tokenizer=..."):
        StandardizedTransformer(llama.tokenizer)
    with pytest.raises(TypeError, match=r"\['dtype'\] with an already loaded model"):
        StandardizedTransformer(llama._module, tokenizer=llama.tokenizer, dtype=torch.float16)
    with pytest.raises(ValueError, match="Pass the RenameConfig once"):
        StandardizedTransformer(llama._module, tokenizer=llama.tokenizer, rename=RenameConfig(), rename_config=RenameConfig())


def test_loaded_model_finds_its_own_tokenizer(tiny_path):
    raw = AutoModelForCausalLM.from_pretrained(str(tiny_path("gpt2")))
    model = StandardizedTransformer(raw)
    assert model.tokenizer("Hello")["input_ids"] == AutoTokenizer.from_pretrained(str(tiny_path("gpt2")))("Hello")["input_ids"]
    assert Path(model._tokenizer_source) == Path(tiny_path("gpt2"))
