"""Token-id helpers shared by every greedy decoding: end-of-sequence ids as a list, and cutting at the first."""

from __future__ import annotations


def token_id_list(token_ids: int | list[int] | None) -> list[int]:
    """A config's ``eos_token_id`` (one id, a list, or None) as a list."""
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def until_eos(tokens: list[int], eos: set[int] | list[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence id."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens
