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


class StaticLayer(torch.nn.Module):
    """Writes its output into one buffer, as a captured graph does (the same address every step)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift
        self.out = torch.zeros(ROWS, WIDTH)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.add(hidden, self.shift, out=self.out)


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(StaticLayer(float(i + 1)) for i in range(3))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class Recording:
    """vLLM's breakable capture as the seams use it: ``add_eager`` runs the callable once and keeps it."""

    def __init__(self) -> None:
        self.segments = []

    def add_eager(self, fn):
        result = fn()
        self.segments.append(fn)
        return result


@pytest.fixture
def captured(monkeypatch):
    root = Stack()
    seams = Seams(root, [("layers.0", "output"), ("layers.1", "input"), ("layers.2", "output")])
    recording = Recording()
    monkeypatch.setattr(seams_module, "recording", lambda: recording)
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
    assert seams.recorded == 3 and len(recording.segments) == 3
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
