"""Check a standardized model against independent references (plain HF forward, manual sums)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.rename import layer_child

DEFAULT_PROMPTS = ("The capital of France is", "Hello world")
SUBMODULE_ACCESSORS = ("attentions_input", "attentions_output", "mlps_input", "mlps_output")


@dataclass
class Check:
    name: str
    status: str  # "pass", "fail" or "n/a"
    detail: str = ""


@dataclass
class ValidationReport:
    architecture: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.status == "fail"]

    def add(self, name: str, ok: bool | None, detail: str = "") -> None:
        self.checks.append(Check(name, "n/a" if ok is None else ("pass" if ok else "fail"), detail))

    def __str__(self) -> str:
        lines = [f"{self.architecture}: {'PASS' if self.passed else 'FAIL'}"]
        lines += [f"  {c.status:4} {c.name} {c.detail}" for c in self.checks]
        return "\n".join(lines)


def close(a: torch.Tensor, b: torch.Tensor | None, rtol: float = 1e-4) -> tuple[bool, float]:
    """Equal up to ``rtol`` of the reference's largest magnitude; returns (ok, max abs diff)."""
    if b is None or a.shape != b.shape:
        return False, float("inf")
    diff = (a.float() - b.float()).abs().max().item()
    scale = max(b.float().abs().max().item(), 1e-6)
    return diff <= rtol * scale, diff


def validate(model, prompts: Sequence[str] = DEFAULT_PROMPTS, rtol: float = 1e-4) -> ValidationReport:
    """Run every accessor check on ``model`` (a StandardizedTransformer) and report pass/fail per check."""
    report = ValidationReport(model.layout.architecture)
    n = model.num_layers
    embeddings, inputs, outputs, logits, model_inputs = _read_stream(model, prompts)
    # The reference: a plain HF forward on exactly the tensors the trace fed the model.
    args, kwargs = model_inputs
    with torch.no_grad():
        reference = model._module(*args, **kwargs, output_hidden_states=True, use_cache=False)
    chain = [close(outputs[i], inputs[i + 1], 0) for i in range(n - 1)]
    report.add("layers_output[i] == layers_input[i+1]", all(ok for ok, _ in chain), f"max diff {max((d for _, d in chain), default=0):.2e}")
    # factorised embeddings (RemBERT) are narrower than the stream and projected up inside the model
    embedding_weight = getattr(model._torch_module("embed_tokens"), "weight", None)
    widths = {model.hidden_size} | ({embedding_weight.shape[-1]} if isinstance(embedding_weight, torch.Tensor) else set())
    report.add("token_embeddings readable", embeddings.shape[-1] in widths)
    report.add("logits == HF forward", *_ok_detail(close(logits, reference.logits, rtol)))

    _check_hidden_states(model, reference.hidden_states, inputs, outputs, report, rtol)

    with torch.no_grad():
        projected = model.project_on_vocab(outputs[-1])
    report.add("project_on_vocab(layers_output[-1]) == logits", *_ok_detail(close(projected, reference.logits, rtol)))

    _check_submodules(model, prompts, inputs, outputs, model_inputs, report, rtol)
    _check_writes(model, prompts, logits, outputs, report)
    return report


def _check_hidden_states(model, hidden, inputs, outputs, report, rtol) -> None:
    """The stream between blocks against HF's ``output_hidden_states``. Most models record the embeddings
    then each block's output, the last one after the final norm; state-space and recurrent models (Mamba,
    RWKV) record each block's output only, the last one again after the final norm. Either way every entry
    but the last is the stream between two blocks."""
    n = model.num_layers
    if hidden is None or len(hidden) != n + 1:
        report.add("layers_input[i] == HF hidden_states[i]", None, "model exposes no per-layer hidden_states")
        return
    if close(inputs[0], hidden[0], rtol)[0] or not close(outputs[0], hidden[0], rtol)[0]:
        per_layer = [close(inputs[i], hidden[i], rtol) for i in range(n)]
        name = "layers_input[i] == HF hidden_states[i]"
    else:
        per_layer = [close(outputs[i], hidden[i], rtol) for i in range(n)]
        name = "layers_output[i] == HF hidden_states[i] (HF records no embeddings: block outputs only)"
    report.add(name, all(ok for ok, _ in per_layer), f"max diff {max((d for _, d in per_layer), default=0):.2e}")
    last_raw = close(outputs[-1], hidden[-1], rtol)
    last_normed = close(model._torch_module("ln_final")(outputs[-1]), hidden[-1], rtol)
    report.add("layers_output[-1] matches HF last hidden state (raw or after ln_final)", last_raw[0] or last_normed[0],
               f"raw {last_raw[1]:.2e} / normed {last_normed[1]:.2e}")


def _read_stream(model, prompts):
    """Embeddings, every layer's input and output, and logits, from one trace.

    Kept in its own function: variables assigned inside a trace must not be captured by closures
    (comprehensions) of the enclosing function.
    """
    inputs, outputs = [], []
    with torch.no_grad(), model.trace(list(prompts)):
        model_inputs = model.inputs.save()
        embeddings = model.token_embeddings.save()
        for i in range(model.num_layers):
            inputs.append(model.layers_input[i].save())
            outputs.append(model.layers_output[i].save())
        logits = model.logits.save()
    return embeddings, inputs, outputs, logits, model_inputs


def _ok_detail(result: tuple[bool, float]) -> tuple[bool, str]:
    return result[0], f"max diff {result[1]:.2e}"


def _read_role(model, prompts, accessor_names: Sequence[str]) -> dict[str, list[torch.Tensor]] | str:
    """Read whole-model accessors in one trace each; returns an error string if the module is absent."""
    values = {}
    for name in accessor_names:
        accessor = getattr(model, name)
        try:
            with torch.no_grad(), model.trace(list(prompts)):
                values[name] = [accessor[i].save() for i in range(model.num_layers)]
        except AttributeError as error:
            return str(error)
    return values


def _check_submodules(model, prompts, inputs, outputs, model_inputs, report, rtol) -> None:
    values = _read_role(model, prompts, SUBMODULE_ACCESSORS)
    if isinstance(values, str):
        report.add("attention/MLP accessors", None, values.splitlines()[0][:120])
        return
    stream_shape = inputs[0].shape  # [batch, seq, hidden]; hyper-connections carry [batch, seq, copies, hidden]
    odd = sorted({f"{name} {tuple(t.shape)}" for name, ts in values.items() for t in ts
                  if t.shape[:2] != stream_shape[:2] or t.shape[-1] != stream_shape[-1]})
    report.add("attention/MLP accessors read [batch, seq, hidden] like the stream", not odd, ", ".join(odd)[:160])
    references = _hooked_submodule_values(model, model_inputs)
    for name in SUBMODULE_ACCESSORS:
        # A module that flattens its tokens (Llama 4's MoE) is read in the stream's shape: its hook, reshaped.
        expected = [_as_stream(reference, stream_shape) for reference in references[name]]
        per_layer = [close(values[name][i], expected[i], rtol) for i in range(model.num_layers)]
        report.add(f"{name}[i] == forward hook on the raw module", all(ok for ok, _ in per_layer),
                   f"max diff {max(d for _, d in per_layer):.2e}")
    if model.layout.residual_additive:
        sums = [
            _close_sum(inputs[i], (values["attentions_output"][i], values["mlps_output"][i]), outputs[i], rtol)
            for i in range(model.num_layers)
        ]
        report.add("layers_input + attentions_output + mlps_output == layers_output", all(ok for ok, _ in sums),
                   f"max diff {max(d for _, d in sums):.2e}")
    else:
        report.add("layers_input + attentions_output + mlps_output == layers_output", None,
                   "not additive (post-norms, scaling or gating in the block)")


def _as_stream(reference: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """A hooked ``[batch * seq, hidden]`` value as ``[batch, seq, hidden]``; any other as it is."""
    if reference is not None and reference.ndim == 2 and len(shape) >= 3 and reference.numel() == shape[:2].numel() * shape[-1]:
        return reference.reshape(*shape[:2], shape[-1])
    return reference


def _close_sum(stream: torch.Tensor, parts: Sequence[torch.Tensor], expected: torch.Tensor, rtol: float) -> tuple[bool, float]:
    """``close(stream + sum(parts), expected)``."""
    if any(part.shape != stream.shape for part in parts):
        return False, float("inf")
    return close(stream + sum(parts), expected, rtol)


def _hooked_submodule_values(model, model_inputs) -> dict[str, list[torch.Tensor]]:
    """Every layer's attention / MLP input and output from forward hooks on the raw torch modules (copied when
    the hook runs, before the parent can edit them), in a plain forward on the trace's inputs."""
    width = model.hidden_size
    found: dict[str, list] = {name: [None] * model.num_layers for name in SUBMODULE_ACCESSORS}
    handles = []
    for index, layer in enumerate(model._torch_module("layers")):
        for role, plural in (("self_attn", "attentions"), ("mlp", "mlps")):
            module = getattr(layer, layer_child(layer, role, model.names))

            def pre(mod, args, kwargs, key=f"{plural}_input", index=index):
                found[key][index] = _hidden_width_copy([*args, *kwargs.values()], width)

            def post(mod, args, kwargs, output, key=f"{plural}_output", index=index):
                found[key][index] = _hidden_width_copy([output] if isinstance(output, torch.Tensor) else output, width)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    args, kwargs = model_inputs
    try:
        with torch.no_grad():
            model._module(*args, **kwargs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _hidden_width_copy(values, width: int) -> torch.Tensor | None:
    """A copy of the first floating tensor of the model's width among ``values`` (None if there is none)."""
    for value in values if isinstance(values, (tuple, list)) else ():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 2 and value.shape[-1] == width:
            return value.detach().clone()
    return None


def _check_writes(model, prompts, logits, outputs, report) -> None:
    middle = model.num_layers // 2
    with torch.no_grad(), model.trace(list(prompts)):
        model.layers_output[middle] = model.layers_output[middle]
        same = model.logits.save()
    report.add("writing a read value back changes nothing", *_ok_detail(close(same, logits, 0)))
    with torch.no_grad(), model.trace(list(prompts)):
        model.layers_output[middle] = torch.zeros_like(model.layers_output[middle])
        zeroed = model.logits.save()
    report.add("zeroing layers_output changes logits", not torch.allclose(zeroed, logits))
