"""StandardizedVLLM on vLLM's CPU engine: layouts, clone policy and equivalence with StandardizedTransformer."""

import nnsight
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp import StandardizedTransformer  # noqa: E402
from nnterp.layout import drift, load_snapshot  # noqa: E402
from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402

PROMPTS = ["The capital of France is", "Hello", "One two three four five six"]


@pytest.fixture(scope="module")
def pair(tiny_path):
    path = str(tiny_path("llama"))
    return StandardizedTransformer(path), StandardizedVLLM(path, dtype="float32", max_model_len=128, max_num_seqs=4)


def read_all(model, prompt, **trace_kwargs):
    """Every accessor of every layer, one trace per role so each reads in forward order.

    Lists are saved with ``nnsight.save``: on vLLM the trace body runs in the engine's worker.
    """
    reads = {}
    for role in ("layers", "attentions", "mlps"):
        with torch.no_grad(), model.trace(prompt, **trace_kwargs):
            ins, outs = nnsight.save([]), nnsight.save([])
            for i in range(model.num_layers):
                ins.append(getattr(model, f"{role}_input")[i])
                outs.append(getattr(model, f"{role}_output")[i])
        reads[f"{role}_input"], reads[f"{role}_output"] = ins, outs
    with torch.no_grad(), model.trace(prompt, **trace_kwargs):
        embeddings = model.token_embeddings.save()
        probs = model.next_token_probs.save()
    reads["token_embeddings"], reads["next_token_probs"] = [embeddings], [probs]
    for name, values in reads.items():
        assert len(values) == (1 if name in ("token_embeddings", "next_token_probs") else model.num_layers), name
    return reads


def hf_reads(model, prompt):
    return read_all(model, prompt)


def vllm_reads(model, prompt):
    return read_all(model, prompt, temperature=0.0, max_tokens=1)


def test_vllm_layout_matches_reviewed_snapshot(pair):
    _, vllm_model = pair
    reviewed = load_snapshot("vllm", vllm_model.layout.architecture)
    assert reviewed is not None
    assert drift(vllm_model.layout, reviewed) == []
    layer = vllm_model.layout.modules["layer:LlamaDecoderLayer"]
    assert (layer.input.position, layer.input.residual, layer.output.kind) == (1, "residual", "dual")
    assert vllm_model.layout.modules["self_attn:LlamaAttention"].input.position is None
    assert vllm_model.layout.modules["mlp:LlamaMLP"].input.position == 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_accessor_equals_hf(pair, prompt):
    hf_model, vllm_model = pair
    expected, actual = hf_reads(hf_model, prompt), vllm_reads(vllm_model, prompt)
    for name, hf_values in expected.items():
        for i, (hf_value, vllm_value) in enumerate(zip(hf_values, actual[name], strict=True)):
            if hf_value.ndim == vllm_value.ndim + 1:
                hf_value = hf_value[0]  # one prompt: [1, seq, hidden] -> vLLM's flat [tokens, hidden]
            assert vllm_value.shape == hf_value.shape, f"{name}[{i}]"
            assert torch.allclose(vllm_value, hf_value, atol=1e-4, rtol=1e-4), \
                f"{name}[{i}] max diff {(vllm_value - hf_value).abs().max():.2e}"


def test_layers_output_equals_next_layers_input_on_vllm(pair):
    _, vllm_model = pair
    reads = vllm_reads(vllm_model, PROMPTS[0])
    for i in range(vllm_model.num_layers - 1):
        assert torch.equal(reads["layers_output"][i], reads["layers_input"][i + 1])


def test_steering_changes_generation_identically(pair):
    hf_model, vllm_model = pair
    vector = torch.randn(hf_model.hidden_size) * 4
    with torch.no_grad(), hf_model.trace(PROMPTS[0]):
        hf_model.steer(layers=[1], steering_vector=vector)
        hf_probs = hf_model.next_token_probs.save()
    with vllm_model.trace(PROMPTS[0], temperature=0.0, max_tokens=1):
        vllm_model.steer(layers=[1], steering_vector=vector)
        vllm_probs = vllm_model.next_token_probs.save()
    assert torch.allclose(vllm_probs, hf_probs, atol=1e-4)
    assert int(vllm_probs.argmax()) == int(hf_probs.argmax())


def test_in_place_edit_of_a_read_is_refused_and_engine_keeps_serving(pair):
    _, vllm_model = pair
    with pytest.raises(RuntimeError, match=r"In-place edit .* model\.layers_output\[0\].*Assign instead"):
        with vllm_model.trace(PROMPTS[0]):
            vllm_model.layers_output[0][:] = 0
    with vllm_model.trace(PROMPTS[0]):
        probs = vllm_model.next_token_probs.save()
    assert probs.shape == (1, vllm_model.vocab_size)


def test_wrong_shape_write_is_refused_with_shape(pair):
    _, vllm_model = pair
    with pytest.raises(RuntimeError, match=r"layers_output\[1\].*shape mismatch"):
        with vllm_model.trace(PROMPTS[0]):
            vllm_model.layers_output[1] = torch.zeros(3, vllm_model.hidden_size)


def test_logit_lens_and_patching_equal_hf(pair):
    from nnterp.interventions import activation_patching, logit_lens

    hf_model, vllm_model = pair
    assert torch.allclose(logit_lens(vllm_model, PROMPTS[0]), logit_lens(hf_model, PROMPTS[0]), atol=1e-5)
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    args = (clean, corrupt, 7)
    kwargs = {"layers": [0, 2], "positions": [0, -1]}
    assert torch.allclose(activation_patching(vllm_model, *args, **kwargs), activation_patching(hf_model, *args, **kwargs), atol=1e-5)


def test_prefix_caching_is_off_unless_unsafely_enabled(pair):
    _, vllm_model = pair
    assert vllm_model.vllm_entrypoint.llm_engine.vllm_config.cache_config.enable_prefix_caching is False


def test_clone_policy_protects_reads_from_in_place_buffer_reuse():
    """vLLM's GPU fused add+RMSNorm rewrites its input buffers in place after they were read. The CPU
    engine's native kernels do not, so the mutation is applied here by hand to the same tensors."""
    from nnterp.standardized.base import Backend
    from nnterp.standardized.vllm import VLLMBackend

    buffer = torch.randn(5, 8)
    before = buffer.clone()
    aliased = Backend().after_read(buffer, fresh=False, where="model.token_embeddings")
    cloned = VLLMBackend().after_read(buffer, fresh=False, where="model.token_embeddings")
    buffer.add_(1.0)  # what fused_add_rms_norm does to its residual argument
    assert not torch.equal(aliased, before)  # the problem: a saved reference follows the buffer
    assert torch.equal(cloned, before)  # the policy: the read holds the value at read time
    dual_sum = buffer + buffer
    assert VLLMBackend().after_read(dual_sum, fresh=True, where="x").data_ptr() == dual_sum.data_ptr()  # not cloned twice
