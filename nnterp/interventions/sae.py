"""Splicing a sparse autoencoder (or any module with ``encode``/``decode``) into the residual stream."""

from __future__ import annotations

from typing import Any

import torch

from ..core.accessors import LayerAccessor


class Splice:
    """An autoencoder spliced at one accessor and layer of the running trace (made by :func:`splice`).

    ``features`` is ``sae.encode(stream)``; the stream the model continues with is ``sae.decode(features)``, plus
    ``error`` (``stream - sae.decode(sae.encode(stream))``) when ``include_error``. Assigning ``features``
    replaces the stream again with the decoding of the new features (same shape), so feature edits reach the
    model's later layers.
    """

    def __init__(self, model: Any, accessor: LayerAccessor, layer: int, sae: Any, include_error: bool) -> None:
        self._accessor, self._layer, self._sae = accessor, layer, sae
        stream = accessor[layer]
        self.stream = stream
        self._dtype = _parameter_dtype(sae, stream.dtype)
        try:
            self._features = sae.encode(stream.to(self._dtype))
        except RuntimeError as error:
            raise ValueError(f"splice({accessor.name}, {layer}): sae.encode failed on the stream of shape "
                             f"{tuple(stream.shape)} ({error}); the autoencoder's width must be the model's hidden "
                             f"size, {stream.shape[-1]}.") from error
        self.reconstruction = sae.decode(self._features).to(stream.dtype)
        self.error = stream - self.reconstruction if include_error else None
        self._write(self.reconstruction)

    @property
    def features(self) -> torch.Tensor:
        return self._features

    @features.setter
    def features(self, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(self._features.shape):
            raise ValueError(f"splice({self._accessor.name}, {self._layer}): the features have shape "
                             f"{tuple(self._features.shape)}, the new value {tuple(value.shape)}; keep the shape.")
        self._features = value
        self._write(self._sae.decode(value.to(self._dtype)).to(self.stream.dtype))

    def _write(self, reconstruction: torch.Tensor) -> None:
        if tuple(reconstruction.shape) != tuple(self.stream.shape):
            raise ValueError(f"splice({self._accessor.name}, {self._layer}): sae.decode returned shape "
                             f"{tuple(reconstruction.shape)} for a stream of shape {tuple(self.stream.shape)}; the "
                             "autoencoder's width must be the model's hidden size.")
        self._accessor[self._layer] = reconstruction if self.error is None else reconstruction + self.error


def splice(model: Any, accessor: str, layer: int, sae: Any, include_error: bool = False) -> Splice:
    """Inside a trace: replace ``accessor[layer]`` (e.g. ``"layers_output"``) by ``sae``'s reconstruction (plus its
    error term with ``include_error=True``, leaving the model's output unchanged until features are edited).
    ``sae`` is any object with ``encode`` and ``decode`` over the last dimension (sae-lens's ``SAE`` has them).
    Returns a :class:`Splice`: read ``.features`` (save it like any value), assign it to edit them."""
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        raise TypeError(f"splice: {type(sae).__name__} has no encode/decode methods; pass a sparse autoencoder "
                        "(e.g. sae_lens.SAE) or any module exposing encode(x) and decode(features).")
    target = getattr(model, accessor, None)
    if not isinstance(target, LayerAccessor):
        raise ValueError(f"splice: {accessor!r} is not a stream accessor; use layers_output, layers_input, "
                         "attentions_output, mlps_output, ...")
    return Splice(model, target, layer, sae, include_error)


def _parameter_dtype(module: Any, default: torch.dtype) -> torch.dtype:
    parameters = getattr(module, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.dtype if first is not None else default
