"""The vLLM backend's read and write policy, and the parameters it gathers."""

from __future__ import annotations

from typing import Optional

import torch

from ...core.backend import Backend
from .graphs import EXTRA_READS, refuse_under_graphs
from .readonly import read_only


class VLLMBackend(Backend):
    """vLLM reuses activation buffers and mutates them in fused kernels: a single-stream read is cloned
    so a saved value is the value at read time; a dual-stream sum is already a fresh tensor. Either way
    the read is not the engine's tensor, so it refuses in-place edits (they would be lost)."""

    name = "vllm"
    batches_prompts = False  # one prompt per trace (each invoke is one request)

    def __init__(self, graph_accessors: Optional[tuple[str, ...]] = None) -> None:
        self.graph_accessors = graph_accessors  # what a graph-captured engine serves (None: eager, everything)

    def serves(self, read: str) -> bool:
        return self.graph_accessors is None or read in (*self.graph_accessors, *EXTRA_READS)

    def check_served(self, read: str) -> None:
        if not self.serves(read):
            refuse_under_graphs(read, self.graph_accessors)

    def after_read(self, value: torch.Tensor, fresh: bool, where: str) -> torch.Tensor:
        return read_only(value if fresh else value.clone(), where)

    def local_parameter(self, module: torch.nn.Module, param_name: str) -> torch.Tensor:
        """Gathered over tensor-parallel ranks, vocabulary padding stripped (see ``nnterp.backends.distributed.tp``)."""
        from ..distributed.tp import gather_param

        return gather_param(module, param_name)
