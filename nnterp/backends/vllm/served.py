"""The engine side of served requests: each request's declarative interventions (``extra_args["nnterp"]``, a
:class:`~nnterp.backends.taps.spec.RequestSpec`), applied by plain hooks at the standardized taps.

No code travels with a request. Every engine step, the runner tells :class:`ServedRequests` which rows of the
flat batch belong to which request and at which token positions; hooks on the tapped modules then read (capture)
or edit (steer, ablate, skip) exactly those rows, through the same layouts the accessors read
(``layers_output[i]`` of a vLLM layer is ``hidden + residual``). Captures stay on the worker until the server
takes them by the request's handle. An error while applying a request's interventions is kept on that request
(reported when its captures are taken) and never raised into the engine's forward pass.

Captures read the stream after the same request's edits at that module: what the next module receives (as a
trace that writes, then reads). Under tensor parallelism every rank applies the edits and the first rank captures;
under pipeline parallelism each stage handles the layers it holds.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ...core.backend import is_local
from ...core.layout import ModelLayout, infer_model_layout
from ...core.rename import ModuleNames, resolve_names
from ..taps.capture import hook_module
from ..taps.plan import Tap, module_tap
from ..taps.spec import SPEC_KEY, TOKENS, RequestSpec
from .step_rows import request_extra, scheduled_rows
KEEP_SECONDS = 600  # captures nobody took are dropped after this long


@functools.lru_cache(maxsize=256)
def parsed_spec(text: str) -> RequestSpec:
    """A request's spec, parsed once for every request that sends the same text (a shared steering vector of
    thousands of numbers costs more to parse than the request's step)."""
    return RequestSpec.from_json(text)


@dataclass
class Served:
    """One served request on this worker."""

    spec: RequestSpec
    prompt_length: int
    captured: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    means: dict[tuple[str, int], tuple[torch.Tensor, int]] = field(default_factory=dict)  # (sum, count) of prompt rows
    skip_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # first skipped layer -> this step's stream
    span: Optional[tuple[int, int, int]] = None  # this step's (first row in the flat batch, rows, first position)
    error: Optional[str] = None
    finished_at: Optional[float] = None
    vector_rows: list[int] = field(default_factory=list)  # the steering vectors' rows held in the table
    sites: list[tuple[str, str]] = field(default_factory=list)  # the sites this request has operations at

    @property
    def rows(self) -> torch.Tensor:
        """This step's rows of the flat batch."""
        start, count, _ = self.span
        return torch.arange(start, start + count)

    def selected(self, tokens: str) -> torch.Tensor:
        """Which of this step's rows ``tokens`` ("all", "prompt", "generated") picks, as a boolean mask."""
        return torch.from_numpy(self.selected_rows(tokens))

    def selected_rows(self, tokens: str) -> np.ndarray:
        _, count, first = self.span
        return token_selection(TOKEN_SELECTIONS[tokens], np.arange(first, first + count), self.prompt_length)


TOKEN_SELECTIONS = {name: number for number, name in enumerate(TOKENS)}  # a spec entry's ``tokens`` as a number


def token_selection(tokens: np.ndarray | int, positions: np.ndarray, prompt_length: np.ndarray | int) -> np.ndarray:
    """Which rows (at token ``positions`` of requests whose prompts are ``prompt_length`` tokens) a selection
    (:data:`TOKEN_SELECTIONS`) picks, as a boolean mask; every argument is a number or one per row."""
    tokens, prompt, number = np.asarray(tokens), positions < prompt_length, TOKEN_SELECTIONS
    return (np.broadcast_to(tokens == number["all"], positions.shape) | ((tokens == number["prompt"]) & prompt)
            | ((tokens == number["generated"]) & ~prompt))


@dataclass
class Site:
    """What requests do at one tapped module: ``(request, operation)`` pairs, the operation a spec entry."""

    tap: Tap
    operations: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)  # request id -> [(kind, entry)]
    steering: Optional[tuple[int, torch.Tensor]] = None  # (step, [rows; vector ids]) of this site's steering


class ServedRequests:
    """The served requests of one engine worker, and the hooks that serve them."""

    def __init__(self, model: torch.nn.Module, reports: bool, hidden_size: int) -> None:
        self.model = model
        self.reports = reports  # this rank returns captures (one rank per pipeline stage)
        self.names: ModuleNames = resolve_names(model)
        self.hidden_size = hidden_size  # from the config: a later pipeline stage holds no embeddings
        self.layout: ModelLayout = infer_model_layout(model, self.names, self.hidden_size, "vllm", type(model).__name__,
                                                      None)
        self.active: dict[str, Served] = {}  # engine request id -> request
        self.done: dict[str, Served] = {}  # handle -> finished request, until taken
        self.handles: dict[str, str] = {}  # engine request id -> handle
        self._hooks: dict[tuple[str, str], Any] = {}
        self._sites: dict[tuple[str, str], Site] = {}
        self._taps: dict[tuple[str, int], Tap] = {}  # (accessor, layer) -> tap
        self._step = 0  # engine steps planned so far: what a site's batched steering was gathered for
        self._vectors = SteeringVectors()

    # -- requests ------------------------------------------------------------------------------------------

    def plan_step(self, scheduler_output: Any, batch_order: list[str], request_states: dict) -> None:
        for data in scheduler_output.scheduled_new_reqs:
            text = request_extra(data, SPEC_KEY)
            if text is not None:
                self._add(data.req_id, text, len(data.prompt_token_ids or ()))
        for request_id in scheduler_output.finished_req_ids:
            self._finish(request_id)
        self._expire()
        self._step += 1
        for served in self.active.values():
            served.span = None
        if not self.active:
            return
        for request_id, start, count, first in scheduled_rows(scheduler_output, batch_order, request_states):
            served = self.active.get(request_id)
            if served is not None:
                served.span = (start, count, first)

    def _add(self, request_id: str, text: str, prompt_length: int) -> None:
        spec = parsed_spec(text)  # shared by requests sending the same text: read, never changed
        served = Served(spec, prompt_length)
        self.active[request_id] = served
        self.handles[request_id] = spec.handle
        try:
            for entry in spec.steer:
                row = self._vectors.acquire(entry)
                served.vector_rows.append(row)
                for layer in entry.layers:
                    self._site("layers_output", layer, served, request_id, "steer", (entry, row))
            for entry in spec.ablate:
                for layer in entry.layers:
                    self._site(entry.accessor, layer, served, request_id, "ablate", entry)
            for first, last in spec.skip_layers:
                self._site("layers_input", first, served, request_id, "skip_from", first)
                for layer in range(first, last + 1):
                    self._site("layers_output", layer, served, request_id, "skip_to", first)
            for entry in spec.capture:
                for layer in entry.layers:
                    self._site(entry.accessor, layer, served, request_id, "capture", entry)
        except Exception as error:  # a model this spec does not fit: reported with the request's captures
            served.error = f"{type(error).__name__}: {error}"

    def _site(self, accessor: str, layer: int, served: Served, request_id: str, kind: str, entry: Any) -> None:
        tap = self._taps.get((accessor, layer))
        if tap is None:
            layers = self.model.get_submodule(self.names.layers)
            if not is_local(layers[layer]):
                return  # another pipeline stage serves this layer
            tap = self._taps[accessor, layer] = module_tap(self.model, self.names, self.layout, accessor, layer)
        key = (tap.path, tap.direction)
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = Site(tap)
        operations = site.operations.get(request_id)
        if operations is None:
            operations = site.operations[request_id] = []
            served.sites.append(key)
        operations.append((kind, entry))
        if key not in self._hooks:
            self._hooks[key] = hook_module(self.model, tap.path, tap.direction, self._hook(key))

    def _finish(self, request_id: str) -> None:
        served = self.active.pop(request_id, None)
        handle = self.handles.pop(request_id, None)
        if served is None:
            return
        served.finished_at = time.monotonic()
        self.done[handle] = served
        for row in served.vector_rows:
            self._vectors.release(row)
        served.vector_rows.clear()
        for key in served.sites:
            site = self._sites.get(key)
            if site is None:
                continue
            site.operations.pop(request_id, None)
            if not site.operations:
                del self._sites[key]
                self._hooks.pop(key).remove()

    def _expire(self) -> None:
        now = time.monotonic()
        for handle in [h for h, s in self.done.items() if now - s.finished_at > KEEP_SECONDS]:
            del self.done[handle]

    def fail_step(self, message: str) -> list[str]:
        """Mark every request with interventions in this step as failed (the step's forward pass raised); their
        hooks then leave the step's retry alone. Returns their ids."""
        failed = [rid for rid, served in self.active.items() if served.span is not None and served.error is None]
        for request_id in failed:
            self.active[request_id].error = message
        return failed

    def take(self, handle: str) -> Optional[dict]:
        """A finished request's captures (safetensors bytes of ``name -> [tokens, hidden]``: bytes cross the
        engine's process boundary as they are) and error, dropped from this worker; None where this worker holds
        nothing of it. The caller knows the request finished: the worker
        hears of it only at the engine's next step, which may not come soon."""
        for request_id in [rid for rid, known in self.handles.items() if known == handle]:
            self._finish(request_id)
        served = self.done.pop(handle, None)
        if served is None:
            return None
        from safetensors.torch import save

        captures = {}
        if self.reports:
            captures = {name: torch.cat(chunks) for name, chunks in served.captured.items() if chunks}
        return {"captures": save(captures) if captures else b"", "error": served.error}

    def close(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._sites.clear()

    # -- hooks -----------------------------------------------------------------------------------------------

    def _hook(self, key: tuple[str, str]):
        def hook(module, args, kwargs, output=None):
            site = self._sites.get(key)
            if site is None:
                return None
            return self._serve(site, args, kwargs, output)

        return hook

    def _serve(self, site: Site, args: tuple, kwargs: dict, output: Any) -> Any:
        """Edits first (ablate, skip: replacements; then steering, added for all requests at once), then captures
        of the edited stream: what the next module receives."""
        captures, steers, others = [], [], []
        for request_id, operations in site.operations.items():
            served = self.active.get(request_id)
            if served is None or served.span is None or served.error is not None:
                continue
            for kind, entry in operations:
                (captures if kind == "capture" else steers if kind == "steer" else others).append((served, kind, entry))
        if steers and not captures and not others:
            self._steer_in_place(site, steers, output)  # the common case: nothing reads the stream itself
            return None
        stream = site.tap.read(args, kwargs, output)
        flat = stream.reshape(-1, stream.shape[-1])
        edits: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, new stream rows)
        for served, kind, entry in others:
            edit = self._guarded([served], site.tap, lambda: self._apply(served, site.tap, kind, entry, flat))
            if edit is not None:
                edits.append(edit)
        steering = None
        if steers:
            steering = self._guarded([served for served, _, _ in steers], site.tap,
                                     lambda: self._steering(site, steers, flat))
        if captures:
            edited = flat
            if edits or steering is not None:
                edited = flat.clone()
                for rows, values in edits:
                    edited[rows] = values
                if steering is not None:
                    edited.index_add_(0, *steering)
            for served, _, entry in captures:
                self._guarded([served], site.tap, lambda: self._capture(served, site.tap, entry, edited))
        if (not edits and steering is None) or site.tap.direction == "input":
            return None
        return _with_rows(site.tap, output, flat.shape, edits, steering)

    def _steer_in_place(self, site: Site, steers: list, output: Any) -> None:
        """Add the steering vectors into the module's output itself (the hidden half of a dual stream: the stream
        is their sum), where a replayed graph reads it next, instead of building a replacement."""
        def add() -> None:
            target = _stream_part(site.tap, output)
            flat = target.view(-1, target.shape[-1])
            flat.index_add_(0, *self._steering(site, steers, flat))

        self._guarded([served for served, _, _ in steers], site.tap, add)

    def _steering(self, site: Site, steers: list, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, addends)`` of every steering request at ``site`` this step: the rows' indices and index
        of their vector (one host-to-device copy), gathered once per step, and the vectors' rows."""
        cached = site.steering
        if cached is None or cached[0] != self._step or cached[1].device != flat.device:
            # one row per (request, entry): its span, its prompt's length, its vector's row, its token selection
            start, count, first, prompt_length, vector_row, tokens = np.array(
                [(*served.span, served.prompt_length, row, TOKEN_SELECTIONS[entry.tokens])
                 for served, _, (entry, row) in steers], dtype=np.int64).reshape(-1, 6).T
            owner = np.repeat(np.arange(len(start)), count)  # the (request, entry) of each row
            within = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
            selected = token_selection(tokens[owner], first[owner] + within, prompt_length[owner])
            ids = np.where(selected, vector_row[owner], 0)  # row 0 of the table: no steering
            index = torch.from_numpy(np.stack([start[owner] + within, ids]))
            if flat.device.type == "cuda":
                index = index.pin_memory()
            cached = site.steering = (self._step, index.to(flat.device, non_blocking=True))
        rows, ids = cached[1]
        return rows, self._vectors.table(flat)[ids]

    @staticmethod
    def _guarded(requests: list[Served], tap: Tap, action):
        """``action()`` for ``requests``; an error is kept on each of them (the forward pass goes on without their
        interventions)."""
        try:
            return action()
        except Exception as error:
            for served in requests:
                served.error = f"{type(error).__name__} at {tap.where}: {error}"
            return None

    def _capture(self, served: Served, tap: Tap, entry: Any, flat: torch.Tensor) -> None:
        rows = served.rows.to(flat.device)
        chosen = rows[served.selected(entry.tokens).to(flat.device)]
        if self.reports and len(chosen):
            served.captured.setdefault(f"{entry.accessor}.{tap.layer}", []).append(flat.index_select(0, chosen).to("cpu", copy=True))

    def _apply(self, served: Served, tap: Tap, kind: str, entry: Any, flat: torch.Tensor):
        rows = served.rows.to(flat.device)
        if kind == "skip_from":
            served.skip_inputs[entry] = flat.index_select(0, rows).clone()
            return None
        current = flat.index_select(0, rows)
        if kind == "skip_to":
            return rows, served.skip_inputs[entry].to(current)
        mask = served.selected(entry.tokens).to(flat.device)[:, None]
        if kind == "ablate":
            if entry.mode == "zero":
                target = torch.zeros_like(current)
            else:
                target = self._prompt_mean(served, tap, current).expand_as(current)
            return rows, torch.where(mask, target, current)
        raise ValueError(f"unknown operation {kind!r}")

    @staticmethod
    def _prompt_mean(served: Served, tap: Tap, current: torch.Tensor) -> torch.Tensor:
        """The mean of this stream over the request's prompt tokens (accumulated over the steps that run them)."""
        key = (tap.accessor, tap.layer)
        prompt = served.selected("prompt")
        if bool(prompt.any()):
            total, count = served.means.get(key, (torch.zeros_like(current[0], dtype=torch.float32), 0))
            rows = current[prompt.to(current.device)].float()
            served.means[key] = (total + rows.sum(0), count + rows.shape[0])
        total, count = served.means[key]
        return (total / count).to(current.dtype)[None]


def _stream_index(tap: Tap) -> Optional[int]:
    """Which item of the module's output carries the stream (the hidden half of vLLM's dual stream); None where
    the output is the stream itself."""
    layout = tap.layout.output
    if layout.kind == "tensor":
        return None
    return 0 if layout.kind == "dual" else layout.index


def _stream_part(tap: Tap, output: Any) -> torch.Tensor:
    index = _stream_index(tap)
    return output if index is None else output[index]


def _with_rows(tap: Tap, output: Any, flat_shape: torch.Size, edits: list[tuple[torch.Tensor, torch.Tensor]],
               steering: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Any:
    """The module's output with the stream's given rows replaced, then ``steering``'s ``(rows, addends)`` added,
    in the module's own layout: a tensor, a tuple item, or the hidden half of vLLM's ``(hidden, residual)``
    (hidden := new stream - residual; an addend to the stream is one to the hidden half)."""
    index, target = _stream_index(tap), _stream_part(tap, output)
    updated = target.reshape(flat_shape).clone()
    residual = output[1].reshape(flat_shape) if tap.layout.output.kind == "dual" else None
    for rows, values in edits:
        updated[rows] = values if residual is None else values - residual.index_select(0, rows)
    if steering is not None:
        rows, addends = steering
        updated.index_add_(0, rows, addends.to(updated.dtype))
    updated = updated.reshape(target.shape)
    if index is None:
        return updated
    return type(output)(updated if i == index else item for i, item in enumerate(output))


class SteeringVectors:
    """The distinct ``factor * vector`` of the steering entries of the requests being served, as one table (row 0:
    zeros) on the stream's device and dtype, so a step's steering of many requests is one gather. A row is held
    while a request uses it and reused after."""

    def __init__(self) -> None:
        self._rows: dict[tuple, int] = {}  # (factor, vector) -> row
        self._keys: list[Optional[tuple]] = [None]  # row -> (factor, vector); row 0 is the zeros
        self._values: list[list[float]] = [[]]  # row -> factor * vector
        self._users: dict[int, int] = {}  # row -> requests using it
        self._free: list[int] = []
        self._table: Optional[torch.Tensor] = None

    def acquire(self, entry: Any) -> int:
        """The row of ``entry``'s vector, held until :meth:`release`."""
        key = (float(entry.factor), tuple(entry.vector))
        row = self._rows.get(key)
        if row is None:
            values = [entry.factor * value for value in entry.vector]
            if self._free:
                row = self._free.pop()
                self._keys[row], self._values[row] = key, values
            else:
                row = len(self._values)
                self._keys.append(key)
                self._values.append(values)
            self._rows[key] = row
            self._table = None
        self._users[row] = self._users.get(row, 0) + 1
        return row

    def release(self, row: int) -> None:
        self._users[row] -= 1
        if not self._users[row]:
            del self._users[row], self._rows[self._keys[row]]
            self._free.append(row)

    def table(self, like: torch.Tensor) -> torch.Tensor:
        table = self._table
        if table is None or table.device != like.device or table.dtype != like.dtype:
            values = [[0.0] * like.shape[-1], *self._values[1:]]
            table = self._table = torch.tensor(values, dtype=torch.float32).to(device=like.device, dtype=like.dtype)
        return table


class ServingRunner:
    """Model-runner behaviour, mixed in before nnsight's runner: served requests' interventions."""

    @property
    def nnterp_served(self) -> ServedRequests:
        state = self.__dict__.get("_nnterp_served")
        if state is None:
            from vllm.distributed.parallel_state import get_tp_group

            state = self.__dict__["_nnterp_served"] = ServedRequests(self.get_model(), get_tp_group().rank_in_group == 0,
                                                                     self.model_config.get_hidden_size())
        return state

    def _update_states(self, scheduler_output) -> Any:
        result = super()._update_states(scheduler_output)
        if self.__dict__.get("_nnterp_served") is not None or _carries_specs(scheduler_output):
            self.nnterp_served.plan_step(scheduler_output, self.input_batch.req_ids, self.requests)
        return result

    def nnterp_take(self, handle: str) -> Optional[dict]:
        state = self.__dict__.get("_nnterp_served")
        return None if state is None else state.take(handle)

    def nnterp_describe(self) -> dict:
        """What requests are checked against: layers, hidden size, the standard names."""
        served = self.nnterp_served
        layers = self.get_model().get_submodule(served.names.layers)
        return {"num_layers": len(layers), "hidden_size": served.hidden_size, "names": served.names.as_dict()}

    def nnterp_unembedding_row(self, token_id: int) -> Optional[list[float]]:
        """Row ``token_id`` of the full LM head (None on a pipeline stage that does not hold it)."""
        from ..distributed.tp import gather_param

        served = self.nnterp_served
        head = self.get_model().get_submodule(served.names.lm_head)
        if not is_local(head):
            return None
        return gather_param(head, "weight")[token_id].float().tolist()


def _carries_specs(scheduler_output: Any) -> bool:
    return any(request_extra(data, SPEC_KEY) is not None for data in scheduler_output.scheduled_new_reqs)


class ServingWorker:
    """The served requests' RPCs on the engine's worker (``collective_rpc`` calls them by name)."""

    def nnterp_take(self, handle: str) -> Optional[dict]:
        return self.model_runner.nnterp_take(handle)

    def nnterp_describe(self) -> dict:
        return self.model_runner.nnterp_describe()

    def nnterp_unembedding_row(self, token_id: int) -> Optional[list[float]]:
        return self.model_runner.nnterp_unembedding_row(token_id)
