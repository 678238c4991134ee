"""Plain HF forwards with hooks on the raw torch model: the independent reference of the surface tests."""

import torch


def stream_of(output):
    """The residual stream in a layer's output (a tensor, or the first entry of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_stream(output, stream):
    return (stream,) + tuple(output[1:]) if isinstance(output, tuple) else stream


def add_at(vector: torch.Tensor, positions: list[int]):
    """An edit of a one-prompt stream ``[1, tokens, hidden]`` adding ``vector`` at ``positions``."""
    def edit(stream):
        stream = stream.clone()
        stream[0, positions] += vector
        return stream
    return edit


def hooked_logits(raw: torch.nn.Module, layers: torch.nn.ModuleList, input_ids: torch.Tensor, edits: dict) -> torch.Tensor:
    """Logits ``[tokens, vocab]`` of a plain forward on one prompt's ``input_ids`` ``[1, tokens]``, with
    ``edits[layer](stream) -> stream`` applied to layer outputs by forward hooks."""
    handles = [layers[i].register_forward_hook(lambda m, a, out, fn=fn: with_stream(out, fn(stream_of(out))))
               for i, fn in edits.items()]
    try:
        with torch.no_grad():
            return raw(input_ids=input_ids).logits[0]
    finally:
        for handle in handles:
            handle.remove()


def logits_with_hook(model, module: torch.nn.Module, hook, prompt: str, pre: bool = False) -> torch.Tensor:
    """Logits of a plain forward of the raw model on ``prompt`` with ``hook`` on ``module`` (a forward hook, or a
    forward pre-hook with ``pre``), removed after."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model._module(**model.tokenizer(prompt, return_tensors="pt")).logits
    finally:
        handle.remove()


def add_to_stream(vector: torch.Tensor):
    """A forward hook adding ``vector`` to a module's output stream."""
    return lambda module, args, output: with_stream(output, stream_of(output) + vector)


def outputs_with_hooks(raw: torch.nn.Module, token_ids: list[int], edits: dict, read: dict) -> dict[str, torch.Tensor]:
    """One plain forward of the raw model on ``token_ids`` with forward hooks ``edits`` (``{module: hook}``)
    installed: the output stream ``[tokens, hidden]`` of each module in ``read`` (``{name: module}``), after
    any edit of that module."""
    seen: dict = {}
    handles = [module.register_forward_hook(hook) for module, hook in edits.items()]
    handles += [module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, stream_of(out)[0].clone()))
                for name, module in read.items()]
    try:
        with torch.no_grad():
            raw(torch.tensor([token_ids]))
    finally:
        for handle in handles:
            handle.remove()
    return seen
