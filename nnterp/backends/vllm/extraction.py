"""Extraction on a vLLM engine: requests that carry no intervention, served by the worker's hooks.

The engine is stepped here (rather than through ``LLM.generate``) so results stream out as prompts finish,
in prompt order, and so at most ``window`` prompts are queued ahead of the consumer. The worker writes each
prompt's rows as its steps run (see ``extraction_worker``); when a prompt finishes the worker is told, and its
rows are taken one step later (by then written).
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator, Sequence

import torch

from ...core.inputs import tokenized
from ..taps.plan import ExtractionPlan
from ..taps.rows import Activations, activations
from .extraction_worker import REQUEST_KEY

PROMPT_CHUNK = 256  # prompts tokenized together


def run(model: Any, plan: ExtractionPlan, prompts: Sequence[str | Sequence[int]], window: int,
        max_new_tokens: int, sampling: dict) -> Iterator[Activations]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if not model.dispatched:
        model.dispatch()
    engine = model.vllm_entrypoint.llm_engine
    extraction_id = uuid.uuid4().hex
    # Only finished requests are read here: the engine then builds no per-step output for each request (as
    # LLM.generate asks it), which at 256 requests cost more than the extraction's own per-step work.
    settings = {**model.greedy_generation_kwargs(max(1, max_new_tokens)), "output_kind": RequestOutputKind.FINAL_ONLY,
                **sampling, "n": 1}
    if sampling.get("ignore_eos") and "stop_token_ids" not in sampling:
        settings["stop_token_ids"] = []  # generate max_new_tokens whatever the model emits
    engine_prompts: dict[int, Any] = {}
    engine.collective_rpc("nnterp_begin_extraction", args=(extraction_id, plan.to_json()))
    model._extractions_running += 1
    by_request: dict[str, int] = {}
    outputs: dict[int, Any] = {}
    done: dict[int, Activations] = {}
    submitted = yielded = 0
    finished_last_step: list[int] = []
    try:
        while yielded < len(prompts):
            while submitted < len(prompts) and submitted - yielded < window:
                params = SamplingParams(**settings)
                params.extra_args = {REQUEST_KEY: [extraction_id, submitted]}
                if hasattr(params, "skip_reading_prefix_cache"):
                    params.skip_reading_prefix_cache = True  # cached tokens skip the forward pass
                request_id = f"nnterp-extract-{extraction_id[:8]}-{submitted}"
                by_request[request_id] = submitted
                if submitted not in engine_prompts:
                    engine_prompts = _engine_prompts(model, prompts, submitted)
                engine.add_request(request_id, engine_prompts.pop(submitted), params)
                submitted += 1
            finished_now = []
            for output in engine.step():
                if output.finished and output.request_id in by_request:
                    index = by_request.pop(output.request_id)
                    outputs[index] = output
                    finished_now.append(index)
            idle = not engine.has_unfinished_requests()
            # Take what finished a step ago (written while this step ran), or everything once the engine
            # has nothing left to run.
            take = finished_last_step + (finished_now if idle else [])
            prepare = [] if idle else finished_now
            finished_last_step = prepare
            if take or prepare:
                done.update(_take(engine, plan, extraction_id, take, prepare, outputs))
            if idle and not take and yielded not in done and submitted == len(prompts):
                raise RuntimeError(f"the engine finished without running prompt {yielded}.")
            while yielded in done:
                yield done.pop(yielded)
                yielded += 1
    finally:
        model._extractions_running -= 1
        if by_request:
            engine.abort_request(list(by_request))
        engine.collective_rpc("nnterp_end_extraction", args=(extraction_id,))


def _engine_prompts(model: Any, prompts: Sequence[Any], first: int) -> dict[int, Any]:
    """The next :data:`PROMPT_CHUNK` prompts from ``first`` as the engine takes them, by index: their text tokenized
    here in one call. The engine tokenizes a text request on its own as it is added: ``add_request`` took 0.57-0.6
    ms per text request on the H200 machine, against 0.13-0.19 ms per request already tokenized (what
    ``LLM.generate`` adds), more than the extraction's own work per request and step."""
    from vllm.inputs import TokensPrompt

    chunk = prompts[first:first + PROMPT_CHUNK]
    encoded = tokenized(model.tokenizer, chunk, first)
    return {first + index: TokensPrompt(prompt_token_ids=ids) if isinstance(prompt, str) else model._prompt(prompt)
            for index, (prompt, ids) in enumerate(zip(chunk, encoded))}


def _take(engine: Any, plan: ExtractionPlan, extraction_id: str, indices: list[int], prepare: list[int],
          outputs: dict[int, Any]) -> dict[int, Activations]:
    replies = engine.collective_rpc("nnterp_take_extracted", args=(extraction_id, indices, prepare))
    replies = [reply for reply in replies if reply is not None]
    for reply in replies:
        if "error" in reply:
            raise RuntimeError(f"extraction failed in the engine: {reply['error']}")
    taken = {}
    for index in indices:
        output = outputs.pop(index)
        generated = list(output.outputs[0].token_ids)
        token_ids = list(output.prompt_token_ids) + generated[:-1]
        rows = _stitch(plan, [(reply["slots"], reply["rows"].get(index)) for reply in replies], index)
        # An engine that schedules ahead (async scheduling) may run one more step for a request than it keeps:
        # rows past the last kept token belong to tokens the engine discarded.
        rows = rows[:, :len(token_ids)]
        taken[index] = activations(plan, index, rows, token_ids, generated)
    return taken


def _stitch(plan: ExtractionPlan, parts: list[tuple[list[int], Any]], index: int) -> torch.Tensor:
    """One prompt's ``[taps, tokens, width]`` from the workers' parts (pipeline stages hold different taps)."""
    parts = [(slots, rows) for slots, rows in parts if rows is not None]
    covered = sorted(slot for slots, _ in parts for slot in slots)
    if covered != list(range(len(plan.taps))):
        missing = [plan.taps[slot].where for slot in range(len(plan.taps)) if slot not in covered]
        raise RuntimeError(f"prompt {index}: no engine worker returned {missing}.")
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    rows = torch.empty((len(plan.taps), *first.shape[1:]), dtype=first.dtype)
    for slots, part in parts:
        rows[slots] = part
    return rows
