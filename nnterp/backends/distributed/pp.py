"""Pipeline parallelism: which stage owns a value, and lazy placeholders for values another stage owns.

Under vLLM pipeline parallelism every stage runs the same intervention body, but each holds only its
slice of the layers (the others are ``PPMissingLayer`` stubs). A read of a value this stage owns returns
the real tensor and publishes it; a read of a value another stage owns returns a :class:`RemoteValue`,
which pulls the owner's published value only when it is consumed (arithmetic, indexing, ``.item()``,
iteration, any torch function). Writes of a value another stage owns are no-ops there: the owning stage
applies its own. Saved placeholders are resolved from the owners' published values when saves are collected.

A read never waits for another stage. It waits only for this stage's own position in the forward pass,
as a single-process read waits for its module: a value of a later stage (a later layer, the logits) is
handed out once this stage has finished its part of the step (``STAGE_END``), a value of an earlier
stage once this stage has started the step (``STAGE_START``). From there the owner produces the value
without waiting on this stage, so consuming it cannot deadlock. The engine serves both boundaries.

Values travel point to point over a process group, pulled by the stage that consumes them (see
``transport``); the key-value store only says which value exists where. A value that is not published
within the timeout (an access out of forward order, or a value no stage produced) raises
:class:`CrossStageTimeout`.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from nnsight.intervention.interleaver import OutOfOrderError

from ...core.backend import EMBEDDINGS, HEAD, Position, is_local
from ...core.forward_order import current_block
from .transport import StageTransport, TransportTimeout

STAGE_START = "model.nnterp_stage_start"
STAGE_END = "model.nnterp_stage_end"


class CrossStageTimeout(OutOfOrderError):
    """A value owned by another pipeline stage was not published in time (the single-GPU out-of-order error)."""


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


def local_layer_range(layers: Iterable[torch.nn.Module]) -> range:
    """The contiguous slice of decoder layers this stage holds."""
    held = [index for index, layer in enumerate(layers) if is_local(layer)]
    if not held:
        return range(0)
    if held != list(range(held[0], held[-1] + 1)):
        raise RuntimeError(f"a pipeline stage must hold a contiguous slice of the layers, this one holds {held}")
    return range(held[0], held[-1] + 1)


def _timeout_error(where: str, timeout: float) -> CrossStageTimeout:
    return CrossStageTimeout(
        f"{where} is owned by another pipeline stage and was not published within {timeout:g} s. "
        "Values must be read in forward order (a layer's value exists only once its stage has run it); "
        "check that the trace reads modules in the order the model calls them."
    )


class StageChannel:
    """Publishes this stage's reads and fetches other stages' reads by key (through a :class:`StageTransport`).

    Keys are ``<prefix>/<trace>/<where>#<occurrence>``: every stage runs the same body, so the n-th read of
    the same value in the same trace has the same key on every stage. ``prefix`` separates traces that run
    at the same time (the engine's request id).
    """

    def __init__(self, transport: StageTransport | None = None, timeout: float = 60.0, prefix: str = "nnterp-pp") -> None:
        self.transport = transport if transport is not None else StageTransport(_default_store(), timeout)
        self.prefix = prefix
        self.trace = 0
        self.published: list[str] = []
        self._occurrences: dict[str, int] = {}
        self._prefetched: dict[str, Future] = {}
        self._fetched: dict[str, torch.Tensor] = {}

    @property
    def timeout(self) -> float:
        return self.transport.timeout

    def new_trace(self) -> None:
        """Start the keys of the next trace (call at the same point on every stage)."""
        self.trace += 1
        self._occurrences.clear()

    def key(self, where: str) -> str:
        occurrence = self._occurrences.get(where, 0)
        self._occurrences[where] = occurrence + 1
        return f"{self.prefix}/{self.trace}/{where}#{occurrence}"

    def publish(self, key: str, value: torch.Tensor) -> None:
        self.transport.publish(key, value)
        self.published.append(key)

    def prefetch(self, key: str, device: torch.device | str = "cpu") -> None:
        """Starts pulling ``key`` in the background if its stage has published it already (a value of an
        earlier stage, handed out when this stage starts its step, arrives while this stage runs)."""
        if key not in self._prefetched and self.transport.announced(key):
            self._prefetched[key] = self.transport.prefetch(key, device)

    def fetch_published(self, keys: list[str], device: torch.device | str = "cpu") -> None:
        """Pulls every published value of ``keys`` not pulled yet, one request per holding stage (saves
        resolved at collection), for :meth:`fetch_if_published` to hand out."""
        wanted = [key for key in dict.fromkeys(keys)
                  if key not in self._fetched and key not in self._prefetched and self.transport.announced(key)]
        if wanted:
            self._fetched.update(zip(wanted, self.transport.fetch(wanted, device)))

    def fetch(self, key: str, where: str, device: torch.device | str = "cpu") -> torch.Tensor:
        value = self._already_pulled(key, where)
        if value is not None:
            return value
        try:
            self.transport.wait(key)
        except TransportTimeout as error:
            raise _timeout_error(where, self.timeout) from error
        return self._pull(key, where, device)

    def fetch_if_published(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The value if some stage published it, without waiting."""
        value = self._already_pulled(key, key)
        if value is None and self.transport.announced(key):
            value = self._pull(key, key, device)
        return value

    def _already_pulled(self, key: str, where: str) -> torch.Tensor | None:
        if key in self._fetched:
            return self._fetched[key]
        if key in self._prefetched:
            try:
                return self._prefetched[key].result()
            except TransportTimeout as error:
                raise CrossStageTimeout(f"{where}: {error}") from error
        return None

    def _pull(self, key: str, where: str, device: torch.device | str) -> torch.Tensor:
        try:
            return self.transport.fetch([key], device)[0]
        except TransportTimeout as error:
            raise CrossStageTimeout(f"{where}: {error}") from error

    def settle(self) -> None:
        """Waits for this channel's background pulls (before the stages release what they published)."""
        for future in self._prefetched.values():
            future.exception()
        self._prefetched.clear()
        self._fetched.clear()

    def delete_published(self) -> None:
        """Drop this stage's published values (once every stage is done with the trace)."""
        self.transport.release(self.published)
        self.published.clear()


def _default_store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


PARAMETER_KEYS = "parameters"  # the keys parameters are offered under, never released


class ParameterShelf:
    """Parameters another stage holds: the owner offers each one once per process, a reader fetches it once
    and keeps it (parameters do not change between traces)."""

    def __init__(self, transport: StageTransport | None = None, timeout: float = 60.0) -> None:
        self.channel = StageChannel(transport, timeout, prefix=PARAMETER_KEYS)
        self._offered: set[str] = set()
        self._taken: dict[str, torch.Tensor] = {}

    def offer(self, path: str, value: torch.Tensor) -> None:
        if path not in self._offered:
            self.channel.transport.publish(f"{PARAMETER_KEYS}/{path}", value)
            self._offered.add(path)

    def take(self, path: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if path not in self._taken:
            self._taken[path] = self.channel.fetch(f"{PARAMETER_KEYS}/{path}", f"parameter {path}", device)
        return self._taken[path]

    def take_if_offered(self, path: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        if path not in self._taken:
            value = self.channel.fetch_if_published(f"{PARAMETER_KEYS}/{path}", device)
            if value is None:
                return None
            self._taken[path] = value
        return self._taken[path]


class RemoteValue:
    """A value another pipeline stage owns: returned at once, fetched when something needs its contents.

    Tensor operations on it (arithmetic, indexing, methods such as ``.float()`` / ``.softmax()``, torch
    functions) return new placeholders that record the operation instead of fetching, so a stage can run a
    body whose results only the owning stage can compute (a logit lens on the first stage) without
    waiting: such results are computed when saves are collected. Whatever needs the actual contents
    (``.item()``, ``.shape``, ``bool``, iteration, writing it into this stage's model) fetches it.
    """

    def __init__(self, fetch: Callable[[], Any] | None, where: str, gate: Callable[[], None] | None = None,
                 lookup: Callable[[], Any] | None = None, key: str | None = None) -> None:
        self._fetch, self._gate, self._op, self._lookup = fetch, gate, None, lookup
        self.where, self.key = where, key
        self._value: Any = None
        self._ready = False

    @classmethod
    def deferred(cls, function: Callable, args: tuple, kwargs: dict, where: str) -> "RemoteValue":
        value = cls(None, where)
        value._op = (function, args, kwargs)
        return value

    @property
    def materialized(self) -> bool:
        return self._ready

    def materialize(self) -> Any:
        return self._evaluate(None)

    def _evaluate(self, leaf: Callable[["RemoteValue"], Any] | None) -> Any:
        """The value; ``leaf`` (when given) supplies each not yet fetched placeholder instead of waiting."""
        if not self._ready:
            if self._op is not None:
                function, args, kwargs = self._op
                self._value = function(*_evaluate(args, leaf), **_evaluate(kwargs, leaf))
            elif leaf is not None:
                self._value = leaf(self)
                if self._value is None:
                    raise LookupError(self.where)
            elif self._fetch is None:
                raise RuntimeError(f"{self.where}: this placeholder left its stage before being fetched; "
                                   "take the owning stage's saved value (merge_stage_saves).")
            else:
                if self._gate is not None:
                    self._gate()
                self._value = self._fetch()
            self._ready, self._op, self._fetch, self._gate, self._lookup = True, None, None, None, None
        return self._value

    def lookup(self) -> Any:
        """The value if its owner has published it, without waiting (None otherwise)."""
        return None if self._lookup is None else self._lookup()

    def __getstate__(self) -> dict:
        """Pickles without what it would fetch or compute (saves are shipped between processes): only the
        value, if it has one."""
        return {"where": self.where, "key": self.key, "_value": self._value, "_ready": self._ready,
                "_fetch": None, "_gate": None, "_op": None, "_lookup": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self) -> "RemoteValue":
        """Keeps the placeholder past the trace without fetching it: it is resolved when saves are collected."""
        import nnsight

        return nnsight.save(self)

    def __repr__(self) -> str:
        state = "materialized" if self.materialized else "not fetched yet"
        return f"RemoteValue({self.where}, {state})"

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func: Callable, types: Iterable[type], args: tuple = (), kwargs: dict | None = None):
        return cls.deferred(func, args, kwargs or {}, f"{getattr(func, '__name__', 'op')}(...)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(torch.Tensor, name, None)
        if name in _NEEDS_CONTENTS or not callable(method):  # .shape, .dtype, .item(), .tolist(), ...
            return getattr(self.materialize(), name)

        def call(*args: Any, **kwargs: Any) -> "RemoteValue":
            return RemoteValue.deferred(_call_method, (self, name, *args), kwargs, f"{self.where}.{name}()")

        return call

    def __getitem__(self, index: Any) -> "RemoteValue":
        return RemoteValue.deferred(_call_method, (self, "__getitem__", index), {}, f"{self.where}[...]")

    def __iter__(self):
        return iter(self.materialize())

    def __len__(self) -> int:
        return len(self.materialize())

    def __float__(self) -> float:
        return float(self.materialize())

    def __int__(self) -> int:
        return int(self.materialize())

    def __index__(self) -> int:
        return int(self.materialize())

    def __bool__(self) -> bool:
        return bool(self.materialize())

    def __array__(self, dtype=None):
        array = self.materialize().numpy()
        return array if dtype is None else array.astype(dtype)


_NEEDS_CONTENTS = {"item", "tolist", "numpy", "size", "dim", "numel", "data_ptr", "equal", "is_nonzero", "element_size"}


def _call_method(value: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    return getattr(value, name)(*args, **kwargs)


def _binary(name: str):
    def operator(self: RemoteValue, other: Any) -> RemoteValue:
        return RemoteValue.deferred(_call_method, (self, name, other), {}, f"{self.where} {name}")

    operator.__name__ = name
    return operator


for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "matmul", "rmatmul",
              "pow", "rpow", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "floordiv", "mod"):
    setattr(RemoteValue, f"__{_name}__", _binary(f"__{_name}__"))
RemoteValue.__neg__ = lambda self: RemoteValue.deferred(_call_method, (self, "__neg__"), {}, f"-{self.where}")  # type: ignore[attr-defined]
RemoteValue.__abs__ = lambda self: RemoteValue.deferred(_call_method, (self, "__abs__"), {}, f"abs({self.where})")  # type: ignore[attr-defined]


def _evaluate(value: Any, leaf: Callable[[RemoteValue], Any] | None) -> Any:
    if isinstance(value, RemoteValue):
        return value._evaluate(leaf)
    if isinstance(value, (list, tuple)):
        return type(value)(_evaluate(item, leaf) for item in value)
    if isinstance(value, dict):
        return {key: _evaluate(item, leaf) for key, item in value.items()}
    return value


def _materialize(value: Any) -> Any:
    return _evaluate(value, None)


def unfetched_keys(value: Any) -> list[str]:
    """The channel keys of the placeholders ``value`` still needs (inside containers and recorded operations)."""
    if isinstance(value, RemoteValue):
        if value.materialized:
            return []
        if value._op is not None:
            function, args, kwargs = value._op
            return unfetched_keys(args) + unfetched_keys(kwargs)
        return [value.key] if value.key is not None else []
    if isinstance(value, (list, tuple)):
        return [key for item in value for key in unfetched_keys(item)]
    if isinstance(value, dict):
        return [key for item in value.values() for key in unfetched_keys(item)]
    return []


def resolve_saves(saves: dict[str, Any], fetch: Callable[[RemoteValue], Any]) -> dict[str, Any]:
    """Saved values with every placeholder replaced by its value, computing recorded operations (``fetch``
    gives a not yet fetched placeholder's value, or None where no stage published it); a name whose value
    cannot be completed is left out."""
    resolved = {}
    for name, value in saves.items():
        try:
            resolved[name] = _evaluate(value, fetch)
        except LookupError:
            continue
    return resolved


def merge_stage_saves(per_stage: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict of saved values from every stage's: for each name the owning stage's value (a stage that
    did not own it saved a :class:`RemoteValue`, or nothing); a name no stage owns stays a placeholder."""
    merged: dict[str, Any] = {}
    for saves in per_stage:
        for name, value in saves.items():
            if name not in merged or (isinstance(merged[name], RemoteValue) and not isinstance(value, RemoteValue)):
                merged[name] = value
    return merged


def _park_until_past(mediator: Any, location: str, step: int) -> None:
    """Park the running trace until ``location`` has been served for ``step`` (at once if it has)."""
    from nnsight.intervention.interleaver import Mediator

    if mediator.occurrence(location) <= step:
        Mediator.value(location)


class PipelineStageBackend:
    """Wraps a backend for one pipeline stage.

    Reads of values this stage owns are published for the other stages; reads of values it does not own
    are :class:`RemoteValue` placeholders, handed out once this stage reaches the point of the forward pass
    where the owner's value exists or will without waiting on this stage (see the module docstring);
    writes to them are no-ops. ``layers`` is the slice of decoder layers this stage holds, ``first`` /
    ``last`` whether it runs the embeddings / the final norm, LM head and sampler. ``publishes`` is off
    on all but one tensor-parallel rank of a stage (they hold the same values). The engine serves the
    ``STAGE_START`` / ``STAGE_END`` boundaries that placeholders wait for.
    """

    def __init__(
        self,
        inner: Any,
        channel: StageChannel | None,
        layers: range,
        first: bool,
        last: bool,
        parameters: ParameterShelf | None = None,
        publishes: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        self.inner, self.channel, self.parameters = inner, channel, parameters
        self.layers, self.first, self.last = layers, first, last
        self.publishes, self.device = publishes, device
        self.name, self.batches_prompts = inner.name, inner.batches_prompts

    # -- ownership ---------------------------------------------------------------

    def serves(self, read: str) -> bool:
        return self.inner.serves(read)

    def check_served(self, read: str) -> None:
        self.inner.check_served(read)

    def owns(self, position: Position) -> bool:
        if position == EMBEDDINGS:
            return self.first
        if position == HEAD:
            return self.last
        return position in self.layers

    def _later(self, position: Position) -> bool:
        """Whether a value this stage does not own comes after this stage's part of the forward pass."""
        if position == EMBEDDINGS:
            return False
        return position == HEAD or position >= self.layers.stop

    # -- reads -------------------------------------------------------------------

    def _channel(self, where: str) -> StageChannel:
        if self.channel is None:
            raise NotImplementedError(
                f"{where} is held by another pipeline stage; edits installed on the engine (model.edit / "
                "registered blocks) cannot reach other stages. Read it inside a trace instead."
            )
        return self.channel

    def _placeholder(self, where: str, gate: Callable[[], None] | None = None) -> RemoteValue:
        channel = self._channel(where)
        key = channel.key(where)
        channel.prefetch(key, self.device)
        return RemoteValue(lambda: channel.fetch(key, where, self.device), where, gate,
                           lookup=lambda: channel.fetch_if_published(key, self.device), key=key)

    def _publish(self, where: str, value: torch.Tensor) -> None:
        key = self._channel(where).key(where)
        if self.publishes:
            self.channel.publish(key, value)

    def _boundary(self, position: Position) -> str:
        return STAGE_END if self._later(position) else STAGE_START

    def remote_read(self, where: str, position: Position) -> RemoteValue:
        """Parks until this stage reaches the boundary that follows (or precedes) the read module, as a read
        in one process parks until its module runs, then hands out the placeholder."""
        mediator = current_block()
        if mediator is not None:
            location = self._boundary(position)
            step = mediator.iteration if mediator.iteration is not None else mediator.occurrence(location)
            _park_until_past(mediator, location, step)
        return self._placeholder(where)

    def _gate(self, position: Position) -> Callable[[], None] | None:
        """For a value computed by another stage at the current point of the trace: what to do before
        fetching it, i.e. park until this stage has passed the boundary after which that stage computes it
        without waiting on this one (nothing, if it already has)."""
        mediator = current_block()
        if mediator is None:
            return None
        location = self._boundary(position)
        pinned = mediator.iteration
        step = pinned if pinned is not None else max(mediator.occurrence(STAGE_START) - 1, 0)
        return lambda: _park_until_past(mediator, location, step)

    def after_read(self, value: torch.Tensor, fresh: bool, where: str) -> torch.Tensor:
        value = self.inner.after_read(value, fresh, where)
        self._publish(where, value)
        return value

    def before_write(self, value: Any) -> Any:
        return self.inner.before_write(_materialize(value))

    def run_value(self, where: str, read: Callable[[], Any]) -> Any:
        """A value the engine serves once per step after the forward pass (logits, sampled tokens): the
        last stage's; the others are served a stand-in at the same point and hand out a placeholder."""
        value = read()
        if not self.last:
            return self._placeholder(where)
        self._publish(where, value)
        return value

    def run_write(self, write: Callable[[Any], None], value: Any) -> None:
        if self.last:
            write(_materialize(value))

    def compute_at(self, where: str, position: Position, compute: Callable[..., torch.Tensor], *inputs: Any) -> Any:
        """``compute(*inputs)`` where it needs modules held at ``position`` (e.g. the final norm and LM head):
        computed and published by their stage, a placeholder elsewhere."""
        if self.owns(position):
            value = compute(*_materialize(inputs))
            self._publish(where, value)
            return value
        return self._placeholder(where, self._gate(position))

    def local_parameter(self, module: torch.nn.Module, param_name: str) -> torch.Tensor:
        return self.inner.local_parameter(module, param_name)

    def full_parameter(self, module: torch.nn.Module, param_name: str, path: str, position: Position) -> Any:
        """The full parameter: gathered by the inner backend where this stage holds the module, otherwise
        offered by the stage that does (once per process) and fetched once."""
        if is_local(module):
            value = self.inner.local_parameter(module, param_name)
            if self.publishes and self.parameters is not None:
                self.parameters.offer(path, value)
            return value
        if self.parameters is None:
            raise NotImplementedError(f"parameter {path} is held by another pipeline stage and no shelf was given.")
        shelf = self.parameters
        return RemoteValue(lambda: shelf.take(path, self.device), f"parameter {path}", self._gate(position),
                           lookup=lambda: shelf.take_if_offered(path, self.device))
