"""Run a function on several CPU processes joined in a gloo process group (distributed tests without GPUs),
and the rank programs the tests and benchmarks run: tensor-parallel gathers on vLLM's parallel layers,
and pipeline stages of a HuggingFace model whose other stage's layers are vLLM's ``PPMissingLayer`` stubs.

Ranks are spawned (not forked: a forked child of a process that already ran torch kernels can hang in
its thread pool), so rank programs are module-level functions, bound to their arguments with ``partial``."""

from __future__ import annotations

import io
import multiprocessing
import queue as queues
import os
import socket
import traceback
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(target: Callable[[int, int], Any], world_size: int = 2, timeout: float = 300, vllm: bool = False) -> list[Any]:
    """``target(rank, world_size)`` on ``world_size`` spawned processes; returns each rank's result in rank order.

    With ``vllm=True`` the group is vLLM's (``init_distributed_environment`` + one tensor-parallel group
    over all ranks), so vLLM's parallel layers can be built; otherwise a plain ``torch.distributed`` group.
    A rank's exception is re-raised here with its traceback; a rank that does not finish in ``timeout``
    seconds is killed and reported.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(target, rank, world_size, port, vllm, queue)) for rank in range(world_size)]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = _from_bytes(payload)
    except queues.Empty as error:
        missing = sorted(set(range(world_size)) - set(results))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout} s") from error
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world_size)]


def _rank_main(target, rank: int, world_size: int, port: int, vllm: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        if vllm:
            from vllm.config import VllmConfig, set_current_vllm_config

            with set_current_vllm_config(VllmConfig()):  # parallel layers read the current config when built
                _init_vllm_group(rank, world_size, port)
                result = target(rank, world_size)
        else:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            result = target(rank, world_size)
        queue.put((rank, True, _to_bytes(result)))
    except BaseException:  # reported to the parent, which raises it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        _wait_for_the_other_ranks()


def _wait_for_the_other_ranks(timeout: float = 120) -> None:
    """Rank 0 hosts the group's store: a rank that finishes first must not take it away while a slower rank
    still reads from it (it would fail with a closed connection instead of its own result)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=timeout))
        except Exception:  # a rank that failed before the barrier: its error is already reported
            pass


def _init_vllm_group(rank: int, world_size: int, port: int) -> None:
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                 distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    initialize_model_parallel(tensor_model_parallel_size=world_size)


def _to_bytes(value: Any) -> bytes:
    """Results travel as bytes: tensors sent through a queue would point at the exiting child's memory."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=False)


# -- tensor parallelism: vLLM's parallel layers sharded over the ranks ---------------------------------

TP_SIZES = {"hidden": 64, "head": 16, "heads": 4, "kv_heads": 1, "vocab": 100, "ffn": 96}


def full_weights() -> dict[str, torch.Tensor]:
    """The unsharded weights the tensor-parallel program loads (seeded, so every rank builds the same)."""
    h, d, f, v = TP_SIZES["hidden"], TP_SIZES["head"], TP_SIZES["ffn"], TP_SIZES["vocab"]
    shapes = {"q": (TP_SIZES["heads"] * d, h), "k": (TP_SIZES["kv_heads"] * d, h), "v": (TP_SIZES["kv_heads"] * d, h),
              "gate": (f, h), "up": (f, h), "down": (h, f), "down_bias": (h,), "head": (v, h), "column": (f, h),
              "column_bias": (f,), "replicated": (h, h)}
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def tp_shard_and_gather(rank: int, world_size: int) -> dict:
    """Build vLLM's parallel layers from :func:`full_weights` (each rank loads its shard through vLLM's own
    weight loaders), then report local shapes, placements and what ``gather_param`` rebuilds."""
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                   QKVParallelLinear, ReplicatedLinear, RowParallelLinear)
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from nnterp.backends.distributed.tp import gather_param, placement_of

    w, s, dtype = full_weights(), TP_SIZES, torch.float32
    qkv = QKVParallelLinear(s["hidden"], s["head"], s["heads"], s["kv_heads"], bias=False, params_dtype=dtype)
    for shard in "qkv":
        qkv.weight_loader(qkv.weight, w[shard], shard)
    gate_up = MergedColumnParallelLinear(s["hidden"], [s["ffn"], s["ffn"]], bias=False, params_dtype=dtype)
    gate_up.weight_loader(gate_up.weight, w["gate"], 0)
    gate_up.weight_loader(gate_up.weight, w["up"], 1)
    down = RowParallelLinear(s["ffn"], s["hidden"], bias=True, params_dtype=dtype)
    down.weight_loader(down.weight, w["down"])
    down.weight_loader(down.bias, w["down_bias"])
    column = ColumnParallelLinear(s["hidden"], s["ffn"], bias=True, params_dtype=dtype)
    column.weight_loader(column.weight, w["column"])
    column.weight_loader(column.bias, w["column_bias"])
    head = ParallelLMHead(s["vocab"], s["hidden"], params_dtype=dtype)
    head.weight_loader(head.weight, w["head"])
    replicated = ReplicatedLinear(s["hidden"], s["hidden"], bias=False, params_dtype=dtype)
    replicated.weight_loader(replicated.weight, w["replicated"])
    layers = {"qkv": qkv, "gate_up": gate_up, "down": down, "column": column, "head": head, "replicated": replicated}
    return {
        "local_shapes": {name: tuple(layer.weight.shape) for name, layer in layers.items()},
        "placements": {name: placement_of(layer) for name, layer in layers.items()} | {"down.bias": placement_of(down, "bias")},
        "gathered": {name: gather_param(layer) for name, layer in layers.items()}
        | {"down.bias": gather_param(down, "bias"), "column.bias": gather_param(column, "bias")},
    }


# -- pipeline parallelism: two stages of a HuggingFace model ---------------------------------------------

PP_PROMPT = "The capital of France is"


def pp_stage_model(path: str | Path, rank: int, split: int, timeout: float, device: str = "cpu"):
    """A StandardizedTransformer holding only this stage's layers (stage 0: ``[0, split)``, stage 1: the
    rest; the others are ``PPMissingLayer`` stubs, as vLLM builds them) with a pipeline-stage backend.

    The stages are chained as vLLM chains them: stage 0 sends the hidden state that leaves its last layer
    (after any intervention) and stage 1's first layer starts from it, so stage 1 cannot run before stage 0.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm.model_executor.models.utils import PPMissingLayer

    from nnterp.backends.distributed.pp import STAGE_END, STAGE_START, PipelineStageBackend, StageChannel, local_layer_range
    from nnterp.standardized import StandardizedTransformer

    hf_model = AutoModelForCausalLM.from_pretrained(str(path)).to(device)
    layers = hf_model.model.layers
    for index in range(len(layers)):
        if (index < split) != (rank == 0):
            layers[index] = PPMissingLayer()
    channel = StageChannel(timeout=timeout)
    where = f"the hidden state handed from stage 0 to layer {split}"
    if rank == 0:  # the stubs after `split` pass the stream through unchanged, up to the final norm
        hf_model.model.norm.register_forward_pre_hook(lambda module, args: channel.publish(channel.key(where), args[0]))
    else:
        def receive(module, args, kwargs):
            return (channel.fetch(channel.key(where), where, device), *args[1:]), kwargs

        layers[split].register_forward_pre_hook(receive, with_kwargs=True)
    # no load-time renaming check: until the stage backend below is installed, the other stage's layers are stubs
    model = StandardizedTransformer(hf_model, tokenizer=AutoTokenizer.from_pretrained(str(path)), check_layout=False,
                                    check_renaming=False)

    def boundary(location: str):  # the step boundaries vLLM's runner serves, around this stage's forward
        def serve(*_):
            if model.interleaver.interleaving:
                model.interleaver.handle(location, None)

        return serve

    hf_model.register_forward_pre_hook(boundary(STAGE_START))
    if rank == 0:  # after the hand-off is sent
        hf_model.model.norm.register_forward_pre_hook(boundary(STAGE_END))
    model._backend = PipelineStageBackend(model._backend, channel, local_layer_range(layers), first=rank == 0,
                                          last=rank == 1, parameters=None)
    channel.new_trace()  # the layout probe above ran a forward pass; traces start afresh on both stages
    return model


def pp_trace(rank: int, world_size: int, path: str, split: int, device: str = "cpu") -> dict:
    """The same trace body on both stages: steer layer 0 (a write stage 1 ignores), read layer 0, the
    last layer and the logits; reads of the other stage's layers are placeholders."""
    import nnsight

    from nnterp.backends.distributed.pp import RemoteValue, owning_stages

    model = pp_stage_model(path, rank, split, timeout=60, device=device)
    model._backend.device = device
    owners = owning_stages({f"layers.{i}": layer for i, layer in enumerate(model._module.model.layers)})
    with torch.no_grad(), model.trace(PP_PROMPT):
        model.layers_output[0] = model.layers_output[0] * 2
        first = model.layers_output[0].save()
        last = model.layers_output[-1]
        returned_at_once = nnsight.save(not isinstance(last, RemoteValue) or not last.materialized)
        last.save()
        logits = model.logits.save()
    remote = {"first": isinstance(first, RemoteValue), "last": isinstance(last, RemoteValue)}
    return {"saves": {"first": first, "last": last}, "logits": logits, "owners": owners,
            "returned_at_once": returned_at_once, "remote": remote}


def pp_out_of_order(rank: int, world_size: int, path: str, split: int, timeout: float) -> dict:
    """Stage 0 reads the last layer (stage 1's) and then writes its own layer 0: out of forward order,
    as in one process. Stage 1, whose write is a no-op, then needs layer 0's value, which stage 0 never
    published: it must time out rather than wait forever."""
    model = pp_stage_model(path, rank, split, timeout=timeout)
    start = time.time()
    try:
        with torch.no_grad(), model.trace(PP_PROMPT):
            late = model.layers_output[-1]
            model.layers_output[0] = model.layers_output[0] + 0 * late.sum()
            model.layers_output[0].sum().item()
    except Exception as error:  # nnsight re-raises the intervention's error at the trace boundary
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.time() - start}
    return {"error": None, "seconds": time.time() - start}


def pp_read_timings(rank: int, world_size: int, path: str, split: int, repeats: int, device: str = "cpu") -> dict:
    """On stage 1, seconds to consume (``.sum().item()``) its own last layer's output vs stage 0's layer 0
    output (a placeholder fetched from stage 0), both once the value exists; medians over ``repeats`` traces."""
    import statistics

    model = pp_stage_model(path, rank, split, timeout=60, device=device)
    model._backend.device = device
    local, remote = [], []
    for _ in range(repeats):
        with torch.no_grad(), model.trace(PP_PROMPT):
            first = model.layers_output[0]
            last = model.layers_output[-1]  # on stage 1, stage 0 has published layer 0 by now
            if rank == 1:
                start = time.perf_counter()
                last.sum().item()
                local.append(time.perf_counter() - start)
                start = time.perf_counter()
                first.sum().item()
                remote.append(time.perf_counter() - start)
        model._backend.channel.new_trace()
    return {"local": statistics.median(local), "cross-stage": statistics.median(remote)} if rank == 1 else {}


def bind(program: Callable, **kwargs: Any) -> Callable[[int, int], Any]:
    """``program`` with its keyword arguments bound, picklable for spawned ranks."""
    return partial(program, **kwargs)


TRANSFER_TIMEOUT_S = 3.0


def transport_transfers(rank: int, world_size: int, device: str = "cpu", last_rank_delay: float = 0.0) -> dict:
    """Rank 0 publishes values; the other ranks pull them (one alone, a large one, three in one request),
    then rank 0 releases them. Reports what each rank saw. The last rank builds its transport
    ``last_rank_delay`` seconds after the others (a rank that loads its weights slower)."""
    import torch.distributed as dist

    from nnterp.backends.distributed.transport import StageTransport

    if rank == world_size - 1:
        time.sleep(last_rank_delay)
    transport = StageTransport(dist.distributed_c10d._get_default_store(), timeout=TRANSFER_TIMEOUT_S)
    generator = torch.Generator().manual_seed(0)
    values = {"large": torch.randn(6 << 20, generator=generator), "bf16": torch.randn(4, 5, generator=generator).bfloat16(),
              **{f"step{i}": torch.randn(2, 3, generator=generator) for i in range(3)}, "scalar": torch.tensor(7.0)}
    result: dict = {}
    if rank == 0:
        for key, value in values.items():
            transport.publish(key, value.to(device))
        result["values"] = values
        result["held_bytes_before"] = transport.held_bytes
    dist.barrier()
    if rank != 0:
        pulled = {key: transport.fetch([key])[0] for key in ("large", "bf16", "scalar")}
        pulled.update(zip(("step0", "step1", "step2"), transport.fetch(["step0", "step1", "step2"])))
        result["values"] = pulled
        futures = {key: transport.prefetch(key) for key in ("step2", "bf16", "large", "step0")}  # in the background
        result["prefetched"] = {key: future.result(timeout=60) for key, future in futures.items()}
        result["largest_store_entry"] = max(len(transport.store.get(key)) for key in values)
        result["missing"], result["missing_seconds"] = _timed_error(lambda: transport.wait("never-published"))
    if rank == 0:  # a value dropped while still announced (a holder that released too early)
        transport.publish("dropped", torch.ones(2))
        with transport._lock:
            transport._held.pop("dropped")
    dist.barrier()
    if rank != 0:
        result["dropped"], result["dropped_seconds"] = _timed_error(lambda: transport.fetch(["dropped"]))
    dist.barrier()
    if rank == 0:
        transport.release(list(values))
        result["held_bytes_after"], result["held_keys_after"] = transport.held_bytes, transport.held_keys
    dist.barrier()
    if rank != 0:
        result["announced_after_release"] = any(transport.announced(key) for key in values)
    dist.barrier()
    if rank == 0:  # a holder whose answer never comes (stuck, or its link gone): announced, never sent
        transport._send = lambda *args: time.sleep(TRANSFER_TIMEOUT_S + 1)
        transport.publish("stuck", torch.ones(2))
    dist.barrier()
    if rank == 1:
        result["stuck"], result["stuck_seconds"] = _timed_error(lambda: transport.fetch(["stuck"]))
    dist.barrier()
    transport.close()
    return result


def _timed_error(action: Callable[[], Any]) -> tuple[str, float]:
    """The transport error ``action`` raises (as text; "nothing raised" when none) and the seconds it took."""
    from nnterp.backends.distributed.transport import TransportTimeout

    start = time.time()
    try:
        action()
        return "nothing raised", time.time() - start
    except TransportTimeout as error:
        return f"{type(error).__name__}: {error}", time.time() - start
