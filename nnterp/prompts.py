"""Prompts with target tokens, run in batches with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import nnsight
import torch
from tqdm.auto import tqdm


def first_token_ids(tokenizer, words: str | Sequence[str]) -> list[int]:
    """The first token of each word, spelled with and without a leading space (tokenizers differ on
    whether a word after a space carries the space), deduplicated, in first-seen order."""
    ids: list[int] = []
    for word in [words] if isinstance(words, str) else words:
        for spelling in (word, " " + word.lstrip()):
            tokens = tokenizer.encode(spelling, add_special_tokens=False)
            if tokens and tokens[0] not in ids:
                ids.append(tokens[0])
    return ids


@dataclass
class Prompt:
    """A prompt and, per target name, the token ids whose next-token probabilities are summed."""

    text: str
    targets: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_words(cls, text: str, targets: dict[str, str | Sequence[str]], tokenizer) -> "Prompt":
        return cls(text, {name: first_token_ids(tokenizer, words) for name, words in targets.items()})


def run_prompts(
    model,
    prompts: Sequence[Prompt],
    batch_size: int = 8,
    intervention: Callable[[object], None] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Probability of each target per prompt: ``{target name: tensor [num_prompts]}``.

    ``intervention(model)`` runs inside every trace before the probabilities are read (e.g. a steer).
    Engines that take one prompt per trace (vLLM) run prompts one at a time.
    """
    names = sorted({name for prompt in prompts for name in prompt.targets})
    step = batch_size if model._backend.batches_prompts else 1
    rows: list[torch.Tensor] = []
    for start in tqdm(range(0, len(prompts), step), disable=not progress, desc="prompts"):
        batch = prompts[start:start + step]
        with torch.no_grad(), model.trace([p.text for p in batch] if step > 1 else batch[0].text):
            if intervention is not None:
                intervention(model)
            probs = nnsight.save(model.next_token_probs)
        rows.extend(probs.float().cpu())
    result = {}
    for name in names:
        result[name] = torch.stack([
            row[prompt.targets[name]].sum() if prompt.targets.get(name) else torch.tensor(float("nan"))
            for row, prompt in zip(rows, prompts)
        ])
    return result
