"""Layout inference from signatures, parent sources and probes, on purpose-built modules."""

import pytest
import torch
from torch import nn

from nnterp.core.layout import (
    InputLayout, LayoutError, OutputLayout, call_style_from_source, drift, infer_module_layout, observe, signature_of,
)
from nnterp.core.layout.infer import output_from_source
from nnterp.core.layout.model import ModuleLayout

H = 8


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, x):
        return self.proj(x)


class FusedLayer(nn.Module):
    """vLLM style: (positions, hidden_states, residual) -> (hidden, residual)."""

    def __init__(self):
        super().__init__()
        self.mlp = Mlp()

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
        else:
            residual = hidden_states + residual
        return self.mlp(residual), residual


class KeywordParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([FusedLayer(), FusedLayer()])

    def forward(self, positions, x):
        residual = None
        for layer in self.layers:
            x, residual = layer(positions=positions, hidden_states=x, residual=residual)
        return x + residual


class PositionalParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([FusedLayer(), FusedLayer()])

    def forward(self, positions, x):
        residual = None
        for i, layer in enumerate(self.layers[:2]):
            x, residual = layer(positions, x, residual)
        return x + residual


def test_signature_finds_hidden_and_residual_not_positions():
    sig = signature_of(FusedLayer())
    assert (sig.name, sig.index, sig.residual, sig.residual_index) == ("hidden_states", 1, "residual", 2)


@pytest.mark.parametrize("parent_class, style", [(KeywordParent, "keyword"), (PositionalParent, "positional")])
def test_call_style_from_parent_source(parent_class, style):
    assert call_style_from_source(parent_class(), "layers", "hidden_states", 1) == style


def test_positional_child_call_detected():
    assert call_style_from_source(FusedLayer(), "mlp", "x", 0) == "positional"


def test_source_only_inference_reads_dual_output_from_return_statement():
    layout, evidence = infer_module_layout(FusedLayer(), KeywordParent(), "layers", None, H, "layer")
    assert layout == ModuleLayout(InputLayout("hidden_states", None, "residual", None), OutputLayout("dual"))
    assert evidence["source"] == "keyword"
    assert output_from_source(Mlp(), signature_of(Mlp())) == OutputLayout("tensor")


@pytest.mark.parametrize("parent_class, position", [(KeywordParent, None), (PositionalParent, 1)])
def test_probe_infers_keyword_or_positional_and_dual(parent_class, position):
    parent = parent_class()
    seen = observe(parent, {"layer1": parent.layers[1]}, lambda: parent(torch.zeros(3), torch.randn(3, H)))
    layout, evidence = infer_module_layout(parent.layers[1], parent, "layers", seen["layer1"], H, "layer 1")
    assert layout.input.position == position
    assert layout.output == OutputLayout("dual")
    assert evidence["probe"] == evidence["source"]


def test_dual_stream_read_is_sum_and_write_replaces_both():
    hidden, residual = torch.randn(3, H), torch.randn(3, H)
    layout = OutputLayout("dual")
    assert torch.equal(layout.read((hidden, residual)), hidden + residual)
    new = torch.randn(3, H)
    written = layout.write((hidden, residual), new)
    assert torch.equal(written[0] + written[1], new)


def test_input_with_residual_reads_sum_and_write_zeroes_residual():
    """The residual is zeroed, not dropped: vLLM batches every request's residual and needs a tensor."""
    layout = InputLayout("hidden_states", 1, "residual", 2)
    positions, hidden, residual = torch.arange(3), torch.randn(3, H), torch.randn(3, H)
    assert torch.equal(layout.read((positions, hidden, residual), {}), hidden + residual)
    new = torch.randn(3, H)
    args, kwargs = layout.write((positions, hidden, residual), {}, new)
    assert args[0] is positions and torch.equal(args[1], new) and torch.equal(args[2], torch.zeros_like(residual))
    assert torch.equal(layout.read(args, kwargs), new)


def test_dual_stream_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3, 8\).*\(1, 8\)"):
        OutputLayout("dual").read((torch.randn(3, H), torch.randn(1, H)), "layers_output[0]")


def test_write_of_wrong_shape_refused():
    with pytest.raises(ValueError, match="layers_output\\[2\\].*shape mismatch"):
        OutputLayout("tuple").write((torch.randn(2, 5, H), None), torch.randn(H), "layers_output[2]")


def test_keyword_layout_refuses_positional_call():
    with pytest.raises(LayoutError, match="passed by keyword"):
        InputLayout("hidden_states", None).read((torch.randn(2, H),), {}, "layers_input[0]")


def test_drift_reports_changed_module(llama):
    changed = type(llama.layout).from_json(llama.layout.to_json())
    key = next(iter(changed.modules))
    changed.modules[key] = ModuleLayout(InputLayout("hidden_states", 3), OutputLayout("tensor"))
    differences = drift(llama.layout, changed)
    assert len(differences) == 1 and key in differences[0]
    assert drift(llama.layout, type(llama.layout).from_json(llama.layout.to_json())) == []
