"""The engine survives every failure: an error raised by the trace body, by one of vLLM's modules, by its
sampler or by the worker's collection reaches the caller with a clear message, and the next trace on the same
engine returns, within a bounded time, the values the engine gave before any failure (a fresh engine's)."""

import contextlib
import signal

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402

PROMPT = "The capital of France is"
MARKER = 12345.0  # a value no activation takes: the injected module failure fires on it
NEXT_TRACE_SECONDS = 60


@pytest.fixture(scope="module")
def engine(tiny_path):
    with StandardizedVLLM(str(tiny_path("llama")), dtype="float32", max_model_len=128, max_num_seqs=4) as model:
        yield model, clean_values(model)


def clean_values(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), model.trace(PROMPT):
        stream = model.layers_output[1].save()
        probs = model.next_token_probs.save()
    return stream, probs


@contextlib.contextmanager
def bounded(seconds: int):
    """Fail instead of hanging: the body must finish within ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"the next trace did not return within {seconds} s: the engine is stuck")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_serves_clean_values(engine) -> None:
    model, (stream, probs) = engine
    with bounded(NEXT_TRACE_SECONDS):
        again = clean_values(model)
    assert torch.equal(again[0], stream) and torch.equal(again[1], probs)


def test_an_error_in_the_trace_body(engine):
    model, _ = engine
    with pytest.raises(KeyError, match="raised by the body"):
        with torch.no_grad(), model.trace(PROMPT):
            model.layers_output[0].save()
            raise KeyError("raised by the body")
    assert_serves_clean_values(engine)


def test_a_write_of_the_wrong_dtype_is_refused_in_the_body(engine):
    model, _ = engine
    with pytest.raises(TypeError, match=r"torch.float32 but the new value is torch.float64.*value.to\(torch.float32\)"):
        with torch.no_grad(), model.trace(PROMPT):
            model.layers_output[1] = model.layers_output[1].double()
            model.logits.save()
    assert_serves_clean_values(engine)


def test_an_error_raised_by_a_vllm_module_after_a_write(engine):
    """One of vLLM's decoder layers fails on what a trace wrote into the stream (its input holds the marker):
    the trace gets that error, marked as raised in the forward pass, and the engine keeps serving."""
    model, _ = engine
    engine_core = model.vllm_entrypoint.llm_engine

    def install(worker):
        layer = worker.model_runner.get_model().get_submodule(model.names.layers)[2]

        def fail_on_marker(module, args, kwargs):
            values = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
            if any(value.is_floating_point() and bool((value == MARKER).any()) for value in values):
                raise RuntimeError("injected failure of a vLLM module")

        worker.nnterp_test_hook = layer.register_forward_pre_hook(fail_on_marker, with_kwargs=True)

    engine_core.collective_rpc(install)
    try:
        with pytest.raises(RuntimeError, match=r"injected failure of a vLLM module.*forward pass raised while this "
                                               r"request's interventions ran"):
            with torch.no_grad(), model.trace(PROMPT):
                model.layers_output[1] = torch.full_like(model.layers_output[1], MARKER)
                model.logits.save()
        assert_serves_clean_values(engine)
    finally:
        engine_core.collective_rpc(lambda worker: worker.nnterp_test_hook.remove())


def test_an_error_raised_by_the_sampler(engine, monkeypatch):
    from vllm.v1.sample.sampler import Sampler

    model, _ = engine
    forward = Sampler.forward
    calls = {"left": 1}

    def failing_once(self, *args, **kwargs):
        if calls["left"]:
            calls["left"] -= 1
            raise RuntimeError("injected failure of the sampler")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "forward", failing_once)
    with pytest.raises(RuntimeError, match="injected failure of the sampler.*sampler raised"):
        with torch.no_grad(), model.trace(PROMPT):
            model.logits.save()
    assert_serves_clean_values(engine)


def test_an_error_raised_by_the_worker_collecting_results(engine, monkeypatch):
    from nnterp.backends.vllm.cpu import NNsightCPUModelRunner

    model, _ = engine
    collect = NNsightCPUModelRunner.collect_nnsight
    calls = {"left": 1}

    def failing_once(self, *args, **kwargs):
        if calls["left"]:
            calls["left"] -= 1
            raise RuntimeError("injected failure of the worker")
        return collect(self, *args, **kwargs)

    monkeypatch.setattr(NNsightCPUModelRunner, "collect_nnsight", failing_once)
    with pytest.raises(Exception, match="injected failure of the worker"):
        with torch.no_grad(), model.trace(PROMPT):
            model.layers_output[1].save()
    assert_serves_clean_values(engine)
