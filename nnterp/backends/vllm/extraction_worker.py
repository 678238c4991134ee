"""The engine side of extraction: plain hooks in vLLM's worker, serving extraction requests in bulk.

A trace ships an intervention per request (pickled, unpickled and run as its own greenlet). An extraction
ships nothing per request but two numbers in the request's ``extra_args`` (which extraction, which prompt):
the plan (taps and their layouts) is installed once per extraction as hooks on the real modules. Each step,
the hooks copy the tapped streams' rows of the extraction's requests into one buffer, whose rows the device
then writes into each prompt's region of a host block (as long as the prompt is expected to run) while the next
step computes: a GPU's kernels into host memory mapped into its addresses, or the CPU engine's thread
(``taps/device_rows.py``); on a GPU that cannot map host memory the buffer is copied to host memory and copier
threads write the regions. The client names the prompts it saw finish: their tensors are handed over at its
next call.

Under pipeline parallelism each stage captures the taps of the layers it holds; under tensor parallelism
(where every rank holds the whole stream) the first rank of each stage does.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ...core.backend import is_local
from ..taps.capture import Capture
from ..taps.device_rows import DeviceRows, RegistrationError, mapped_rows_supported
from ..taps.plan import ExtractionPlan
from ..taps.rows import CopiedRows, PromptRows, compact
from .step_rows import request_extra, scheduled_rows

REQUEST_KEY = "nnterp_extraction"  # SamplingParams.extra_args[REQUEST_KEY] = [extraction id, prompt index]


@dataclass
class StepShare:
    """An extraction's part of one engine step: which rows of the flat batch are its requests'."""

    ranges: list[tuple[int, int]] = field(default_factory=list)  # (start, end) in the flat batch
    prompts: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    # (index, buffer start, count, position, rows the prompt is expected to run)
    count: int = 0


@dataclass
class Extraction:
    """One extraction on this worker: its hooks (over the taps this worker holds) and prompts' rows."""

    plan: ExtractionPlan
    slots: list[int]  # positions in plan.taps of the taps captured here
    capture: Capture
    writer: DeviceRows | CopiedRows  # writes its prompts' rows
    prompts: dict[int, PromptRows] = field(default_factory=dict)
    ready: dict[int, Future] = field(default_factory=dict)  # finished prompts' rows, by prompt index
    finished: set[int] = field(default_factory=set)  # prompts whose rows are complete
    error: Optional[str] = None
    share: Optional[StepShare] = None


class WorkerExtractions:
    """The extractions running on one engine worker, and which engine requests belong to them."""

    def __init__(self, device: torch.device, max_rows: int) -> None:
        self.running: dict[str, Extraction] = {}
        # engine request id -> (extraction id, prompt index, rows expected at most)
        self.requests: dict[str, tuple[str, int, int]] = {}
        self.device = device
        self.max_rows = max_rows  # the engine's longest sequence
        # the device writes the rows (a GPU that maps host memory, the CPU); elsewhere copies to host, copier threads
        self.device_rows = DeviceRows(device) if device.type == "cpu" or mapped_rows_supported(device) else None
        self.copied_rows: Optional[CopiedRows] = None

    def begin(self, extraction_id: str, plan: ExtractionPlan, model: torch.nn.Module, reports: bool) -> None:
        slots = [slot for slot, tap in enumerate(plan.taps) if reports and _held(model, tap.path)]
        if not slots:
            return  # nothing to capture on this worker: its steps are left alone, take() answers None
        capture = Capture(model, [plan.taps[slot] for slot in slots], defer_errors=True)
        self.running[extraction_id] = Extraction(plan, slots, capture, self._writer())

    def _writer(self) -> DeviceRows | CopiedRows:
        if self.device_rows is not None:
            return self.device_rows
        if self.copied_rows is None:
            self.copied_rows = CopiedRows()
        return self.copied_rows

    def take(self, extraction_id: str, take: list[int], prepare: list[int]) -> Optional[dict]:
        extraction = self.running.get(extraction_id)
        if extraction is None:
            return None
        if extraction.error is not None:
            return {"error": extraction.error}
        for index in (*prepare, *take):
            extraction.finished.add(index)
            if index in extraction.prompts:
                extraction.ready[index] = extraction.writer.finish(extraction.prompts.pop(index))
        rows = {}
        try:
            for index in take:
                ready = extraction.ready.pop(index, None)
                rows[index] = None if ready is None else ready.result()
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}"}
        return {"slots": extraction.slots, "rows": rows}

    def end(self, extraction_id: str) -> None:
        extraction = self.running.pop(extraction_id, None)
        if extraction is not None:
            extraction.capture.remove()
        for request_id in [rid for rid, (owner, *_) in self.requests.items() if owner == extraction_id]:
            del self.requests[request_id]

    def plan_step(self, scheduler_output, batch_order: list[str], request_states: dict) -> None:
        """Arms each extraction's hooks on the rows of its requests in this step's flat batch (in
        ``batch_order``, the order of the forward pass's rows)."""
        for request_id in scheduler_output.finished_req_ids:
            self.requests.pop(request_id, None)
        for data in scheduler_output.scheduled_new_reqs:
            key = request_extra(data, REQUEST_KEY)
            if key is not None and key[0] in self.running:
                expected = min(_expected_rows(data) or self.max_rows, self.max_rows)
                self.requests[data.req_id] = (key[0], int(key[1]), expected)
        for extraction in self.running.values():
            extraction.share = None
        if not self.requests:
            return
        for request_id, start, count, position in scheduled_rows(scheduler_output, batch_order, request_states):
            key = self.requests.get(request_id)
            extraction = self.running[key[0]] if key is not None else None
            if extraction is not None and extraction.error is None:
                share = extraction.share = extraction.share or StepShare()
                share.prompts.append((key[1], share.count, count, position, key[2]))
                if share.ranges and share.ranges[-1][1] == start:
                    share.ranges[-1] = (share.ranges[-1][0], start + count)
                else:
                    share.ranges.append((start, start + count))
                share.count += count
        for extraction in self.running.values():
            if extraction.share is not None:
                extraction.capture.arm(self._rows(extraction.share.ranges), extraction.share.count)

    def _rows(self, ranges: list[tuple[int, int]]) -> torch.Tensor | slice:
        if len(ranges) == 1:
            return slice(*ranges[0])
        return torch.cat([torch.arange(start, end) for start, end in ranges]).to(self.device, non_blocking=True)

    def collect_step(self) -> None:
        """After the forward pass is queued: starts each extraction's buffer on its way to host memory and
        records where its prompts' rows sit in it."""
        for extraction in self.running.values():
            share, extraction.share = extraction.share, None
            if share is None:
                continue
            try:
                buffer = extraction.capture.disarm()
                items = []
                for index, offset, count, position, expected in share.prompts:
                    if index in extraction.finished:
                        continue  # a step run ahead for a request that had already finished: discarded
                    prompt = extraction.prompts.get(index)
                    if prompt is None:
                        prompt = extraction.prompts[index] = PromptRows(expected)
                    items.append(prompt.add(offset, count, position, f"prompt {index}"))
                extraction.writer.copy(buffer, items)
            except RegistrationError as error:
                self.device_rows = None  # the next extractions go through host transfers and copier threads
                extraction.error = (f"{error}: this extraction stops; the engine's next extractions copy their rows "
                                    "through pinned host transfers instead. Run it again.")
            except Exception as error:  # reported to the client at its next take; the engine keeps serving
                extraction.error = f"{type(error).__name__}: {error}"


class ExtractionRunner:
    """Model-runner behaviour, mixed in before nnsight's runner (whose class is swapped in, without an
    ``__init__``: the state is made on first use)."""

    @property
    def nnterp_extractions(self) -> WorkerExtractions:
        state = self.__dict__.get("_nnterp_extractions")
        if state is None:
            state = self.__dict__["_nnterp_extractions"] = WorkerExtractions(self.device, self.max_model_len)
        return state

    def nnterp_begin_extraction(self, extraction_id: str, plan_json: str) -> None:
        from vllm.distributed.parallel_state import get_tp_group

        reports = get_tp_group().rank_in_group == 0  # every tensor-parallel rank holds the same streams
        self.nnterp_extractions.begin(extraction_id, ExtractionPlan.from_json(plan_json), self.get_model(), reports)

    def nnterp_take_extracted(self, extraction_id: str, take: list[int], prepare: list[int]) -> Optional[dict]:
        """Marks the prompts in ``prepare`` finished (their last rows are being written), and returns those of the prompts
        in ``take`` as ``[taps held here, tokens, width]`` by prompt index (with which taps they are), dropped
        from this worker; None where this worker captures nothing."""
        from vllm.distributed.parallel_state import get_world_group

        reply = self.nnterp_extractions.take(extraction_id, take, prepare)
        if reply is not None and "rows" in reply and get_world_group().world_size > 1:
            # pickled to the engine's client: a prompt's view would carry the whole block it shares
            reply["rows"] = {index: None if rows is None else compact(rows) for index, rows in reply["rows"].items()}
        return reply

    def nnterp_end_extraction(self, extraction_id: str) -> None:
        self.nnterp_extractions.end(extraction_id)

    def _update_states(self, scheduler_output) -> Any:
        result = super()._update_states(scheduler_output)
        if self.nnterp_extractions.running:
            self.nnterp_extractions.plan_step(scheduler_output, self.input_batch.req_ids, self.requests)
        return result

    def execute_model(self, scheduler_output, *args, **kwargs) -> Any:
        output = super().execute_model(scheduler_output, *args, **kwargs)
        if self.nnterp_extractions.running:
            self.nnterp_extractions.collect_step()
        return output


def _expected_rows(data: Any) -> Optional[int]:
    """How many token rows a new request runs: its prompt, then every generated token but the last (None when
    unknown)."""
    prompt, max_tokens = data.prompt_token_ids, getattr(data.sampling_params, "max_tokens", None)
    if prompt is None or max_tokens is None:
        return None
    return len(prompt) + max(max_tokens, 1) - 1


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
