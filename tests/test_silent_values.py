"""Values that used to come back plausible and wrong, each against an independent reference: forward hooks
on the raw torch modules (copied when the hook runs), or each prompt run alone."""

import dataclasses
import linecache

import pytest
import torch
from nnsight.intervention.interleaver import OutOfOrderError
from hf_reference import logits_with_hook
from torch import nn

from nnterp import StandardizedTransformer
from nnterp.core.layout import InputLayout, ModuleLayout, OutputLayout
from nnterp.core.layout.edits import edits_from_source
from nnterp.core.padding import last_token_indices
from nnterp.validation import validate

PROMPTS = ["The capital of France is", "Hi", "One two three four"]


@pytest.fixture(scope="module")
def falcon(tiny_path):
    return StandardizedTransformer(str(tiny_path("falcon")))


def hooked_outputs(model, role: str, prompts) -> list[torch.Tensor]:
    """Each layer's ``role`` module output from a plain forward with hooks that copy it when they run."""
    with torch.no_grad(), model.trace(prompts):
        fed = model.inputs.save()
    found = []
    handles = [getattr(layer, getattr(model.names, role)).register_forward_hook(
        lambda module, args, output: found.append((output if isinstance(output, torch.Tensor) else output[0]).clone()))
        for layer in model._torch_module("layers")]
    try:
        with torch.no_grad():
            model._module(*fed[0], **fed[1])
    finally:
        for handle in handles:
            handle.remove()
    return found


def test_falcon_mlp_output_is_the_mlp_output_not_plus_attention(falcon):
    """HF Falcon's layer adds the attention output into the MLP's returned tensor in place."""
    reads = []
    with torch.no_grad(), falcon.trace(PROMPTS):
        for i in range(falcon.num_layers):
            reads.append(falcon.mlps_output[i].save())
    for read, reference in zip(reads, hooked_outputs(falcon, "mlp", PROMPTS), strict=True):
        assert torch.equal(read, reference)
    layout = falcon.layout.modules["mlp:FalconMLP"]
    assert layout.output.edited_in_place and not layout.input.edited_in_place
    assert falcon.layout.evidence["mlp:FalconMLP"]["edited_in_place"] == {"output": ["source", "probe"]}
    assert falcon.layout.residual_additive  # with the values at call time, Falcon's parallel block is additive


def test_falcon_write_hands_the_parent_a_copy(falcon):
    """The parent's in-place add must land on nnterp's copy, not on the user's tensor, and the write must
    equal a hooked forward that returns the same value."""
    with torch.no_grad(), falcon.trace(PROMPTS[0]):
        written = (falcon.mlps_output[1] * 2).save()
        falcon.mlps_output[1] = written
        logits = falcon.logits.save()
    expected_written = hooked_outputs(falcon, "mlp", PROMPTS[0])[1] * 2
    assert torch.equal(written, expected_written)
    mlp = falcon._torch_module("layers")[1].mlp
    expected = logits_with_hook(falcon, mlp, lambda module, args, output: output * 2, PROMPTS[0])
    assert torch.allclose(logits, expected, atol=1e-6)


def test_ctrl_token_embeddings_are_the_embedding_output_the_parent_then_scales(tiny_path):
    """HF CTRL runs ``inputs_embeds *= sqrt(d_model)`` on the embedding's returned tensor."""
    model = StandardizedTransformer(str(tiny_path("ctrl")))
    assert model.layout.embeddings_edited_in_place
    assert model.layout.evidence["embed_tokens"] == {"edited_in_place": {"output": ["source", "probe"]}}
    with torch.no_grad(), model.trace(PROMPTS):
        fed = model.inputs.save()
        embeddings = model.token_embeddings.save()
        written = (model.token_embeddings * 2).save()
        model.token_embeddings = written
        logits = model.logits.save()
    found = []
    embedding = model._torch_module("embed_tokens")
    handle = embedding.register_forward_hook(lambda module, args, output: found.append(output.clone()))
    try:
        with torch.no_grad():
            model._module(*fed[0], **fed[1])
    finally:
        handle.remove()
    assert torch.equal(embeddings, found[0]) and torch.equal(written, found[0] * 2)  # the user's tensor is not scaled
    handle = embedding.register_forward_hook(lambda module, args, output: output * 2)
    try:
        with torch.no_grad():
            expected = model._module(*fed[0], **fed[1]).logits
    finally:
        handle.remove()
    assert torch.allclose(logits, expected, atol=1e-5)


def test_validate_compares_submodules_with_hooks_and_catches_an_uncopied_in_place_edit(tiny_path):
    model = StandardizedTransformer(str(tiny_path("falcon")))
    assert validate(model).passed
    layout = model.layout.modules["mlp:FalconMLP"]
    model.layout.modules["mlp:FalconMLP"] = dataclasses.replace(layout, output=dataclasses.replace(layout.output, edited_in_place=False))
    failures = [check.name for check in validate(model).failures()]
    assert "mlps_output[i] == forward hook on the raw module" in failures


def test_bloom_attention_input_is_its_hidden_argument_not_plus_residual(tiny_path):
    """HF Bloom passes the residual to its attention and MLP for them to add to their output: the input is the
    hidden state alone (vLLM's fused add+norm layers, which return (hidden, residual), are the ones to sum)."""
    model = StandardizedTransformer(str(tiny_path("bloom")))
    assert model.layout.modules["self_attn:BloomAttention"].input.residual is None
    report = validate(model)
    assert report.passed, str(report)
    assert {"attentions_input[i] == forward hook on the raw module", "mlps_input[i] == forward hook on the raw module"} <= {
        check.name for check in report.checks if check.status == "pass"}


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


def _parent(body: str) -> nn.Module:
    """A layer whose forward is ``body`` (its child ``self.mlp`` takes ``x``); the source is registered so
    ``inspect`` reads it as it reads a model file."""
    source = "def forward(self, h, a):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    filename = f"<parent-{len(linecache.cache)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"torch": torch}
    exec(compile(source, filename, "exec"), namespace)
    layer = type("Layer", (nn.Module,), {"forward": namespace["forward"]})()
    layer.mlp = Mlp()
    return layer


@pytest.mark.parametrize("body, edited", [
    ("out = self.mlp(h)\nout += a\nreturn out", {"output": True, "input": False}),
    ("out = self.mlp(h)\nout.add_(a)\nreturn out", {"output": True, "input": False}),
    ("out = self.mlp(h)[0]\nout[0] = 1\nreturn out", {"output": True, "input": False}),
    ("out = self.mlp(h)\nview = out.view(-1)\nview.mul_(2)\nreturn out", {"output": True, "input": False}),
    ("out = self.mlp(h)\nout = out + a\nout += a\nreturn out", {"output": False, "input": False}),
    ("out = self.mlp(h)\nreturn out + a", {"output": False, "input": False}),
    ("out = self.mlp(h)\nh += a\nreturn out", {"output": False, "input": True}),
    ("out = self.mlp(h)\ntorch.relu(out, out=out)\nreturn out", {"output": True, "input": False}),
    ("for _ in range(2):\n    h += a\n    h = self.mlp(h)\nreturn h", {"output": True, "input": False}),
    ("out = self.mlp(h)\nif self.training and a is not None:\n    out += a\nreturn out", {"output": False, "input": False}),
])
def test_in_place_edits_read_off_the_parent_source(body, edited):
    layer = _parent(body)
    assert edits_from_source(layer.mlp, layer, "mlp", "x", 0) == edited


def test_probe_sees_an_edit_the_source_cannot():
    """An edit inside a helper function: only the runtime probe sees it; reads and writes then copy."""
    from nnterp.core.layout.model_layout import infer_model_layout
    from nnterp.core.rename import ModuleNames

    def add_into(target, value):
        target.add_(value)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Mlp(), Mlp()

        def forward(self, h):
            a = self.attn(h)
            out = self.mlp(h)
            add_into(out, a)
            return h + out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer()])

        def forward(self, h):
            for layer in self.layers:
                h = layer(h)
            return h

    model = Model()
    names = ModuleNames(embed_tokens="layers", layers="layers", ln_final="layers", lm_head="layers", self_attn="attn", mlp="mlp")
    layout = infer_model_layout(model, names, 4, "hf", "Model", lambda: model(torch.randn(1, 3, 4)))
    assert layout.modules["mlp:Mlp"].output.edited_in_place
    assert layout.evidence["mlp:Mlp"]["edited_in_place"] == {"output": ["probe"]}
    assert not layout.modules["self_attn:Mlp"].output.edited_in_place
    mlp = layout.modules["mlp:Mlp"].output
    buffer = torch.randn(2, 4)
    read, fresh = mlp.read_stream(buffer)
    assert fresh and read is not buffer and torch.equal(read, buffer)
    value = torch.randn(2, 4)
    assert mlp.write(buffer, value) is not value


def test_snapshot_records_edited_in_place_only_where_true():
    plain = ModuleLayout(InputLayout("x", 0), OutputLayout("tensor"))
    edited = ModuleLayout(InputLayout("x", 0), OutputLayout("tensor", edited_in_place=True))
    assert "edited_in_place" not in plain.to_json()["output"]
    assert edited.to_json()["output"]["edited_in_place"] is True
    assert ModuleLayout.from_json(edited.to_json()) == edited and ModuleLayout.from_json(plain.to_json()) == plain


def prompt_alone_probs(model, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        logits = model._module(**model.tokenizer(prompt, return_tensors="pt")).logits
    return logits[0, -1].softmax(-1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_next_token_probs_is_each_prompts_last_token_with_either_padding(llama, side):
    llama.tokenizer.padding_side = side
    try:
        with torch.no_grad(), llama.trace(PROMPTS):
            last_stream = llama.last_position(llama.layers_output[1]).save()
            probs = llama.next_token_probs.save()
            mask = llama.trace_attention_mask().save()
    finally:
        llama.tokenizer.padding_side = "left"
    assert bool((mask[:, -1] == 0).any()) == (side == "right")  # the batch really is padded on that side
    for row, prompt in enumerate(PROMPTS):
        assert torch.allclose(probs[row], prompt_alone_probs(llama, prompt), atol=1e-6)
        with torch.no_grad(), llama.trace(prompt):
            alone = llama.layers_output[1].save()
        assert torch.allclose(last_stream[row], alone[0, -1], atol=1e-5)


def test_model_whose_positions_left_padding_shifts_pads_on_the_right(tiny_path, llama):
    """HF Pegasus adds positional embeddings by index in the padded batch: left padding would change every
    value of the shorter prompts. It pads on the right by default and refuses a left-padded batch."""
    model = StandardizedTransformer(str(tiny_path("pegasus")))
    assert model.left_padding_shifts_positions and model.tokenizer.padding_side == "right"
    assert llama.left_padding_shifts_positions is False and llama.tokenizer.padding_side == "left"
    with torch.no_grad(), model.trace(PROMPTS):
        probs = model.next_token_probs.save()
    for row, prompt in enumerate(PROMPTS):
        assert torch.allclose(probs[row], prompt_alone_probs(model, prompt), atol=1e-6)
    model.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match=r"PegasusForCausalLM places each token by its index.*Pad on the right"):
        with torch.no_grad(), model.trace(PROMPTS):
            model.logits.save()
    with torch.no_grad(), model.trace(PROMPTS[0]):  # one prompt is never padded
        model.logits.save()


def test_last_position_per_invoke_with_right_padding(llama):
    """Several invokes are padded together; each invoke's rows get their own prompts' last tokens."""
    llama.tokenizer.padding_side = "right"
    try:
        with torch.no_grad(), llama.trace() as tracer:
            with tracer.invoke(PROMPTS[:2]):
                first = llama.next_token_probs.save()
            with tracer.invoke(PROMPTS[2]):
                second = llama.next_token_probs.save()
    finally:
        llama.tokenizer.padding_side = "left"
    assert torch.allclose(first[1], prompt_alone_probs(llama, PROMPTS[1]), atol=1e-6)
    assert torch.allclose(second[0], prompt_alone_probs(llama, PROMPTS[2]), atol=1e-6)


def test_last_position_outside_a_trace_needs_the_mask_when_padding_right(llama):
    tensor = torch.arange(2 * 4).reshape(2, 4, 1).float()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert llama.last_position(tensor, attention_mask=mask).flatten().tolist() == [1.0, 7.0]
    assert llama.last_position(tensor).flatten().tolist() == [3.0, 7.0]  # a left-padding tokenizer
    llama.tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="pads on the right.*attention_mask="):
            llama.last_position(tensor)
    finally:
        llama.tokenizer.padding_side = "left"


def test_last_token_indices():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    assert last_token_indices(mask).tolist() == [3, 2, 0]
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        last_token_indices(torch.tensor([[1, 1], [0, 0]]))


def test_out_of_order_read_names_the_accessors(llama):
    with pytest.raises(OutOfOrderError, match=r"model\.attentions_output\[1\] was requested.*The access before it was "
                                              r"model\.layers_output\[2\].*order the forward pass computes them"):
        with torch.no_grad(), llama.trace(PROMPTS[0]):
            llama.layers_output[2].save()
            llama.attentions_output[1].save()
    with pytest.raises(OutOfOrderError, match=r"model\.token_embeddings was requested.*model\.logits"):
        with torch.no_grad(), llama.trace(PROMPTS[0]):
            llama.logits.save()
            llama.token_embeddings.save()


MOE_FAMILIES = ("llama4_text", "mixtral", "qwen3_moe")  # Llama 4's MoE block returns [batch * seq, hidden]


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_moe_accessors_have_the_stream_shape_and_writes_hit_their_position(tiny_path, model_type):
    """Every accessor of a MoE model reads ``[batch, seq, hidden]``; ``mlps_output[0][:, -1] = 0`` zeroes each
    prompt's last position (not a hidden unit of every token), as a hook doing it on the raw model does."""
    model = StandardizedTransformer(str(tiny_path(model_type)))
    model.tokenizer.padding_side = "left"
    with torch.no_grad(), model.trace(PROMPTS):
        shapes = nnsight_save_shapes(model)
    assert len(set(shapes.values())) == 1, shapes
    with torch.no_grad(), model.trace(PROMPTS):
        fed = model.inputs.save()
        model.mlps_output[0][:, -1] = 0
        logits = model.logits.save()
    batch = fed[1]["input_ids"].shape[0]

    def zero_last_position(module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        per_prompt = value.reshape(batch, -1, value.shape[-1]).clone()  # flattened tokens are prompt-major
        per_prompt[:, -1] = 0
        value = per_prompt.reshape(value.shape)
        return (value, *output[1:]) if isinstance(output, tuple) else value

    mlp = getattr(model._torch_module("layers")[0], model.names.mlp)
    handle = mlp.register_forward_hook(zero_last_position)
    try:
        with torch.no_grad():
            expected = model._module(*fed[0], **fed[1]).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, expected)


def nnsight_save_shapes(model) -> dict:
    import nnsight

    shapes = nnsight.save({})
    for name in ("layers_input", "attentions_input", "attentions_output", "mlps_input", "mlps_output", "layers_output"):
        shapes[name] = tuple(getattr(model, name)[0].shape)
    return shapes


def test_flattened_moe_output_per_invoke_equals_the_batch_rows(tiny_path):
    """With several invokes, each reads its own prompts' rows of a flattened stream and a write reaches only
    them: each invoke's values equal the same prompts' rows of a single-invoke batch, and a write in the
    second invoke leaves the first prompt's logits as they are without it."""
    model = StandardizedTransformer(str(tiny_path("llama4_text")))
    model.tokenizer.padding_side = "left"
    with torch.no_grad(), model.trace(PROMPTS):
        both = model.mlps_output[1].save()
        clean = model.logits.save()
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(PROMPTS[:2]):
            first = model.mlps_output[1].save()
            first_logits = model.logits.save()
        with tracer.invoke(PROMPTS[2:]):
            second = model.mlps_output[1].save()
            model.mlps_output[1] = torch.zeros_like(model.mlps_output[1])
    torch.testing.assert_close(first, both[:2])
    torch.testing.assert_close(second, both[2:])
    torch.testing.assert_close(first_logits, clean[:2])
