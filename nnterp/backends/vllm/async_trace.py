"""Traces on vLLM's async engine (``StandardizedVLLM(..., mode="async")``): every invoke its own request.

The trace body is the same as on the synchronous engine. On leaving the ``with`` block nothing runs yet: the
invokes' workers are built and serialized onto their requests, and every request is submitted to the async
engine at once, so the engine batches them with whatever else it is serving. The caller then awaits the trace::

    with model.trace() as tracer:
        with tracer.invoke("The capital of France is"):
            stream = model.layers_output[5].save()
        with tracer.invoke("The Eiffel Tower is in", max_tokens=8):
            tokens = model.samples.save()
    result = await tracer.backend          # every request finished and collected
    result.saves["stream"]                 # what the sync trace binds to `stream`
    result.request_saves[1]["tokens"]      # one invoke's own saves

or streams it: ``async for output in tracer.backend`` yields each request's ``RequestOutput`` as the engine
produces it (``output.request_index`` is its invoke), then ``tracer.backend.result`` holds the same result.
Saved values come back on the result, not as variables (the block's frame has returned by then). An error in
any request is raised when the trace is awaited (or the stream ends), with its original type, once every
request has finished; the engine keeps serving. vLLM's async engine serves the event loop it first ran on: use
one loop for the engine's life (``close()`` may be called from synchronous code once the loop is idle).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from nnsight.tracing.backend import Backend

from .collect import collect_like_local


@dataclass
class AsyncTraceResult:
    """A finished async trace: ``saves`` as the synchronous trace binds them (by name), each invoke's own
    ``request_saves``, and the engine's final ``outputs`` (one ``RequestOutput`` per invoke, in order)."""

    saves: dict[str, Any]
    request_saves: list[dict[str, Any]]
    outputs: list[Any] = field(default_factory=list)


class AsyncTrace(Backend):
    """The backend of a trace on an async ``StandardizedVLLM``: submits on exit, finishes when awaited."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.result: AsyncTraceResult | None = None
        self._mediators: list = []
        self._requests: list[tuple[str, Any]] = []  # (request id, the engine's output stream)
        self._consumed = False

    def __call__(self, tracer: Any) -> None:
        model = self.model
        if not model.dispatched:
            model.dispatch()
        interleaver = model.interleaver
        try:
            _, (prompts, params, lora_requests), forward_kwargs = tracer.prepare(tracer.info.code)
            self._mediators = model._attach_mediators(params, **forward_kwargs)
            trace_id = uuid.uuid4().hex[:12]
            engine = model.vllm_entrypoint
            for index, (prompt, param, lora) in enumerate(zip(prompts, params, lora_requests)):
                request_id = f"nnterp-async-{trace_id}-{index}"
                self._requests.append((request_id, engine.generate(prompt, param, request_id, lora_request=lora)))
        finally:
            interleaver.cancel()  # the workers ride on the requests now

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._stream()

    def __await__(self):
        async def drain() -> AsyncTraceResult:
            async for _ in self._stream():
                pass
            return self.result

        return drain().__await__()

    async def _stream(self) -> AsyncIterator[Any]:
        """Each request's outputs as they come, then the collected result (raising the first error)."""
        if self._consumed:
            raise RuntimeError("an async trace is awaited or iterated once; its result is tracer.backend.result.")
        self._consumed = True
        queue: asyncio.Queue = asyncio.Queue()
        finals: list[Any] = [None] * len(self._requests)

        async def pump(index: int, request_id: str, stream: Any) -> None:
            try:
                async for output in stream:
                    output.request_index = index
                    if output.finished:
                        finals[index] = output
                    await queue.put(output)
            finally:
                await queue.put(index)  # this request is over

        tasks = [asyncio.create_task(pump(i, rid, stream)) for i, (rid, stream) in enumerate(self._requests)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, int):
                    remaining -= 1
                else:
                    yield item
            for task in tasks:
                task.result()  # an engine error of any request
        finally:
            for task in tasks:
                task.cancel()
            await self._collect_all(finals)

    async def _collect_all(self, finals: list[Any]) -> None:
        """Every request's saves from the workers (also those of a request that did not finish, to free them),
        merged as the synchronous trace merges them; then the first error is raised."""
        from nnsight.modeling.vllm.engines.engine import acollect, attach

        engine = self.model.vllm_entrypoint
        outputs = []
        for (request_id, _), final in zip(self._requests, finals):
            entry = await acollect(engine, request_id, final)
            output = final if final is not None else _Unfinished(request_id)
            if entry is not None:
                attach(output, entry)
            outputs.append(output)
        from nnsight.modeling.vllm.vllm import VLLM

        request_saves = [dict(getattr(output, "nnsight_saves", None) or {}) for output in outputs]
        collect_like_local(self._mediators, outputs, VLLM._collect)  # merges, then raises the first error
        names = {name for own in request_saves for name in own}
        saves = {name: self._mediators[0].lcls[name] for name in names if self._mediators and name in self._mediators[0].lcls}
        self.result = AsyncTraceResult(saves, request_saves, [o for o in outputs if not isinstance(o, _Unfinished)])


class _Unfinished:
    """Stands for the output of a request that ended without a finished output (aborted)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.nnsight_error = None
