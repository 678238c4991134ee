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


class NNsightCPUWorker(NNsightGPUWorker, CPUWorker):
    """vLLM's CPU worker whose runner interleaves interventions (nnsight's RPCs come from NNsightGPUWorker)."""

    def init_device(self) -> None:
        CPUWorker.init_device(self)
        if type(self.model_runner) is not CPUModelRunner:
            raise NotImplementedError(f"expected vLLM's CPUModelRunner, got {type(self.model_runner).__name__}")
        self.model_runner.__class__ = NNsightCPUModelRunner

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
