"""The engine side of extraction: plain hooks in vLLM's worker, serving extraction requests in bulk.

A trace ships an intervention per request (pickled, unpickled and run as its own greenlet). An extraction
ships nothing per request but two numbers in the request's ``extra_args`` (which extraction, which prompt):
the plan (taps and their layouts) is installed once per extraction as hooks on the real modules. Each step,
the hooks copy the tapped streams' rows of the extraction's requests into one buffer, which is sent to host
memory while the next step computes. The client names the prompts it saw finish: their rows are assembled
into one tensor each on background threads, and handed over at the client's next call.

Under pipeline parallelism each stage captures the taps of the layers it holds; under tensor parallelism
(where every rank holds the whole stream) the first rank of each stage does.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..distributed.pp import is_local
from .capture import Capture
from .plan import ExtractionPlan
from .result import Assembler, PromptRows
from .transfer import HostTransfer, InFlight

REQUEST_KEY = "nnterp_extraction"  # SamplingParams.extra_args[REQUEST_KEY] = [extraction id, prompt index]


@dataclass
class StepShare:
    """An extraction's part of one engine step: which rows of the flat batch are its requests'."""

    ranges: list[tuple[int, int]] = field(default_factory=list)  # (start, end) in the flat batch
    prompts: list[tuple[int, int, int, int]] = field(default_factory=list)  # (index, buffer start, count, position)
    count: int = 0


@dataclass
class Extraction:
    """One extraction on this worker: its hooks (over the taps this worker holds) and prompts' rows."""

    plan: ExtractionPlan
    slots: list[int]  # positions in plan.taps of the taps captured here
    capture: Optional[Capture]
    prompts: dict[int, PromptRows] = field(default_factory=dict)
    ready: dict[int, Future] = field(default_factory=dict)  # rows being assembled, by prompt index
    finished: set[int] = field(default_factory=set)  # prompts whose rows are complete
    error: Optional[str] = None
    share: Optional[StepShare] = None


class ExtractionRunner:
    """Model-runner behaviour, mixed in before nnsight's runner."""

    def _nnterp_state(self) -> dict[str, Extraction]:
        state = self.__dict__.get("_nnterp_extractions")
        if state is None:
            state = self.__dict__["_nnterp_extractions"] = {}
            self.__dict__["_nnterp_requests"] = {}  # engine request id -> (extraction id, prompt index)
            self.__dict__["_nnterp_transfer"] = HostTransfer()
            self.__dict__["_nnterp_assembler"] = Assembler()
        return state

    def nnterp_begin_extraction(self, extraction_id: str, plan_json: str) -> None:
        from vllm.distributed.parallel_state import get_tp_group

        plan = ExtractionPlan.from_json(plan_json)
        model = self.get_model()
        reports = get_tp_group().rank_in_group == 0  # every tensor-parallel rank holds the same streams
        slots = [slot for slot, tap in enumerate(plan.taps) if reports and _held(model, tap.path)]
        capture = Capture(model, [plan.taps[slot] for slot in slots], defer_errors=True) if slots else None
        self._nnterp_state()[extraction_id] = Extraction(plan, slots, capture)

    def nnterp_take_extracted(self, extraction_id: str, take: list[int], prepare: list[int]) -> Optional[dict]:
        """Starts assembling the rows of the prompts in ``prepare`` (finished), and returns those of the prompts
        in ``take`` as ``[taps held here, tokens, width]`` by prompt index (with which taps they are), dropped
        from this worker; None where this worker captures nothing."""
        extraction = self._nnterp_state().get(extraction_id)
        if extraction is None or extraction.capture is None:
            return None
        if extraction.error is not None:
            return {"error": extraction.error}
        assembler: Assembler = self.__dict__["_nnterp_assembler"]
        for index in (*prepare, *take):
            extraction.finished.add(index)
            if index in extraction.prompts:
                extraction.ready[index] = assembler.submit(extraction.prompts.pop(index))
        rows = {}
        try:
            for index in take:
                ready = extraction.ready.pop(index, None)
                rows[index] = None if ready is None else ready.result()
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}"}
        return {"slots": extraction.slots, "rows": rows}

    def nnterp_end_extraction(self, extraction_id: str) -> None:
        extraction = self._nnterp_state().pop(extraction_id, None)
        if extraction is not None and extraction.capture is not None:
            extraction.capture.remove()
        requests = self.__dict__["_nnterp_requests"]
        for request_id in [rid for rid, (owner, _) in requests.items() if owner == extraction_id]:
            del requests[request_id]

    # -- per step ---------------------------------------------------------------------------------------

    def _update_states(self, scheduler_output) -> Any:
        result = super()._update_states(scheduler_output)
        extractions = self._nnterp_state()
        if extractions:
            self._nnterp_plan_step(scheduler_output, extractions)
        return result

    def execute_model(self, scheduler_output, *args, **kwargs) -> Any:
        output = super().execute_model(scheduler_output, *args, **kwargs)
        extractions = self.__dict__.get("_nnterp_extractions")
        if extractions:
            self._nnterp_collect_step(extractions)
        return output

    def _nnterp_plan_step(self, scheduler_output, extractions: dict[str, Extraction]) -> None:
        requests = self.__dict__["_nnterp_requests"]
        for request_id in scheduler_output.finished_req_ids:
            requests.pop(request_id, None)
        for data in scheduler_output.scheduled_new_reqs:
            extra = getattr(data.sampling_params, "extra_args", None) or {}
            key = extra.get(REQUEST_KEY)
            if key is not None and key[0] in extractions:
                requests[data.req_id] = (key[0], int(key[1]))
        for extraction in extractions.values():
            extraction.share = None
        if not requests:
            return
        tokens = scheduler_output.num_scheduled_tokens
        start = 0
        for request_id in self.input_batch.req_ids:
            count = tokens.get(request_id)
            if count is None:
                continue
            key = requests.get(request_id)
            if key is not None:
                extraction = extractions[key[0]]
                if extraction.capture is not None and extraction.error is None:
                    if extraction.share is None:
                        extraction.share = StepShare()
                    share = extraction.share
                    position = self.requests[request_id].num_computed_tokens
                    share.prompts.append((key[1], share.count, count, position))
                    if share.ranges and share.ranges[-1][1] == start:
                        share.ranges[-1] = (share.ranges[-1][0], start + count)
                    else:
                        share.ranges.append((start, start + count))
                    share.count += count
            start += count
        for extraction in extractions.values():
            share = extraction.share
            if share is not None:
                extraction.capture.arm(self._nnterp_rows(share.ranges), share.count)

    def _nnterp_rows(self, ranges: list[tuple[int, int]]) -> torch.Tensor | slice:
        if len(ranges) == 1:
            return slice(*ranges[0])
        rows = torch.cat([torch.arange(start, end) for start, end in ranges])
        return rows.to(self.device, non_blocking=True)

    def _nnterp_collect_step(self, extractions: dict[str, Extraction]) -> None:
        transfer: HostTransfer = self.__dict__["_nnterp_transfer"]
        for extraction_id, extraction in extractions.items():
            share, extraction.share = extraction.share, None
            if share is None:
                continue
            try:
                buffer: InFlight = transfer.start(extraction.capture.disarm())
                for index, offset, count, position in share.prompts:
                    if index in extraction.finished:
                        continue  # a step run ahead for a request that had already finished: discarded
                    prompt = extraction.prompts.setdefault(index, PromptRows())
                    prompt.add(buffer, offset, count, position, f"prompt {index}")
            except Exception as error:  # reported to the client at its next take; the engine keeps serving
                extraction.error = f"{type(error).__name__}: {error}"


def _held(model: torch.nn.Module, path: str) -> bool:
    """Whether this pipeline stage holds the module at ``path`` (another stage's layer is a stub without
    children)."""
    module = model
    for name in path.split("."):
        if not is_local(module):
            return False
        module = module.get_submodule(name)
    return is_local(module)


class ExtractionWorker:
    """The extraction RPCs on the engine's worker (``collective_rpc`` calls them by name)."""

    def nnterp_begin_extraction(self, extraction_id: str, plan_json: str) -> None:
        return self.model_runner.nnterp_begin_extraction(extraction_id, plan_json)

    def nnterp_take_extracted(self, extraction_id: str, take: list[int], prepare: list[int]) -> Optional[dict]:
        return self.model_runner.nnterp_take_extracted(extraction_id, take, prepare)

    def nnterp_end_extraction(self, extraction_id: str) -> None:
        return self.model_runner.nnterp_end_extraction(extraction_id)
