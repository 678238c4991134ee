"""A factor vLLM applies to the embedding's output outside the embedding module (Gemma's ``normalizer``,
MiniCPM's ``config.scale_emb``), read off the source of the module that holds the embedding."""

from __future__ import annotations

import ast
import functools

import torch

from ...core.layout.infer import parse_source


def embedding_scale(model: torch.nn.Module, embed: torch.nn.Module) -> torch.Tensor | float | None:
    """The factor the modules holding ``embed`` multiply its output by (None: none)."""
    for holder in model.modules():
        attr = next((name for name, child in holder.named_children() if child is embed), None)
        path = scale_path(type(holder), attr) if attr is not None else None
        if path is not None:
            value = holder
            for name in path:
                value = getattr(value, name, None)
            if isinstance(value, (torch.Tensor, float, int)) and not isinstance(value, bool):
                return value
    return None


@functools.lru_cache(maxsize=None)
def scale_path(holder_class: type, attr: str) -> tuple[str, ...] | None:
    """The attribute path from ``self`` of the factor the source of ``holder_class`` (or a base class: MiniCPM3's
    model inherits MiniCPM's) multiplies ``self.<attr>(...)`` by, directly or through a name the call's result is
    bound to: ``("config", "scale_emb")``."""
    for klass in holder_class.__mro__:
        if klass.__module__.startswith("torch."):
            break
        path = _scale_path_in(klass, attr)
        if path is not None:
            return path
    return None


def _scale_path_in(klass: type, attr: str) -> tuple[str, ...] | None:
    tree = parse_source(klass)
    if tree is None:
        return None
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        bound = {target.id for node in ast.walk(function) if isinstance(node, ast.Assign) and _calls_self(node.value, attr)
                 for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(function):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
                continue
            for product, factor in ((node.left, node.right), (node.right, node.left)):
                if _calls_self(product, attr) or isinstance(product, ast.Name) and product.id in bound:
                    path = _self_path(factor)
                    if path:
                        return path
    return None


def _calls_self(node: ast.AST, attr: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self")


def _self_path(node: ast.AST) -> tuple[str, ...] | None:
    """``self.a.b`` as ``("a", "b")``; None for anything else."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return tuple(reversed(names)) if names and isinstance(node, ast.Name) and node.id == "self" else None
