"""``model.ln_final`` of a model that has no final norm: the identity."""

from __future__ import annotations

from typing import Any

import torch


class IdentityFinalNorm:
    """Stands where a final-norm envoy would: calling it returns its argument, and inside a trace its input and
    output are the last layer's output (what the LM head reads)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @property
    def input(self) -> torch.Tensor:
        return self._model.layers_output[-1]

    @property
    def output(self) -> torch.Tensor:
        return self._model.layers_output[-1]

    @output.setter
    def output(self, value: torch.Tensor) -> None:
        raise AttributeError(
            "ln_final.output cannot be assigned: the model has no final norm (ln_final is the identity). "
            "Assign model.layers_output[-1] instead."
        )

    def __repr__(self) -> str:
        return "IdentityFinalNorm()  # the model has no final norm"
