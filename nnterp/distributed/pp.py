"""Pipeline parallelism: which stage owns a module, and lazy placeholders for values another stage owns.

Under vLLM pipeline parallelism every stage runs the same intervention body, but each holds only its
slice of the layers (the others are ``PPMissingLayer`` stubs). A read of a module this stage owns
returns the real tensor and publishes it; a read of a module another stage owns returns a
:class:`RemoteValue` at once (never blocks), which pulls the owner's published value only when it is
consumed (arithmetic, indexing, ``.item()``, iteration, any torch function). Writes and saves of a
module another stage owns are no-ops there; the owning stage's saved value wins when saves are merged.

Values travel through a ``torch.distributed`` key-value store shared by the stages, so a consumer never
depends on the owner being at a matching collective call; a value that does not arrive within the
timeout (an access out of forward order, or a module no stage ran) raises :class:`CrossStageTimeout`.
"""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from nnsight.intervention.interleaver import OutOfOrderError


class CrossStageTimeout(OutOfOrderError):
    """A value owned by another pipeline stage was not published in time (the single-GPU out-of-order error)."""


def is_local(module: torch.nn.Module) -> bool:
    """Whether this stage holds the real module (vLLM replaces the other stages' modules by ``PPMissingLayer``)."""
    return not any(cls.__name__ == "PPMissingLayer" for cls in type(module).__mro__)


def owning_stages(modules: dict[str, torch.nn.Module], group=None) -> dict[str, int]:
    """The stage (rank in ``group``) that holds each named module, derived by exchanging every stage's
    local names; raises when a module is held by no stage or by several. A collective."""
    local = sorted(name for name, module in modules.items() if is_local(module))
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(gathered, local, group=group)
    owners: dict[str, list[int]] = {name: [] for name in modules}
    for stage, names in enumerate(gathered):
        for name in names:
            owners[name].append(stage)
    wrong = {name: stages for name, stages in owners.items() if len(stages) != 1}
    if wrong:
        raise RuntimeError(f"every module must be held by exactly one pipeline stage; these are not: {wrong}")
    return {name: stages[0] for name, stages in owners.items()}


class StageChannel:
    """Publishes this stage's reads and fetches other stages' reads by key, through a shared store.

    Keys are ``<trace>/<where>#<occurrence>``: every stage runs the same body, so the n-th read of the same
    accessor in the same trace has the same key on every stage.
    """

    def __init__(self, store: dist.Store | None = None, timeout: float = 60.0, prefix: str = "nnterp-pp") -> None:
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(prefix, base)
        self.timeout = timeout
        self.trace = 0
        self._occurrences: dict[str, int] = {}

    def new_trace(self) -> None:
        """Start the keys of the next trace (call at the same point on every stage)."""
        self.trace += 1
        self._occurrences.clear()

    def key(self, where: str) -> str:
        occurrence = self._occurrences.get(where, 0)
        self._occurrences[where] = occurrence + 1
        return f"{self.trace}/{where}#{occurrence}"

    def publish(self, key: str, value: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save(value.detach().cpu(), buffer)
        self.store.set(key, buffer.getvalue())

    def fetch(self, key: str, where: str, device: torch.device | str = "cpu") -> torch.Tensor:
        try:
            self.store.wait([key], timedelta(seconds=self.timeout))
        except Exception as error:  # the store raises its own timeout type (DistStoreError / RuntimeError)
            raise CrossStageTimeout(
                f"{where} is owned by another pipeline stage and was not published within {self.timeout:g} s. "
                "Values must be read in forward order (a layer's value exists only once its stage has run it); "
                "check that the trace reads modules in the order the model calls them."
            ) from error
        return torch.load(io.BytesIO(self.store.get(key)), weights_only=True).to(device)


class RemoteValue:
    """A value another pipeline stage owns: returned immediately, materialized on first consumption."""

    def __init__(self, channel: StageChannel, key: str, where: str, device: torch.device | str = "cpu") -> None:
        self._channel, self._key, self.where, self._device = channel, key, where, device
        self._value: torch.Tensor | None = None

    @property
    def materialized(self) -> bool:
        return self._value is not None

    def materialize(self) -> torch.Tensor:
        if self._value is None:
            if self._channel is None:
                raise RuntimeError(f"{self.where}: this placeholder left its stage before being fetched; "
                                   "take the owning stage's saved value (merge_stage_saves).")
            self._value = self._channel.fetch(self._key, self.where, self._device)
        return self._value

    def __getstate__(self) -> dict:
        """Pickles without its channel (saves are shipped between processes): only the fetched value, if any."""
        return {"_key": self._key, "where": self.where, "_device": self._device, "_value": self._value, "_channel": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self) -> "RemoteValue":
        """Keeps the placeholder past the trace without fetching it: the owner's save wins at merge time."""
        import nnsight

        return nnsight.save(self)

    def __repr__(self) -> str:
        state = "materialized" if self.materialized else "not fetched yet"
        return f"RemoteValue({self.where}, {state})"

    @classmethod
    def __torch_function__(cls, func: Callable, types: Iterable[type], args: tuple = (), kwargs: dict | None = None):
        return func(*_materialize(args), **_materialize(kwargs or {}))

    def __getattr__(self, name: str) -> Any:  # .shape, .item(), .float(), .sum(), ... all consume
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.materialize()[_materialize(index)]

    def __iter__(self):
        return iter(self.materialize())

    def __len__(self) -> int:
        return len(self.materialize())

    def __float__(self) -> float:
        return float(self.materialize())

    def __int__(self) -> int:
        return int(self.materialize())

    def __bool__(self) -> bool:
        return bool(self.materialize())

    def __array__(self, dtype=None):
        array = self.materialize().numpy()
        return array if dtype is None else array.astype(dtype)


def _binary(name: str):
    def operator(self: RemoteValue, other: Any) -> Any:
        return getattr(self.materialize(), name)(_materialize(other))

    operator.__name__ = name
    return operator


for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "matmul", "rmatmul",
              "pow", "rpow", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "floordiv", "mod"):
    setattr(RemoteValue, f"__{_name}__", _binary(f"__{_name}__"))
RemoteValue.__neg__ = lambda self: -self.materialize()  # type: ignore[attr-defined]
RemoteValue.__abs__ = lambda self: abs(self.materialize())  # type: ignore[attr-defined]


def _materialize(value: Any) -> Any:
    if isinstance(value, RemoteValue):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(item) for item in value)
    if isinstance(value, dict):
        return {key: _materialize(item) for key, item in value.items()}
    return value


def merge_stage_saves(per_stage: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict of saved values from every stage's: for each name the owning stage's value (a stage that
    did not own it saved a :class:`RemoteValue`, or nothing); a name no stage owns stays a placeholder."""
    merged: dict[str, Any] = {}
    for saves in per_stage:
        for name, value in saves.items():
            if name not in merged or (isinstance(merged[name], RemoteValue) and not isinstance(value, RemoteValue)):
                merged[name] = value
    return merged


class PipelineStageBackend:
    """Wraps a backend for one pipeline stage: reads of modules this stage owns are published for the
    other stages; reads of modules it does not own are :class:`RemoteValue` placeholders; writes to them
    are no-ops (the owning stage applies its own)."""

    def __init__(self, inner: Any, channel: StageChannel) -> None:
        self.inner, self.channel = inner, channel
        self.name, self.batches_prompts = inner.name, inner.batches_prompts

    def owns(self, module: torch.nn.Module) -> bool:
        return is_local(module)

    def remote_read(self, where: str) -> RemoteValue:
        return RemoteValue(self.channel, self.channel.key(where), where)

    def after_read(self, value: torch.Tensor, fresh: bool, where: str) -> torch.Tensor:
        value = self.inner.after_read(value, fresh, where)
        self.channel.publish(self.channel.key(where), value)
        return value

    def before_write(self, value: Any) -> Any:
        return self.inner.before_write(_materialize(value))
