"""nnsight's vLLM worker on vLLM's CPU platform (nnsight ships only the GPU worker).

The engine builds this worker when ``StandardizedVLLM`` runs without an accelerator; it brings up
vLLM's CPU worker and gives its model runner nnsight's intervention behaviour.
"""

from __future__ import annotations

import contextlib

import torch
from nnsight.modeling.vllm.model_runners.GPUModelRunner import NNsightGPUModelRunner
from nnsight.modeling.vllm.workers.GPUWorker import NNsightGPUWorker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker


class NNsightCPUModelRunner(NNsightGPUModelRunner, CPUModelRunner):
    """vLLM's CPU model runner with nnsight's request interleaving."""

    def load_model(self, *args, **kwargs) -> None:
        from vllm.distributed.parallel_state import get_pp_group

        super().load_model(*args, **kwargs)
        if get_pp_group().world_size > 1:  # elsewhere an unknown module is a real mismatch and must raise
            self.nnsight_persistent_objects = StageModules(self.nnsight_persistent_objects)


class StageModules(dict):
    """Persistent objects of one pipeline stage: a request names modules by their path in the whole model,
    and a module another stage holds resolves to vLLM's stub for it."""

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or str(key).startswith("Module:")

    def __missing__(self, key):
        from vllm.model_executor.models.utils import PPMissingLayer

        return self.setdefault(key, PPMissingLayer())


class NNsightCPUWorker(NNsightGPUWorker, CPUWorker):
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


@contextlib.contextmanager
def no_accelerator_cache():
    """Make ``torch.accelerator.empty_cache`` a no-op while vLLM code that assumes a GPU runs on CPU."""
    original = torch.accelerator.empty_cache
    torch.accelerator.empty_cache = lambda: None
    try:
        yield
    finally:
        torch.accelerator.empty_cache = original


def allocate_stage_inputs(runner) -> None:
    """The buffer a later pipeline stage receives the previous stage's tensors into. vLLM allocates it in a
    warm-up run, which its CPU worker skips in eager mode; without it the first request fails on stage 2+."""
    from vllm.distributed.parallel_state import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
    )
