"""StandardizedVLLM on CUDA graphs: which standardized reads a graph-captured engine serves, and the seams that
serve them.

A replayed CUDA graph runs no Python, so only the locations recorded as seams of vLLM's breakable graphs are
reached on a replayed step. They are derived from the standardized names, never typed: ``cuda_graphs=True``
serves every layer accessor (``layers_input/output``, ``attentions_input/output``, ``mlps_input/output``) at every
layer, plus the token embeddings and the model's input ids; ``cuda_graphs=("layers_output",)`` only what it names
(fewer seams, fewer graph breaks). Traces reach them through nnsight's taps; extraction and served requests
through :class:`~nnterp.backends.taps.seams.Seams`, installed when the worker loads the model. Anything else
(attention probabilities, heads, routers, other accessors, raw modules) is refused with the eager alternative.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional, Sequence

import torch

from ..taps.plan import graph_sites
from ..taps.seams import Seams
from ..taps.spec import ACCESSORS, GRAPH_ACCESSORS_KEY

EXTRA_READS = ("token_embeddings", "input_ids")  # reads outside the layers that are served as well


def accessors_under_graphs(cuda_graphs: bool | Sequence[str], enforce_eager: Optional[bool]) -> Optional[tuple[str, ...]]:
    """The layer accessors a graph-captured engine serves (None: an eager engine). ``enforce_eager=False`` is
    ``cuda_graphs=True``."""
    if enforce_eager is not None and cuda_graphs is not False and bool(enforce_eager):
        raise ValueError(f"enforce_eager=True contradicts cuda_graphs={cuda_graphs!r}: drop one of them.")
    if cuda_graphs is False and enforce_eager is False:
        cuda_graphs = True
    if cuda_graphs is False or cuda_graphs is None:
        return None
    if cuda_graphs is True:
        return ACCESSORS
    accessors = (cuda_graphs,) if isinstance(cuda_graphs, str) else tuple(cuda_graphs)
    unknown = [name for name in accessors if name not in ACCESSORS]
    if unknown or not accessors:
        raise ValueError(f"cuda_graphs={cuda_graphs!r}: pass True, or some of the layer accessors {ACCESSORS} "
                         f"({unknown or 'none given'} is not one of them).")
    return tuple(dict.fromkeys(accessors))


def check_graph_engine(vllm_kwargs: dict, accessors: tuple[str, ...]) -> None:
    """Refuse what a graph-captured StandardizedVLLM cannot run, before the engine starts."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"cuda_graphs={list(accessors)}: CUDA graphs need an NVIDIA GPU and this machine has none. Drop "
            "cuda_graphs (and enforce_eager=False): the eager engine serves every accessor.")
    if int(vllm_kwargs.get("pipeline_parallel_size", 1) or 1) > 1:
        raise ValueError(
            "cuda_graphs with pipeline_parallel_size > 1: cross-stage reads and writes are served on eager engines "
            "only. Drop cuda_graphs for pipeline parallelism, or use tensor_parallel_size.")


def graph_engine_kwargs(vllm_kwargs: dict, accessors: tuple[str, ...]) -> dict:
    """The engine arguments of a graph-captured engine: vLLM's breakable graphs (read by the worker processes,
    which inherit the environment), and the accessors its workers keep seams for."""
    check_graph_engine(vllm_kwargs, accessors)
    os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"
    return {**vllm_kwargs, "additional_config": {**(vllm_kwargs.get("additional_config") or {}),
                                                 GRAPH_ACCESSORS_KEY: list(accessors)}}


def make_full_graphs_breakable(runner: Any) -> None:
    """Record FULL graphs (a whole decode step, attention inside) breakable too, so the seams break them.

    Some vLLM versions record every graph mode through the breakable wrapper; others wrap the model once more in a
    plain wrapper for FULL graphs, whose replay reaches no hook (every read and steering would silently miss those
    steps): that wrapper is replaced by a breakable one recording the same mode, or, where vLLM's breakable wrapper
    records every mode alike, refused."""
    from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphWrapper
    from vllm.compilation.cuda_graph import CUDAGraphWrapper

    wrapper = runner.model
    if not isinstance(wrapper, CUDAGraphWrapper):
        return
    if "runtime_mode" not in inspect.signature(BreakableCUDAGraphWrapper.__init__).parameters:
        raise ValueError(
            f"cudagraph_mode {runner.compilation_config.cudagraph_mode}: this vLLM records {wrapper.runtime_mode.name} "
            "CUDA graphs whose replay reaches no hook, so reads and steering would miss those steps. Pass "
            "compilation_config={'cudagraph_mode': 'PIECEWISE'}.")
    runner.model = BreakableCUDAGraphWrapper(wrapper.runnable, runner.vllm_config, runtime_mode=wrapper.runtime_mode)


def nnsight_taps(root: torch.nn.Module, names: Any, accessors: Sequence[str]) -> tuple[str, ...]:
    """nnsight's tap locations for ``accessors`` at every layer, the embeddings' output and the model's input
    (``model.<path>.<input|output>``, paths under the worker's root envoy)."""
    sites = graph_sites(root, names, accessors)
    return ("model.input", f"model.{names.embed_tokens}.output",
            *(f"model.{path}.{direction}" for path, direction in sites))


def tap_sites(taps: Sequence[str]) -> list[tuple[str, str]]:
    """The module sites of nnsight tap locations (``model.<path>.<direction>``), the model's own input left out."""
    sites = []
    for tap in taps:
        path, _, direction = tap.removeprefix("model.").rpartition(".")
        if path and direction in ("input", "output"):
            sites.append((path, direction))
    return sites


def refuse_under_graphs(read: str, accessors: tuple[str, ...]) -> None:
    raise NotImplementedError(
        f"{read} is not served on this graph-captured engine: a replayed CUDA graph reaches only its seams, which "
        f"serve {list(accessors)} and {list(EXTRA_READS)}. Build StandardizedVLLM(..., cuda_graphs=False) (the "
        "eager engine) for it, or name its accessor in cuda_graphs=(...) if it is a layer accessor.")


class GraphRunner:
    """Model-runner behaviour, mixed in before nnsight's runner: on a graph-captured engine, seams at the
    served accessors' sites, installed before the graphs are captured; each step tells them its token count."""

    _nnterp_seams: Optional[Seams] = None

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        config = self.vllm_config.additional_config or {}
        if not config.get(GRAPH_ACCESSORS_KEY):
            return
        from ...core.backend import is_local

        make_full_graphs_breakable(self)
        model = self.get_model()
        if config.get("nnsight_taps"):  # StandardizedVLLM derived them from its names (and rename config)
            sites = tap_sites(config["nnsight_taps"])
        else:  # a served engine (nnterp serve): the standard names of the model
            from ...core.rename import resolve_names

            sites = graph_sites(model, resolve_names(model), config[GRAPH_ACCESSORS_KEY])
        self._nnterp_seams = Seams(model, [site for site in sites if is_local(model.get_submodule(site[0]))])

    def _update_states(self, scheduler_output) -> Any:
        result = super()._update_states(scheduler_output)
        if self._nnterp_seams is not None:
            self._nnterp_seams.tokens = scheduler_output.total_num_scheduled_tokens
        return result

    def nnterp_seams(self) -> Optional[dict]:
        """The seams this worker keeps (None on an eager engine): sites, how many were recorded into graphs."""
        seams = self._nnterp_seams
        if seams is None:
            return None
        return {"sites": len(seams.sites), "recorded": seams.recorded, "merged": seams.merged,
                "cudagraph_mode": str(self.compilation_config.cudagraph_mode),
                "listeners": sum(len(listeners) for listeners in seams.listeners.values())}


class GraphWorker:
    """The RPC that reports the seams of a graph-captured engine (``collective_rpc`` calls it by name)."""

    def nnterp_seams(self) -> Optional[dict]:
        return self.model_runner.nnterp_seams()
