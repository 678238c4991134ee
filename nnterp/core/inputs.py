"""What a trace, a generation or an invoke takes as its prompt, checked before an engine sees it: a bad prompt
gets an error that says what is wrong with it, not a tokenizer's or a model's error from deep inside."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

ACCEPTED = ("a prompt (str), a list of prompts, token ids (a list of ints, a list of such lists or an integer "
            "tensor [tokens] / [prompts, tokens]) or a tokenizer's output")


def check_prompts(inputs: tuple, tokenizer: Any, where: str = "model.trace") -> None:
    """Raise ``TypeError`` / ``ValueError`` when ``inputs`` (an invoke's positional arguments) hold no prompt, a
    prompt of no tokens, or something that is not a prompt. No positional input (keywords only, or invokes to
    come) is fine."""
    if not inputs:
        return
    data = inputs[0]
    if isinstance(data, Mapping) or hasattr(data, "input_ids") and not isinstance(data, torch.Tensor):
        return  # a tokenizer's encoding (or a dict of model inputs): the model checks its fields
    if isinstance(data, str):
        _check_text(data, 0, tokenizer, where)
    elif isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.ndim not in (1, 2) or data.numel() == 0:
            raise ValueError(f"{where}: a tensor prompt is token ids, [tokens] or [prompts, tokens] of integers with "
                             f"at least one token; got a {data.dtype} tensor of shape {tuple(data.shape)}.")
    elif isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{where}([]): no prompts given. Pass at least one prompt, e.g. {where}(['Hello']).")
        if all(_is_token_id(item) for item in data):
            return  # one prompt as token ids
        for index, item in enumerate(data):
            if isinstance(item, str):
                _check_text(item, index, tokenizer, where)
            elif isinstance(item, (list, tuple)) and item and all(_is_token_id(token) for token in item):
                continue
            elif isinstance(item, (list, tuple)) and not item:
                raise ValueError(f"{where}: prompt {index} is an empty list of token ids.")
            else:
                raise TypeError(f"{where}: prompt {index} is {_describe(item)}; each prompt is a str or a list of "
                                f"token ids.")
    else:
        raise TypeError(f"{where} takes {ACCEPTED}; got {_describe(data)}.")


def _check_text(text: str, index: int, tokenizer: Any, where: str) -> None:
    if _HAS_TOKEN.search(text):
        return  # an ASCII letter or digit always makes a token: no need to tokenize it here as well
    if tokenizer is not None and not tokenizer(text)["input_ids"]:
        raise ValueError(f"{where}: prompt {index} ({text!r}) has no tokens (the tokenizer adds none of its own "
                         f"either); give it some text.")


_HAS_TOKEN = re.compile(r"[A-Za-z0-9]")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def token_id_prompt(prompt: Any) -> Any:
    """A one-prompt integer tensor (``[tokens]`` or ``[1, tokens]``) as a list of token ids; anything else as is."""
    if isinstance(prompt, torch.Tensor) and not prompt.is_floating_point():
        if prompt.ndim == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.ndim == 1:
            return [int(token) for token in prompt.tolist()]
        raise ValueError(f"one request takes one prompt; got token ids of shape {tuple(prompt.shape)}. Use one "
                         "tracer.invoke(...) per prompt.")
    return prompt


def tokenized(tokenizer: Any, prompts: Sequence[Any], first_index: int = 0) -> list[Any]:
    """``prompts`` with each text replaced by its token ids, every text in one call of the tokenizer (with its
    special tokens, as an engine adds them); other prompts as they are. A prompt of no tokens raises, naming its
    index (``first_index`` is the first prompt's)."""
    result = list(prompts)
    texts = [index for index, prompt in enumerate(result) if isinstance(prompt, str)]
    if texts:
        for index, token_ids in zip(texts, tokenizer([result[index] for index in texts])["input_ids"]):
            result[index] = list(token_ids)
    for index, prompt in enumerate(result):
        if isinstance(prompt, torch.Tensor):
            empty = prompt.numel() == 0
        else:
            empty = isinstance(prompt, (list, tuple)) and not prompt
        if empty:
            raise ValueError(f"prompt {first_index + index} has no tokens: give it some text or token ids.")
    return result
