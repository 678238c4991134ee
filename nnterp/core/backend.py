"""What a backend (the engine that runs the model) decides for the accessors, and where values sit in the
forward pass.

A position in the forward pass is a layer index, ``EMBEDDINGS`` (before layer 0) or ``HEAD`` (after the last
layer: the final norm, the LM head, the sampler). Under pipeline parallelism a process holds only some
positions; the modules of the others are vLLM's ``PPMissingLayer`` stubs (:func:`is_local`).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from .forward_order import in_forward_order

EMBEDDINGS, HEAD = "embeddings", "head"
Position = Union[int, str]  # a layer index, EMBEDDINGS or HEAD


def is_local(module: torch.nn.Module) -> bool:
    """Whether this process holds the real module (vLLM replaces other pipeline stages' modules by
    ``PPMissingLayer`` stubs)."""
    return not any(cls.__name__ == "PPMissingLayer" for cls in type(module).__mro__)


class Backend:
    """Engine-specific policy hooks the accessors call; this base class is the HuggingFace backend (the
    identity). vLLM's is ``nnterp.backends.vllm.VLLMBackend``, a pipeline stage's
    ``nnterp.backends.distributed.pp.PipelineStageBackend``."""

    name = "hf"
    batches_prompts = True  # a trace takes a list of prompts

    def after_read(self, value: torch.Tensor, fresh: bool, where: str) -> torch.Tensor:
        return value

    def before_write(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def local_parameter(self, module: torch.nn.Module, param_name: str) -> torch.Tensor:
        """The full logical parameter of a module this process holds (HF holds it whole)."""
        return getattr(module, param_name).detach()

    def full_parameter(self, module: torch.nn.Module, param_name: str, path: str, position: Any) -> torch.Tensor:
        """The full logical parameter at ``path`` (``module`` runs at ``position`` of the forward pass)."""
        return self.local_parameter(module, param_name)

    def serves(self, read: str) -> bool:
        """Whether the engine serves ``read`` (an accessor's name, e.g. ``attentions_output``) at all (an engine
        that replays CUDA graphs serves only its seams)."""
        return True

    def check_served(self, read: str) -> None:
        """Raise, naming the alternative, where the engine does not serve ``read``."""

    def owns(self, position: Any) -> bool:
        """Whether this process runs the forward pass at ``position`` (always, except on a pipeline stage)."""
        return True

    def remote_read(self, where: str, position: Any) -> Any:
        raise NotImplementedError(f"{where}: this backend runs every module itself.")

    def run_value(self, where: str, read: Callable[[], Any]) -> Any:
        """A value the engine serves outside any module (logits, sampled tokens)."""
        return in_forward_order(where, read)

    def run_write(self, write: Callable[[Any], None], value: Any) -> None:
        write(value)

    def compute_at(self, where: str, position: Any, compute: Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
        """``compute(*inputs)`` with the modules at ``position`` (run here: this process holds every module)."""
        return compute(*inputs)
