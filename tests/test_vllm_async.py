"""Traces on vLLM's async engine: the same trace body as on the sync engine, every invoke its own request, the
same values as the sync engine, outputs streamed as they are generated, and errors raised with their type when
the trace is awaited while the engine keeps serving."""

import asyncio
import nnsight
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402

PROMPTS = ["The capital of France is", "Hello world, this is", "One two three"]
ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def loop():
    """One event loop for the async engine's whole life (vLLM's AsyncLLM serves the loop it first ran on)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engines(tiny_path, loop):
    path = str(tiny_path("llama"))
    with StandardizedVLLM(path, **ENGINE) as sync_model, StandardizedVLLM(path, mode="async", **ENGINE) as async_model:
        yield sync_model, async_model


def body(model, tracer) -> None:
    """One trace body, run on both engines: a read per invoke, a write in one, generated tokens in another."""
    shared = nnsight.save([])
    with tracer.invoke(PROMPTS[0]):
        shared.append(model.layers_output[1])
        first = model.next_token_probs.save()  # noqa: F841  (read off the result / the frame)
    with tracer.invoke(PROMPTS[1]):
        model.layers_output[0] = model.layers_output[0] * 0.5
        shared.append(model.layers_output[2])
        second = model.next_token_probs.save()  # noqa: F841
    with tracer.invoke(PROMPTS[2], max_tokens=4):
        tokens = nnsight.save([])
        for _ in tracer.iter[:]:
            tokens.append(int(model.samples.item()))


def run_sync(model) -> dict:
    with torch.no_grad(), model.trace() as tracer:
        shared = nnsight.save([])
        with tracer.invoke(PROMPTS[0]):
            shared.append(model.layers_output[1])
            first = model.next_token_probs.save()
        with tracer.invoke(PROMPTS[1]):
            model.layers_output[0] = model.layers_output[0] * 0.5
            shared.append(model.layers_output[2])
            second = model.next_token_probs.save()
        with tracer.invoke(PROMPTS[2], max_tokens=4):
            tokens = nnsight.save([])
            for _ in tracer.iter[:]:
                tokens.append(int(model.samples.item()))
    return {"shared": list(shared), "first": first, "second": second, "tokens": list(tokens)}


async def first_probs(model):
    """A clean async trace after a failure: the first prompt's next-token probabilities."""
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = model.next_token_probs.save()  # noqa: F841
    return (await tracer.backend).saves["first"]


def test_async_trace_gives_the_sync_engines_values(engines, loop):
    sync_model, async_model = engines
    expected = run_sync(sync_model)

    async def run():
        with torch.no_grad(), async_model.trace() as tracer:
            body(async_model, tracer)
        return await tracer.backend

    result = loop.run_until_complete(run())
    assert [len(saves) for saves in result.request_saves] == [2, 2, 1]  # per request: its own saves
    assert len(result.outputs) == 3 and [len(o.outputs[0].token_ids) for o in result.outputs] == [1, 1, 4]
    got = result.saves
    assert len(got["shared"]) == 2  # one container shared by the invokes, merged in invoke order
    for ours, theirs in zip(got["shared"], expected["shared"]):
        assert torch.equal(ours, theirs)
    assert torch.equal(got["first"], expected["first"]) and torch.equal(got["second"], expected["second"])
    assert got["tokens"] == expected["tokens"] == list(result.outputs[2].outputs[0].token_ids)


def test_outputs_stream_as_they_are_generated(engines, loop):
    _, model = engines

    async def run():
        with torch.no_grad(), model.trace() as tracer:
            for prompt in PROMPTS:
                with tracer.invoke(prompt, max_tokens=3):
                    model.layers_output[0].save()
        seen = []
        async for output in tracer.backend:
            seen.append((output.request_index, len(output.outputs[0].token_ids), output.finished))
        return seen, tracer.backend.result

    seen, result = loop.run_until_complete(run())
    for index in range(len(PROMPTS)):
        lengths = [length for i, length, _ in seen if i == index]
        assert lengths == [1, 2, 3], seen  # one output per generated token, as the engine produced them
        assert [finished for i, _, finished in seen if i == index][-1]
    assert len(result.outputs) == len(PROMPTS)


def test_an_error_in_one_request_is_raised_with_its_type_and_the_engine_keeps_serving(engines, loop):
    sync_model, model = engines
    expected = run_sync(sync_model)["first"]

    async def failing():
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(PROMPTS[0]):
                model.layers_output[0].save()
            with tracer.invoke(PROMPTS[1]):
                model.layers_output[0].save()
                raise KeyError("raised in the second invoke")
        await tracer.backend

    with pytest.raises(KeyError, match="raised in the second invoke"):
        loop.run_until_complete(failing())
    assert torch.equal(loop.run_until_complete(asyncio.wait_for(first_probs(model), 60)), expected)


def test_a_write_on_another_device_is_refused_and_the_async_engine_keeps_serving(engines, loop):
    """A write vLLM's modules cannot run on (a tensor on another device) is refused in the body, in the engine's
    process, naming the device to move it to; the next trace gets the sync engine's values."""
    sync_model, model = engines
    expected = run_sync(sync_model)["first"]

    async def failing():
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(PROMPTS[0]):
                model.layers_output[1] = model.layers_output[1].to("meta")
                model.logits.save()
        await tracer.backend

    with pytest.raises(ValueError, match=r"on cpu but the new value is on meta. Move it first: value.to\('cpu'\)"):
        loop.run_until_complete(asyncio.wait_for(failing(), 60))
    assert torch.equal(loop.run_until_complete(asyncio.wait_for(first_probs(model), 60)), expected)
