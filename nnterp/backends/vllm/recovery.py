"""The engine keeps serving when interventions make vLLM's own code fail.

A trace body's own errors are caught by nnsight and surface at the trace boundary. An error raised by one of
vLLM's modules or its sampler after a trace wrote into the forward pass (a tensor of another dtype, say) used to
escape the engine's step and leave the request scheduled forever: the next trace never returned. Here such an
error fails the interventions that ran in that step, with a message saying so, and the step runs again
without them: other requests in the batch get their values, the failed ones end at once (nnsight forces their
end of sequence) and their callers get the error.
"""

from __future__ import annotations

from typing import Any

import torch

RECOVERED = (" [vLLM's {where} raised while this request's interventions ran; the engine ran the step again "
             "without them and keeps serving. A value written into the forward pass (e.g. layers_output[i] = ...) "
             "probably has another dtype, device or shape than the engine's tensors.]")


class RecoveringRunner:
    """Model-runner behaviour, mixed in before nnsight's runner: the forward pass and the sampler, retried
    without the step's interventions when they raise while interventions run."""

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._model_forward(*args, **kwargs)
        except Exception as error:
            if not self._fail_interventions(error, "forward pass"):
                raise
            return super()._model_forward(*args, **kwargs)

    def _sample(self, logits: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._sample(logits, *args, **kwargs)
        except Exception as error:
            if not self._fail_interventions(error, "sampler"):
                raise
            clean = None if logits is None else torch.nan_to_num(logits)  # what an edit may have left in them
            return super()._sample(clean, *args, **kwargs)

    def _fail_interventions(self, error: Exception, where: str) -> bool:
        """Record ``error`` on every intervention running in this step and stop them; whether there was any."""
        from nnsight.intervention.errors import capture_exception

        failed = []
        tracked = getattr(self, "nnsight_requests", None)
        for request in tracked.requests.values() if tracked is not None else ():
            mediator = request.mediator
            if mediator is None or mediator.batch_group is None or mediator.exception is not None:
                continue
            payload = capture_exception(error)
            payload["message"] += RECOVERED.format(where=where)
            request.error = payload
            mediator.exception = error
            if mediator.alive:
                from greenlet import GreenletExit

                try:
                    mediator.worker.throw(GreenletExit)
                except BaseException:  # the block's own cleanup failing changes nothing here
                    pass
            failed.append(request)
        served = self.__dict__.get("_nnterp_served")
        if served is not None:
            failed += served.fail_step(f"{type(error).__name__}: {error}" + RECOVERED.format(where=where))
        if failed:
            interleaver = getattr(getattr(self, "nnsight_model", None), "interleaver", None)
            if interleaver is not None:
                interleaver.mediators = []
                interleaver.reindex()
        return bool(failed)
