"""model.extract on vLLM's CPU engine: several prompts per engine step (and steps per prompt when generating)
against the trace of each prompt alone, against HF, the engine's errors, and trace requests that refer to the
model instead of carrying it."""

import nnsight
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp import StandardizedTransformer  # noqa: E402
from nnterp.backends.vllm.engine import share_with_workers  # noqa: E402
from nnterp.extraction import ACCESSORS, plan_extraction  # noqa: E402
from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402

PROMPTS = ["The capital of France is", "Hello", "One two three four five six. The cat sat on the mat.", "A",
           "Le chat est noir. Der Hund ist braun."]


@pytest.fixture(scope="module")
def model(tiny_path):
    # 3 requests per step at most: the 5 prompts share steps, and a step holds other prompts' tokens.
    with StandardizedVLLM(str(tiny_path("llama")), dtype="float32", max_model_len=128, max_num_seqs=3) as vllm_model:
        yield vllm_model


@pytest.fixture(scope="module")
def extracted(model):
    return list(model.extract(PROMPTS, accessors=ACCESSORS, progress=False))


def traced(model, prompt, name: str) -> torch.Tensor:
    with model.trace(prompt):
        values = nnsight.save([getattr(model, name)[i] for i in range(model.num_layers)])
    return torch.stack(list(values))


def engine_token_ids(model, prompt: str) -> list[int]:
    """The engine's own tokenization of a text prompt."""
    from vllm import SamplingParams

    return list(model.vllm_entrypoint.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids)


def test_every_accessor_equals_the_trace_of_each_prompt_alone(model, extracted):
    """Dual-stream sums (layers), keyword inputs (attention), positional inputs (MLP), and layer 0's input, which
    is the embedding's own buffer (the clone policy). Text is tokenized as the engine tokenizes it."""
    assert [result.index for result in extracted] == list(range(len(PROMPTS)))
    for result, prompt in zip(extracted, PROMPTS):
        assert result.token_ids == engine_token_ids(model, prompt)
        for name in ACCESSORS:
            reference = traced(model, prompt, name)
            assert result[name].shape == reference.shape == (model.num_layers, len(result.token_ids), model.hidden_size)
            assert torch.allclose(result[name], reference, atol=1e-5), (name, prompt)


def test_vllm_extraction_equals_hf_extraction(tiny_path, extracted):
    hf = StandardizedTransformer(str(tiny_path("llama")))
    for vllm_result, hf_result in zip(extracted, hf.extract(PROMPTS, accessors=ACCESSORS, progress=False)):
        assert vllm_result.token_ids == hf_result.token_ids
        for name in ACCESSORS:
            assert torch.allclose(vllm_result[name], hf_result[name], atol=1e-4), name


def test_generated_rows_equal_the_traced_generation_steps(model):
    """Each decode step adds one row per request, in steps shared with other requests."""
    results = list(model.extract(PROMPTS[:3], layers=[1], max_new_tokens=4, ignore_eos=True, progress=False))
    for result, prompt in zip(results, PROMPTS):
        with model.trace(prompt, max_tokens=4, ignore_eos=True) as tracer:
            steps, tokens = nnsight.save([]), nnsight.save([])
            for _ in tracer.iter[:]:
                steps.append(model.layers_output[1])
                tokens.append(model.samples.item())
        assert result.generated == list(tokens) and len(result.generated) == 4
        assert result.token_ids == model.tokenizer(prompt)["input_ids"] + result.generated[:-1]
        assert torch.allclose(result["layers_output"][0], torch.cat(list(steps))[:len(result.token_ids)], atol=1e-5)


def test_a_small_window_keeps_prompt_order_and_values(model, extracted):
    windowed = list(model.extract(PROMPTS, accessors=ACCESSORS, batch_size=2, progress=False))
    assert [result.index for result in windowed] == list(range(len(PROMPTS)))
    for small, full in zip(windowed, extracted):
        assert all(torch.allclose(small[name], full[name], atol=1e-5) for name in ACCESSORS)


def worker_state(model):
    """(extractions, requests nnsight tracks) on the engine's worker."""
    def read(worker):
        runner = worker.model_runner
        return len(runner.nnterp_extractions.running), len(runner.nnsight_requests.requests)

    return model.vllm_entrypoint.llm_engine.collective_rpc(read)[0]


def test_tracing_during_an_extraction_is_refused_and_closing_releases_the_engine(model):
    results = model.extract(PROMPTS, progress=False)
    next(results)
    with pytest.raises(RuntimeError, match=r"extract\(\) generator is still running"):
        model.trace(PROMPTS[0])
    results.close()
    with model.trace(PROMPTS[0]):
        value = model.layers_output[0].save()
    assert value.shape[0] == len(model.tokenizer(PROMPTS[0])["input_ids"])
    assert worker_state(model) == (0, 0)


def test_a_prompt_of_no_tokens_is_refused_by_its_index_and_the_engine_keeps_serving(model):
    with pytest.raises(ValueError, match="prompt 2 has no tokens: give it some text or token ids"):
        list(model.extract(["Hello", "A", []], progress=False))
    assert worker_state(model) == (0, 0)
    result = next(model.extract(PROMPTS[:1], progress=False))
    assert result.token_ids == engine_token_ids(model, PROMPTS[0])


def test_an_error_in_the_engine_is_reported_and_the_engine_keeps_serving(model):
    from dataclasses import replace

    from nnterp.backends.vllm.extraction import run
    from nnterp.core.layout import InputLayout

    plan = plan_extraction(model, "attentions_input", [1])
    broken = replace(plan.taps[0], layout=replace(plan.taps[0].layout, input=InputLayout("hidden", None)))
    with pytest.raises(RuntimeError, match=r"extraction failed in the engine: LayoutError: attentions_input\[1\].*'hidden'"):
        list(run(model, replace(plan, taps=(broken,)), PROMPTS[:2], 2, 0, {}))
    result = next(model.extract(PROMPTS[:1], accessors="attentions_input", layers=1, progress=False))
    assert torch.allclose(result["attentions_input"], traced(model, PROMPTS[0], "attentions_input")[1:2], atol=1e-5)
    assert worker_state(model) == (0, 0)


def test_memory_that_cannot_be_registered_stops_one_extraction_and_the_next_copy_their_rows(model):
    """On a GPU the device writes rows into host memory registered with CUDA; where registering fails, that
    extraction says so and the engine's next extractions go through host transfers and copier threads."""
    def break_registration(worker):
        from nnterp.backends.taps.device_rows import DeviceRows, RegistrationError

        class Unregistrable(DeviceRows):
            def copy(self, buffer, items):
                raise RegistrationError("could not register 4096 bytes of host memory with CUDA (out of memory)")

        worker.model_runner.nnterp_extractions.device_rows = Unregistrable(torch.device("cpu"))

    def writers(worker):
        extractions = worker.model_runner.nnterp_extractions
        return type(extractions.device_rows).__name__, type(extractions.copied_rows).__name__

    def restore(worker):
        from nnterp.backends.taps.device_rows import DeviceRows

        worker.model_runner.nnterp_extractions.device_rows = DeviceRows(torch.device("cpu"))

    engine = model.vllm_entrypoint.llm_engine
    engine.collective_rpc(break_registration)
    try:
        refused = (r"could not register 4096 bytes of host memory with CUDA \(out of memory\): this extraction "
                   r"stops; the engine's next extractions copy their rows")
        with pytest.raises(RuntimeError, match=refused):
            list(model.extract(PROMPTS[:2], progress=False))
        assert engine.collective_rpc(writers)[0] == ("NoneType", "NoneType")
        results = list(model.extract(PROMPTS[:2], accessors="layers_output", progress=False))
        assert engine.collective_rpc(writers)[0] == ("NoneType", "CopiedRows")
        for result, prompt in zip(results, PROMPTS[:2]):
            assert torch.allclose(result["layers_output"], traced(model, prompt, "layers_output"), atol=1e-5)
    finally:
        engine.collective_rpc(restore)
    assert worker_state(model) == (0, 0)


def test_trace_requests_refer_to_the_model_instead_of_carrying_it(model):
    from nnsight.intervention.serialization import dumps
    from nnsight.modeling.vllm.vllm import VLLM

    payloads = []
    attach = VLLM._attach_mediators

    def recording(self, params, **kwargs):
        attached = attach(self, params, **kwargs)
        payloads.extend(len(param.extra_args["nnsight_mediator"]) for param in params)
        return attached

    VLLM._attach_mediators = recording
    try:
        with model.trace(PROMPTS[0]):
            model.layers_output[1].save()
    finally:
        VLLM._attach_mediators = attach
    model.__dict__.pop("_persistent_id")
    try:
        whole = len(dumps(model))
    finally:
        share_with_workers(model)
    assert payloads and max(payloads) * 20 < whole, (payloads, whole)


def test_a_model_attribute_set_after_a_trace_reaches_later_traces(model):
    vector = torch.full((model.hidden_size,), 0.5)

    def steered(direction=None):
        with model.trace(PROMPTS[0]):
            step = model.steering_direction if direction is None else direction
            model.layers_output[0] = model.layers_output[0] + step
            value = model.layers_output[1].save()
        return value

    with_local = steered(vector)
    model.steering_direction = vector
    assert torch.equal(steered(), with_local)
    model.steering_direction = -vector
    assert torch.allclose(steered(), steered(-vector)) and not torch.allclose(steered(), with_local)


def read_in_trace(model, name: str) -> torch.Tensor:
    with model.trace(PROMPTS[0]):
        value = getattr(model, name)[0].save()
    return value


def test_a_graph_captured_engine_refuses_what_it_does_not_serve(model):
    """What a graph-captured engine serving only ``layers_output`` refuses, checked on the CPU engine with that
    engine's backend (the refusal lives in the backend; a CPU machine cannot capture graphs): each read names
    itself and the eager alternative, and the engine serves the next request."""
    from nnterp.backends.vllm.backend import VLLMBackend

    original = model._backend
    model._backend = VLLMBackend(("layers_output",))
    try:
        assert model.graph_accessors == ("layers_output",)
        from nnterp.standardized.checks import check_renaming

        check_renaming(model)  # the load-time check reads only what such an engine serves
        assert read_in_trace(model, "layers_output").shape[-1] == model.hidden_size
        for name in ("attentions_output", "mlps_input", "layers_input", "attention_probabilities", "heads_output"):
            with pytest.raises(NotImplementedError, match=rf"{name} is not served on this graph-captured engine.*"
                                                          r"cuda_graphs=False"):
                read_in_trace(model, name)
        with pytest.raises(NotImplementedError, match="mlps_output is not served"):
            with model.trace(PROMPTS[0]):
                model.mlps_output[0] = model.mlps_output[0] * 2
        with pytest.raises(NotImplementedError, match="attentions_output is not served"):
            list(model.extract(PROMPTS[:1], accessors=("attentions_output",), progress=False))
    finally:
        model._backend = original
    assert model.graph_accessors is None
    assert read_in_trace(model, "attentions_output").shape[-1] == model.hidden_size


def test_requests_sending_the_same_steering_text_are_each_steered_until_their_own_end(model):
    """Offline requests with one spec text share its parse and its vector's row: one request finishing (fewer
    tokens) must not take the vector from the others. Each request's tokens equal the same request run alone,
    and differ from the unsteered ones."""
    from vllm import SamplingParams

    from nnterp.backends.taps.spec import RequestSpec, Steer

    vector = (torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(3)) * 8).tolist()
    text = RequestSpec(steer=[Steer([1], vector, 1.0, "all")]).to_json()
    lengths = [2, 9, 9]
    prompts = PROMPTS[:3]

    def generate(indices, steered=True):
        params = [SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True,
                                 extra_args={"nnterp": text} if steered else None) for i in indices]
        outputs = model.vllm_entrypoint.generate([prompts[i] for i in indices], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    together = generate(range(3))
    alone = [generate([i])[0] for i in range(3)]
    plain = generate(range(3), steered=False)
    assert together == alone
    assert all(steered != unsteered for steered, unsteered in zip(together[1:], plain[1:]))


def test_the_heap_is_frozen_for_the_garbage_collector_once_the_engine_is_up(tiny_path, monkeypatch):
    """An in-process engine shares its heap with the model's wrappers: each full collection between engine
    steps would walk them all, so they are frozen once the engine has started."""
    import gc
    import sys

    import vllm.utils.gc_utils as gc_utils

    frozen = []

    def freeze():  # records, for a model's call, whether it already has its engine (vLLM's engine calls it too)
        caller = sys._getframe(1).f_locals.get("self")
        if isinstance(caller, StandardizedVLLM):
            frozen.append(caller.vllm_entrypoint is not None)
        gc.freeze()

    monkeypatch.setattr(gc_utils, "freeze_gc_heap", freeze)
    model = StandardizedVLLM(str(tiny_path("gpt2")), dtype="float32", max_model_len=64, check_renaming=False)
    try:
        assert model.dispatched and frozen == [True] and gc.get_freeze_count() > 0  # once, after the engine started
        model.dispatch()
        assert frozen == [True]
        model.close()
        model.dispatch()  # a new engine after close
        assert frozen == [True, True]
    finally:
        model.close()
