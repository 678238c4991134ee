"""nnsight's vLLM worker on vLLM's CPU platform (nnsight ships only the GPU worker).

The engine builds this worker when ``StandardizedVLLM`` runs without an accelerator; it brings up
vLLM's CPU worker and gives its model runner nnsight's intervention behaviour.
"""

from __future__ import annotations


import torch
from nnsight.modeling.vllm.model_runners.GPUModelRunner import NNsightGPUModelRunner
from nnsight.modeling.vllm.workers.GPUWorker import NNsightGPUWorker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from ..distributed.tp import REPACKED
from .extraction_worker import ExtractionRunner, ExtractionWorker
from .graphs import GraphRunner, GraphWorker
from .meta import patched_attribute
from .recovery import RecoveringRunner
from .served import ServingRunner, ServingWorker
from .worker import PipelineRunner, SharedModelRunner, SharedModelWorker, StageWorker, TracedRequestsRunner


class NNsightCPUModelRunner(RecoveringRunner, ServingRunner, ExtractionRunner, SharedModelRunner, GraphRunner, PipelineRunner,
                            TracedRequestsRunner, NNsightGPUModelRunner, CPUModelRunner):
    """vLLM's CPU model runner with nnsight's request interleaving and nnterp's pipeline stages, extraction and
    shared model copy."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        mark_prepacked_moe_weights(self.model)


class NNsightCPUWorker(ServingWorker, ExtractionWorker, SharedModelWorker, StageWorker, GraphWorker, NNsightGPUWorker, CPUWorker):
    """vLLM's CPU worker whose runner interleaves interventions (nnsight's RPCs come from NNsightGPUWorker)."""

    def init_device(self) -> None:
        CPUWorker.init_device(self)
        if type(self.model_runner) is not CPUModelRunner:
            raise NotImplementedError(f"expected vLLM's CPUModelRunner, got {type(self.model_runner).__name__}")
        self.model_runner.__class__ = NNsightCPUModelRunner

    def compile_or_warm_up_model(self):
        times = super().compile_or_warm_up_model()
        allocate_stage_inputs(self.model_runner)
        return times

    def shutdown(self) -> None:
        # vLLM's shared runner shutdown empties the accelerator cache, which raises without one.
        with no_accelerator_cache():
            super().shutdown()


def no_accelerator_cache():
    """Make ``torch.accelerator.empty_cache`` a no-op while vLLM code that assumes a GPU runs on CPU."""
    return patched_attribute(torch.accelerator, "empty_cache", lambda original: lambda: None)


def allocate_stage_inputs(runner) -> None:
    """The buffer a later pipeline stage receives the previous stage's tensors into. vLLM allocates it in a
    warm-up run, which its CPU worker skips in eager mode; without it the first request fails on stage 2+."""
    from vllm.distributed.parallel_state import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
    )


def mark_prepacked_moe_weights(model: torch.nn.Module) -> None:
    """Tag the expert weights vLLM's CPU MoE prepacked into its grouped-GEMM layout (same shape, other values),
    so that reading them as parameters fails clearly instead of returning the packed values."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and not getattr(experts, "_use_zentorch", False):
            for name in ("w13_weight", "w2_weight"):
                if isinstance(getattr(module, name, None), torch.Tensor):
                    setattr(getattr(module, name), REPACKED, True)
