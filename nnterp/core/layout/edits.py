"""Which residual-stream tensors get edited in place after a module receives or returns them.

HF Falcon's decoder layer runs ``mlp_output = self.mlp(x)`` and then ``mlp_output += attention_output``: a
saved reference to the MLP's output silently becomes MLP + attention. Two sources say where this happens:
the parent's forward source (an augmented assignment, an in-place method such as ``.add_()``, an item
assignment, ``out=`` / ``inplace=True``, on a name bound to the module's result or to the tensor passed to
it, or on a view of one) and, where a probe runs, the tensors themselves (a copy taken at the call differs
from the same tensor once the forward pass is over).
"""

from __future__ import annotations

import ast
from dataclasses import replace
from typing import Any, Callable, Literal

import torch

from .infer import Observation, _calls_child, _loop_variables_over, parse_source, signature_of
from .model import ModuleLayout

VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "squeeze", "unsqueeze", "flatten",
    "unflatten", "expand", "expand_as", "as_strided", "t", "contiguous", "chunk", "split", "unbind", "select",
    "movedim", "detach", "type_as", "to",
}
NOT_EDITS = {"requires_grad_", "retain_grad", "share_memory_"}
Tracked = Literal["result", "argument"]


def _root_name(node: ast.AST) -> str | None:
    """The variable an expression reads through subscripts, attributes and view methods (``x[0].view(...)``
    -> ``x``)."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, (ast.Subscript, ast.Attribute, ast.Starred)):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in VIEW_METHODS:
            node = node.func.value
        else:
            return None


class _EditsAfterHandover(ast.NodeVisitor):
    """Walks a forward in source order (loop bodies twice), tracking the names bound to the tensors of
    interest, and notes whether one of them is edited in place while it is still bound."""

    def __init__(self, is_child_call: Callable[[ast.Call], bool], mode: Tracked, argument: Callable[[ast.Call], ast.AST | None],
                 initial: set[str] = frozenset()) -> None:
        """``mode``: track the names bound to the child's result, or the names passed to it as its hidden
        state (``argument`` finds that expression in a call); ``initial`` names are tracked from the start."""
        self.is_child_call, self.mode, self.argument = is_child_call, mode, argument
        self.names: set[str] = set(initial)
        self.edited = False

    def _tracked(self, node: ast.AST | None) -> bool:
        return node is not None and _root_name(node) in self.names

    def _binds(self, value: ast.AST) -> bool:
        """Whether ``value`` evaluates to (a view of) a tracked tensor."""
        if self.mode == "result":
            inner = value
            while isinstance(inner, ast.Subscript):
                inner = inner.value
            if isinstance(inner, ast.Call) and self.is_child_call(inner):
                return True
        if isinstance(value, ast.Call) and not (isinstance(value.func, ast.Attribute) and value.func.attr in VIEW_METHODS):
            return False
        return self._tracked(value)

    def _bind(self, target: ast.AST, bound: bool) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._bind(element, bound)
        elif isinstance(target, ast.Starred):
            self._bind(target.value, bound)
        elif isinstance(target, ast.Name):
            (self.names.add if bound else self.names.discard)(target.id)
        elif isinstance(target, ast.Subscript) and self._tracked(target):
            self.edited = True  # x[...] = value

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        bound = self._binds(node.value)
        for target in node.targets:
            self._bind(target, bound)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self._bind(node.target, self._binds(node.value))

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if self._tracked(node.target):
            self.edited = True

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and self._tracked(func.value):
            name = func.attr
            if name.endswith("_") and not name.startswith("__") and name not in NOT_EDITS:
                self.edited = True  # x.add_(...)
        for keyword in node.keywords:
            if keyword.arg == "out" and self._tracked(keyword.value):
                self.edited = True
            if keyword.arg == "inplace" and isinstance(keyword.value, ast.Constant) and keyword.value.value is True:
                if node.args and self._tracked(node.args[0]):
                    self.edited = True
        if self.mode == "argument" and self.is_child_call(node):
            argument = self.argument(node)
            if isinstance(argument, ast.Name):
                self.names.add(argument.id)

    def _loop(self, node: ast.AST, header: list[ast.AST]) -> None:
        for part in header:
            self.visit(part)
        for _ in range(2):  # an edit at the top of the body reaches the previous iteration's tensors
            for statement in node.body:
                self.visit(statement)
        for statement in node.orelse:
            self.visit(statement)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._bind(node.target, False)
        self._loop(node, [])

    visit_AsyncFor = visit_For

    def visit_While(self, node: ast.While) -> None:
        self._loop(node, [node.test])

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        if not _only_when_training(node.test):  # nnterp runs models in inference mode
            for statement in node.body:
                self.visit(statement)
        for statement in node.orelse:
            self.visit(statement)


def _only_when_training(test: ast.AST) -> bool:
    """``self.training`` or ``self.training and ...``."""
    conjuncts = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
    return any(isinstance(c, ast.Attribute) and c.attr == "training" and isinstance(c.value, ast.Name)
               and c.value.id == "self" for c in conjuncts)


def _hidden_argument(param: str, index: int) -> Callable[[ast.Call], ast.AST | None]:
    def argument(call: ast.Call) -> ast.AST | None:
        for keyword in call.keywords:
            if keyword.arg == param:
                return keyword.value
        if len(call.args) > index and not any(isinstance(a, ast.Starred) for a in call.args[: index + 1]):
            return call.args[index]
        return None

    return argument


def with_in_place_edits(layout: ModuleLayout, evidence: dict, module: torch.nn.Module, parent: torch.nn.Module,
                        child_attr: str, obs: Observation | None) -> tuple[ModuleLayout, dict]:
    """``layout`` with ``edited_in_place`` set on its input and output where the source or the probe shows an
    in-place edit; the evidence names which (recorded only where there is one)."""
    sig = signature_of(module)
    found: dict[str, list[str]] = {"input": [], "output": []}
    for kind, edited in edits_from_source(module, parent, child_attr, sig.name, sig.index).items():
        if edited:
            found[kind].append("source")
    if obs is not None and obs.at_end is not None:
        for kind, edited in edits_from_probe(layout, (obs.args, obs.kwargs, obs.output), obs.at_end).items():
            if edited:
                found[kind].append("probe")
    if not found["input"] and not found["output"]:
        return layout, evidence
    evidence = {**evidence, "edited_in_place": {kind: sources for kind, sources in found.items() if sources}}
    return ModuleLayout(replace(layout.input, edited_in_place=bool(found["input"])),
                        replace(layout.output, edited_in_place=bool(found["output"]))), evidence


def edits_from_source(module: torch.nn.Module, parent: torch.nn.Module, child_attr: str, param: str,
                      param_index: int) -> dict[str, bool]:
    """{"input": ..., "output": ...}: whether the source edits, in place, the tensor passed to the module (in
    the parent after the call, or in the module's own forward) or the module's returned tensor (in the parent).
    """
    found = {"input": False, "output": False}
    calling = _forward_calling(parent, child_attr)
    if calling is not None:
        tree, is_child_call = calling
        argument = _hidden_argument(param, param_index)
        for kind, mode in (("output", "result"), ("input", "argument")):
            walker = _EditsAfterHandover(is_child_call, mode, argument)
            walker.visit(tree)
            found[kind] = walker.edited
    own = parse_source(type(module).forward)
    if own is not None:
        walker = _EditsAfterHandover(lambda call: False, "result", lambda call: None, initial={param})
        walker.visit(own)
        found["input"] = found["input"] or walker.edited
    return found


def _forward_calling(parent: torch.nn.Module, child_attr: str) -> tuple[ast.AST, Callable[[ast.Call], bool]] | None:
    """The syntax tree of the first forward up ``parent``'s class hierarchy that calls ``self.<child_attr>``, and
    a test for those calls."""
    for klass in type(parent).__mro__:
        tree = parse_source(vars(klass)["forward"]) if "forward" in vars(klass) else None
        if tree is None:
            continue
        loops = _loop_variables_over(tree, child_attr)

        def is_child_call(call: ast.Call, loops=loops) -> bool:
            return _calls_child(call.func, child_attr, loops)

        if any(isinstance(node, ast.Call) and is_child_call(node) for node in ast.walk(tree)):
            return tree, is_child_call
    return None


def embedding_edits(parent: torch.nn.Module, child_attr: str, obs: Observation | None) -> list[str]:
    """Which sources show the embedding module's output edited in place after it returns (HF CTRL scales it
    with ``inputs_embeds *= ...``): "source" (the parent's forward), "probe" (its output at the call differs
    from the same tensor after the forward pass)."""
    found = []
    calling = _forward_calling(parent, child_attr)
    if calling is not None:
        walker = _EditsAfterHandover(calling[1], "result", lambda call: None)
        walker.visit(calling[0])
        if walker.edited:
            found.append("source")
    if obs is not None and obs.at_end is not None and isinstance(obs.output, torch.Tensor):
        if _changed(obs.output, obs.at_end[2]):
            found.append("probe")
    return found


def _changed(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.shape != after.shape:
        return True
    same = (before == after) | (before.isnan() & after.isnan())
    return not bool(same.all())


def edits_from_probe(layout: ModuleLayout, at_call: tuple[tuple, dict, Any], at_end: tuple[tuple, dict, Any]) -> dict[str, bool]:
    """{"input": ..., "output": ...}: whether the hidden state the module received or returned changed between
    the call (``at_call``: copies taken by the hooks) and the end of the forward pass (``at_end``: the same
    objects then)."""
    args, kwargs, output = at_call
    later_args, later_kwargs, later_output = at_end
    return {
        "input": _changed(layout.input.read(args, kwargs), layout.input.read(later_args, later_kwargs)),
        "output": _changed(layout.output.read(output), layout.output.read(later_output)),
    }
