"""vLLM code that cannot run while nnsight builds the module tree on the meta device, made to."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def meta_tree_build() -> Iterator[None]:
    """The context nnsight's meta build of a vLLM model runs in:

    - layers whose constructor reads a value off a tensor it just made (vLLM's xIELU activation, used by
      Apertus, calls ``.item()`` on its ``beta``) are built on real tensors (a few scalars);
    - without an accelerator, MoE layers skip prepacking their expert weights after loading: vLLM's CPU MoE
      does it with ``_C::prepack_moe_weight``, which has no meta kernel, and the tree only needs the modules
      (the engine's own load, outside this context, prepacks).
    """
    from nnsight.modeling.mixins.meta import MetaDevice
    from vllm.model_executor.layers import activation

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched_attribute(activation.XIELU, "__init__", lambda init: _under(MetaDevice.real, init)))
        if not torch.cuda.is_available():
            from vllm.model_executor.layers.fused_moe.experts import cpu_moe

            stack.enter_context(patched_attribute(cpu_moe, "cpu_prepack_moe_weight", lambda prepack: lambda weight, isa: weight))
        yield


@contextlib.contextmanager
def patched_attribute(owner: object, name: str, wrap: Callable) -> Iterator[None]:
    """``owner.name`` replaced by ``wrap(original)`` while the block runs."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _under(context: Callable, function: Callable) -> Callable:
    def run(*args, **kwargs):
        with context():
            return function(*args, **kwargs)

    return run
