"""CUDA-graph serving without a GPU: the seams' capture / replay mechanism against a recording stand-in, the tap
derivation from standardized names, and the refusals of what a graph-captured engine cannot serve. (The GPU
check that graph-served values equal the eager engine's is ``scratch/gpu_graphs.py``.)"""

import pytest
import torch

from nnterp import StandardizedTransformer
from nnterp.backends.taps import seams as seams_module
from nnterp.backends.taps.capture import hook_module
from nnterp.backends.taps.seams import NotServedUnderGraphs, Seams
from nnterp.backends.taps.spec import ACCESSORS
from nnterp.backends.vllm.graphs import accessors_under_graphs, check_graph_engine, nnsight_taps, tap_sites

ROWS, WIDTH = 8, 4
RECORDED: list[str] = []  # what was recorded into the open graph segment since the last break


class StaticLayer(torch.nn.Module):
    """Writes its output into one buffer, as a captured graph does (the same address every step)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift
        self.out = torch.zeros(ROWS, WIDTH)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        RECORDED.append("add")
        return torch.add(hidden, self.shift, out=self.out)


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(StaticLayer(float(i + 1)) for i in range(3))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def graph_segment() -> None:
    """A recorded graph segment's replay (the test writes the layers' buffers itself)."""


class Recording:
    """vLLM's breakable capture as the seams use it: ``add_eager`` closes the open graph segment (empty or not),
    runs the callable once, keeps both, and opens the next segment."""

    def __init__(self) -> None:
        self.segments = []

    def add_eager(self, fn):
        self.segments.append(graph_segment)
        result = fn()
        self.segments.append(fn)
        RECORDED.clear()
        return result


def eager_calls(recording: Recording) -> int:
    return sum(segment is not graph_segment for segment in recording.segments)


@pytest.fixture(params=["breaks apart", "breaks merged"])
def captured(monkeypatch, request):
    """Seams recorded into a stand-in graph; with "breaks merged" the recording can tell an empty segment (a GPU's
    stream capture can; without one the breaks stay apart)."""
    root = Stack()
    seams = Seams(root, [("layers.0", "output"), ("layers.1", "input"), ("layers.2", "output")])
    recording = Recording()
    monkeypatch.setattr(seams_module, "recording", lambda: recording)
    if request.param == "breaks merged":
        monkeypatch.setattr(seams_module, "nothing_recorded_in_segment", lambda: not RECORDED)
    RECORDED.clear()
    root(torch.zeros(ROWS, WIDTH))
    monkeypatch.setattr(seams_module, "recording", lambda: None)
    return root, seams, recording


def replay(root: Stack, recording: Recording, seams: Seams, tokens: int) -> list[torch.Tensor]:
    """A replayed step of ``tokens`` rows: the graph rewrites the layers' buffers, then the seams run."""
    seams.tokens = tokens
    values = [torch.randn(ROWS, WIDTH) for _ in root.layers]
    for layer, value in zip(root.layers, values):
        layer.out.copy_(value)
    for segment in recording.segments:
        segment()
    return values


def test_a_replayed_step_serves_its_rows_and_edits_land_in_the_graphs_buffer(captured):
    root, seams, recording = captured
    assert seams.recorded == 3 and eager_calls(recording) == 3 - seams.merged
    seen = {}
    hook_module(root, "layers.0", "output", lambda module, args, kwargs, output: seen.__setitem__("out0", output.clone()))
    hook_module(root, "layers.1", "input", lambda module, args, kwargs: seen.__setitem__("in1", args[0].clone()))
    hook_module(root, "layers.2", "output", lambda module, args, kwargs, output: output + 100)
    values = replay(root, recording, seams, tokens=5)
    torch.testing.assert_close(seen["out0"], values[0][:5])  # trimmed to the step's rows, read at replay
    torch.testing.assert_close(seen["in1"], values[0][:5])
    torch.testing.assert_close(root.layers[2].out[:5], values[2][:5] + 100)  # the replacement, in place
    torch.testing.assert_close(root.layers[2].out[5:], values[2][5:])  # padding rows untouched


def test_listeners_chain_like_torch_hooks_and_are_served_on_eager_steps_too(captured):
    root, seams, recording = captured
    hook_module(root, "layers.2", "output", lambda module, args, kwargs, output: output * 2)
    seen = []
    handle = hook_module(root, "layers.2", "output", lambda module, args, kwargs, output: seen.append(output.clone()))
    hidden = torch.randn(ROWS, WIDTH)
    result = root(hidden)  # an eager step: the permanent hooks call the listeners directly
    expected = (hidden + 1 + 2 + 3) * 2
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(seen[-1], expected)  # the second listener sees the first one's replacement
    handle.remove()
    values = replay(root, recording, seams, tokens=ROWS)
    assert len(seen) == 1  # a removed listener is not served at replay
    torch.testing.assert_close(root.layers[2].out, values[2] * 2)


def test_breaks_with_nothing_recorded_between_them_share_one_eager_segment(monkeypatch):
    """Layer 0's output and layer 1's input follow one another: one eager segment, run in the order they were
    asked for; another break (vLLM's eager attention, say) after recorded work stays apart, as does a break after
    someone else's."""
    monkeypatch.setattr(seams_module, "nothing_recorded_in_segment", lambda: not RECORDED)
    root = Stack()
    seams = Seams(root, [("layers.0", "output"), ("layers.1", "input"), ("layers.1", "output")])
    recording = Recording()
    order = []
    root.layers[1].register_forward_pre_hook(lambda module, args: recording.add_eager(lambda: order.append("own")))
    monkeypatch.setattr(seams_module, "recording", lambda: recording)
    RECORDED.clear()
    root(torch.zeros(ROWS, WIDTH))
    monkeypatch.setattr(seams_module, "recording", lambda: None)
    assert seams.recorded == 3 and seams.merged == 2  # layer 1's input seam and the other break joined layer 0's
    assert eager_calls(recording) == 2
    hook_module(root, "layers.0", "output", lambda *args: order.append("out0"))
    hook_module(root, "layers.1", "input", lambda *args: order.append("in1"))
    hook_module(root, "layers.1", "output", lambda *args: order.append("out1"))
    order.clear()
    for segment in recording.segments:
        segment()
    assert order == ["out0", "in1", "own", "out1"]


def test_a_site_without_a_seam_is_refused_by_name(captured):
    root, _, _ = captured
    with pytest.raises(NotServedUnderGraphs, match=r"layers\.1\.output is not among the sites"):
        hook_module(root, "layers.1", "output", lambda *args: None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_taps_are_the_modules_the_accessors_read(tiny_path, family):
    """Every accessor at every layer maps to the module (and side) its envoy reads; the round trip through
    nnsight's tap strings gives the same sites back."""
    model = StandardizedTransformer(str(tiny_path(family)))
    taps = nnsight_taps(model._module, model.names, ACCESSORS)
    assert taps[:2] == ("model.input", f"model.{model.names.embed_tokens}.output")
    paths = {module: name for name, module in model._module.named_modules()}
    expected = []
    for accessor in ACCESSORS:
        for layer in range(model.num_layers):
            module = getattr(model, accessor).get_module(layer)._module
            expected.append((paths[module], accessor.rpartition("_")[2]))
    assert sorted(tap_sites(taps)) == sorted({(f"{model.names.embed_tokens}", "output"), *expected})
    assert len(set(expected)) == len(ACCESSORS) * model.num_layers


def test_graph_switch_arguments():
    assert accessors_under_graphs(False, None) is None
    assert accessors_under_graphs(False, True) is None
    assert accessors_under_graphs(True, None) == ACCESSORS
    assert accessors_under_graphs(False, False) == ACCESSORS  # enforce_eager=False is cuda_graphs=True
    assert accessors_under_graphs(("layers_output", "mlps_input"), None) == ("layers_output", "mlps_input")
    with pytest.raises(ValueError, match=r"'layer_output'.* is not one of them"):
        accessors_under_graphs(["layer_output"], None)
    with pytest.raises(ValueError, match="enforce_eager=True contradicts cuda_graphs=True"):
        accessors_under_graphs(True, True)


def test_graph_engines_are_refused_without_a_gpu_and_under_pipeline_parallelism(monkeypatch):
    with pytest.raises(ValueError, match="CUDA graphs need an NVIDIA GPU"):
        check_graph_engine({}, ACCESSORS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1: cross-stage reads"):
        check_graph_engine({"pipeline_parallel_size": 2}, ACCESSORS)
    check_graph_engine({"tensor_parallel_size": 2}, ACCESSORS)


def test_a_replacement_of_another_shape_is_refused_at_replay(captured):
    root, seams, recording = captured
    hook_module(root, "layers.2", "output", lambda module, args, kwargs, output: output[:, :2])
    with pytest.raises(ValueError, match=r"a replacement of shape \(5, 2\) for a stream of shape \(5, 4\)"):
        replay(root, recording, seams, tokens=5)


def test_graph_engines_record_every_graph_breakable(monkeypatch):
    """A graph engine keeps vLLM's graph mode; at load, a plain wrapper recording FULL graphs (whose replay reaches no
    hook) is replaced by a breakable one recording the same mode, or refused where vLLM's breakable wrapper cannot
    be told a mode; a model wrapped only by the breakable wrapper is left as it is."""
    from types import SimpleNamespace

    import vllm.compilation.breakable_cudagraph as breakable
    from vllm.compilation.cuda_graph import CUDAGraphWrapper
    from vllm.config import CUDAGraphMode

    from nnterp.backends.vllm.graphs import graph_engine_kwargs, make_full_graphs_breakable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "0")
    kwargs = graph_engine_kwargs({"compilation_config": {"max_cudagraph_capture_size": 64}}, ACCESSORS)
    assert kwargs["compilation_config"] == {"max_cudagraph_capture_size": 64}
    assert __import__("os").environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] == "1"

    class Breakable:  # vLLM's breakable wrapper, recording one mode
        def __init__(self, runnable, vllm_config, runtime_mode=None):
            self.runnable, self.vllm_config, self.runtime_mode = runnable, vllm_config, runtime_mode

    class EveryMode:  # a breakable wrapper that records every mode alike (no mode to tell it)
        def __init__(self, runnable, vllm_config):
            raise AssertionError("not to be built")

    inner, config = torch.nn.Linear(2, 2), object()
    plain = CUDAGraphWrapper.__new__(CUDAGraphWrapper)
    plain.runnable, plain.runtime_mode = inner, CUDAGraphMode.FULL
    runner = SimpleNamespace(model=plain, vllm_config=config,
                             compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE))
    monkeypatch.setattr(breakable, "BreakableCUDAGraphWrapper", Breakable)
    make_full_graphs_breakable(runner)
    assert isinstance(runner.model, Breakable) and runner.model.runnable is inner
    assert runner.model.runtime_mode == CUDAGraphMode.FULL and runner.model.vllm_config is config
    already = runner.model
    make_full_graphs_breakable(runner)
    assert runner.model is already
    runner.model = plain
    monkeypatch.setattr(breakable, "BreakableCUDAGraphWrapper", EveryMode)
    with pytest.raises(ValueError, match="records FULL CUDA graphs whose replay reaches no hook.*'PIECEWISE'"):
        make_full_graphs_breakable(runner)


def test_nnsight_tracks_only_the_requests_that_carry_something_for_it(monkeypatch):
    """Extraction, served and plain requests get no nnsight worker: nnsight's per-step bookkeeping leaves them out,
    unless a block is registered to run on every request (then every request gets its copy, as in nnsight)."""
    from types import SimpleNamespace

    from nnsight.modeling.vllm.model_runners.GPUModelRunner import Requests

    from nnterp.backends.vllm.worker import TracedRequests

    passed = []
    monkeypatch.setattr(Requests, "add", lambda self, new, objects: passed.append([data.req_id for data in new]))

    def request(request_id, extra_args):
        return SimpleNamespace(req_id=request_id, sampling_params=SimpleNamespace(extra_args=extra_args))

    batch = [request("plain", None), request("extract", {"nnterp_extraction": ["x", 0]}), request("served", {"nnterp": "{}"}),
             request("trace", {"nnsight_mediator": b""}), request("edits", {"nnsight_edits": ["name"]})]
    requests = TracedRequests()
    requests.add(batch, {})
    requests.templates["registered"] = object()
    requests.add(batch, {})
    assert passed == [["trace", "edits"], ["plain", "extract", "served", "trace", "edits"]]
