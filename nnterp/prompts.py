"""Prompts with target tokens, and their next-token probabilities over many prompts (re-exported as nnterp
1.x's ``nnterp.prompt_utils``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm as auto_tqdm

from .core.log import logger
from .core.progress import with_progress
from .interventions.activations import compute_next_token_probs

PEAR = "🍐"  # a prefix no word merges with, so the word's first token can be read after it


class TokenizationError(Exception):
    """A word's first token cannot be told apart from the tokenizer's handling of spaces."""


def _tokenizer_of(llm_or_tokenizer: Any) -> Any:
    """The tokenizer to split words with: a model's tokenizer that adds no prefix space if it has one."""
    if not hasattr(llm_or_tokenizer, "tokenizer"):
        return llm_or_tokenizer
    try:
        prefix_free = getattr(llm_or_tokenizer, "add_prefix_false_tokenizer", None)
    except Exception as error:
        logger.warning(f"Error getting model.add_prefix_false_tokenizer, using model.tokenizer instead:\n{error}")
        prefix_free = None
    return prefix_free or llm_or_tokenizer.tokenizer


def _first_token_after_pear(tokenizer: Any, word: str) -> int | None:
    pear = tokenizer(PEAR, add_special_tokens=False).input_ids
    tokens = tokenizer(PEAR + word, add_special_tokens=False).input_ids
    if tokens[: len(pear)] != pear:
        raise TokenizationError(f"{PEAR!r} + {word!r} does not start with the tokens of {PEAR!r}; cannot read the first token of {word!r}.")
    return tokens[len(pear)] if len(tokens) > len(pear) else None


def get_first_tokens(
    words: str | list[str],
    llm_or_tokenizer: Any,
    use_hacky_implementation: bool = False,
) -> list[int]:
    """The first token of each word written ``"word"`` and ``" word"``, deduplicated in first-seen order.

    ``llm_or_tokenizer`` is a model (its tokenizer is used, one that adds no prefix space where the model
    offers it) or a tokenizer. When a tokenizer writes ``"word"`` as ``" word"`` (it adds a prefix space),
    the spelling without the space is read after a ``"🍐"`` prefix instead; ``use_hacky_implementation``
    always does so. ``TokenizationError`` when neither works.
    """
    tokenizer = _tokenizer_of(llm_or_tokenizer)
    space = tokenizer(" ", add_special_tokens=False).input_ids
    space_token = space[0] if space else None
    tokens: list[int] = []
    for word in [words] if isinstance(words, str) else words:
        spaced = tokenizer(" " + word, add_special_tokens=False).input_ids[0]
        if use_hacky_implementation:
            plain = _first_token_after_pear(tokenizer, word)
        else:
            plain = tokenizer(word, add_special_tokens=False).input_ids[0]
            if plain == spaced and not word.startswith(" "):
                plain = _first_token_after_pear(tokenizer, word)
                logger.warning(
                    "The tokenizer adds a prefix space (initialize it with add_prefix_space=False): the first "
                    f"token of {word!r} without a space was read after a {PEAR!r} prefix."
                )
        if plain is not None:
            tokens.append(plain)
        if spaced != space_token:
            tokens.append(spaced)
    return list(dict.fromkeys(tokens))


@dataclass
class Prompt:
    """A prompt and the tokens to track in its next-token prediction: ``target_tokens`` maps each target
    name to token ids whose probabilities are summed; ``target_strings`` keeps the words they came from."""

    prompt: str
    target_tokens: dict[str, list[int]]
    target_strings: dict[str, str | list[str]] | None = None

    @classmethod
    def from_strings(
        cls,
        prompt: str,
        target_strings: dict[str, str | list[str]] | list[str] | str,
        tokenizer: Any,
    ) -> "Prompt":
        """Targets given as words (their first tokens, with and without a leading space; see
        :func:`get_first_tokens`); a bare word or list of words is the target ``"target"``.
        ``tokenizer`` may also be a model."""
        if isinstance(target_strings, (str, list)):
            target_strings = {"target": target_strings}
        target_tokens = {target: get_first_tokens(words, tokenizer) for target, words in target_strings.items()}
        return cls(prompt=prompt, target_tokens=target_tokens, target_strings=target_strings)

    @classmethod
    def from_words(cls, prompt: str, targets: dict[str, str | list[str]], tokenizer: Any) -> "Prompt":
        """Same as :meth:`from_strings`."""
        return cls.from_strings(prompt, targets, tokenizer)

    def has_no_collisions(self, ignore_targets: None | str | list[str] = None) -> bool:
        """Whether no token belongs to two targets (targets in ``ignore_targets`` left out)."""
        ignored = {ignore_targets} if isinstance(ignore_targets, str) else set(ignore_targets or [])
        tokens = [token for target, ids in self.target_tokens.items() if target not in ignored for token in ids]
        return len(tokens) == len(set(tokens))

    def get_target_probs(self, probs: torch.Tensor, layer: int | None = None) -> dict[str, torch.Tensor]:
        """``probs`` ``[batch, layers, vocab]`` summed over each target's tokens: ``{target: [batch, layers]}``
        (``[batch]`` when ``layer`` is given), on CPU."""
        if probs.ndim != 3:
            raise ValueError(f"probs must be [batch, layers, vocab], got shape {tuple(probs.shape)}.")
        target_probs = {target: probs[:, :, tokens].sum(dim=2).cpu() for target, tokens in self.target_tokens.items()}
        if layer is not None:
            target_probs = {target: values[:, layer] for target, values in target_probs.items()}
        return target_probs

    @torch.no_grad()
    def run(self, nn_model: Any, get_probs: Callable[[Any, str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``get_probs(nn_model, self.prompt)`` (``[1, layers, vocab]``, e.g. ``logit_lens``) per target."""
        return self.get_target_probs(get_probs(nn_model, self.prompt))


def next_token_probs_unsqueeze(
    nn_model: Any, prompt: str | list[str], remote: bool = False, intervention: Callable[[Any], None] | None = None, **_kwargs: Any
) -> torch.Tensor:
    """Next-token probabilities with a layer axis of size 1: ``[num_prompts, 1, vocab]``."""
    return compute_next_token_probs(nn_model, prompt, remote=remote, intervention=intervention).unsqueeze(1)


@torch.no_grad()
def run_prompts(
    nn_model: Any,
    prompts: Sequence[Prompt],
    batch_size: int = 32,
    get_probs_func: Callable | None = None,
    func_kwargs: dict | None = None,
    remote: bool = False,
    tqdm: Callable | None = auto_tqdm,
    intervention: Callable[[Any], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The probability of each target for each prompt: ``{target: [num_prompts, num_layers]}`` on CPU.

    ``get_probs_func(nn_model, prompts, remote=..., **func_kwargs)`` gives ``[batch, layers, vocab]`` per
    batch of ``batch_size`` prompts; the default is the next-token distribution (one layer). All prompts
    must have the same target names. ``intervention(model)`` (default probabilities only) runs inside each
    trace before the probabilities are read, e.g. ``lambda m: m.steer(...)``. ``tqdm=None`` hides the bar.
    On vLLM each batch is one trace with one request per prompt.
    """
    prompts = list(prompts)
    if not prompts:
        return {}
    keys = set(prompts[0].target_tokens)
    for prompt in prompts:
        if set(prompt.target_tokens) != keys:
            raise ValueError(f"All prompts must have the same target keys. Got {keys} and {set(prompt.target_tokens)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if intervention is not None and get_probs_func is not None:
        raise ValueError("intervention= applies to the default next-token probabilities; with your own "
                         "get_probs_func, run the intervention inside it.")
    func_kwargs = func_kwargs or {}
    starts = range(0, len(prompts), batch_size)
    batches = []
    for start in with_progress(tqdm, starts, "Running prompts"):
        texts = [prompt.prompt for prompt in prompts[start:start + batch_size]]
        if get_probs_func is None:
            batches.append(next_token_probs_unsqueeze(nn_model, texts, remote=remote, intervention=intervention))
        else:
            batches.append(get_probs_func(nn_model, texts, remote=remote, **func_kwargs))
    probs = torch.cat(batches)
    return {
        target: torch.stack([probs[i, :, prompt.target_tokens[target]].sum(dim=-1) for i, prompt in enumerate(prompts)]).cpu()
        for target in prompts[0].target_tokens
    }


__all__ = [
    "Prompt",
    "TokenizationError",
    "get_first_tokens",
    "next_token_probs_unsqueeze",
    "run_prompts",
]
