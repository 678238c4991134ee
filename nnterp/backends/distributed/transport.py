"""Tensors between pipeline stages: over a ``torch.distributed`` process group, pulled by the consumer.

A stage that produces a value keeps it and announces it in the key-value store (who holds it, its dtype
and shape: a few bytes). A stage that consumes it asks the holder for it (a pull request through the
store) and receives it over a gloo process group of its own, point to point. Each process runs one
thread that answers pull requests, so the holder's forward pass never waits for a consumer and a value
nobody consumes never leaves its stage. The store carries only coordination; values are freed when their
holder releases them (the engine does when the request finishes).
"""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP = "stop"
SWITCH_INTERVAL_S = 0.0005
# Creating the group waits for every rank to reach it; ranks that load their weights at different speeds
# arrive minutes apart, so this wait is not the (short) wait for a value.
GROUP_SETUP_TIMEOUT_S = 600.0


def _raw_store(store: dist.Store) -> dist.Store:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


def _own_client(store: dist.Store, timeout: timedelta) -> dist.Store:
    """A connection of its own to the same store (a TCP store client serializes its callers: a thread
    waiting on it would hold up every other one); other stores are shared."""
    if isinstance(store, dist.TCPStore):
        return dist.TCPStore(store.host, store.port, is_master=False, timeout=timeout, wait_for_workers=False)
    return store


class _Held:
    """A held value; an accelerator's is copied to the host once its device copy is done."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.ready = None
        if tensor.device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record()

    def on_host(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensor.cpu()


class TransportTimeout(TimeoutError):
    """A value did not arrive: not announced in time, no longer held by its holder, or its transfer failed."""


class StageTransport:
    """Holds the values this process publishes and moves values between processes on request.

    ``store``: any ``torch.distributed`` store the processes share (only coordination goes through it).
    ``group``: the process group values travel over; by default one gloo group over every rank of the
    default group, created here (a collective: every rank constructs its transport at the same point, and
    waits up to ``GROUP_SETUP_TIMEOUT_S`` for the others). Without an initialized process group (one process)
    values are served locally. ``timeout`` bounds each wait for a value: its announcement and its transfer.
    """

    def __init__(self, store: dist.Store, timeout: float = 60.0, prefix: str = "nnterp-transport",
                 group: dist.ProcessGroup | None = None) -> None:
        self.timeout = timeout
        raw = _raw_store(store)
        self._prefix = prefix
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        if distributed and group is None:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout, GROUP_SETUP_TIMEOUT_S)))
        self.group = group
        self._raw_store = raw
        self._clients = threading.local()
        self._held: dict[str, _Held] = {}
        self.published_count = 0  # values published over this transport's life
        self._lock = threading.Lock()
        self._server: threading.Thread | None = None
        self._prefetcher: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, torch.device | str, Future]] = []

    @property
    def store(self) -> dist.Store:
        """This thread's connection to the store."""
        client = getattr(self._clients, "store", None)
        if client is None:
            client = dist.PrefixStore(self._prefix, _own_client(self._raw_store, timedelta(seconds=self.timeout)))
            self._clients.store = client
        return client

    # -- holder ------------------------------------------------------------------

    def publish(self, key: str, value: torch.Tensor) -> None:
        """Keeps a copy of ``value`` (the holder may change its tensor later) and announces it. An
        accelerator's value is copied on its device, without waiting; it goes to the host when pulled."""
        held = _Held(value.detach().clone(memory_format=torch.contiguous_format))
        with self._lock:
            self._held[key] = held
            self.published_count += 1
        self._start_server()
        shape = ",".join(map(str, held.tensor.shape))
        self.store.set(key, f"{self.rank}|{str(held.tensor.dtype).removeprefix('torch.')}|{shape}")

    def release(self, keys: Iterable[str]) -> None:
        """Drops held values (once no process will ask for them again)."""
        for key in keys:
            with self._lock:
                self._held.pop(key, None)
            self.store.delete_key(key)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(held.tensor.numel() * held.tensor.element_size() for held in self._held.values())

    @property
    def held_keys(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def _start_server(self) -> None:
        if self._server is None and self.group is not None and dist.get_world_size(self.group) > 1:
            store = dist.PrefixStore(self._prefix, _own_client(self._raw_store, timedelta(days=365)))
            self._server = threading.Thread(target=self._serve, args=(store,), name="nnterp-stage-transport", daemon=True)
            self._server.start()
            # A woken thread waits for the interpreter lock up to this interval while the main thread runs
            # Python (the engine's step loop): 5 ms by default, the bulk of a pull's latency.
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))

    def _serve(self, store: dist.Store) -> None:
        """Answers pull requests in the order they were numbered, until told to stop (or the store goes away)."""
        number = 1
        while True:
            slot = f"pull/{self.rank}/{number}"
            try:
                store.wait([slot])
                request = store.get(slot).decode()
                store.delete_key(slot)
            except Exception:  # the store is gone: the processes are shutting down
                return
            if request == STOP:
                return
            consumer, *keys = request.split("\n")
            with self._lock:
                held = [self._held.get(key) for key in keys]
            try:  # which values follow, then those values: a consumer never waits for one that will not come
                present = torch.tensor([value is not None for value in held], dtype=torch.uint8)
                self._send(present, int(consumer), number)
                for value in held:
                    if value is not None:
                        self._send(value.on_host(), int(consumer), number)
            except Exception:  # the consumer gave up (its own error says so): serve the next request
                logger.exception("sending %s to rank %s failed", keys, consumer)
            number += 1

    def _send(self, tensor: torch.Tensor, consumer: int, number: int) -> None:
        dist.isend(tensor, dst=consumer, group=self.group, tag=number).wait(timedelta(seconds=self.timeout))

    def close(self) -> None:
        """Stops the thread that answers pull requests."""
        if self._server is not None and self._server.is_alive():
            try:
                self._request(self.rank, [STOP])
            except Exception:
                pass
            self._server.join(timeout=5)
        self._server = None
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None

    # -- consumer ----------------------------------------------------------------

    def announced(self, key: str) -> bool:
        return self.store.check([key])

    def wait(self, key: str) -> None:
        """Waits until ``key`` is announced; raises :class:`TransportTimeout` after the timeout."""
        try:
            self.store.wait([key], timedelta(seconds=self.timeout))
        except Exception as error:  # the store raises its own timeout type (DistStoreError)
            raise TransportTimeout(key) from error

    def fetch(self, keys: list[str], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The announced values of ``keys``, one pull request per holder."""
        records = [self.store.get(key).decode().split("|") for key in keys]
        values: list[torch.Tensor | None] = [None] * len(keys)
        by_holder: dict[int, list[int]] = {}
        for index, (holder, _, _) in enumerate(records):
            by_holder.setdefault(int(holder), []).append(index)
        for holder, indices in by_holder.items():
            if holder == self.rank:
                with self._lock:
                    held = [self._held.get(keys[index]) for index in indices]
                present = [value is not None for value in held]
            else:
                number = self._request(holder, [keys[index] for index in indices])
                flags = torch.empty(len(indices), dtype=torch.uint8)
                self._receive(flags, holder, number, keys[indices[0]])
                present = [bool(flag) for flag in flags.tolist()]
            missing = [keys[index] for index, ok in zip(indices, present) if not ok]
            if missing:
                raise TransportTimeout(f"rank {holder} no longer holds {missing} (released before this read)")
            if holder == self.rank:
                for index, value in zip(indices, held):
                    values[index] = value.tensor.clone()
                continue
            for index in indices:
                _, dtype, shape = records[index]
                values[index] = torch.empty([int(size) for size in shape.split(",") if size], dtype=getattr(torch, dtype))
                self._receive(values[index], holder, number, keys[index])
        return [value.to(device) for value in values]

    def _receive(self, buffer: torch.Tensor, holder: int, number: int, key: str) -> None:
        try:
            dist.irecv(buffer, src=holder, group=self.group, tag=number).wait(timedelta(seconds=self.timeout))
        except Exception as error:
            raise TransportTimeout(f"{key} (held by rank {holder}) did not arrive") from error

    def prefetch(self, key: str, device: torch.device | str = "cpu") -> Future:
        """Starts pulling an announced value in the background; the future gives the value. Values asked for
        while a pull is under way go together in the next one (one request per holder)."""
        future: Future = Future()
        with self._lock:
            self._pending.append((key, device, future))
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="nnterp-stage-prefetch")
            self._prefetcher.submit(self._pull_pending)
        return future

    def _pull_pending(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:  # an earlier pull took these
            return
        try:
            values = self.fetch([key for key, _, _ in batch])
        except Exception as error:
            for _, _, future in batch:
                future.set_exception(error)
            return
        for (_, device, future), value in zip(batch, values):
            future.set_result(value.to(device))

    def _request(self, holder: int, lines: list[str]) -> int:
        number = self.store.add(f"pull/{holder}", 1)
        body = STOP if lines == [STOP] else "\n".join([str(self.rank), *lines])
        self.store.set(f"pull/{holder}/{number}", body)
        return number
