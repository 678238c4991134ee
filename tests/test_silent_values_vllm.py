"""StandardizedVLLM on the CPU engine against the HF model of the same weights: several invokes collected in one
shared list, writes through every accessor, worker errors with their own type, and a fixed-seed sample of
the differential fuzzer (one prompt per invoke, each compared with that prompt run alone on HF; extraction
likewise)."""

import nnsight
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from differential import (  # noqa: E402
    alone_references, check_extraction_case, check_vllm_case, failing_trace, make_case, summarize, surface_of,
)
from nnsight.intervention.interleaver import OutOfOrderError  # noqa: E402

from engines import hf_and_vllm  # noqa: E402

from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402
from nnterp.backends.vllm.collect import merge_invoke_copies, worker_error  # noqa: E402

PROMPTS = ["The capital of France is", "Hi", "One two three four"]
ACCESSORS = ("layers_input", "attentions_input", "attentions_output", "mlps_input", "mlps_output", "layers_output")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_path):
    with hf_and_vllm(tiny_path(request.param)) as models:
        yield (request.param, *models)


def hf_alone(hf_model, prompt: str, accessor: str, layer: int) -> torch.Tensor:
    with torch.no_grad(), hf_model.trace(prompt):
        value = getattr(hf_model, accessor)[layer].save()
    return value[0]


def test_list_shared_by_invokes_collects_every_invoke_in_order(pair):
    """``nnsight.save([])`` appended in each invoke (the README's pattern), a pre-sized slot list and a dict."""
    _, hf_model, vllm_model = pair
    with vllm_model.trace() as tracer:
        appended = nnsight.save([])
        slots = nnsight.save([None] * len(PROMPTS))
        by_prompt = nnsight.save({})
        for index, prompt in enumerate(PROMPTS):
            with tracer.invoke(prompt):
                slots[index] = vllm_model.layers_output[0]
                appended.append(vllm_model.layers_output[1])
                by_prompt[prompt] = vllm_model.next_token_probs
    assert len(appended) == len(PROMPTS) and list(by_prompt) == PROMPTS
    for index, prompt in enumerate(PROMPTS):
        assert torch.allclose(appended[index], hf_alone(hf_model, prompt, "layers_output", 1), atol=1e-5)
        assert torch.allclose(slots[index], hf_alone(hf_model, prompt, "layers_output", 0), atol=1e-5)
        with torch.no_grad(), hf_model.trace(prompt):
            probs = hf_model.next_token_probs.save()
        assert torch.allclose(by_prompt[prompt], probs, atol=1e-6)


def test_every_accessor_write_equals_hf(pair):
    """Each accessor (and token_embeddings) at every layer: the stream scaled and shifted, then the next-token
    distribution, against the same write on HF."""
    _, hf_model, vllm_model = pair
    shift = torch.randn(hf_model.hidden_size, generator=torch.Generator().manual_seed(0))
    targets = [(name, layer) for name in ACCESSORS for layer in range(hf_model.num_layers)] + [("token_embeddings", None)]
    for name, layer in targets:
        results = {}
        for backend, model in (("hf", hf_model), ("vllm", vllm_model)):
            with torch.no_grad(), model.trace(PROMPTS[0]):
                if layer is None:
                    model.token_embeddings = model.token_embeddings * 0.5 + shift
                else:
                    accessor = getattr(model, name)
                    accessor[layer] = accessor[layer] * 0.5 + shift
                probs = model.next_token_probs.save()
            results[backend] = probs
        assert torch.allclose(results["vllm"], results["hf"], atol=1e-6), (name, layer)
    with torch.no_grad(), hf_model.trace(PROMPTS[0]):
        plain = hf_model.next_token_probs.save()
    assert not torch.allclose(results["hf"], plain, atol=1e-4)  # the writes do change the distribution


def test_worker_errors_keep_their_type(pair):
    _, _, vllm_model = pair
    with pytest.raises(IndexError, match="list index out of range"):
        with vllm_model.trace(PROMPTS[0]):
            [][1]
    with pytest.raises(ValueError, match=r"layers_output\[1\].*shape mismatch") as raised:
        with vllm_model.trace(PROMPTS[0]):
            vllm_model.layers_output[1] = torch.zeros(3, vllm_model.hidden_size)
    assert isinstance(raised.value, RuntimeError)  # still caught by handlers written for nnsight's RuntimeError
    with pytest.raises(OutOfOrderError, match=r"model\.attentions_output\[1\] was requested.*The access before it was "
                                              r"model\.layers_output\[2\]"):
        with vllm_model.trace(PROMPTS[0]):
            vllm_model.layers_output[2].save()
            vllm_model.attentions_output[1].save()
    with vllm_model.trace(PROMPTS[0]):  # the engine keeps serving
        probs = vllm_model.next_token_probs.save()
    assert probs.shape == (1, vllm_model.vocab_size)


def test_last_position_is_the_requests_last_token(pair):
    _, hf_model, vllm_model = pair
    with vllm_model.trace(PROMPTS[2]):
        last = vllm_model.last_position(vllm_model.layers_output[1]).save()
    assert last.shape == (1, vllm_model.hidden_size)
    assert torch.allclose(last[0], hf_alone(hf_model, PROMPTS[2], "layers_output", 1)[-1], atol=1e-5)


def test_fuzz_sample_matches_hf_alone(pair):
    architecture, hf_model, vllm_model = pair
    surface = surface_of(hf_model)
    results = []
    for seed in range(300, 308):
        case = make_case(seed, architecture, surface, one_prompt_per_invoke=True, dtypes=(torch.float32,))
        found, worst = check_vllm_case(vllm_model, case, alone_references(hf_model, case))
        results.append((case, found, worst))
    assert not any(found for _, found, _ in results), summarize(results)


def test_fuzz_extraction_sample_matches_hf_alone(pair):
    """StandardizedVLLM.extract (random accessors, layers, windows, generated tokens with and without ignore_eos)
    against hooks on the HF model run on each prompt's tokens alone, and its tokens against HF's greedy choice."""
    architecture, hf_model, vllm_model = pair
    surface = surface_of(hf_model)
    results = []
    for seed in range(340, 346):
        case = make_case(seed, architecture, surface, dtypes=(torch.float32,))
        results.append((case, *check_extraction_case(vllm_model, hf_model, surface, case, engine_sampling=True)))
    assert not any(found for _, found, _ in results), summarize(results)


def test_engine_steps_outside_a_trace_leave_later_traces_outermost(pair):
    """The in-process engine runs its steps on this thread; after an extraction and a plain generate, an HF trace
    is still an outermost one: only saved values leave its body, and saving outside a trace is refused."""
    _, hf_model, vllm_model = pair
    list(vllm_model.extract(PROMPTS[:2], layers=[0], max_new_tokens=2, progress=False))
    vllm_model.vllm_entrypoint.generate(PROMPTS[0], use_tqdm=False)
    with torch.no_grad(), hf_model.trace(PROMPTS[0]):
        unsaved = hf_model.layers_output[0] * 1
        saved = hf_model.layers_output[0].save()
    assert "unsaved" not in locals() and saved.shape[-1] == hf_model.hidden_size
    with pytest.raises(Exception, match="save"):
        torch.zeros(1).save()


def test_a_trace_holding_another_models_accessor_is_refused_by_name(pair):
    """A variable bound to the HF model's accessor, reassigned inside a vLLM trace: the request cannot carry the HF
    model, and the error says which kind of object and what to do; the engine serves the next trace."""
    _, hf_model, vllm_model = pair
    accessor = hf_model.layers_output
    with pytest.raises(RuntimeError, match=r"UnknownPersistentIdError.*another model such as a StandardizedTransformer, "
                                           r"or its accessor.*Use another variable name"):
        with vllm_model.trace(PROMPTS[0]):
            accessor = vllm_model.layers_output
            accessor[0].save()
    with vllm_model.trace(PROMPTS[0]):
        value = vllm_model.layers_output[0].save()
    assert torch.allclose(value, hf_alone(hf_model, PROMPTS[0], "layers_output", 0), atol=1e-5)


def test_fuzz_cases_after_engine_side_failures_match_hf_alone(pair):
    """Cases run right after a trace during which one of vLLM's modules failed: the failure reaches that trace,
    and the engine's next values are still the HF reference's."""
    architecture, hf_model, vllm_model = pair
    surface = surface_of(hf_model)
    results = []
    for seed in range(320, 324):
        case = make_case(seed, architecture, surface, one_prompt_per_invoke=True, dtypes=(torch.float32,))
        with pytest.raises(RuntimeError, match="injected failure of a vLLM module.*forward pass raised"):
            failing_trace(vllm_model, case)
        found, worst = check_vllm_case(vllm_model, case, alone_references(hf_model, case))
        results.append((case, found, worst))
    assert not any(found for _, found, _ in results), summarize(results)


def test_prefix_caching_is_refused_by_its_vllm_name(tiny_path):
    with pytest.raises(ValueError, match="unsafe_enable_prefix_caching=True"):
        StandardizedVLLM(str(tiny_path("llama")), enable_prefix_caching=True)


def test_merge_of_invoke_copies():
    assert merge_invoke_copies([], [[1], [2], [3]]) == [1, 2, 3]
    assert merge_invoke_copies([None, None], [["a", None], [None, "b"]]) == ["a", "b"]
    assert merge_invoke_copies([0], [[0, 1], [5, 2]]) == [5, 1, 2]  # a slot one invoke changed, then the appends
    assert merge_invoke_copies({"k": 0}, [{"k": 0, "a": 1}, {"k": 2, "b": 3}]) == {"k": 2, "a": 1, "b": 3}
    assert merge_invoke_copies({1, 2}, [{1, 2, 3}, {2}]) == {2, 3}
    assert merge_invoke_copies([[]], [[[1]], [[2, 3]]]) == [[1, 2, 3]]
    tensor = torch.ones(2)
    assert torch.equal(merge_invoke_copies(tensor, [tensor.clone(), tensor * 3, tensor.clone()]), tensor * 3)


def test_worker_error_types():
    error = worker_error({"type_name": "KeyError", "message": "'x'", "traceback": "  File ..."})
    assert isinstance(error, KeyError) and isinstance(error, RuntimeError) and "Intervention traceback" in str(error)
    unknown = worker_error({"type_name": "SomeLibraryError", "message": "boom"})
    assert type(unknown) is RuntimeError and str(unknown) == "SomeLibraryError: boom"


def test_skipping_a_layer_whose_parent_unpacks_its_tuple():
    """vLLM's StableLM layer returns ``hidden_states, residual`` and its model unpacks both: a skipped layer's
    stand-in output must have as many entries."""
    from vllm.model_executor.models.stablelm import StablelmDecoderLayer

    from nnterp.core.layout import OutputLayout
    from nnterp.core.layout.infer import returned_tuple_length

    assert returned_tuple_length(StablelmDecoderLayer) == 2
    stream = torch.randn(3, 8)
    built = OutputLayout("tuple", 0).build(stream, returned_tuple_length(StablelmDecoderLayer))
    hidden, residual = built
    assert hidden is stream and residual is None
