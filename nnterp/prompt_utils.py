"""nnterp 1.x's ``nnterp.prompt_utils``: prompts with target tokens (defined in :mod:`nnterp.prompts`)."""

from .prompts import Prompt, TokenizationError, get_first_tokens, next_token_probs_unsqueeze, run_prompts

__all__ = ["Prompt", "TokenizationError", "get_first_tokens", "next_token_probs_unsqueeze", "run_prompts"]
