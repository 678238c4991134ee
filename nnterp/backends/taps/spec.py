"""The declarative interventions a served request carries (its ``nnterp`` object), in standardized names.

::

    {"steer":   [{"layers": [4, 5], "vector": [0.1, ...] | {"token": " London"}, "factor": 4.0,
                  "tokens": "all" | "prompt" | "generated"}],
     "capture": [{"accessor": "layers_output", "layers": [5], "tokens": "prompt" | "generated" | "all"}],
     "ablate":  [{"accessor": "mlps_output", "layers": [3], "mode": "zero" | "mean", "tokens": "all"}],
     "skip_layers": [[2, 4]]}

``steer`` adds ``factor * vector`` to ``layers_output`` of each layer (a ``token`` vector is that token's row of
the LM head). ``capture`` returns the accessor's stream at each layer, ``[tokens, hidden]``, for the prompt's
tokens, the generated ones (each token but the last: the model never runs on it) or both. ``ablate`` replaces
the output of an accessor (``layers_output``, ``attentions_output``, ``mlps_output``) by zeros or by its mean
over the request's prompt tokens. ``skip_layers`` makes layers ``a..b`` (inclusive) output the stream entering
layer ``a``. Everything is checked against the model (layer range, hidden size, finite values) before the
request reaches the engine, and every error names the field: :class:`SpecError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# Imported by the API server's middleware, which must not load nnsight (it would change vLLM's server): standard
# library only.

ACCESSORS = ("layers_input", "layers_output", "attentions_input", "attentions_output", "mlps_input", "mlps_output")
SPEC_KEY = "nnterp"  # the request field, and SamplingParams.extra_args[SPEC_KEY] = RequestSpec.to_json()
GRAPH_ACCESSORS_KEY = "nnterp_graph_accessors"  # engine additional_config: the accessors served under CUDA graphs
TOKENS = ("all", "prompt", "generated")
WRITABLE = ("layers_output", "attentions_output", "mlps_output")
MODES = ("zero", "mean")
FIELDS = ("steer", "capture", "ablate", "skip_layers")


class SpecError(ValueError):
    """A served request's ``nnterp`` object is invalid; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ModelFacts:
    """What a specification is checked against."""

    num_layers: int
    hidden_size: int
    accessors: tuple[str, ...] = ACCESSORS


@dataclass
class Steer:
    layers: list[int]
    vector: list[float] | None
    factor: float = 1.0
    tokens: str = "all"
    token: str | None = None  # a vector given as a token, resolved to its LM-head row before the engine


@dataclass
class Capture:
    accessor: str
    layers: list[int]
    tokens: str = "prompt"

    def names(self) -> list[str]:
        return [f"{self.accessor}.{layer}" for layer in self.layers]


@dataclass
class Ablate:
    accessor: str
    layers: list[int]
    mode: str = "zero"
    tokens: str = "all"


@dataclass
class RequestSpec:
    steer: list[Steer] = field(default_factory=list)
    capture: list[Capture] = field(default_factory=list)
    ablate: list[Ablate] = field(default_factory=list)
    skip_layers: list[tuple[int, int]] = field(default_factory=list)
    handle: str | None = None  # where the engine keeps this request's captures

    def to_json(self) -> str:
        return json.dumps({
            "handle": self.handle,
            "steer": [{"layers": s.layers, "vector": s.vector, "factor": s.factor, "tokens": s.tokens} for s in self.steer],
            "capture": [{"accessor": c.accessor, "layers": c.layers, "tokens": c.tokens} for c in self.capture],
            "ablate": [{"accessor": a.accessor, "layers": a.layers, "mode": a.mode, "tokens": a.tokens} for a in self.ablate],
            "skip_layers": [list(pair) for pair in self.skip_layers],
        })

    @classmethod
    def from_json(cls, text: str) -> "RequestSpec":
        """The form :meth:`to_json` writes, already checked (the engine's side)."""
        data = json.loads(text)
        return cls(
            steer=[Steer(s["layers"], s["vector"], s["factor"], s["tokens"]) for s in data["steer"]],
            capture=[Capture(c["accessor"], c["layers"], c["tokens"]) for c in data["capture"]],
            ablate=[Ablate(a["accessor"], a["layers"], a["mode"], a["tokens"]) for a in data["ablate"]],
            skip_layers=[(a, b) for a, b in data["skip_layers"]],
            handle=data["handle"],
        )

    @property
    def capture_names(self) -> list[str]:
        return [name for capture in self.capture for name in capture.names()]


def parse_spec(data: Any, facts: ModelFacts) -> RequestSpec:
    """Check a request's ``nnterp`` object against the model; token vectors are left for the caller to resolve
    (``Steer.token``)."""
    if not isinstance(data, dict):
        raise SpecError("nnterp", f"must be an object with some of the fields {list(FIELDS)}, got {_kind(data)}.")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise SpecError(f"nnterp.{unknown[0]}", f"unknown field; the fields are {list(FIELDS)}.")
    spec = RequestSpec()
    for index, item in enumerate(_list(data, "steer")):
        spec.steer.append(_steer(item, f"nnterp.steer[{index}]", facts))
    for index, item in enumerate(_list(data, "capture")):
        where = f"nnterp.capture[{index}]"
        _only(item, where, ("accessor", "layers", "tokens"))
        accessor = _accessor(item, where, facts.accessors)
        spec.capture.append(Capture(accessor, _layers(item, where, facts), _tokens(item, where, "prompt")))
    names = spec.capture_names
    if len(set(names)) != len(names):
        raise SpecError("nnterp.capture", "names the same accessor and layer twice.")
    for index, item in enumerate(_list(data, "ablate")):
        where = f"nnterp.ablate[{index}]"
        _only(item, where, ("accessor", "layers", "mode", "tokens"))
        accessor = _accessor(item, where, WRITABLE)
        mode = item.get("mode", "zero")
        if mode not in MODES:
            raise SpecError(f"{where}.mode", f"is {mode!r}; use one of {list(MODES)}.")
        spec.ablate.append(Ablate(accessor, _layers(item, where, facts), mode, _tokens(item, where, "all")))
    for index, item in enumerate(_list(data, "skip_layers")):
        where = f"nnterp.skip_layers[{index}]"
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(_is_int(v) for v in item)):
            raise SpecError(where, f"is {_kind(item)}; give [first, last] layer indices, e.g. [2, 4].")
        first, last = (_layer(v, where, facts) for v in item)
        if last < first:
            raise SpecError(where, f"last layer {last} comes before first layer {first}.")
        spec.skip_layers.append((first, last))
    return spec


def _steer(item: Any, where: str, facts: ModelFacts) -> Steer:
    _only(item, where, ("layers", "vector", "factor", "tokens"))
    layers = _layers(item, where, facts)
    factor = item.get("factor", 1.0)
    if not _is_number(factor) or not math.isfinite(factor):
        raise SpecError(f"{where}.factor", f"is {_kind(factor)}; give a finite number.")
    vector = item.get("vector")
    if isinstance(vector, dict):
        if set(vector) != {"token"} or not isinstance(vector["token"], str) or not vector["token"]:
            raise SpecError(f"{where}.vector", 'as an object takes one field, "token": a string such as " London".')
        return Steer(layers, None, float(factor), _tokens(item, where, "all"), token=vector["token"])
    if not isinstance(vector, list) or not all(_is_number(v) for v in vector):
        raise SpecError(f"{where}.vector", f"is {_kind(vector)}; give a list of {facts.hidden_size} numbers or "
                                            '{"token": "..."}.')
    if len(vector) != facts.hidden_size:
        raise SpecError(f"{where}.vector", f"has {len(vector)} values; the model's hidden size is {facts.hidden_size}.")
    if not all(math.isfinite(v) for v in vector):
        raise SpecError(f"{where}.vector", "holds NaN or infinite values.")
    return Steer(layers, [float(v) for v in vector], float(factor), _tokens(item, where, "all"))


def _list(data: dict, name: str) -> list:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise SpecError(f"nnterp.{name}", f"is {_kind(value)}; give a list.")
    return value


def _only(item: Any, where: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(item, dict):
        raise SpecError(where, f"is {_kind(item)}; give an object with the fields {list(allowed)}.")
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}", f"unknown field; the fields are {list(allowed)}.")


def _accessor(item: dict, where: str, allowed) -> str:
    accessor = item.get("accessor")
    if accessor not in allowed:
        raise SpecError(f"{where}.accessor", f"is {accessor!r}; use one of {list(allowed)}.")
    return accessor


def _layers(item: dict, where: str, facts: ModelFacts) -> list[int]:
    layers = item.get("layers")
    if _is_int(layers):
        layers = [layers]
    if not isinstance(layers, list) or not layers or not all(_is_int(v) for v in layers):
        raise SpecError(f"{where}.layers", f"is {_kind(layers)}; give a layer index or a non-empty list of them.")
    checked = [_layer(layer, f"{where}.layers", facts) for layer in layers]
    if len(set(checked)) != len(checked):
        raise SpecError(f"{where}.layers", "names a layer twice.")
    return sorted(checked)


def _layer(value: int, where: str, facts: ModelFacts) -> int:
    n = facts.num_layers
    if not -n <= value < n:
        raise SpecError(where, f"layer {value} is out of range: the model has {n} layers (0..{n - 1}, or -{n}..-1).")
    return value % n


def _tokens(item: dict, where: str, default: str) -> str:
    tokens = item.get("tokens", default)
    if tokens not in TOKENS:
        raise SpecError(f"{where}.tokens", f"is {tokens!r}; use one of {list(TOKENS)}.")
    return tokens


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
