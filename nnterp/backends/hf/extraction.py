"""Extraction on a HuggingFace model: batched forward passes with plain hooks, one prompt's rows at a time out.

Prompts are padded on the right, so every real token sits at the position it has when the prompt runs alone
(causal attention never looks at the padding after it), and the hooks keep only real tokens' rows. The forward
pass stops as soon as every tap is captured (nothing after the last tapped module is computed). A batch's copy to
host memory and its assembly into one tensor per prompt overlap the next batch's forward pass. The host memory
(pinned blocks, the prompts' rows) is the model's, kept from one extraction to the next.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from ...core.inputs import tokenized
from ...core.tokens import token_id_list, until_eos
from ..taps.capture import Capture
from ..taps.host_memory import BlockMemory
from ..taps.plan import ExtractionPlan
from ..taps.rows import Activations, PromptRows, RowCopier, activations
from ..taps.transfer import HostTransfer


class KeptMemory:
    """Host memory a model keeps between its extractions: the pinned blocks captured buffers are copied into (as
    many as were in flight at once) and up to 2 GiB of free memory for the prompts' rows. Fresh pinned memory costs
    about 40 ms per 256 MB (every layer of a batch of 32 prompts of a 1B model fills 210 MB), fresh pageable memory
    a page fault per page."""

    def __init__(self) -> None:
        self.transfer = HostTransfer()
        self.rows = BlockMemory()


class _AllCaptured(Exception):
    """Raised by the last hook to end a forward pass whose remaining modules nobody reads."""


def encode(tokenizer: Any, prompts: Sequence[str | Sequence[int]], first_index: int = 0) -> list[list[int]]:
    """Token ids of each prompt (text tokenized with the tokenizer's special tokens, as vLLM does)."""
    return [[int(token) for token in prompt] for prompt in tokenized(tokenizer, prompts, first_index)]


def run(model: Any, plan: ExtractionPlan, prompts: Sequence[str | Sequence[int]], batch_size: int,
        max_new_tokens: int, generation_kwargs: dict, memory: KeptMemory) -> Iterator[Activations]:
    torch_model = model._module
    device = next(torch_model.parameters()).device
    capture = Capture(torch_model, plan.taps, after_fill=_stop)
    transfer = memory.transfer
    copier = RowCopier(memory=memory.rows)
    pad = _pad_id(model.tokenizer)
    pending: list[tuple[int, list[int], list[int], Any]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            indices = range(start, min(start + batch_size, len(prompts)))
            token_ids = encode(model.tokenizer, [prompts[index] for index in indices], start)
            generated = [[] for _ in indices]
            if max_new_tokens > 0:
                generated = _generate(model, token_ids, max_new_tokens, generation_kwargs, device)
                token_ids = [prompt + new[:-1] for prompt, new in zip(token_ids, generated)]
            input_ids, mask = _padded(token_ids, pad, left=False)
            rows = mask.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
            capture.arm(rows, int(mask.sum()))
            try:
                with torch.inference_mode():
                    torch_model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _AllCaptured:
                pass
            buffer = transfer.start(capture.disarm())
            finished, pending = pending, []
            offset, items = 0, []
            for index, tokens, new in zip(indices, token_ids, generated):
                prompt_rows = PromptRows(len(tokens))
                items.append(prompt_rows.add(offset, len(tokens), 0, f"prompt {index}"))
                pending.append((index, tokens, new, prompt_rows))
                offset += len(tokens)
            copier.copy(buffer, items)
            yield from _finish(plan, copier, finished)  # the previous batch, while this one computes
        yield from _finish(plan, copier, pending)
    finally:
        capture.remove()
        copier.close()


def _stop() -> None:
    raise _AllCaptured()


def _finish(plan: ExtractionPlan, copier: RowCopier, pending: list) -> Iterator[Activations]:
    ready = [copier.finish(rows) for _, _, _, rows in pending]
    for (index, tokens, new, _), rows in zip(pending, ready):
        yield activations(plan, index, rows.result(), tokens, new)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _padded(token_ids: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a batch padded on the left or the right."""
    width = max(len(tokens) for tokens in token_ids)
    input_ids = torch.full((len(token_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, tokens in enumerate(token_ids):
        columns = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        input_ids[row, columns] = torch.tensor(tokens)
        mask[row, columns] = 1
    return input_ids, mask


def _generate(model: Any, token_ids: list[list[int]], max_new_tokens: int, generation_kwargs: dict,
              device: torch.device) -> list[list[int]]:
    """Greedy continuations (a left-padded batch, as generation needs; one prompt at a time for a model whose
    positions left padding shifts), up to end of sequence."""
    if len(token_ids) > 1 and getattr(model, "left_padding_shifts_positions", False):
        return [new for tokens in token_ids for new in _generate(model, [tokens], max_new_tokens, generation_kwargs, device)]
    input_ids, mask = _padded(token_ids, _pad_id(model.tokenizer), left=True)
    width = input_ids.shape[1]
    kwargs = {**model.greedy_generation_kwargs(max_new_tokens), **generation_kwargs}
    with torch.inference_mode():
        output = model._module.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
    eos = set(token_id_list(kwargs.get("eos_token_id")))
    return [until_eos(row, eos) for row in output[:, width:].tolist()]
