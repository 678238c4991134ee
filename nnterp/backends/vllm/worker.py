"""nnterp's side of a vLLM engine worker: pipeline stages.

nnsight's worker runs each request's intervention body on every rank; under pipeline parallelism each
stage holds only its slice of the model. This module makes the body see its stage:

- the request's copy of ``StandardizedVLLM`` gets a :class:`~nnterp.distributed.pp.PipelineStageBackend`
  (``stage_backend``, called when the body is unpickled in the worker);
- the runner serves the step boundaries the backend parks on (``STAGE_START`` once the step's batch is
  known, ``STAGE_END`` with stand-ins for the logits and sampled tokens after a non-last stage's forward);
- at collection, the reporting rank resolves the placeholders it saved from the values the owning stages
  published, takes the first error of any stage, and every stage drops what it published.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from nnsight.modeling.vllm.model_runners.GPUModelRunner import NNsightGPUModelRunner, Requests
from nnsight.modeling.vllm.workers.GPUWorker import NNsightGPUWorker

from .extraction_worker import ExtractionRunner, ExtractionWorker
from .graphs import GraphRunner, GraphWorker
from .recovery import RecoveringRunner
from .served import ServingRunner, ServingWorker
from ..distributed.transport import StageTransport
from ..distributed.pp import (
    PARAMETER_KEYS,
    STAGE_END,
    STAGE_START,
    ParameterShelf,
    PipelineStageBackend,
    RemoteValue,
    StageChannel,
    local_layer_range,
    resolve_saves,
    unfetched_keys,
)

STAGE_TIMEOUT_S = float(os.environ.get("NNTERP_PP_TIMEOUT", "60"))


@dataclass
class WorkerStage:
    """This worker's pipeline stage, set once its model is loaded."""

    rank: int
    size: int
    publishes: bool  # one tensor-parallel rank per stage publishes (the others hold the same values)
    device: torch.device
    transport: StageTransport
    parameters: ParameterShelf
    channels: dict[str, StageChannel] = field(default_factory=dict)  # by engine request id
    unpickling_request: Optional[str] = None  # the request whose body is being unpickled

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


_STAGE: Optional[WorkerStage] = None


def stage_backend(model: Any, inner: Any) -> Any:
    """The backend a request's model copy uses in this worker: ``inner`` off pipeline parallelism, else a
    stage backend keyed by the request (one without a request, e.g. an engine-installed edit, cannot
    reach other stages)."""
    stage = _STAGE
    if stage is None:
        return inner
    channel = None
    if stage.unpickling_request is not None:
        channel = StageChannel(stage.transport, prefix=f"requests/{stage.unpickling_request}")
        stage.channels[stage.unpickling_request] = channel
    layers = local_layer_range(model._module.get_submodule(model.names.layers))
    return PipelineStageBackend(inner, channel, layers, stage.first, stage.last, parameters=stage.parameters,
                                publishes=stage.publishes, device=stage.device)


class StageModules(dict):
    """Persistent objects of one pipeline stage: a request names modules by their path in the whole model,
    and a module another stage holds resolves to vLLM's stub for it."""

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or str(key).startswith("Module:")

    def __missing__(self, key):
        from vllm.model_executor.models.utils import PPMissingLayer

        return self.setdefault(key, PPMissingLayer())


class TracedRequests(Requests):
    """nnsight's per-request bookkeeping, kept for the requests that carry something for nnsight: a request with no
    ``nnsight_*`` argument, arriving while no block is registered to run on every request (extraction, served and
    plain requests), would get no worker anyway, so it is not tracked. nnsight's work each step (scoping, saves,
    collection) then follows the traced requests instead of the whole batch."""

    def add(self, new_requests: list, persistent_objects: dict) -> None:
        if not self.templates:
            new_requests = [data for data in new_requests if _carries_nnsight(data)]
        super().add(new_requests, persistent_objects)


def _carries_nnsight(data: Any) -> bool:
    return any(key.startswith("nnsight_") for key in getattr(data.sampling_params, "extra_args", None) or {})


class TracedRequestsRunner:
    """Model-runner behaviour, mixed in before nnsight's runner: :class:`TracedRequests` as its request tracker."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        self.nnsight_requests.__class__ = TracedRequests


class StageRequests(TracedRequests):
    """Unpickles each new request's body knowing which request it is (its stage channel is keyed by it)."""

    def add(self, new_requests: list, persistent_objects: dict) -> None:
        for data in new_requests:
            _STAGE.unpickling_request = data.req_id
            try:
                super().add([data], persistent_objects)
            finally:
                _STAGE.unpickling_request = None


class PipelineRunner:
    """Model-runner behaviour for pipeline stages, mixed in before nnsight's runner."""

    _nnterp_step_open = False

    def load_model(self, *args, **kwargs) -> None:
        global _STAGE
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        super().load_model(*args, **kwargs)
        pp = get_pp_group()
        if pp.world_size == 1:  # elsewhere an unknown module is a real mismatch and must raise
            return
        self.nnsight_persistent_objects = StageModules(self.nnsight_persistent_objects)
        self.nnsight_requests.__class__ = StageRequests
        import torch.distributed as dist

        # a collective: every worker loads its model at the same point
        transport = StageTransport(dist.distributed_c10d._get_default_store(), STAGE_TIMEOUT_S)
        _STAGE = WorkerStage(rank=pp.rank_in_group, size=pp.world_size, publishes=get_tp_group().rank_in_group == 0,
                             device=self.device, transport=transport, parameters=ParameterShelf(transport))

    def _update_states(self, scheduler_output) -> None:
        super()._update_states(scheduler_output)
        if _STAGE is not None and scheduler_output.total_num_scheduled_tokens > 0:
            self._nnterp_step_open = True
            self.nnsight_model.interleaver.handle(STAGE_START, None)

    def sample_tokens(self, *args, **kwargs):
        if _STAGE is not None and not _STAGE.last and self._nnterp_step_open:
            # This stage's forward is done and its output sent: what waits on a later stage's value may
            # now wait, and the logits / sampled tokens (the last stage's) are served as stand-ins.
            model = self.nnsight_model
            with self._still_running():
                model.interleaver.handle(STAGE_END, None)
                type(model).logits.provide(model, None)
                type(model).samples.provide(model, None)
        self._nnterp_step_open = False
        return super().sample_tokens(*args, **kwargs)  # nnsight's records every body's saves after it

    def collect_nnsight(self, request_ids: list[str], finished_request_ids: Optional[list[str]] = None,
                        outputs: Optional[dict] = None) -> Optional[bytes]:
        if _STAGE is None:
            return super().collect_nnsight(request_ids, finished_request_ids, outputs)
        import pickle

        import torch.distributed as dist
        from nnsight.modeling.vllm.collect import dumps_compact
        from vllm.distributed.parallel_state import get_pp_group, get_world_group

        finished = set(finished_request_ids or [])
        wanted = set(request_ids) | finished
        tracked = [request for request in self.nnsight_requests.requests.values() if request.named(wanted)]
        payload = super().collect_nnsight(request_ids, finished_request_ids, outputs)
        errors = {request.key(wanted): _request_error(request) for request in tracked}
        by_stage: list[dict] = [{} for _ in range(_STAGE.size)]
        dist.all_gather_object(by_stage, errors, group=get_pp_group().cpu_group)
        if get_pp_group().rank == 0 and payload is not None:  # nnsight's reporting rank
            collected = pickle.loads(payload)
            for request in tracked:
                engine_id, index = request.key(wanted)
                entry = collected.get(engine_id)
                if entry is None:
                    continue
                sequence = entry["sequences"].get(index)
                if sequence is not None:  # from the live values: what a placeholder would compute is not pickled
                    saves = request.saves()
                    if (channel := _STAGE.channels.get(request.id)) is not None:  # one pull per stage
                        channel.fetch_published(unfetched_keys(saves), _STAGE.device)
                    sequence["saves"] = resolve_saves(saves, RemoteValue.lookup)
                    if index == 0:
                        entry["saves"] = sequence["saves"]
                entry["error"] = first_cause([stage.get((engine_id, index)) for stage in by_stage])
            payload = dumps_compact(collected)
        for request in tracked:
            if request.named(finished) and (channel := _STAGE.channels.get(request.id)) is not None:
                channel.settle()
        dist.barrier(group=get_world_group().cpu_group)  # every rank is done reading this request's values
        for request in tracked:
            if request.named(finished) and (channel := _STAGE.channels.pop(request.id, None)) is not None:
                channel.delete_published()
        return payload


def first_cause(errors: list[Optional[dict]]) -> Optional[dict]:
    """The error to report among the stages' (in stage order): the first that is not a stage waiting in
    vain for a value (which another stage's error usually explains), else the first."""
    errors = [error for error in errors if error is not None]
    causes = [error for error in errors if error.get("type_name") != "CrossStageTimeout"]
    return (causes or errors or [None])[0]


def _request_error(request) -> Any:
    mediator = request.mediator
    error = request.deferred()
    if error is None and mediator is not None and mediator.exception is not None:
        from nnsight.intervention.errors import capture_exception

        error = capture_exception(mediator.exception)
    return error


class SharedModelRunner:
    """Keeps the model copies traces refer to, so a request carries a reference instead of the whole module tree.

    Unpickling a request's ``StandardizedVLLM`` (one envoy per module, ~185 for a 16-layer Llama) was most of a
    trace request's fixed cost; the client now ships the model once per engine and tags it so its requests
    pickle a persistent id that resolves here (see ``engine.share_with_workers``)."""

    def nnterp_share_model(self, key: str, payload: bytes, replaces: Optional[str] = None) -> None:
        from nnsight.intervention.serialization import loads

        objects = self.nnsight_persistent_objects
        objects[key] = loads(payload, persistent_objects=objects)
        if replaces is not None:
            objects.pop(replaces, None)


class NNterpGPUModelRunner(RecoveringRunner, ServingRunner, ExtractionRunner, SharedModelRunner, GraphRunner, PipelineRunner,
                           TracedRequestsRunner, NNsightGPUModelRunner):
    """nnsight's GPU model runner with pipeline stages, extraction, a shared model copy for traces and seams for
    CUDA graphs."""


class SharedModelWorker:
    """The RPC that installs a model copy traces refer to (``collective_rpc`` calls it by name)."""

    def nnterp_share_model(self, key: str, payload: bytes, replaces: Optional[str] = None) -> None:
        return self.model_runner.nnterp_share_model(key, payload, replaces)


class StageWorker:
    """The RPC that reports what this pipeline stage holds for other stages (None off pipeline parallelism)."""

    def nnterp_stage_transport(self) -> Optional[dict]:
        if _STAGE is None:
            return None
        from vllm.distributed.utils import get_pp_indices

        keys = _STAGE.transport.held_keys
        values = [key for key in keys if not key.startswith(f"{PARAMETER_KEYS}/")]
        layers = get_pp_indices(self.model_config.hf_text_config.num_hidden_layers, _STAGE.rank, _STAGE.size)
        return {"stage": _STAGE.rank, "layers": list(layers), "held_values": len(values), "held_parameters": len(keys) - len(values),
                "held_bytes": _STAGE.transport.held_bytes, "open_requests": len(_STAGE.channels),
                "published": _STAGE.transport.published_count}


class NNterpGPUWorker(ServingWorker, ExtractionWorker, SharedModelWorker, StageWorker, GraphWorker, NNsightGPUWorker):
    """nnsight's GPU worker, with nnterp's runner."""

    def init_device(self) -> None:
        super().init_device()
        self.model_runner.__class__ = NNterpGPUModelRunner
