"""Failures injected into a served engine's worker, for the tests that check the engine survives them.

``nnterp serve ... --worker-cls harness.faults.FaultyCPUWorker`` (``tests/`` on the engine's path) with
``VLLM_SERVER_DEV_MODE=1``: a test calls ``POST /collective_rpc {"method": "fail_next_forward"}`` and the next
forward pass of decoder layer 1 raises once. (A worker subclass rather than vLLM's ``worker_extension_cls``:
nnsight gives every object a ``save`` attribute, which vLLM's extension check takes for a name clash.)
"""

from __future__ import annotations

from nnterp.backends.vllm.cpu import NNsightCPUWorker


class FaultyCPUWorker(NNsightCPUWorker):
    """nnterp's CPU worker, with a method that makes the next forward pass of one layer fail."""

    def fail_next_forward(self, layer: int = 1) -> str:
        model = self.model_runner.get_model()
        state = {"armed": True}

        def hook(module, args):
            if state["armed"]:
                state["armed"] = False
                raise RuntimeError("injected failure of a vLLM module")

        model.get_submodule("model.layers")[layer].register_forward_pre_hook(hook)
        return "armed"
