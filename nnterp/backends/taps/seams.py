"""Hooks that keep working on an engine that replays CUDA graphs.

A replayed graph runs no Python, so a forward hook fires only when the model runs eagerly. vLLM's breakable
graphs (``VLLM_USE_BREAKABLE_CUDAGRAPH=1``) leave a seam: a callable handed to the recording's ``add_eager``
while a graph is captured runs at that point of every replay, against the recording's own tensors.

:class:`Seams` puts one permanent hook on each site (a module's input or output) when the engine loads, before
its graphs are captured. Listeners come and go (an extraction, a served request's interventions); the permanent
hook hands each call to them, directly on an eager step, through the recorded callable on a replayed one. At
replay the tensors are the graph's static buffers, padded past this step's tokens: the listeners see them cut to
the step's rows (``tokens``), and a replacement they return is copied into the buffer (the graph reads from there).

Every break ends a graph segment, and each segment costs a graph launch at every replay. Breaks that follow one
another with nothing recorded between them (a layer's output and the next layer's input, nnsight's tap and the
seam at one site) are merged into one eager segment (:class:`MergedBreaks`).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable, Iterable, Optional

import torch

Site = tuple[str, str]  # (module path, "input" or "output")
SEAMS_ATTRIBUTE = "_nnterp_seams"


class NotServedUnderGraphs(RuntimeError):
    """A hook was asked for at a site the graph-captured engine has no seam at."""


def recording() -> Any:
    """vLLM's breakable graph capture while it is recording, else None."""
    try:
        from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphCapture
    except ImportError:
        return None
    capture = BreakableCUDAGraphCapture.current()
    return capture if capture is not None and capture._capturing else None


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    return value


def _weak(value: Any) -> Any:
    """The CUDA tensors of ``value`` as weak references (vLLM's own eager breaks do the same: a strong reference
    from the recorded callable would pin the recording's memory pool slot)."""
    from vllm.utils.torch_utils import weak_ref_tensor

    return _map_tensors(value, lambda t: weak_ref_tensor(t) if t.is_cuda else t)


def copy_into(live: Any, edited: Any) -> None:
    """Land ``edited`` in ``live``'s memory, tensor by tensor (items that are ``live``'s own are skipped)."""
    if edited is live or edited is None:
        return
    if isinstance(live, torch.Tensor):
        if edited.shape != live.shape:
            raise ValueError(f"a replacement of shape {tuple(edited.shape)} for a stream of shape {tuple(live.shape)}")
        live.copy_(edited)
    elif isinstance(live, (tuple, list)):
        for live_item, edited_item in zip(live, edited):
            copy_into(live_item, edited_item)
    elif isinstance(live, dict):
        for key, live_item in live.items():
            copy_into(live_item, edited.get(key))


@functools.lru_cache(maxsize=None)
def _stream_capture_info() -> Optional[Callable]:
    """The driver's ``cuStreamGetCaptureInfo`` (v2 signature), or None where it cannot be loaded."""
    try:
        function = ctypes.CDLL("libcuda.so.1").cuStreamGetCaptureInfo_v2
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    return function


def nothing_recorded_in_segment() -> bool:
    """Whether the graph segment being recorded on the current stream is still empty: an active stream capture
    whose next node would depend on nothing. False whenever that cannot be told (the breaks then stay apart)."""
    function = _stream_capture_info()
    if function is None:
        return False
    status, dependencies, count = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_size_t()
    result = function(ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.byref(status), None, None,
                      ctypes.byref(dependencies), ctypes.byref(count))
    return result == 0 and status.value == 1 and count.value == 0  # CU_STREAM_CAPTURE_STATUS_ACTIVE


class EagerSegment:
    """The calls of merged breaks, replayed in order as one eager segment."""

    __slots__ = ("calls",)

    def __init__(self, call: Callable) -> None:
        self.calls = [call]

    def __call__(self) -> Any:
        result = None
        for call in self.calls:
            result = call()
        return result


class MergedBreaks:
    """Stands in for a recording's ``add_eager`` (set on the recording, so every break goes through it: nnsight's
    taps, vLLM's own eager ops, the seams): a break asked for while the segment opened by the previous one is still
    empty joins that break's eager segment instead of closing an empty graph and opening another."""

    def __init__(self, recording: Any, nothing_recorded: Callable[[], bool], on_merge: Callable[[], None]) -> None:
        self._recording, self._add_eager, self._nothing_recorded = recording, recording.add_eager, nothing_recorded
        self._on_merge = on_merge
        self._empty_graphs: list = []  # kept: destroying a graph while the next segment records invalidates it

    def __call__(self, call: Callable) -> Any:
        segments = self._recording.segments
        last = segments[-1] if segments else None  # the previous break, when nothing was recorded since
        if isinstance(last, EagerSegment) and self._nothing_recorded():
            result = self._add_eager(call)  # closes the empty segment, runs the call outside the capture
            if len(segments) >= 3 and segments[-1] is call and segments[-3] is last:
                self._empty_graphs.append(segments[-2])
                del segments[-2:]  # the empty graph and the call, which joins the previous eager segment
                last.calls.append(call)
                self._on_merge()
            return result
        return self._add_eager(EagerSegment(call))


def merge_breaks(recording: Any, on_merge: Callable[[], None], nothing_recorded: Callable[[], bool]) -> None:
    """Route ``recording``'s breaks through :class:`MergedBreaks` (once per recording)."""
    if not isinstance(recording.__dict__.get("add_eager"), MergedBreaks):
        recording.add_eager = MergedBreaks(recording, nothing_recorded, on_merge)


class Seams:
    """Permanent hooks at ``sites`` of ``root``, serving listeners on eager and replayed steps alike."""

    def __init__(self, root: torch.nn.Module, sites: Iterable[Site]) -> None:
        self.listeners: dict[Site, list[Callable]] = {}
        self.tokens: Optional[int] = None  # this step's token rows; set by the runner before each forward pass
        self.recorded = 0
        self.merged = 0  # breaks that joined the one before them
        root.register_forward_pre_hook(self._begin_forward, prepend=True)
        for site in dict.fromkeys(sites):
            self.listeners[site] = []
            module = root.get_submodule(site[0])
            if site[1] == "input":
                module.register_forward_pre_hook(self._permanent(site), with_kwargs=True)
            else:
                module.register_forward_hook(self._permanent(site), with_kwargs=True)
        object.__setattr__(root, SEAMS_ATTRIBUTE, self)

    @property
    def sites(self) -> tuple[Site, ...]:
        return tuple(self.listeners)

    def add(self, path: str, direction: str, hook: Callable) -> "Listener":
        """Serve ``hook`` (a forward pre-hook or hook with kwargs, as :func:`hook_module` takes) at the site."""
        listeners = self.listeners.get((path, direction))
        if listeners is None:
            raise NotServedUnderGraphs(
                f"{path}.{direction} is not among the sites this engine serves under CUDA graphs "
                f"({len(self.listeners)} sites, e.g. {list(self.listeners)[:3]})."
            )
        listeners.append(hook)
        return Listener(listeners, hook)

    def _begin_forward(self, module, args) -> None:
        """Before anything else of a recorded forward pass: its breaks are merged where they can be."""
        capture = recording()
        if capture is not None:
            merge_breaks(capture, self._count_merge, nothing_recorded_in_segment)

    def _count_merge(self) -> None:
        self.merged += 1

    def _permanent(self, site: Site):
        def hook(module, args, kwargs, output=None):
            capture = recording()
            if capture is not None:
                live = _weak((args, kwargs, output))
                capture.add_eager(lambda: self._replay(site, module, live))
                self.recorded += 1
                return None
            if not self.listeners[site]:
                return None
            return self._dispatch(site, module, args, kwargs, output)

        return hook

    def _dispatch(self, site: Site, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Each listener in turn, as torch chains hooks: a replacement is what the next one sees."""
        replaced = None
        for listener in list(self.listeners[site]):
            if site[1] == "input":
                result = listener(module, args, kwargs)
                if result is not None:
                    args, kwargs = replaced = result
            else:
                result = listener(module, args, kwargs, output)
                if result is not None:
                    output = replaced = result
        return replaced

    def _replay(self, site: Site, module: torch.nn.Module, live: tuple) -> None:
        if not self.listeners[site]:
            return
        tokens = self.tokens
        args, kwargs, output = live if tokens is None else _map_tensors(
            live, lambda t: t[:tokens] if t.dim() and t.shape[0] > tokens else t)
        replaced = self._dispatch(site, module, args, kwargs, output)
        if replaced is not None:
            copy_into((args, kwargs) if site[1] == "input" else output, replaced)


class Listener:
    """A listener's handle: ``remove()`` as a torch hook handle."""

    def __init__(self, listeners: list, hook: Callable) -> None:
        self._listeners, self._hook = listeners, hook

    def remove(self) -> None:
        if self._hook in self._listeners:
            self._listeners.remove(self._hook)


def seams_of(root: torch.nn.Module) -> Optional[Seams]:
    return root.__dict__.get(SEAMS_ATTRIBUTE)
