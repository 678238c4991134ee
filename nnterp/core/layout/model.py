"""How a module receives and returns the residual-stream tensor, and how to read or replace it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch


class LayoutError(ValueError):
    """A module's call or return value does not match its inferred layout."""


@dataclass(frozen=True)
class InputLayout:
    """Where the hidden state sits in a module's ``(args, kwargs)``.

    ``position`` is its index in ``args`` when the parent passes it positionally, ``None`` when by keyword.
    ``residual`` names a second input added to it (vLLM fused add+norm layers); the stream is their sum.
    ``edited_in_place``: the module or its parent edits this tensor in place after the module receives it,
    so a read copies it and a write hands the module a copy.
    ``by_signature``: the parent's source does not tell how it passes them (arguments unpacked from a
    computed container, calls of both kinds); each is then taken by keyword when passed so, else at its
    position in the signature, as Python binds the call.
    ``flat_tokens``: the module receives the stream with its tokens flattened, ``[batch * seq, hidden]``, where
    the rest of the model carries ``[batch, seq, hidden]`` (the accessors restore the batch axis).
    """

    name: str
    position: int | None
    residual: str | None = None
    residual_position: int | None = None
    edited_in_place: bool = False
    by_signature: bool = False
    flat_tokens: bool = False

    def _by_keyword(self, kwargs: dict, name: str, position: int | None) -> bool:
        return position is None or self.by_signature and name in kwargs

    def _locate(self, args: tuple, kwargs: dict, name: str, position: int | None, where: str) -> tuple[str, Any]:
        if self._by_keyword(kwargs, name, position):
            if name not in kwargs:
                raise LayoutError(
                    f"{where}: layout says '{name}' is passed by keyword, but the call had keywords "
                    f"{sorted(kwargs)} and {len(args)} positional argument(s). The module is called "
                    f"differently than when its layout was inferred; re-run `python -m nnterp.layout --update`."
                )
            return "kw", name
        if position >= len(args):
            raise LayoutError(
                f"{where}: layout says '{name}' is positional argument {position}, but the call had only "
                f"{len(args)} positional argument(s) (keywords {sorted(kwargs)})."
            )
        return "arg", position

    def read(self, args: tuple, kwargs: dict, where: str = "module") -> torch.Tensor:
        return self.read_stream(args, kwargs, where)[0]

    def read_stream(self, args: tuple, kwargs: dict, where: str = "module") -> tuple[torch.Tensor, bool]:
        """The residual stream entering the module, and whether it is a fresh tensor: a ``hidden + residual``
        sum or a copy (False: the caller's own buffer, e.g. vLLM's first layer, which gets ``residual=None``)."""
        hidden = self._get(args, kwargs, self.name, self.position, where)
        if self.residual is not None:
            residual = self._get(args, kwargs, self.residual, self.residual_position, where, optional=True)
            if residual is not None:
                check_same_shape(hidden, residual, f"{where} (hidden_states + residual)")
                return hidden + residual, True
        return copy_if(self.edited_in_place, hidden)

    def write(self, args: tuple, kwargs: dict, value: torch.Tensor, where: str = "module") -> tuple[tuple, dict]:
        current = self._get(args, kwargs, self.name, self.position, where)
        check_same_shape(current, value, where)
        value = copy_if(self.edited_in_place, value)[0]
        args, kwargs = self._set(args, kwargs, self.name, self.position, value, where)
        if self.residual is not None:
            # The stream is hidden + residual: put it all in hidden and zero the residual (a tensor, not None:
            # the engine batches every request's residual and expects one from each).
            residual = self._get(args, kwargs, self.residual, self.residual_position, where, optional=True)
            if residual is not None:
                args, kwargs = self._set(args, kwargs, self.residual, self.residual_position,
                                         torch.zeros_like(residual), where)
        return args, kwargs

    def _get(self, args, kwargs, name, position, where, optional=False):
        by_keyword = self._by_keyword(kwargs, name, position)
        if optional and (by_keyword and name not in kwargs or not by_keyword and position >= len(args)):
            return None
        kind, key = self._locate(args, kwargs, name, position, where)
        return kwargs[key] if kind == "kw" else args[key]

    def _set(self, args, kwargs, name, position, value, where):
        kind, key = self._locate(args, kwargs, name, position, where)
        if kind == "kw":
            return args, {**kwargs, key: value}
        return tuple(value if index == key else arg for index, arg in enumerate(args)), kwargs


OutputKind = Literal["tensor", "tuple", "dual"]


@dataclass(frozen=True)
class OutputLayout:
    """What a module returns: a tensor, a tuple whose ``index`` entry is the hidden state, or a
    dual stream ``(hidden, residual)`` whose sum is the residual stream (vLLM fused add+norm).

    ``edited_in_place``: the parent edits the returned tensor in place after the module returns (HF Falcon
    adds the attention output into the MLP's), so a read copies it and a write hands the parent a copy.
    ``flat_tokens``: the module returns the stream with its tokens flattened, ``[batch * seq, hidden]`` (HF
    Llama 4's MoE block, which its layer reshapes), where the rest of the model carries ``[batch, seq, hidden]``.
    """

    kind: OutputKind
    index: int = 0
    edited_in_place: bool = False
    flat_tokens: bool = False

    def read_stream(self, output: Any, where: str = "module") -> tuple[torch.Tensor, bool]:
        """The residual-stream part of ``output``, and whether it is a fresh tensor (a dual-stream sum or a
        copy) rather than the module's own buffer."""
        value = self.read(output, where)
        if self.kind == "dual":
            return value, True
        return copy_if(self.edited_in_place, value)

    def read(self, output: Any, where: str = "module") -> torch.Tensor:
        if self.kind == "tensor":
            if not isinstance(output, torch.Tensor):
                raise LayoutError(f"{where}: layout says the output is a tensor, got {type(output).__name__}.")
            return output
        if not isinstance(output, (tuple, list)):
            raise LayoutError(f"{where}: layout says the output is a {self.kind}, got {type(output).__name__}.")
        if self.kind == "dual":
            hidden, residual = output[0], output[1]
            check_same_shape(hidden, residual, f"{where} (hidden + residual)")
            return hidden + residual
        return output[self.index]

    def write(self, output: Any, value: torch.Tensor, where: str = "module") -> Any:
        check_same_shape(self.read(output, where), value, where)
        value = copy_if(self.edited_in_place, value)[0]
        if self.kind == "tensor":
            return value
        if self.kind == "dual":
            return type(output)((value, torch.zeros_like(output[1]), *output[2:]))
        return type(output)(value if index == self.index else item for index, item in enumerate(output))

    def build(self, value: torch.Tensor, length: int | None = None) -> Any:
        """A whole output of this layout carrying ``value`` as the stream (for skipping a module); a tuple has
        ``length`` entries (the module's own count, which a parent that unpacks it needs), None elsewhere."""
        value = copy_if(self.edited_in_place, value)[0]
        if self.kind == "tensor":
            return value
        if self.kind == "dual":
            return (value, torch.zeros_like(value))
        return tuple(value if index == self.index else None for index in range(max(length or 0, self.index + 1)))



@dataclass(frozen=True)
class ModuleLayout:
    input: InputLayout
    output: OutputLayout

    def to_json(self) -> dict:
        """Plain dicts; the flags ``edited_in_place``, ``by_signature`` and ``flat_tokens`` appear only where true
        (most modules are none of them), so reviewed snapshots keep their form."""
        return {"input": _without_false_flags(asdict(self.input)), "output": _without_false_flags(asdict(self.output))}

    @classmethod
    def from_json(cls, data: dict) -> "ModuleLayout":
        return cls(InputLayout(**data["input"]), OutputLayout(**data["output"]))


def _without_false_flags(fields: dict) -> dict:
    for flag in ("edited_in_place", "by_signature", "flat_tokens"):
        if not fields.get(flag):
            fields.pop(flag, None)
    return fields


def copy_if(edited_in_place: bool, value: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``value``, copied when something edits it in place later; and whether it was copied."""
    return (value.clone(), True) if edited_in_place else (value, False)


def check_same_shape(current: Any, value: Any, where: str) -> None:
    """Refuse a tensor whose shape (no silent broadcast), floating dtype or device differs from the one it replaces."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(value).__name__}.")
    if isinstance(current, torch.Tensor) and current.is_floating_point() and value.dtype != current.dtype:
        raise TypeError(
            f"{where}: the module's tensor is {current.dtype} but the new value is {value.dtype}; the model's next "
            f"operations would fail on it. Cast it first: value.to({current.dtype})."
        )
    if isinstance(current, torch.Tensor) and value.device != current.device:
        raise ValueError(
            f"{where}: the module's tensor is on {current.device} but the new value is on {value.device}. Move it "
            f"first: value.to({str(current.device)!r})."
        )
    if isinstance(current, torch.Tensor) and current.shape != value.shape:
        raise ValueError(
            f"{where}: shape mismatch, the module's tensor has shape {tuple(current.shape)} but the new "
            f"value has shape {tuple(value.shape)}. Write a tensor of the same shape (add a steering vector "
            f"to the read value instead of assigning the vector itself)."
        )
