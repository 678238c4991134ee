"""Layout inference without a probe where the parent's source does not say how it passes the hidden state:
each call is bound to the module's signature, so every module class the layers use gets a layout."""

import torch
from torch import nn

from nnterp.core.layout import InputLayout, ModelLayout, OutputLayout, infer_module_layout, observe
from nnterp.core.layout.model import ModuleLayout
from nnterp.core.rename import ModuleNames

H = 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, positions, hidden_states, residual=None):
        return self.proj(hidden_states) + (0 if residual is None else residual)


class UnreadableParent(nn.Module):
    """Calls its block once positionally from a computed list and once by keyword from a computed dict: the
    source names neither style, and the two calls differ."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.passed = []

    def forward(self, positions, x):
        self.passed.append(x)
        arguments = [positions, x][: 2]
        x = self.block(*arguments)
        self.passed.append(x)
        keywords = dict(zip(("positions", "hidden_states"), (positions, x)))
        return self.block(**keywords)


def test_unreadable_call_style_binds_each_call_to_the_signature():
    parent = UnreadableParent()
    layout, evidence = infer_module_layout(parent.block, parent, "block", None, H, "block")
    assert evidence["source"] is None
    # the residual argument is dropped: the block returns one tensor, not a (hidden, residual) pair
    assert layout == ModuleLayout(InputLayout("hidden_states", 1, by_signature=True), OutputLayout("tensor"))
    calls = []
    handle = parent.block.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        parent(torch.arange(3), torch.randn(3, H))
    handle.remove()
    assert [bool(kwargs) for _, kwargs in calls] == [False, True]
    for (args, kwargs), passed in zip(calls, parent.passed, strict=True):
        assert layout.input.read(args, kwargs, "block") is passed
        new = torch.randn(3, H)
        new_args, new_kwargs = layout.input.write(args, kwargs, new, "block")
        assert layout.input.read(new_args, new_kwargs, "block") is new
        assert (len(new_args), sorted(new_kwargs)) == (len(args), sorted(kwargs))


def test_residual_bound_by_keyword_or_position():
    layout = InputLayout("hidden_states", 1, "residual", 2, by_signature=True)
    positions, hidden, residual = torch.arange(3), torch.randn(3, H), torch.randn(3, H)
    assert torch.equal(layout.read((positions, hidden), {"residual": residual}), hidden + residual)
    assert torch.equal(layout.read((positions,), {"hidden_states": hidden, "residual": residual}), hidden + residual)
    assert torch.equal(layout.read((positions, hidden, residual), {}), hidden + residual)
    assert layout.read((positions, hidden), {}) is hidden


def test_snapshots_keep_their_form_and_round_trip_the_fallback():
    names = ModuleNames(embed_tokens="embed", layers="layers", ln_final=None, lm_head="head", self_attn=None, mlp=None)
    plain = ModuleLayout(InputLayout("hidden_states", None), OutputLayout("tensor"))
    bound = ModuleLayout(InputLayout("hidden_states", 1, by_signature=True), OutputLayout("tensor"))
    layout = ModelLayout("vllm", "Toy", names, {"layer:A": plain, "self_attn:B": bound})
    data = layout.to_json()
    assert "by_signature" not in data["modules"]["layer:A"]["input"]
    assert ModelLayout.from_json(data).modules == layout.modules


def test_probe_still_decides_where_it_ran():
    parent = UnreadableParent()
    seen = observe(parent, {"block": parent.block}, lambda: parent(torch.arange(3), torch.randn(3, H)))
    layout, evidence = infer_module_layout(parent.block, parent, "block", seen["block"], H, "block")
    assert layout.input == InputLayout("hidden_states", 1) and evidence["probe"] == "positional"
