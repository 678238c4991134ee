"""nnterp 1.x's model surface on StandardizedVLLM (one engine), against plain HF forwards with hooks on the
same weights and manual computations."""

import time

import nnsight
import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp import RenameConfig, RenamingError  # noqa: E402
from nnterp.standardized.checks import check_renaming  # noqa: E402
from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402

from hf_reference import add_at, hooked_logits  # noqa: E402

PROMPTS = ["The capital of France is", "One two three four"]
ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def pair(tiny_path):
    """The raw HF model and a StandardizedVLLM on the same weights, loaded with nnterp 1.x's arguments."""
    path = str(tiny_path("llama"))
    config = RenameConfig(attn_name="self_attn", layers_name="layers", model_name="model", attn_head_config_key="num_attention_heads")
    vllm_model = StandardizedVLLM(path, trust_remote_code=False, check_renaming=True, allow_dispatch=True, rename_config=config,
                                  rename={"o_proj": "out_proj"}, tokenizer_kwargs={"padding_side": "left"}, **ENGINE)
    yield AutoModelForCausalLM.from_pretrained(path).eval(), vllm_model
    vllm_model.close()


def hooked_probs(raw, ids: torch.Tensor, edits: dict) -> torch.Tensor:
    """Next-token probabilities of the raw HF model on ``ids``, ``edits`` applied to layer outputs by hooks."""
    return hooked_logits(raw, raw.model.layers, ids, edits)[-1].softmax(-1)


def test_module_tree_aliases_and_layout_facts(pair):
    raw, model = pair
    assert model.model.layers._module is model.layers._module and model.model.ln_final._module is model.ln_final._module
    assert model.layers[0].self_attn.out_proj._module is model.layers[0].self_attn.o_proj._module
    assert model.num_heads == raw.config.num_attention_heads and model.attn_probs_available
    with torch.no_grad(), model.trace(PROMPTS[0]):
        output = nnsight.save(model.layers[0].output)
        called = model.layers_output(0).save()
    assert model.layers_output.returns_tuple is isinstance(output, tuple) is True  # (hidden, residual)
    assert torch.equal(called, output[0] + output[1])


def test_inputs_are_per_invoke(pair):
    _, model = pair
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            ids_0, mask_0, size_0 = model.input_ids.save(), model.attention_mask.save(), nnsight.save(tuple(model.input_size))
        with tracer.invoke(PROMPTS[1]):
            ids_1, mask_1, size_1 = model.input_ids.save(), model.attention_mask.save(), nnsight.save(tuple(model.input_size))
    first, second = (ids_0, mask_0, size_0), (ids_1, mask_1, size_1)
    for prompt, (ids, mask, size) in zip(PROMPTS, (first, second)):
        expected = model.tokenizer(prompt)["input_ids"]
        assert ids.tolist() == [expected] and mask.tolist() == [[1] * len(expected)] and tuple(size) == (1, len(expected))


def test_steer_positions_are_each_invokes_own_tokens(pair):
    raw, model = pair
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            first_ids = model.input_ids.save()
            model.steer([2, 0], vector, factor=2.0, token_positions=[0, -1])
            first = model.next_token_probs.save()
        with tracer.invoke(PROMPTS[1]):
            second_ids = model.input_ids.save()
            model.steer(1, vector, batch_index=0, token_positions=slice(1, 3))
            second = model.next_token_probs.save()
    twice = add_at(2 * vector, [0, -1])
    assert torch.allclose(first[0], hooked_probs(raw, first_ids, {0: twice, 2: twice}), atol=1e-5)
    assert torch.allclose(second[0], hooked_probs(raw, second_ids, {1: add_at(vector, [1, 2])}), atol=1e-5)
    assert not torch.allclose(second[0], hooked_probs(raw, second_ids, {}), atol=1e-4)
    with pytest.raises(RuntimeError, match=r"batch_index=\[1\] is out of range for a batch of 1 prompt.*each invoke is one prompt"):
        with model.trace(PROMPTS[0]):
            model.steer(0, vector, batch_index=1)


def test_skip_layers_with_skip_with_and_topk_tokens(pair):
    raw, model = pair
    replacement = torch.randn(len(model.tokenizer(PROMPTS[0])["input_ids"]), model.hidden_size)
    with torch.no_grad(), model.trace(PROMPTS[0]):
        ids = model.input_ids.save()
        model.skip_layers(0, 1, skip_with=replacement)
        skipped = model.next_token_probs.save()
    replace = lambda stream: replacement[None]  # noqa: E731
    assert torch.allclose(skipped[0], hooked_probs(raw, ids, {0: replace, 1: replace}), atol=1e-5)
    hidden = torch.randn(2, model.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        manual = raw.lm_head(raw.model.norm(hidden)).softmax(-1)
    top = model.get_topk_closest_tokens(hidden, k=3)
    for row, result in enumerate(top):
        values, indices = manual[row].topk(3)
        assert list(result) == model.tokenizer.convert_ids_to_tokens(indices.tolist())
        assert list(result.values()) == pytest.approx(values.tolist(), abs=1e-5)


def test_check_renaming_on_vllm_reads_the_engines_shapes(pair):
    _, model = pair
    check_renaming(model)  # passes on the real config
    original = model._rename_config
    model._rename_config = RenameConfig(hidden_size_config_key=64)
    try:
        with pytest.raises(RenamingError, match=r"token_embeddings has shape \(\d+, 128\), expected \(1, \d+, 64\)"):
            check_renaming(model)
    finally:
        model._rename_config = original


def test_arguments_vllm_cannot_honour_fail_before_the_engine_starts(tiny_path, tmp_path):
    path = str(tiny_path("llama"))
    with pytest.raises(NotImplementedError, match="remote execution on NDIF"):
        StandardizedVLLM(path, remote=True)
    with pytest.raises(ValueError, match="CUDA graphs need an NVIDIA GPU and this machine has none"):
        StandardizedVLLM(path, enforce_eager=False)
    with pytest.raises(ValueError, match="CPU engine cannot run on its Ray executor"):
        StandardizedVLLM(path, pipeline_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(FileNotFoundError, match="StandardizedVLLM: the model path .* does not exist"):
        StandardizedVLLM(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"without config\.json or params\.json"):
        StandardizedVLLM(tmp_path)
    with pytest.raises(TypeError, match="takes a path or hub id, not a loaded LlamaForCausalLM"):
        StandardizedVLLM(AutoModelForCausalLM.from_pretrained(path))


def test_token_id_tensors_are_prompts_as_on_hf(pair):
    _, model = pair
    ids = model.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad(), model.trace(torch.tensor(ids)):
        from_tensor = model.layers_output[1].save()
    with torch.no_grad(), model.trace(ids):
        from_list = model.layers_output[1].save()
    assert torch.equal(from_tensor, from_list)
    with pytest.raises(ValueError, match="one request takes one prompt"):
        with torch.no_grad(), model.trace(torch.tensor([ids, ids])):
            model.layers_output[1].save()


def test_a_variable_from_another_invoke_is_explained(pair):
    _, model = pair
    with pytest.raises(NameError, match="each tracer.invoke runs as its own engine request"):
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(PROMPTS[0]):
                first = model.layers_output[0]
            with tracer.invoke(PROMPTS[1]):
                (first * 2).save()
    with torch.no_grad(), model.trace(PROMPTS[0]):  # the engine serves the next trace
        assert model.layers_output[0].save() is not None


def test_parameters_and_projections_outside_a_trace_equal_hf(pair):
    """Outside a trace the weights live in the engine: they are read through a short request, and equal the HF
    model's; a projection equals the HF model's final norm and LM head applied by hand."""
    raw, model = pair
    assert torch.equal(model.parameter("lm_head.weight"), raw.lm_head.weight)
    assert torch.equal(model.parameter("embed_tokens.weight"), raw.model.embed_tokens.weight)
    try:
        assert torch.equal(model.parameter("layers.1.mlp.down_proj.weight"), raw.model.layers[1].mlp.down_proj.weight)
    except RuntimeError as error:  # vLLM's CPU engine repacks linear weights: said as such
        assert "repacks linear weights" in str(error) and not torch.cuda.is_available()
    hidden = torch.randn(2, model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = raw.lm_head(raw.model.norm(hidden))
    torch.testing.assert_close(model.project_on_vocab(hidden), expected)


def test_a_bad_dtype_is_refused_before_the_engine_starts(tiny_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"dtype='float33'.*vLLM takes one of \['auto', 'half'"):
        StandardizedVLLM(str(tiny_path("llama")), dtype="float33")
    assert time.monotonic() - start < 5
