"""Infer a module's layout from its signature, its parent's forward source and a runtime probe."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .model import InputLayout, LayoutError, ModuleLayout, OutputLayout

HIDDEN_NAMES = ("hidden_states", "hidden_state", "x", "hidden", "input", "inputs", "input_tensor", "h", "hx", "xs")
NOT_HIDDEN = {"positions", "position_ids", "attention_mask", "input_ids", "cache_position", "past_key_values"}
RESIDUAL_NAMES = ("residual",)


@dataclass(frozen=True)
class Signature:
    """The hidden-state parameter (and residual parameter, if any) of ``module.forward``."""

    name: str
    index: int
    residual: str | None
    residual_index: int | None


def signature_of(module: torch.nn.Module) -> Signature:
    # The unbound function, so decorators that hide `self` from a bound signature cannot shift indices.
    params = [
        p for p in list(inspect.signature(type(module).forward).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    names = [p.name for p in params]
    hidden = next((n for n in HIDDEN_NAMES if n in names), None)
    if hidden is None:
        hidden = next((n for n in names if n not in NOT_HIDDEN), None)
    if hidden is None:
        raise LayoutError(f"{type(module).__name__}.forward has no parameter that could be the hidden state: {names}")
    residual = next((n for n in RESIDUAL_NAMES if n in names), None)
    if residual is not None and overwritten_before_read(type(module).forward, residual):
        residual = None  # the stream is the hidden state alone (vLLM's post-norm Exaone-4 layer)
    return Signature(hidden, names.index(hidden), residual, names.index(residual) if residual else None)


def overwritten_before_read(forward, param: str) -> bool:
    """Whether ``forward`` assigns ``param`` before any statement reads it: the argument is then ignored.

    Statements of the body are taken in order; the first that loads ``param`` means it is used, the first
    that stores it (and does not load it) means it is discarded. A forward whose source is unavailable
    counts as reading it.
    """
    tree = parse_source(forward)
    if tree is None:
        return False
    function = next((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    for statement in function.body if function is not None else []:
        names = [node for node in ast.walk(statement) if isinstance(node, ast.Name) and node.id == param]
        if any(isinstance(name.ctx, ast.Load) for name in names):
            return False
        if any(isinstance(name.ctx, ast.Store) for name in names):
            return True
    return False


def call_style_from_source(parent: torch.nn.Module, child_attr: str, param: str, param_index: int) -> str | None:
    """How ``parent.forward`` passes ``param`` to ``self.<child_attr>``: 'keyword', 'positional' or None.

    Recognises ``self.child(...)``, ``self.child[i](...)`` and loops ``for layer in self.child[...]:
    layer(...)`` (also through ``enumerate``/``islice``/slices). A forward that only delegates to
    ``super().forward`` is followed up the class hierarchy.
    """
    for klass in type(parent).__mro__:
        if "forward" in vars(klass):
            style = _call_style_in(vars(klass)["forward"], child_attr, param, param_index)
            if style is not None:
                return style
    return None


def parse_source(function) -> ast.AST | None:
    """The syntax tree of ``function``'s source (None when the source is unavailable)."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None


def _call_style_in(forward, child_attr: str, param: str, param_index: int) -> str | None:
    tree = parse_source(forward)
    if tree is None:
        return None
    loop_names = _loop_variables_over(tree, child_attr)
    keyword_dicts = _dict_literal_keys(tree)
    styles = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _calls_child(node.func, child_attr, loop_names):
            if any(keyword.arg == param or _unpacks_key(keyword, param, keyword_dicts) for keyword in node.keywords):
                styles.append("keyword")
            elif len(node.args) > param_index and not any(isinstance(a, ast.Starred) for a in node.args):
                styles.append("positional")
    if not styles:
        return None
    return styles[0] if len(set(styles)) == 1 else "mixed"


def _dict_literal_keys(tree: ast.AST) -> dict[str, set[str]]:
    """``name -> keys`` of dicts built as literals (``kwargs = {"hidden_states": h}``) in the function."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            keys = {key.value for key in node.value.keys if isinstance(key, ast.Constant) and isinstance(key.value, str)}
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found.setdefault(target.id, set()).update(keys)
    return found


def _unpacks_key(keyword: ast.keyword, param: str, keyword_dicts: dict[str, set[str]]) -> bool:
    """``**kwargs`` where ``kwargs`` is a dict literal holding ``param`` (vLLM's A.X-K1 layer calls its attention
    so)."""
    return keyword.arg is None and isinstance(keyword.value, ast.Name) and param in keyword_dicts.get(keyword.value.id, ())


def _mentions_self_attr(node: ast.AST, attr: str) -> bool:
    return any(
        isinstance(sub, ast.Attribute) and sub.attr == attr and isinstance(sub.value, ast.Name) and sub.value.id == "self"
        for sub in ast.walk(node)
    )


def _loop_variables_over(tree: ast.AST, attr: str) -> set[str]:
    """Names bound to items of ``self.<attr>``: loop variables over it, and ``layer = self.<attr>[i]``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and _mentions_self_attr(node.iter, attr):
            names |= {sub.id for sub in ast.walk(node.target) if isinstance(sub, ast.Name)}
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript) and _mentions_self_attr(node.value.value, attr):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def _calls_child(func: ast.AST, attr: str, loop_names: set[str]) -> bool:
    if isinstance(func, ast.Attribute) and func.attr == attr and isinstance(func.value, ast.Name):
        return func.value.id == "self"
    if isinstance(func, ast.Subscript):
        return _mentions_self_attr(func.value, attr)
    return isinstance(func, ast.Name) and func.id in loop_names


@dataclass(frozen=True)
class Observation:
    """One call of a module captured by the probe: copies of its arguments and output as they were at the
    call, and (``at_end``) the same objects, as they are once the forward pass is over."""

    args: tuple
    kwargs: dict
    output: Any
    at_end: tuple[tuple, dict, Any] | None = None


def snapshot(value: Any) -> Any:
    """A copy of every tensor in ``value`` (through tuples, lists and dicts), to compare with later."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        items = [snapshot(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    return value


def observe(model: torch.nn.Module, modules: dict[str, torch.nn.Module], run: Callable[[], Any]) -> dict[str, Observation]:
    """Run ``run()`` once with hooks on ``modules`` and keep each one's first call."""
    seen: dict[str, Observation] = {}
    pending: dict[str, tuple] = {}
    handles = []
    for key, module in modules.items():
        def pre(mod, args, kwargs, key=key):
            if key not in seen and key not in pending:
                pending[key] = (snapshot(args), snapshot(dict(kwargs)), args, dict(kwargs))

        def post(mod, args, kwargs, output, key=key):
            if key not in seen and key in pending:
                args_at_call, kwargs_at_call, live_args, live_kwargs = pending.pop(key)
                seen[key] = Observation(args_at_call, kwargs_at_call, snapshot(output), (live_args, live_kwargs, output))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _is_hidden(value: Any, hidden_size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 2 and value.shape[-1] == hidden_size


def _flat(value: Any, stream_ndim: int | None) -> bool:
    """A hidden state with its tokens flattened where the model's stream is ``[batch, seq, hidden]``."""
    return stream_ndim == 3 and isinstance(value, torch.Tensor) and value.ndim == 2


def input_from_probe(obs: Observation, sig: Signature, hidden_size: int, where: str,
                     stream_ndim: int | None = None) -> InputLayout:
    if sig.name in obs.kwargs:
        position = None
        value = obs.kwargs[sig.name]
    elif sig.index < len(obs.args):
        position, value = sig.index, obs.args[sig.index]
    else:
        raise LayoutError(f"{where}: '{sig.name}' was neither passed by keyword nor at position {sig.index}.")
    if not _is_hidden(value, hidden_size):
        raise LayoutError(
            f"{where}: argument '{sig.name}' is {_describe(value)}, not a hidden state of width {hidden_size}."
        )
    residual_position = None
    if sig.residual is not None and sig.residual not in obs.kwargs:
        residual_position = sig.residual_index
    return InputLayout(sig.name, position, sig.residual, residual_position if sig.residual else None,
                       flat_tokens=_flat(value, stream_ndim))


def output_from_probe(output: Any, sig: Signature, hidden_size: int, where: str,
                      stream_ndim: int | None = None) -> OutputLayout:
    if isinstance(output, torch.Tensor):
        if not _is_hidden(output, hidden_size):
            raise LayoutError(f"{where}: output is {_describe(output)}, not a hidden state of width {hidden_size}.")
        return OutputLayout("tensor", flat_tokens=_flat(output, stream_ndim))
    if isinstance(output, (tuple, list)) and output:
        first = output[0]
        if (
            sig.residual is not None and len(output) >= 2
            and _is_hidden(first, hidden_size) and _is_hidden(output[1], hidden_size)
            and first.shape == output[1].shape
        ):
            return OutputLayout("dual")
        index = next((i for i, item in enumerate(output) if _is_hidden(item, hidden_size)), None)
        if index is not None:
            return OutputLayout("tuple", index, flat_tokens=_flat(output[index], stream_ndim))
    raise LayoutError(f"{where}: cannot find a hidden state of width {hidden_size} in output {_describe(output)}.")


def output_from_source(module: torch.nn.Module, sig: Signature) -> OutputLayout | None:
    """The output kind read off ``return`` statements of ``module.forward`` (used without a probe)."""
    returned = _returned_values(type(module))
    if returned is None:
        return None
    kinds = set()
    for value in returned:
        if isinstance(value, ast.Tuple):
            kinds.add("dual" if sig.residual is not None and len(value.elts) == 2 else "tuple")
        else:
            kinds.add("tensor")
    return OutputLayout(kinds.pop()) if len(kinds) == 1 else None


def _returned_values(module_class: type) -> list[ast.expr] | None:
    """The expressions ``module_class.forward`` returns (None when its source is unavailable)."""
    tree = parse_source(module_class.forward)
    if tree is None:
        return None
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Return) and node.value is not None]


@functools.lru_cache(maxsize=None)
def returned_tuple_length(module_class: type) -> int | None:
    """How many entries ``module_class.forward`` returns when every ``return`` statement is a tuple display of
    the same length (vLLM's StableLM layer returns ``hidden_states, residual``), else None."""
    lengths = {len(value.elts) if isinstance(value, ast.Tuple) and not any(isinstance(e, ast.Starred) for e in value.elts)
               else None for value in _returned_values(module_class) or ()}
    return lengths.pop() if len(lengths) == 1 else None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(_describe(v) for v in value)})"
    return type(value).__name__


def infer_module_layout(
    module: torch.nn.Module, parent: torch.nn.Module, child_attr: str, obs: Observation | None, hidden_size: int, where: str,
    stream_ndim: int | None = None,
) -> tuple[ModuleLayout | None, dict]:
    """Combine the three sources; returns the layout and the evidence each source gave.

    The probe is the runtime truth and wins; without a probe, the source decides the call style.
    A static/probe disagreement is kept in the evidence so it shows up in the reviewed snapshot.
    """
    sig = signature_of(module)
    style = call_style_from_source(parent, child_attr, sig.name, sig.index)
    evidence = {"signature": {"hidden": sig.name, "index": sig.index, "residual": sig.residual}, "source": style}
    if obs is None:
        output_layout = output_from_source(module, sig)
        if output_layout is None:
            return None, evidence
        if style in ("keyword", "positional"):
            position = None if style == "keyword" else sig.index
            residual_position = None if style == "keyword" or sig.residual is None else sig.residual_index
            input_layout = InputLayout(sig.name, position, sig.residual, residual_position)
        else:
            # The source does not say how the parent passes the hidden state: bind each call to the signature.
            input_layout = InputLayout(sig.name, sig.index, sig.residual, sig.residual_index, by_signature=True)
        return ModuleLayout(_residual_only_if_dual(input_layout, output_layout), output_layout), evidence
    input_layout = input_from_probe(obs, sig, hidden_size, where, stream_ndim)
    output_layout = output_from_probe(obs.output, sig, hidden_size, where, stream_ndim)
    evidence["probe"] = "keyword" if input_layout.position is None else "positional"
    return ModuleLayout(_residual_only_if_dual(input_layout, output_layout), output_layout), evidence


def _residual_only_if_dual(input_layout: InputLayout, output_layout: OutputLayout) -> InputLayout:
    """A ``residual`` argument is half of the stream only in a fused add+norm module, which returns the dual
    ``(hidden, residual)``. Elsewhere (HF Bloom's attention and MLP take the residual to add it to their own
    output) the module's input is the hidden state alone."""
    if input_layout.residual is None or output_layout.kind == "dual":
        return input_layout
    return replace(input_layout, residual=None, residual_position=None)
