"""Where each request sits in one engine step's flat batch, read off vLLM's scheduler output (shared by
extraction and served requests, which both arm hooks on their requests' rows)."""

from __future__ import annotations

from typing import Any, Iterator


def request_extra(data: Any, key: str) -> Any:
    """``extra_args[key]`` of a newly scheduled request's sampling parameters (None when absent)."""
    return (getattr(data.sampling_params, "extra_args", None) or {}).get(key)


def scheduled_rows(scheduler_output: Any, batch_order: list[str], request_states: dict) -> Iterator[tuple[str, int, int, int]]:
    """``(request id, first row, row count, position of its first token)`` for each request this step runs, in
    ``batch_order`` (the order of the forward pass's rows)."""
    tokens = scheduler_output.num_scheduled_tokens
    start = 0
    for request_id in batch_order:
        count = tokens.get(request_id)
        if count is None:
            continue
        yield request_id, start, count, request_states[request_id].num_computed_tokens
        start += count
