"""Same as :mod:`nnterp.prompt_utils` (prompts with target tokens, run in batches)."""

from .prompt_utils import Prompt, TokenizationError, get_first_tokens, next_token_probs_unsqueeze, run_prompts

__all__ = ["Prompt", "TokenizationError", "get_first_tokens", "next_token_probs_unsqueeze", "run_prompts"]
