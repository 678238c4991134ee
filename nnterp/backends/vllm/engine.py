"""Starting, configuring and stopping the vLLM engine behind ``StandardizedVLLM`` (nnsight's ``VLLM``), and
the names its layouts are snapshotted under."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import uuid
from typing import Any

import torch

CPU_KV_CACHE_BYTES = 2**30
def quiet_vllm_logging() -> None:
    """vLLM logs ~45 INFO lines per engine start: WARNING unless the user set ``VLLM_LOGGING_LEVEL``. The
    variable reaches vLLM's logging config and the engine's worker processes; the logger's own level also
    covers what vLLM logs before it applies that config, and a vllm imported before nnterp."""
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING").upper()
    if level in logging.getLevelNamesMapping():
        logging.getLogger("vllm").setLevel(level)


def nnsight_vllm_class():
    quiet_vllm_logging()
    from nnsight.modeling.vllm import VLLM

    return VLLM


def no_accelerator() -> bool:
    return not torch.cuda.is_available()


def expert_group_after_a_dense_engine() -> None:
    """vLLM creates its expert-parallel group when the process's first engine sets up its parallel groups, and
    only for a MoE model: a MoE model loaded after a dense one in the same process (engines run in-process)
    finds none and fails to build. On a single-rank world, create it then over that rank, as vLLM would have."""
    from vllm.distributed import parallel_state

    if parallel_state._EP is not None or not parallel_state.model_parallel_is_initialized():
        return
    world = parallel_state.get_world_group()
    if world.world_size != 1:
        return  # a multi-rank world sets its groups up once, with the model it was made for
    backend = torch.distributed.get_backend(world.device_group)
    parallel_state._EP = parallel_state.init_model_parallel_group([[world.rank]], world.local_rank, backend,
                                                                  group_name="ep")


def cpu_meta_build():
    """vLLM's loader empties the accelerator cache after building the meta tree; without one that raises."""
    if not no_accelerator():
        return contextlib.nullcontext()
    from .cpu import no_accelerator_cache

    return no_accelerator_cache()


def translate_hf_kwargs(kwargs: dict) -> dict:
    """Accept the HuggingFace spellings users bring over (``torch_dtype``/``dtype``, ``device_map``)."""
    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if isinstance(kwargs.get("dtype"), torch.dtype):
        kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    kwargs.pop("device_map", None)
    return kwargs


def wrapped_hf_model(module: torch.nn.Module) -> torch.nn.Module | None:
    """The HF model vLLM's Transformers backend runs inside ``module`` (None for vLLM's own implementations)."""
    if not type(module).__module__.endswith(".transformers"):
        return None
    return getattr(module, "model", None)


def layout_key(module: torch.nn.Module) -> str:
    """The name the layout of ``module`` is snapshotted under: its class, and for vLLM's Transformers backend
    (one class wrapping any HF model) also the wrapped HF model's class."""
    wrapped = wrapped_hf_model(module)
    return type(module).__name__ if wrapped is None else f"{type(module).__name__}/{type(wrapped).__name__}"


def engine_kwargs(vllm_kwargs: dict, trust_remote_code: bool, unsafe_enable_prefix_caching: bool) -> dict:
    """The engine arguments ``StandardizedVLLM`` starts vLLM with: HF spellings translated, prefix caching off
    unless asked for unsafely, machine-wide defaults from ``NNTERP_VLLM_ARGS``, and on CPU an explicit KV cache."""
    if vllm_kwargs.get("enable_prefix_caching"):
        raise ValueError(
            "StandardizedVLLM keeps vLLM's prefix caching off: tokens served from the cache skip the forward "
            "pass, so reads would miss them and interventions would silently not apply to them. To turn it on "
            "anyway, pass unsafe_enable_prefix_caching=True instead of enable_prefix_caching=True."
        )
    vllm_kwargs = translate_hf_kwargs(vllm_kwargs)
    check_dtype(vllm_kwargs.get("dtype"))
    if trust_remote_code:
        vllm_kwargs["trust_remote_code"] = True
    for key, value in json.loads(os.environ.get("NNTERP_VLLM_ARGS", "{}")).items():
        vllm_kwargs.setdefault(key, value)  # machine-wide engine defaults, e.g. an attention backend
    vllm_kwargs["enable_prefix_caching"] = unsafe_enable_prefix_caching
    vllm_kwargs.setdefault("dispatch", True)
    if no_accelerator():
        if vllm_kwargs.get("distributed_executor_backend") == "ray":
            raise ValueError(
                "distributed_executor_backend='ray': vLLM's CPU engine cannot run on its Ray executor (its CPU "
                "platform declares no Ray device, and the executor places each worker on one). On CPUs use the "
                "default multiprocessing executor (tensor_parallel_size / pipeline_parallel_size work as they are); "
                "Ray runs on GPU machines.")
        # An explicit KV cache: vLLM's CPU worker otherwise sizes it as a fraction of host memory minus this
        # process's resident memory, which fails once the process holds other models (an HF one, say).
        vllm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    return vllm_kwargs


def check_dtype(dtype) -> None:
    """Refuse a dtype vLLM does not take before the engine starts (vLLM reports it from deep in its config)."""
    import typing

    from vllm.config.model import ModelDType

    accepted = typing.get_args(ModelDType)
    if dtype is not None and not (isinstance(dtype, str) and dtype in accepted):
        raise ValueError(f"StandardizedVLLM(dtype={dtype!r}): vLLM takes one of {list(accepted)} (or a torch dtype "
                         f"among float16, bfloat16, float32).")


def worker_class() -> str:
    """The engine worker nnterp runs in: nnsight's GPU worker with nnterp's runner, or its CPU counterpart."""
    if no_accelerator():
        return "nnterp.backends.vllm.cpu.NNsightCPUWorker"
    return "nnterp.backends.vllm.worker.NNterpGPUWorker"


def close_trace_scope_after_steps(engine: Any) -> None:
    """Each step of the in-process ``engine`` leaves the calling thread's trace scope as the step found it.

    nnsight's model runner opens a trace scope on the thread that runs a step and leaves it open (its requests'
    bodies may span steps). An in-process engine runs its steps on the caller's thread: after a step run outside a
    trace (extraction, ``generate``, served requests) every later trace on that thread, of any model, ran as a
    nested one (its body's unsaved names pushed into the caller's frame, ``.save()`` accepted outside a trace).
    Inside a trace the scope is already open and stays as it is."""
    from nnsight.tracing.tracer import _local

    step = engine.step

    def step_in_own_scope(*args: Any, **kwargs: Any) -> Any:
        outside_a_trace = not getattr(_local, "depth", 0)
        try:
            return step(*args, **kwargs)
        finally:
            if outside_a_trace:
                _local.depth = 0  # the saved ids stay: nnsight clears them once no request is in flight

    engine.step = step_in_own_scope


def shut_down(entrypoint: Any) -> None:
    """Stop an engine and release its memory (vLLM keeps it alive until it is shut down). An async engine
    closes its sockets on the event loop it served; when that loop is not running (the engine is closed from
    synchronous code), it is run until they are, or their context would block the process when collected."""
    core = getattr(getattr(entrypoint, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
        gc.collect()
        return
    handler = getattr(entrypoint, "output_handler", None)
    loop = handler.get_loop() if handler is not None else None
    entrypoint.shutdown()
    if loop is not None and not loop.is_closed() and not loop.is_running():
        loop.run_until_complete(asyncio.sleep(0))
    gc.collect()


SHARING_STATE = ("_persistent_id", "_shared_fingerprint")


def share_with_workers(model: Any) -> None:
    """Ship ``model`` to the engine's workers once, and make trace requests refer to that copy.

    Each request otherwise pickles the whole envoy tree (one envoy per module) and the worker unpickles it:
    most of a trace request's fixed cost. The copy is shipped again when the model's attributes change (a
    trace body may read them). Off under pipeline parallelism, where each request's copy gets a stage
    backend of its own."""
    engine = getattr(model.vllm_entrypoint, "llm_engine", None)
    if engine is None or engine.vllm_config.parallel_config.pipeline_parallel_size > 1:
        return
    state = model.__dict__
    fingerprint = tuple((name, id(value)) for name, value in state.items() if name not in SHARING_STATE)
    shared = state.get("_persistent_id")
    if shared is not None and state.get("_shared_fingerprint") == fingerprint:
        return
    from nnsight.intervention.serialization import dumps

    state.pop("_persistent_id", None)  # pickle the model itself this once
    key = f"nnterp:StandardizedVLLM:{uuid.uuid4().hex}"
    engine.collective_rpc("nnterp_share_model", args=(key, dumps(model), shared))
    state["_persistent_id"] = key
    state["_shared_fingerprint"] = fingerprint


def forget_shared(model: Any) -> None:
    for key in SHARING_STATE:
        model.__dict__.pop(key, None)
