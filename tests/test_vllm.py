"""StandardizedVLLM on vLLM's CPU engine: layouts, clone policy and equivalence with StandardizedTransformer."""

import nnsight
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


from nnterp.core.layout import drift, load_snapshot  # noqa: E402
from harness.equivalence import RESULT_PREFIX, compare, read_accessors  # noqa: E402

TESTS = Path(__file__).resolve().parent  # the harness runs from here (`python -m harness...`)

PROMPTS = ["The capital of France is", "Hello", "One two three four five six"]


def test_vllm_layout_matches_reviewed_snapshot(pair):
    _, vllm_model = pair
    reviewed = load_snapshot("vllm", vllm_model.layout.architecture)
    assert reviewed is not None
    assert drift(vllm_model.layout, reviewed) == []
    layer = vllm_model.layout.modules["layer:LlamaDecoderLayer"]
    assert (layer.input.position, layer.input.residual, layer.output.kind) == (1, "residual", "dual")
    assert vllm_model.layout.modules["self_attn:LlamaAttention"].input.position is None
    assert vllm_model.layout.modules["mlp:LlamaMLP"].input.position == 0


def test_every_accessor_equals_hf(pair):
    """3 prompts of different lengths, every layer; each vLLM request's flat tokens map back to its prompt."""
    diffs = compare(*pair, PROMPTS)
    assert set(diffs) == {"layers_input", "layers_output", "attentions_input", "attentions_output", "mlps_input",
                          "mlps_output", "token_embeddings", "next_token_probs"}
    assert all(diff["abs"] <= 1e-4 for diff in diffs.values()), diffs


def test_layers_output_equals_next_layers_input_on_vllm(pair):
    _, vllm_model = pair
    reads = read_accessors(vllm_model, PROMPTS[0])
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


def test_steered_generation_equals_hf_token_for_token(pair):
    """Greedy multi-token generation, plain and steered at every step, on both backends."""
    from nnterp.interventions import steered_generation

    hf_model, vllm_model = pair
    vector = torch.randn(hf_model.hidden_size, generator=torch.Generator().manual_seed(1)) * 20
    runs = {}
    for name, model in (("hf", hf_model), ("vllm", vllm_model)):
        runs[name] = [steered_generation(model, prompt, vector if steer else None, layers=[1], max_new_tokens=6).tokens
                      for prompt in PROMPTS for steer in (False, True)]
    assert runs["vllm"] == runs["hf"]
    assert runs["hf"][0::2] != runs["hf"][1::2]  # steering changed the continuations


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


def test_parameters_are_whole_and_unpadded_inside_a_trace(pair):
    hf_model, vllm_model = pair
    with torch.no_grad(), vllm_model.trace(PROMPTS[0]):
        head = nnsight.save(vllm_model.parameter("lm_head.weight"))
        embed = nnsight.save(vllm_model.parameter("embed_tokens.weight"))
    assert torch.equal(head, hf_model.parameter("lm_head.weight"))
    assert torch.equal(embed, hf_model.parameter("embed_tokens.weight"))
    with pytest.raises(RuntimeError, match="repacks linear weights"):  # the CPU engine keeps no original
        with torch.no_grad(), vllm_model.trace(PROMPTS[0]):
            vllm_model.parameter("layers.1.mlp.gate_up_proj.weight").save()


def test_smollm2_every_accessor_equals_hf():
    """The real SmolLM2-135M (30 layers), HF then vLLM in a fresh process (one engine per process)."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "harness.equivalence", "smollm2-135m"], cwd=TESTS,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    result = json.loads(line.removeprefix(RESULT_PREFIX))["smollm2-135m"]
    assert result["status"] == "pass", result["reason"]
    assert len(result["max_abs_diff"]) == 8 and max(result["max_rel_diff"].values()) <= 1e-4, result
    generations = result["generations"]  # greedy, plain and steered: token for token
    assert generations["vllm"] == generations["hf"] and generations["hf"]["plain"] != generations["hf"]["steered"]
